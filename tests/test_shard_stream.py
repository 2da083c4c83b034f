"""WebDataset shards: write → stream round trips (local and the loopback S3 server), 2 ranks × 2 workers in real
processes, exact resume, skip, bad data."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import fsspec
import numpy as np
import pytest
import torch
import webdataset as wds

from meanflow.data_pipeline.errors import DataUnreadable, ShardUnreadable
from meanflow.data_pipeline.manifest import ManifestError, read_manifest
from meanflow.data_pipeline.shard_plan import ShardPlan, SlotPosition
from meanflow.data_pipeline.shard_reader import ShardReader
from meanflow.data_pipeline.shard_writer import write_shards
from meanflow.data_pipeline.sources import open_source
from meanflow.data_pipeline.webdataset_stream import DataUnusable, ShardStream, merge_stream_states

pytestmark = pytest.mark.timeout(120)
STREAM_RANK = Path(__file__).with_name("stream_rank.py")
WORLD, WORKERS = 2, 2


def write_digits(url: str, samples_per_shard: int = 60) -> dict:
    return write_shards(open_source("digits"), url, samples_per_shard=samples_per_shard, show_progress=False)


@pytest.fixture(params=["local", "s3"])
def digits_url(request, tmp_path):
    """1437 digits in 24 shards of 60, on local disk or in a bucket of the loopback S3 server."""
    url = str(tmp_path / "digits") if request.param == "local" else \
        request.getfixturevalue("s3_bucket") + "/digits"
    write_digits(url)
    return url


def run_ranks(url: str, global_batch: int, batches: int, tmp_path: Path, tag: str, states=None) -> list[dict]:
    """Run WORLD real processes, one per rank, each streaming ``batches`` local batches with 2 workers."""
    procs, outs = [], []
    for rank in range(WORLD):
        out = tmp_path / f"{tag}-rank{rank}.json"
        args = [sys.executable, str(STREAM_RANK), url, str(rank), str(WORLD), str(global_batch), str(batches),
                str(out)]
        if states is not None:
            state_file = tmp_path / f"{tag}-state{rank}.json"
            state_file.write_text(json.dumps(states[rank]))
            args.append(str(state_file))
        procs.append(subprocess.Popen(args, stderr=subprocess.PIPE, text=True))
        outs.append(out)
    for p in procs:
        _, err = p.communicate(timeout=100)
        assert p.returncode == 0, err[-3000:]
    return [json.loads(o.read_text()) for o in outs]


# ------------------------------------------------------------------------------------------------ plan
def test_every_shard_goes_to_exactly_one_slot_per_epoch():
    plan = ShardPlan([5] * 10, num_slots=4, seed=0, block=3)
    for epoch in range(3):
        dealt = sorted(s for slot in range(4) for s in plan.slot_shards(epoch, slot))
        assert dealt == list(range(10))
    assert plan.shard_order(0) != plan.shard_order(1)   # reshuffled every epoch


def test_advance_rolls_over_epoch_ends():
    plan = ShardPlan([3, 4, 5, 6], num_slots=2, seed=1, block=2)
    length0 = plan.slot_length(0, 1)
    assert plan.advance(SlotPosition(0, 0), 1, length0 + 1) == SlotPosition(1, 1)
    assert plan.locate(0, 1, length0 - 1)[0] == len(plan.slot_shards(0, 1)) - 1


def test_fewer_shards_than_reader_slots_is_an_error():
    with pytest.raises(ValueError, match="3 shard.*4 reader slots"):
        ShardPlan([10, 10, 10], num_slots=4, seed=0, block=8)


# ------------------------------------------------------------------------------------------------ round trip
def test_two_ranks_two_workers_see_every_sample_once_per_epoch(digits_url, tmp_path):
    manifest = read_manifest(digits_url)
    global_batch, batches = 16, 180     # 8 samples per local batch: 720 per worker ≥ two epochs of any slot (≤ 360)
    results = run_ranks(digits_url, global_batch, batches, tmp_path, "full")
    plan = ShardPlan([s["count"] for s in manifest["shards"]], WORLD * WORKERS, seed=3, block=16)
    epochs = [[], []]
    for rank, result in enumerate(results):
        for worker in range(WORKERS):   # the DataLoader serves its workers' batches round-robin
            slot = rank * WORKERS + worker
            seq = [i for b in result["indices"][worker::WORKERS] for i in b]
            first, second = plan.slot_length(0, slot), plan.slot_length(1, slot)
            epochs[0] += seq[:first]
            epochs[1] += seq[first:first + second]
    for epoch in epochs:
        assert sorted(epoch) == list(range(manifest["total"]))


def test_resumed_stream_yields_exactly_the_uninterrupted_samples(digits_url, tmp_path):
    # Stop at an odd batch, mid-block and mid-shard; the tail crosses every slot's epoch end (400 > 360 records).
    global_batch, total, first = 16, 100, 23
    full = run_ranks(digits_url, global_batch, total, tmp_path, "full")
    head = run_ranks(digits_url, global_batch, first, tmp_path, "head")
    tail = run_ranks(digits_url, global_batch, total - first, tmp_path, "tail", states=[h["state"] for h in head])
    for f, h, t in zip(full, head, tail):
        assert h["indices"] + t["indices"] == f["indices"]
        assert h["x_sums"] + t["x_sums"] == f["x_sums"]
        assert t["state"] == f["state"]


def test_skip_lands_where_reading_would(tmp_path):
    url = str(tmp_path / "digits")
    write_digits(url)
    read = ShardStream(url, global_batch=16, seed=5, num_workers=2, shuffle_block=16)
    skipped = ShardStream(url, global_batch=16, seed=5, num_workers=2, shuffle_block=16)
    for _ in range(97):   # an odd number of batches, past both readers' epoch ends (~720 records each)
        read.next_batch()
    skipped.skip(97 * 16)
    assert read.state_dict() == skipped.state_dict()
    for _ in range(3):
        a, b = read.next_batch(), skipped.next_batch()
        assert torch.equal(a["index"], b["index"]) and torch.equal(a["x"], b["x"])
    with pytest.raises(ValueError, match="multiple of the global batch"):
        skipped.skip(10)
    read.close()
    skipped.close()


def test_changing_world_size_on_resume_continues_from_the_same_progress(tmp_path):
    url = str(tmp_path / "digits")
    write_digits(url)
    ranks = [ShardStream(url, global_batch=16, seed=5, rank=r, world_size=2, num_workers=0, shuffle_block=16)
             for r in range(2)]
    for _ in range(40):
        for stream in ranks:
            stream.next_batch()
    state = merge_stream_states([stream.state_dict() for stream in ranks])
    assert sorted(state["slots"]) == ["0", "1"]
    exact = ShardStream(url, global_batch=16, seed=5, rank=1, world_size=2, num_workers=0, shuffle_block=16)
    assert exact.load_state_dict(state) == "exact"
    assert torch.equal(exact.next_batch()["index"], ranks[1].next_batch()["index"])
    single = ShardStream(url, global_batch=16, seed=5, num_workers=0, shuffle_block=16)
    assert single.load_state_dict(state) == "approximate"
    assert single.state_dict()["progress"] == pytest.approx(state["progress"], abs=0.01)


def test_resume_refuses_other_shards_or_seed(tmp_path):
    url = str(tmp_path / "digits")
    write_digits(url)
    state = ShardStream(url, global_batch=16, seed=5, num_workers=0).state_dict()
    with pytest.raises(ValueError, match="seed"):
        ShardStream(url, global_batch=16, seed=6, num_workers=0).load_state_dict(state)
    other = str(tmp_path / "other")
    write_digits(other, samples_per_shard=50)
    with pytest.raises(ValueError, match="fingerprint"):
        ShardStream(other, global_batch=16, seed=5, num_workers=0).load_state_dict(state)


# ------------------------------------------------------------------------------------------------ bad data
def rewrite_shard(url: str, count: int, edit) -> None:
    """Re-pack one shard of ``count`` records with ``edit(list of raw records)`` applied."""
    records = list(ShardReader([url]).shard_records(0, 0, count))
    buf = io.BytesIO()
    with wds.TarWriter(buf, encoder=False) as tar:
        for r in edit(records):
            tar.write({k: v for k, v in r.items() if k == "__key__" or not k.startswith("__")})
    with fsspec.open(url, "wb") as f:
        f.write(buf.getvalue())


def test_corrupt_sample_is_skipped_and_counted(tmp_path):
    url = str(tmp_path / "digits")
    write_digits(url)

    def corrupt_one(records):
        records[5]["npy"] = b"not an npy file"
        return records

    rewrite_shard(f"{url}/train-000002.tar", 60, corrupt_one)
    stream = ShardStream(url, global_batch=100, seed=0, num_workers=0, shuffle_block=64)
    seen = [i for _ in range(15) for i in stream.next_batch()["index"].tolist()]
    assert 125 not in seen and len(set(seen[:1436])) == 1436   # 2·60 + 5: every other sample of the epoch came
    assert stream.metrics()["data/skipped"] == 1


def test_truncated_shard_loses_only_its_tail(tmp_path):
    url = str(tmp_path / "digits")
    write_digits(url)
    path = tmp_path / "digits" / "train-000001.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    stream = ShardStream(url, global_batch=100, seed=0, num_workers=0, shuffle_block=64)
    seen = {i for _ in range(15) for i in stream.next_batch()["index"].tolist()}
    lost = stream.metrics()["data/skipped"]
    assert 20 < lost < 40                                   # about half of shard 1's 60 records
    assert set(range(60)) <= seen and set(range(120, 1437)) <= seen


def test_missing_shard_fails_fast_naming_the_url(tmp_path, s3_bucket):
    url = s3_bucket + "/digits"
    write_digits(url)
    fsspec.filesystem("s3").rm(f"{url}/train-000007.tar")
    with pytest.raises(FileNotFoundError, match="train-000007.tar"):
        ShardStream(url, global_batch=16, seed=0)
    with pytest.raises(ManifestError, match=r"76 shard\(s\) not in .*manifest.json, e.g. .*train-000024.tar"):
        ShardStream(url + "/train-{000000..000099}.tar", global_batch=16, seed=0)


def test_shard_vanishing_while_training_names_the_url(tmp_path):
    url = str(tmp_path / "digits")
    write_digits(url)
    stream = ShardStream(url, global_batch=16, seed=0, num_workers=0, shuffle_block=16)
    for shard in (tmp_path / "digits").glob("train-*.tar"):
        shard.unlink()
    with pytest.raises(ShardUnreadable, match=r"train-\d{6}\.tar"):
        stream.next_batch()


def test_missing_manifest_and_empty_shard_list_are_errors(tmp_path):
    with pytest.raises(ManifestError, match="manifest.json"):
        ShardStream(str(tmp_path / "nothing"), global_batch=16, seed=0)
    root = tmp_path / "empty"
    root.mkdir()
    (root / "manifest.json").write_text(json.dumps({"format": 1, "shards": [], "total": 0}))
    with pytest.raises(ManifestError, match="lists no shards"):
        ShardStream(str(root), global_batch=16, seed=0)


def test_a_manifest_that_is_not_json_is_an_error_naming_its_url(tmp_path):
    url = str(tmp_path / "digits")
    write_digits(url)
    (tmp_path / "digits" / "manifest.json").write_text('{"format": 1, "shards": ')   # cut short mid-write
    with pytest.raises(ManifestError, match=re.escape(f"{url}/manifest.json") + " is not valid JSON"):
        ShardStream(url, global_batch=16, seed=0)


def test_data_whose_every_shard_is_corrupt_is_unreadable_input(tmp_path):
    url = str(tmp_path / "digits")
    write_digits(url, samples_per_shard=400)   # 4 shards: 2 per reader slot (1 rank × 2 workers)
    for shard in (tmp_path / "digits").glob("train-*.tar"):
        shard.write_bytes(b"not a tar file\n" * 100)
    stream = ShardStream(url, global_batch=16, seed=0, num_workers=2)
    stream.reader.backoff_s = 0.01   # a corrupt tar's first error is retried once, as a dropped connection would be
    with pytest.raises(DataUnreadable, match=f"^data.url {re.escape(url)}: none of the 2 shard"):
        stream.next_batch()                   # raised in a DataLoader worker, re-raised here as the same class
    assert issubclass(DataUnreadable, ValueError)   # bad input (exit 2), not a storage outage (ShardUnreadable)


class FlakyFile:
    """Raises ConnectionResetError once ``fail_after`` bytes have been read: a connection dropped mid-body."""

    def __init__(self, f, fail_after: int):
        self.f, self.left = f, fail_after

    def read(self, n=-1):
        if self.left <= 0:
            raise ConnectionResetError("connection reset by peer (injected, mid-read)")
        data = self.f.read(n if n >= 0 else self.left)
        self.left -= len(data)
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


class FlakyFilesystem:
    """Fault injection (a real S3 server cannot be made to drop connections on cue): the first ``open_failures``
    opens raise ConnectionResetError, and the next ``read_failures`` opened files break after ``fail_after`` bytes;
    then the real filesystem answers."""

    def __init__(self, fs, open_failures: int = 0, read_failures: int = 0, fail_after: int = 20_000):
        self.fs, self.open_failures, self.read_failures, self.fail_after = fs, open_failures, read_failures, fail_after

    def open(self, path, mode="rb"):
        if self.open_failures:
            self.open_failures -= 1
            raise ConnectionResetError("connection reset by peer (injected)")
        if self.read_failures:
            self.read_failures -= 1
            return FlakyFile(self.fs.open(path, mode), self.fail_after)
        return self.fs.open(path, mode)


def test_transient_errors_are_retried_with_backoff(tmp_path):
    url = str(tmp_path / "digits")
    write_digits(url)
    clean = list(ShardReader([f"{url}/train-000000.tar"]).shard_records(0, 0, 60))
    reader = ShardReader([f"{url}/train-000000.tar"], retries=3, backoff_s=0.01)
    reader._fs = FlakyFilesystem(fsspec.filesystem("file"), open_failures=2, read_failures=2)
    reader._fs_pid = os.getpid()
    records = list(reader.shard_records(0, 0, 60))
    assert reader.transient_errors == 4
    assert [r["__key__"] for r in records] == [r["__key__"] for r in clean]   # none lost, none repeated
    assert all(r["npy"] == c["npy"] for r, c in zip(records, clean))
    reader._fs = FlakyFilesystem(fsspec.filesystem("file"), open_failures=9)
    with pytest.raises(ShardUnreadable, match="giving up after 3 retries"):
        list(reader.shard_records(0, 0, 60))


def test_a_reader_with_nothing_decodable_fails_instead_of_spinning(tmp_path):
    url = tmp_path / "digits"
    write_digits(str(url))
    manifest = json.loads((url / "manifest.json").read_text())
    (url / "manifest.json").write_text(json.dumps({**manifest, "sample_shape": [1, 9, 9]}))
    stream = ShardStream(str(url), global_batch=16, seed=0, num_workers=0)
    with pytest.raises(DataUnusable, match=r"no record of its \d+ in epoch 0 decodes.*shape \(1, 8, 8\)"):
        stream.next_batch()


# ------------------------------------------------------------------------------------------------ writer
def test_writer_ranks_never_collide_and_the_last_writes_the_manifest(s3_bucket):
    url = s3_bucket + "/ranked"
    source = open_source("digits")
    assert write_shards(source, url, samples_per_shard=100, rank=1, world_size=2, show_progress=False) is None
    fs = fsspec.filesystem("s3")
    assert not fs.exists(f"{url}/manifest.json")
    manifest = write_shards(source, url, samples_per_shard=100, rank=0, world_size=2, show_progress=False)
    assert [s["first_index"] for s in manifest["shards"]] == list(range(0, 1437, 100))
    assert manifest["total"] == 1437 and manifest == read_manifest(url)
    stream = ShardStream(url, global_batch=1437, seed=0, num_workers=0)
    assert sorted(stream.next_batch()["index"].tolist()) == list(range(1437))


def test_a_rewrite_ignores_parts_left_by_an_earlier_write(tmp_path):
    url = str(tmp_path / "rewritten")
    source = open_source("digits")
    write_shards(source, url, samples_per_shard=100, show_progress=False)              # world size 1
    assert write_shards(source, url, samples_per_shard=100, rank=1, world_size=2, show_progress=False) is None
    assert not (tmp_path / "rewritten" / "manifest.json").exists()   # withdrawn: the set is being rewritten
    manifest = write_shards(source, url, samples_per_shard=100, rank=0, world_size=2, show_progress=False)
    assert [s["first_index"] for s in manifest["shards"]] == list(range(0, 1437, 100))


def test_writer_shuffles_grouped_sources_into_mixed_shards(tmp_path):
    x = np.zeros((400, 2), dtype=np.float32)
    y = np.repeat(np.arange(4), 100)                                   # sorted by class, like an image folder
    np.savez(tmp_path / "sorted.npz", x=x, y=y)
    write_shards(open_source(f"npz:{tmp_path / 'sorted.npz'}"), str(tmp_path / "mixed"), samples_per_shard=50,
                 show_progress=False)
    first_shard = ShardStream(str(tmp_path / "mixed"), global_batch=50, seed=0, num_workers=0, shuffle_block=50)
    assert len(set(first_shard.next_batch()["y"].tolist())) == 4


def test_image_folder_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = {}
    for c, name in enumerate(["cat", "dog"]):
        (tmp_path / "folder" / name).mkdir(parents=True)
        for k in range(3):
            arr = rng.integers(0, 256, size=(12, 12, 3), dtype=np.uint8)
            from PIL import Image
            Image.fromarray(arr).save(tmp_path / "folder" / name / f"{k}.png")
            images[(c, k)] = arr
    source = open_source(f"imagefolder:{tmp_path / 'folder'}", image_size=12)
    manifest = write_shards(source, str(tmp_path / "shards"), samples_per_shard=2, show_progress=False)
    assert manifest["class_names"] == ["cat", "dog"] and manifest["sample_shape"] == [3, 12, 12]
    batch = ShardStream(str(tmp_path / "shards"), global_batch=6, seed=0, num_workers=0).next_batch()
    found = set()
    for x, y in zip(batch["x"], batch["y"]):
        matches = [k for (c, k), arr in images.items()
                   if c == int(y) and torch.equal(x, torch.from_numpy(arr).permute(2, 0, 1).float() / 127.5 - 1)]
        assert len(matches) == 1
        found.add((int(y), matches[0]))
    assert found == set(images)
