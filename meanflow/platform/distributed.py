"""Who am I in the job: resolve the distributed environment loudly, then start torch.distributed.

Order (as dinov2 does it): a preset torchrun-style environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
MASTER_PORT — submitit's ``TorchDistributedEnvironment().export()`` writes exactly these under SLURM), then a
single process. A half-set environment is an error, not a silent single-process run.
"""

from __future__ import annotations

import datetime
import os
import socket
import threading
import zlib
from dataclasses import dataclass
from typing import Callable, TypeVar

import torch
import torch.distributed as dist

TORCHRUN_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
T = TypeVar("T")


class DistributedEnvError(RuntimeError):
    pass


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_env(environ=None) -> DistEnv:
    environ = os.environ if environ is None else environ
    present = [k for k in TORCHRUN_KEYS if k in environ]
    if not present:
        return DistEnv()
    if len(present) != len(TORCHRUN_KEYS):
        missing = [k for k in TORCHRUN_KEYS if k not in environ]
        raise DistributedEnvError(f"distributed environment half set: {present} present, {missing} missing")
    env = DistEnv(int(environ["RANK"]), int(environ["WORLD_SIZE"]), int(environ["LOCAL_RANK"]))
    if not 0 <= env.rank < env.world_size:
        raise DistributedEnvError(f"RANK={env.rank} outside WORLD_SIZE={env.world_size}")
    return env


# A rank left waiting in a collective holds every node of its job until the wall-time limit: NCCL's watchdog must
# tear it down when a collective times out (torch's default, 3); 0 and 2 leave it waiting.
NCCL_TEARDOWN = ("TORCH_NCCL_ASYNC_ERROR_HANDLING", ("1", "3"), "3")


def collective_variables(network_interface: str | None, environ) -> dict[str, str]:
    """The variables a task sets before its process group starts: the interface NCCL and gloo use
    (``cluster.network_interface``), and NCCL's teardown on a timed-out collective where the site's environment
    turned it off (said in the task's log)."""
    out = {}
    if network_interface:
        out.update(NCCL_SOCKET_IFNAME=network_interface, GLOO_SOCKET_IFNAME=network_interface)
    key, tearing_down, default = NCCL_TEARDOWN
    if environ.get(key, default) not in tearing_down:
        print(f"{key}={environ[key]} would leave a rank waiting on a timed-out collective; set to {default}",
              flush=True)
        out[key] = default
    return out


# Linux hands out client ports from 32768 up (ip_local_port_range): a listening port there collides, now and then,
# with some process's open connection to the object store (EADDRINUSE when the TCPStore starts). Below it, only
# other listeners can.
MASTER_PORTS = range(15000, 32000)


def job_master_port(job_id: str, restart: int) -> int:
    """The rendezvous port every task of one job instance derives alike (submitit's own draw spans 20000-60000):
    below the ephemeral range, and another one for each requeued instance of the job, whose predecessor's
    sockets may still linger."""
    return MASTER_PORTS[zlib.crc32(f"{job_id}/{restart}".encode()) % len(MASTER_PORTS)]


def describe_task(environ) -> str:
    """One log line: who this task is and whom it will meet (MASTER_ADDR), on which host."""
    return (f"task: rank {environ.get('RANK', 0)} of {environ.get('WORLD_SIZE', 1)}, local rank "
            f"{environ.get('LOCAL_RANK', 0)} on host {socket.gethostname()}, master "
            f"{environ.get('MASTER_ADDR', '-')}:{environ.get('MASTER_PORT', '-')}")


def task_device(requested: str, local_rank: int) -> torch.device:
    """The device of this task: ``auto`` is the GPU when one is visible. On GPUs, one task per GPU: task
    LOCAL_RANK uses GPU LOCAL_RANK of its node."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested != "cuda":
        return torch.device(requested)
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if local_rank >= visible:
        raise DistributedEnvError(f"LOCAL_RANK={local_rank} but this node shows {visible} GPU(s): one task per GPU "
                                  "(cluster.gpus_per_node sets both the GPUs and the tasks of a node)")
    return torch.device("cuda", local_rank)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_group_backend(device: torch.device) -> str:
    """The default group's backend for a task on ``device``. On GPU, NCCL serves CUDA tensors and gloo CPU ones:
    an NCCL-only group refuses CPU tensors ("No backend type associated with device type cpu"), and the
    evaluation all-reduces its float64 feature sums on the CPU."""
    return "cpu:gloo,cuda:nccl" if device.type == "cuda" else "gloo"


def init_distributed(env: DistEnv, device: torch.device, timeout_s: float, required: bool = False) -> None:
    """Start the default process group (``process_group_backend``: NCCL and gloo on GPU, gloo on CPU) with a
    bounded timeout, so a lost peer fails the job in ``timeout_s`` instead of gloo's default 30 minutes.
    ``required``: sharded engines need a group even alone (a one-process group on a loopback port when no launcher
    set the environment)."""
    if dist.is_initialized() or not (env.distributed or required):
        return
    backend = process_group_backend(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=timeout_s)
    if env.distributed or "MASTER_ADDR" in os.environ:
        dist.init_process_group(backend, rank=env.rank, world_size=env.world_size, timeout=timeout)
    else:
        dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1,
                                timeout=timeout)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a tensor (one collective for a whole stats vector)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
        values /= dist.get_world_size()
    return values


def all_gather_objects(obj, group=None):
    """Every rank's ``obj`` (small, picklable: data-stream positions, RNG states), in rank order."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier(group=None) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier(group=group)


def new_group_like_world(timeout_s: float):
    """A second gloo group over all ranks with its own timeout, for the checkpoint save path: its collectives may
    run in a background thread, never interleaved with training's on the default group."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        return dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=timeout_s))
    return None


class PeerFailed(RuntimeError):
    """Another rank's share of a ``finish_together`` failed (its own log says why)."""


def finish_together(work: Callable[[], T], group, poll_s: float) -> T:
    """``work()`` on every rank of ``group``; returns once every rank's work has finished. Meanwhile the ranks meet
    every ``poll_s`` in a small collective of ``group``, each bounded by the group's timeout: one rank's long work
    (an upload retried through a storage outage) keeps the others waiting as long as it takes, while a lost or
    partitioned rank fails them within that timeout. A rank whose work raised re-raises it; the others raise
    PeerFailed naming it. ``poll_s`` must be well under the group's timeout."""
    if not (dist.is_initialized() and dist.get_world_size(group) > 1):
        return work()
    outcome: dict = {}

    def run() -> None:
        try:
            outcome["value"] = work()
        except BaseException as err:   # re-raised in the caller's thread
            outcome["error"] = err

    worker = threading.Thread(target=run, daemon=True, name="finish-together")
    worker.start()
    while True:
        worker.join(poll_s)
        # (still working, 1 + the rank whose work failed): MAX over ranks
        flags = torch.tensor([float(worker.is_alive()), 0.0 if "error" not in outcome else 1.0 + dist.get_rank()])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=group)
        if flags[0] == 0:
            break
    if "error" in outcome:
        raise outcome["error"]
    if flags[1] > 0:
        raise PeerFailed(f"rank {int(flags[1]) - 1} failed (see its log)")
    return outcome["value"]
