"""Collectives of platform.distributed on real gloo process groups (two spawned processes)."""

from __future__ import annotations

import datetime
import json
import os
import time

import pytest
import torch.multiprocessing as mp

from s3_server import free_port

pytestmark = pytest.mark.timeout(120)

GROUP_TIMEOUT_S = 1.0


def _finish_together_rank(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from meanflow.platform.distributed import PeerFailed, finish_together, new_group_like_world

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2,
                            timeout=datetime.timedelta(seconds=30))
    group = new_group_like_world(GROUP_TIMEOUT_S)
    seen = {}
    started = time.monotonic()   # rank 1 works 3 group timeouts long (an upload retried through an outage)
    seen["result"] = finish_together(lambda: time.sleep(3 * GROUP_TIMEOUT_S if rank else 0) or rank, group, 0.2)
    seen["waited_s"] = time.monotonic() - started
    try:
        finish_together(lambda: 1 / rank, group, 0.2)   # rank 0's work fails
    except (ZeroDivisionError, PeerFailed) as err:
        seen["failure"] = f"{type(err).__name__}: {err}"
    if rank == 1:                # gone silent, as behind a network partition: it never meets rank 0 again
        time.sleep(4 * GROUP_TIMEOUT_S)
    else:
        started = time.monotonic()
        try:
            finish_together(lambda: None, group, 0.2)
        except RuntimeError as err:
            seen["silent_peer"] = [type(err).__name__, time.monotonic() - started]
    with open(f"{out}/{rank}.json", "w") as f:
        json.dump(seen, f)
    os._exit(0)   # a broken group: no teardown


def test_finish_together_outwaits_a_slow_peer_and_fails_within_the_timeout_on_a_silent_one(tmp_path):
    mp.start_processes(_finish_together_rank, args=(free_port(), str(tmp_path)), nprocs=2, start_method="spawn")
    zero, one = (json.loads((tmp_path / f"{rank}.json").read_text()) for rank in (0, 1))
    assert (zero["result"], one["result"]) == (0, 1)                       # each its own work's result
    assert zero["waited_s"] >= 3 * GROUP_TIMEOUT_S                          # waited out the slow peer
    assert zero["failure"].startswith("ZeroDivisionError") and one["failure"] == "PeerFailed: rank 0 failed (see " \
                                                                                  "its log)"
    assert zero["silent_peer"][1] < 3 * GROUP_TIMEOUT_S                     # not the slow peer's allowance
