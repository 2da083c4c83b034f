"""The default process group of a GPU task serves CPU tensors too: the evaluation all-reduces its float64 feature
sums on the CPU, and an NCCL-only group refuses them ("No backend type associated with device type cpu"). NCCL
needs GPUs, so the two-process test starts the GPU task's group with gloo in NCCL's place: which devices the group
serves, what the backend string decides, is what is tested."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.distributed_c10d import Backend, BackendConfig

from meanflow.platform.distributed import process_group_backend
from s3_server import free_port

pytestmark = pytest.mark.timeout(180)

NUM_SAMPLES, DIM, CLASSES, SPLITS = 301, 8, 5, 4


def device_backends(backend: str) -> dict[str, str]:
    """Device type -> backend, as torch reads a backend string ("nccl" alone serves cuda only)."""
    return {device: str(name) for device, name in BackendConfig(Backend(backend)).get_device_backend_map().items()}


def test_a_gpu_task_gets_nccl_for_cuda_tensors_and_gloo_for_cpu_tensors():
    assert device_backends(process_group_backend(torch.device("cuda", 3))) == {"cpu": "gloo", "cuda": "nccl"}
    assert process_group_backend(torch.device("cpu")) == "gloo"


def evaluation_sums(rank: int, world: int):
    """The evaluation's reductions (feature moments, IS sums, class-accuracy counts, the grid's objects) over this
    rank's share of a fixed feature set: rows i ≡ rank mod world."""
    from meanflow.evaluation.feature_stats import FeatureMoments, InceptionScoreSums, all_reduce_sum
    from meanflow.platform.distributed import all_gather_objects

    g = torch.Generator().manual_seed(0)
    feats, logits = torch.randn(NUM_SAMPLES, DIM, generator=g), torch.randn(NUM_SAMPLES, CLASSES, generator=g)
    mine = torch.arange(rank, NUM_SAMPLES, world)
    moments, scores = FeatureMoments(DIM), InceptionScoreSums(CLASSES, NUM_SAMPLES, splits=SPLITS)
    moments.add(feats[mine])
    scores.add(logits[mine], mine)
    counts = all_reduce_sum(torch.tensor([float(len(mine)), 1.0], dtype=torch.float64))
    moments.all_reduce()
    scores.all_reduce()
    firsts = sorted(all_gather_objects(int(mine[0])))
    mu, sigma = moments.mean_cov()
    return {"mu": mu.tolist(), "sigma": sigma.tolist(), "is": scores.score(), "counts": counts.tolist(),
            "firsts": firsts}


def _rank_main(rank: int, world: int, port: int, backend: str, out: str) -> None:
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    try:
        sums = evaluation_sums(rank, world)
        if rank == 0:
            Path(out).write_text(json.dumps(sums))
    finally:
        dist.destroy_process_group()


def test_the_evaluation_sums_reduce_over_two_ranks_on_a_gpu_tasks_group(tmp_path):
    gpu_group = device_backends(process_group_backend(torch.device("cuda", 0)))
    stand_in = ",".join(f"{device}:gloo" for device in gpu_group)   # NCCL's devices kept, gloo doing its work
    out = tmp_path / "two.json"
    mp.start_processes(_rank_main, args=(2, free_port(), stand_in, str(out)), nprocs=2, start_method="spawn",
                       join=True)
    two, one = json.loads(out.read_text()), evaluation_sums(0, 1)
    assert two["counts"] == [NUM_SAMPLES, 2.0] and two["firsts"] == [0, 1]
    torch.testing.assert_close(torch.tensor(two["mu"]), torch.tensor(one["mu"]), rtol=1e-13, atol=1e-15)
    torch.testing.assert_close(torch.tensor(two["sigma"]), torch.tensor(one["sigma"]), rtol=1e-12, atol=1e-14)
    assert two["is"] == pytest.approx(one["is"], rel=1e-12)
