"""One rank of a multi-process streaming test (run as its own process, as a trainer rank would be).

usage: python stream_rank.py URL RANK WORLD GLOBAL_BATCH BATCHES OUT_JSON [STATE_IN_JSON]
Writes {"indices": [[...] per batch], "x_sums": [...], "state": state_dict, "metrics": {...}} to OUT_JSON.
"""

import json
import sys

import torch

from meanflow.data_pipeline.webdataset_stream import ShardStream


def main(url, rank, world, global_batch, batches, out, state_in=None):
    torch.set_num_threads(1)
    stream = ShardStream(url, global_batch=int(global_batch), seed=3, rank=int(rank), world_size=int(world),
                         num_workers=2, shuffle_block=16)
    if state_in:
        with open(state_in) as f:
            stream.load_state_dict(json.load(f))
    indices, x_sums = [], []
    for _ in range(int(batches)):
        batch = stream.next_batch()
        indices.append(batch["index"].tolist())
        x_sums.append(batch["x"].double().sum().item())
    result = {"indices": indices, "x_sums": x_sums, "state": stream.state_dict(), "metrics": stream.metrics()}
    stream.close()
    with open(out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
