"""What a task of a GPU job sets up before its first collective, without a GPU: the torchrun variables from SLURM's
(submitit), the collectives' variables (NCCL/gloo interface, NCCL's teardown on a timed-out collective), one task
per GPU (LOCAL_RANK → cuda:LOCAL_RANK), the NCCL backend (gloo beside it for CPU tensors). NCCL and CUDA cannot
run here: where a test needs them, torch.cuda and init_process_group are replaced, and the test says so."""

from __future__ import annotations

import datetime

import pytest
import torch
import torch.distributed as dist

from meanflow.jobs.job_callables import export_distributed_env
from meanflow.platform import distributed
from meanflow.platform.distributed import DistEnv, DistributedEnvError, collective_variables, init_distributed, \
    task_device

pytestmark = pytest.mark.timeout(60)

# task 11 of a 2-node × 8-GPU job, as srun sets it for that task (and submitit's sbatch script, the executor)
SLURM_TASK_11_OF_16 = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_JOB_NUM_NODES": "2", "SLURM_NODEID": "1",
                       "SLURM_JOB_NODELIST": "gpu-[07-08]", "SLURM_PROCID": "11", "SLURM_LOCALID": "3"}
TORCHRUN = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def slurm_task(monkeypatch):
    for key in (*TORCHRUN, "NCCL_SOCKET_IFNAME", "GLOO_SOCKET_IFNAME", "TORCH_NCCL_ASYNC_ERROR_HANDLING"):
        monkeypatch.setenv(key, "")   # recorded, so that what the test exports is undone after it
        monkeypatch.delenv(key)
    for key, value in SLURM_TASK_11_OF_16.items():
        monkeypatch.setenv(key, value)
    return monkeypatch


def test_a_slurm_task_exports_its_rank_the_first_host_and_the_interface(slurm_task, capsys):
    import os

    export_distributed_env("ib0")
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("11", "16", "3")
    assert os.environ["MASTER_ADDR"] == "gpu-07"
    assert os.environ["NCCL_SOCKET_IFNAME"] == os.environ["GLOO_SOCKET_IFNAME"] == "ib0"
    assert "task: rank 11 of 16, local rank 3 on host " in capsys.readouterr().out


def test_the_master_port_lies_below_the_ephemeral_ports_and_changes_when_the_job_is_requeued(slurm_task):
    """A port from 32768 up can be some process's open connection (EADDRINUSE, seen in CI); a requeued instance
    must not meet its predecessor's lingering sockets. Every task derives the same port from the job."""
    import os

    ports = []
    for restart in ("0", "1", "2"):
        slurm_task.setenv("SLURM_RESTART_COUNT", restart)
        slurm_task.delenv("MASTER_PORT", raising=False)
        export_distributed_env()
        ports.append(int(os.environ["MASTER_PORT"]))
    low, high = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
    assert all(1024 < port < low for port in ports) and len(set(ports)) == 3
    assert ports[0] == distributed.job_master_port("4242", 0)
    slurm_task.setenv("MASTER_PORT", "29400")                          # a port the user chose is kept
    export_distributed_env()
    assert os.environ["MASTER_PORT"] == "29400"


def test_nccl_teardown_on_timeout_is_kept_and_restored_where_a_site_turned_it_off():
    key = "TORCH_NCCL_ASYNC_ERROR_HANDLING"
    assert collective_variables(None, {}) == {}                     # torch's default (3) already tears down
    assert collective_variables(None, {key: "1"}) == {}
    assert collective_variables(None, {key: "0"}) == {key: "3"}    # 0: a rank would wait forever
    assert collective_variables(None, {key: "2"}) == {key: "3"}
    assert collective_variables("eth2", {}) == {"NCCL_SOCKET_IFNAME": "eth2", "GLOO_SOCKET_IFNAME": "eth2"}


@pytest.fixture
def eight_gpus(monkeypatch):
    """Stand-in for a node with 8 GPUs (none here)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)


def test_each_task_takes_the_gpu_of_its_local_rank(eight_gpus):
    assert task_device("auto", 3) == torch.device("cuda", 3)
    assert task_device("cuda", 7) == torch.device("cuda", 7)
    assert task_device("cpu", 3) == torch.device("cpu")
    with pytest.raises(DistributedEnvError, match="LOCAL_RANK=8 but this node shows 8 GPU"):
        task_device("auto", 8)   # more tasks than GPUs on a node


def test_without_a_gpu_auto_is_the_cpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    assert task_device("auto", 5) == torch.device("cpu")


def test_a_gpu_task_starts_nccl_and_gloo_on_its_own_device_with_the_configured_timeout(eight_gpus, monkeypatch):
    """init_process_group and set_device are recorded, not run: NCCL needs GPUs. Gloo serves the CPU tensors."""
    calls = {}
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.setdefault("device", device))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.update(backend=backend, **kw))
    monkeypatch.setattr(distributed.os, "environ", {"MASTER_ADDR": "gpu-07", "MASTER_PORT": "29500"})
    init_distributed(DistEnv(rank=11, world_size=16, local_rank=3), task_device("auto", 3), timeout_s=90)
    assert calls == {"device": torch.device("cuda", 3), "backend": "cpu:gloo,cuda:nccl", "rank": 11, "world_size": 16,
                     "timeout": datetime.timedelta(seconds=90)}
