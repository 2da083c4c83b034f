"""The GPU check of the platform as one command, within a hard time budget.

    python bench/gpu_suite.py --out gpu-report [--budget-s 540] [--cpu-smoke]

Runs each section below as a subprocess with its share of the budget: its weight out of the weights of the
sections still to run, applied to the time left, so what one section leaves unused goes to the next. A section
that overruns is killed (its whole process group) and reported as ``timeout``, one that exits non-zero as
``failed`` (with what it printed before), and the suite goes on. Writes OUT/report.md (tables), OUT/results.json
(per section: status ok/failed/timeout/skipped, seconds, parsed figures, stderr tail when not ok), both
rewritten after each section, and each section's full output to OUT/logs/. Exits with 1 if a section failed or
timed out.

Sections: the environment (torch, CUDA, driver, GPU; the bf16 matmul peak measured at 8192² and the datasheet's);
``pytest -m gpu``; step cost (bench/step_cost.py, bf16, synthetic 32×32×4 latents, training CFG off: every
registered objective and the peers' MF, ``+naive`` and ``+two_pass``, at B/2 batch 256 and XL/2 batch 64, but dmf
and mf+naive, which would not fit an 80 GB GPU there, at half those batches beside fm and mf; ``engine.compile``
outside_jvp and all at B/2; MFU against the GPU model's datasheet peak, or the measured one for a GPU the table
lacks); JVP attention, math vs fused, and the fused kernel's Hopper path (TMA) on and off at the padded head dims,
against math (bench/jvp_attention.py); evaluation throughput (1-NFE bf16 generation of B/2, inception-v3-compat
features with random weights); NCCL (the platform's process group, an all_reduce on the GPU and one of float64 on
the CPU); the async checkpoint stall at XL/2 on local disk. The environment, evaluation, NCCL and checkpoint
sections are probes in this file (``--probe NAME``, run as subprocesses like the rest).

``--cpu-smoke`` hides the GPU and runs every section on tiny shapes (tiny configs, batch 8, one step and round,
compiled with aot_eager; the fused kernel in Triton's CPU interpreter) in about 110 s on 2 quiet CPU cores;
step_cost_XL2_b32 is skipped there (its tiny command would be step_cost_B2_b128's), and the report says so.
tests/test_bench_smoke.py runs it, so the suite cannot rot between GPU loans. Its figures test the suite, not the
machine. There the weights (GPU timings) would not fit: a smoke section costs mostly its start-up, so each may use
the time left less a reserve for each one after it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from unittest import mock

import torch
import torch.distributed as dist
from checkpoint_cost import make_engine   # bench/, this script's directory
from jvp_attention import PIECES
from torch_fidelity import feature_extractor_inceptionv3

from meanflow.evaluation.feature_extractors import INCEPTION, load_feature_extractor
from meanflow.evaluation.sampling import generate
from meanflow.models import count_parameters
from meanflow.models.attention import fused_available
from meanflow.objectives import NAMES
from meanflow.platform.checkpoint import CheckpointStore
from meanflow.platform.config import load_config
from meanflow.platform.distributed import DistEnv, init_distributed, shutdown

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
PY = sys.executable
# B/2 and XL/2 as on ImageNet 256: SD-VAE latents 32×32×4, 1000 classes (tiny_mf's width override dropped).
LATENT = ["model.width=0", "model.image_size=32", "model.in_channels=4", "model.num_classes=1000"]
# Estimated at ~105–110 GB at B/2 batch 256 and XL/2 batch 64 (saved activations measured on a CPU, scaled): they
# run at half the batch, with fm and mf at that batch for their ratios.
LARGE_ROWS = ("dmf", "mf+naive")
LARGE_ROWS_NOTE = ("dmf and mf+naive run at batch {half} here, not {full}: at {full} they are estimated at "
                   "~105–110 GB, over an 80 GB GPU. ÷ fm is against fm at {half}.")
OBJECTIVE_ROWS = tuple(r for r in (*NAMES, "mf+naive", "mf+two_pass") if r not in LARGE_ROWS)   # fm first: ÷ fm
HALF_BATCH_ROWS = ("fm", "mf", *LARGE_ROWS)
PEERS = ("mf+naive", "mf+two_pass")
COMPILE_ROWS = ("mf", "mf+compiled", "mf+compiled_jvp")
MIN_SECTION_S = 5.0                                      # less than this left: the section is skipped
SMOKE_RESERVE_S = 10.0                                   # --cpu-smoke: kept for each section still to come


# ------------------------------------------------------------------------------------------------ sections


@dataclass(frozen=True)
class Section:
    name: str
    weight: float                                   # seconds out of the default 540 on a cold GPU machine
    command: Callable[[bool], list[str]]            # cpu_smoke -> argv
    parse: Callable[[str], dict]                    # stdout -> figures
    note: str = ""                                  # for the reader of the report
    smoke_skip: str = ""                            # why --cpu-smoke skips it (empty: it runs)


def number(cell: str) -> float | None:
    """A table cell: '-' and nan are None, '41%' is 0.41."""
    value = float(cell[:-1]) / 100 if cell.endswith("%") else float("nan") if cell == "-" else float(cell)
    return value if math.isfinite(value) else None


def table_rows(stdout: str, header: str, columns: tuple[str, ...], text: int = 1) -> list[dict]:
    """The rows of len(columns) cells after the line that starts with ``header``; the first ``text`` stay text."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header)) + 1
    return [dict(zip(columns, [*cells[:text], *map(number, cells[text:])]))
            for cells in (line.split() for line in lines[start:]) if len(cells) == len(columns)]


def probe(name: str) -> Callable[[bool], list[str]]:
    return lambda smoke: [PY, __file__, "--probe", name, *(["--cpu-smoke"] * smoke)]


def parse_probe(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])


def pytest_gpu(smoke: bool) -> list[str]:
    return [PY, "-m", "pytest", "-m", "gpu", "-q", "-rs", "-p", "no:cacheprovider", "tests"]


def parse_pytest(stdout: str) -> dict:
    summary = stdout.strip().splitlines()[-1]
    counts = {kind: int(n) for n, kind in re.findall(r"(\d+) (passed|failed|skipped|deselected|errors?)", summary)}
    return {**counts, "skip_reasons": [line for line in stdout.splitlines() if line.startswith("SKIPPED")]}


def step_cost(size: str, batch: int, rows: tuple[str, ...]) -> Callable[[bool], list[str]]:
    def command(smoke: bool) -> list[str]:
        # The smoke compiles with aot_eager: the same capture and traced graphs, without inductor's C++ build
        # (55 s cold on 2 cores; tests/test_block_execution.py covers inductor itself).
        shape = (["data.global_batch=8", "engine.compile_backend=aot_eager"] if smoke else
                 [f"model.size={size}", *LATENT, f"data.global_batch={batch}", "engine.precision=bf16"])
        steps, warmup = (1, 1) if smoke else (6, 2)   # one round: on a GPU rows run alone, with little noise
        return [PY, str(BENCH / "step_cost.py"), "--synthetic", "--keep-going", "--objectives", ",".join(rows),
                "--steps", str(steps), "--warmup", str(warmup), "--rounds", "1", *shape, "objective.guidance.kappa=0.0"]
    return command


STEP_COLUMNS = ("row", "ms_per_step", "x_fm", "floor_F", "floor_ms", "x_floor", "saved_mb", "peak_mb", "tflops",
                "mfu")


def parse_step_cost(stdout: str) -> dict:
    f_ms, f_tflop = re.search(r"= ([\d.]+) ms, ([\d.]+) TFLOP", stdout).groups()
    failed = re.search(r"# failed rows .*: (\S+)", stdout)
    return {"setup": stdout.splitlines()[0].lstrip("# "), "F_ms": float(f_ms), "F_tflop": float(f_tflop),
            "mfu_peak": re.search(r"# MFU peak: (.*)", stdout)[1],
            "rows": table_rows(stdout, "row ", STEP_COLUMNS), **({"failed_rows": failed[1]} if failed else {})}


def jvp_attention(smoke: bool) -> list[str]:
    sizes = ["--batch", "2", "--dtype", "float32", "--repeats", "1"] if smoke else ["--batch", "64"]
    return [PY, str(BENCH / "jvp_attention.py"), *sizes]


def parse_jvp_attention(stdout: str) -> dict:
    return {"setup": stdout.splitlines()[0].lstrip("# "),
            "rows": table_rows(stdout, "shape ", ("shape", "backend", "ms_per_call", "peak_mb"), text=2)}


def jvp_attention_tma(smoke: bool) -> list[str]:
    # The smoke: Triton's CPU interpreter (float32 only), one head and short lengths with the same paddings
    sizes = ["--small", "--batch", "1", "--dtype", "float32"] if smoke else ["--batch", "4"]
    return [PY, str(BENCH / "jvp_attention.py"), "--check-tma", *sizes]


def parse_jvp_attention_tma(stdout: str) -> dict:
    setup, tma = stdout.splitlines()[:2]
    return {"setup": setup.lstrip("# "), "tma": tma.removeprefix("# TMA: "),
            "rows": table_rows(stdout, "shape ", ("shape", "kernel", "tma", "status", *PIECES), text=4)}


SECTIONS = (
    Section("environment", 15, probe("environment"), parse_probe),
    Section("pytest_gpu", 115, pytest_gpu, parse_pytest,
            "Cold, it compiles the fused kernel's Triton specialisations first."),
    Section("step_cost_B2", 55, step_cost("B", 256, OBJECTIVE_ROWS), parse_step_cost),
    Section("step_cost_B2_b128", 25, step_cost("B", 128, HALF_BATCH_ROWS), parse_step_cost,
            LARGE_ROWS_NOTE.format(half=128, full=256)),
    Section("step_cost_XL2", 70, step_cost("XL", 64, OBJECTIVE_ROWS), parse_step_cost),
    Section("step_cost_XL2_b32", 30, step_cost("XL", 32, HALF_BATCH_ROWS), parse_step_cost,
            LARGE_ROWS_NOTE.format(half=32, full=64),
            smoke_skip="--cpu-smoke: the same tiny command as step_cost_B2_b128"),
    Section("step_cost_compile_B2", 80, step_cost("B", 256, COMPILE_ROWS), parse_step_cost),
    Section("jvp_attention", 20, jvp_attention, parse_jvp_attention),
    Section("jvp_attention_tma", 40, jvp_attention_tma, parse_jvp_attention_tma,
            "The fused kernel with jvp-flash-attention's USE_TMA on (its default: TMA descriptors and warp "
            "specialisation on sm_90+) and off, through the platform's padding, against float64 math attention."),
    Section("eval_throughput", 30, probe("eval_throughput"), parse_probe),
    Section("nccl", 10, probe("nccl"), parse_probe),
    Section("checkpoint_XL2", 50, probe("checkpoint"), parse_probe),
)


# -------------------------------------------------------------------------------------- probes (subprocesses)


def seconds_per_call(fn, device: torch.device, repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def probe_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def probe_environment(smoke: bool) -> dict:
    from step_cost import datasheet_tflops, matmul_flops   # here: it imports the trainer (~3 s), others need not

    device = probe_device()
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    smi = shutil.which("nvidia-smi")
    driver = smi and subprocess.run([smi, "--query-gpu=driver_version", "--format=csv,noheader"],
                                    capture_output=True, text=True).stdout.split("\n")[0]
    name = torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu"
    datasheet = datasheet_tflops(name) if device.type == "cuda" else None
    return {"torch": torch.__version__, "cuda": torch.version.cuda, "driver": driver or None, "device": name,
            "gpus": torch.cuda.device_count(), "cpus": os.cpu_count(),
            "nccl": ".".join(map(str, torch.cuda.nccl.version())) if device.type == "cuda" else None,
            "fused_jvp_attention": fused_available(),
            "matmul": f"{n}x{n} {str(dtype).removeprefix('torch.')}",
            "matmul_tflops": matmul_flops(device, n, dtype) / 1e12,
            "datasheet_bf16_tflops": datasheet and datasheet[1]}


def save_random_inception(path: Path) -> None:
    """torch-fidelity's inception-v3-compat with random weights (the cost of the real ones), built as
    tests/conftest.py's fixture builds it: the constructor's download of the real weights is stubbed out."""
    fe = feature_extractor_inceptionv3
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: None), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda *a, **k: None):
        torch.manual_seed(0)
        net = fe.FeatureExtractorInceptionV3(INCEPTION, ["2048", "logits_unbiased"])
    torch.save(net.state_dict(), path)


def probe_eval_throughput(smoke: bool) -> dict:
    """bench/eval_throughput.py takes its shapes from an embedded dataset and generates in fp32, so the B/2 latent
    case is put together here from the same parts: ``generate`` (bf16 autocast) and ``load_feature_extractor``.
    Features are of 256×256 RGB uint8 images, what B/2's latents decode to (the VAE decode is not timed)."""
    from step_cost import build_on   # here: it imports the trainer (~3 s), others need not

    device = probe_device()
    m = load_config("tiny_mf", [] if smoke else ["model.size=B", *LATENT]).model
    num, batch, side, repeats = (8, 8, 32, 1) if smoke else (4096, 256, 256, 2)
    torch.manual_seed(0)
    model = build_on(device, m)
    shape = (m.in_channels, m.image_size, m.image_size)

    def sample_all():
        return [x for _, x, _ in generate(model, range(num), shape, m.num_classes, 0, batch_size=batch, device=device,
                                          autocast_dtype=torch.bfloat16)]

    generation = num / seconds_per_call(sample_all, device, repeats)
    with tempfile.TemporaryDirectory() as tmp:
        save_random_inception(Path(tmp) / "inception-random.pth")
        extractor = load_feature_extractor(INCEPTION, str(Path(tmp) / "inception-random.pth"), device)
    images = torch.randint(0, 256, (num // 4, 3, side, side), dtype=torch.uint8)
    features = len(images) / seconds_per_call(lambda: [extractor(b) for b in images.split(batch)], device, repeats,
                                              warmup=repeats - 1)   # the smoke: one call, no warm-up
    return {"model": f"MF-DiT {m.size}/2 on {'x'.join(map(str, shape))}", "batch": batch, "device": str(device),
            "generation_1nfe_bf16_per_s": generation, "inception_features_per_s": features,
            "images": f"{side}x{side} RGB uint8, resized to 299 by the extractor",
            "together_per_s": 1 / (1 / generation + 1 / features)}


def probe_nccl(smoke: bool) -> dict:
    """The platform's own process-group start (init_distributed, one process on a loopback port), an all_reduce
    on the device and one of float64 on the CPU (the evaluation's feature sums); without a GPU both with gloo."""
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    start = time.perf_counter()
    init_distributed(DistEnv(), device, timeout_s=60, required=True)
    init_s = time.perf_counter() - start
    for x in (torch.full((1 << 20,), 2.0, device=device), torch.full((1 << 10,), 2.0, dtype=torch.float64)):
        dist.all_reduce(x)
        if x.sum().item() != 2.0 * len(x):
            raise RuntimeError(f"all_reduce over one process changed its input: sum {x.sum().item()}")
    # A CUDA task's group has a backend per device: get_backend() is then "cpu:gloo,cuda:nccl", not "nccl".
    backend, backends = dist.get_backend(), dict(pair.split(":") for pair in dist.get_backend_config().split(","))
    shutdown()
    return {"backend": backend, "init_s": init_s,
            "all_reduce": f"ok (1 process: 4 MB on {device.type}, 8 KB float64 on cpu)",
            "nccl": "tried" if device.type == "cuda" and backends.get("cuda") == "nccl" else
            f"not tried ({'--cpu-smoke' if smoke else 'no CUDA'}): the same check with gloo"}


def probe_checkpoint(smoke: bool) -> dict:
    """How long ``save`` holds the training thread with ``checkpoint.async_save`` (the state staged in memory),
    and the whole save, on local disk (the system's temporary directory: in --out a killed probe would leave
    ~11 GB behind). The engine is bench/checkpoint_cost.py's (AdamW state after one step, EMA; on the CPU); its
    measure() is not used: it also saves synchronously, loads, and needs an S3 server, too long for the budget."""
    size = "tiny" if smoke else "XL"
    engine = make_engine(size)
    with tempfile.TemporaryDirectory() as tmp:
        store = CheckpointStore(f"{tmp}/ckpt", keep_last=1, async_save=True)
        start = time.perf_counter()
        store.save(1, engine, {"step": 1}, {})
        stall_s = time.perf_counter() - start
        store.wait()
        total_s = time.perf_counter() - start
        nbytes = sum(f["bytes"] for f in store.commits()[1]["files"].values())
    return {"model": f"MF-DiT {size}/2, {count_parameters(engine.model) / 1e6:.1f}M params", "GB": nbytes / 1e9,
            "directory": tempfile.gettempdir(),
            "async_stall_s": stall_s, "whole_save_s": total_s, "stall_share": stall_s / total_s}


PROBES = {"environment": probe_environment, "eval_throughput": probe_eval_throughput, "nccl": probe_nccl,
          "checkpoint": probe_checkpoint}


# -------------------------------------------------------------------------------------------------- runner


def run_section(section: Section, smoke: bool, out: Path, limit_s: float) -> dict:
    argv = section.command(smoke)
    log = out / "logs" / section.name
    # Unbuffered: a killed section keeps what it printed. The smoke hides the GPU and runs one thread a process
    # (tiny ops on a shared 2-core machine only contend).
    env = {**os.environ, "PYTHONUNBUFFERED": "1",
           **({"CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"} if smoke else {})}
    start = time.monotonic()
    with open(f"{log}.out", "w") as stdout, open(f"{log}.err", "w") as stderr:
        proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=stdout, stderr=stderr, start_new_session=True)
        try:
            status = "ok" if proc.wait(timeout=limit_s) == 0 else "failed"
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)   # its process group: pytest's and torch.compile's children too
            proc.wait()
            status = "timeout"
    result = {"status": status, "seconds": round(time.monotonic() - start, 1), "limit_s": round(limit_s, 1),
              "command": shlex.join(argv)}
    try:
        result["figures"] = section.parse(Path(f"{log}.out").read_text())
    except Exception as err:    # a failed section's partial output parses as far as it goes
        if status == "ok":
            result.update(status="failed", error=f"unparsable output: {err!r}")
    if result["status"] != "ok":
        result["stderr_tail"] = Path(f"{log}.err").read_text()[-3000:]
    return result


def run_suite(smoke: bool, out: Path, budget_s: float) -> dict[str, dict]:
    """Runs every section; the report and results.json are rewritten after each (a killed suite leaves them)."""
    (out / "logs").mkdir(parents=True, exist_ok=True)
    start, results = time.monotonic(), {}
    for i, section in enumerate(SECTIONS):
        left = start + budget_s - time.monotonic()
        share = (left - SMOKE_RESERVE_S * (len(SECTIONS) - i - 1) if smoke else
                 left * section.weight / sum(s.weight for s in SECTIONS[i:]))
        if smoke and section.smoke_skip:
            result = {"status": "skipped", "seconds": 0.0, "error": section.smoke_skip}
        elif share >= MIN_SECTION_S:
            result = run_section(section, smoke, out, share)
        else:
            result = {"status": "skipped", "seconds": 0.0, "error": "the budget was spent"}
        if section.note:
            result["note"] = section.note
        results[section.name] = result
        print(f"{section.name:<22}{result['status']:<9}{result['seconds']:>7.1f} s", flush=True)
        write_outputs(results, out, smoke, budget_s, time.monotonic() - start)
    return results


# -------------------------------------------------------------------------------------------------- report


def cell(value) -> str:
    if isinstance(value, float):
        digits = next((d for d, at_least in ((0, 100), (1, 10), (2, 1)) if abs(value) >= at_least), None)
        return f"{value:.3g}" if digits is None else f"{value:.{digits}f}"
    return "-" if value is None else str(value)


def goals(results: dict[str, dict]) -> list[str]:
    """The step-cost goals, where the figures exist: MF/FM ≤ 1.25 at B/2; mf ≥ 1.5× faster than the faster peer
    at XL/2 (each peer against mf at its own batch); fm's MFU ≥ 40% at XL/2."""
    rows = {name: {r["row"]: r for r in results.get(name, {}).get("figures", {}).get("rows", [])}
            for name in ("step_cost_B2", "step_cost_XL2", "step_cost_XL2_b32")}
    b2, xl2 = rows["step_cost_B2"], rows["step_cost_XL2"]
    lines = []
    if "mf" in b2 and "fm" in b2:
        lines.append(f"- MF ÷ FM at B/2: {cell(b2['mf']['x_fm'])} (goal ≤ 1.25)")
    peers = [r[p]["ms_per_step"] / r["mf"]["ms_per_step"] for r in (xl2, rows["step_cost_XL2_b32"]) if "mf" in r
             for p in PEERS if p in r]
    if peers:
        lines.append(f"- faster peer ÷ mf at XL/2: {cell(min(peers))} (goal ≥ 1.5; mf+naive at batch 32)")
    if xl2.get("fm", {}).get("mfu") is not None:
        lines.append(f"- fm MFU at XL/2: {xl2['fm']['mfu']:.0%} (goal ≥ 40%)")
    return lines


def markdown_table(rows: list[dict]) -> list[str]:
    if not rows:
        return []
    align = ("---" if isinstance(value, str) else "---:" for value in rows[0].values())
    return ["", "| " + " | ".join(rows[0]) + " |", "|" + "|".join(align) + "|",
            *("| " + " | ".join(map(cell, row.values())) + " |" for row in rows)]


def write_outputs(results: dict[str, dict], out: Path, smoke: bool, budget_s: float, wall_s: float) -> None:
    (out / "results.json").write_text(json.dumps(
        {"date": str(datetime.date.today()), "mode": "cpu-smoke" if smoke else "gpu", "budget_s": budget_s,
         "wall_s": round(wall_s, 1), "sections": results}, indent=1))
    env = results["environment"].get("figures", {})
    mode = "CPU smoke: tiny shapes, the GPU hidden; these figures test the suite, not the machine" if smoke else \
        "GPU run"
    lines = [f"# GPU suite report, {datetime.date.today()}", "",
             f"{mode}. {env.get('device', '?')}, torch {env.get('torch', '?')}, CUDA {env.get('cuda')}, "
             f"driver {env.get('driver')}; budget {budget_s:.0f} s, wall {wall_s:.0f} s.", "",
             "| section | status | s | limit s |", "|---|---|---:|---:|"]
    lines += [f"| {name} | {r['status']} | {r['seconds']:.1f} | {cell(r.get('limit_s'))} |"
              for name, r in results.items()]
    lines += ["", "## Goals", "", *(goals(results) or ["- no step-cost figures"])]
    for name, r in results.items():
        lines += ["", f"## {name}", ""] + ([f"`{r['command']}`", ""] if "command" in r else [])
        lines += [r["note"], ""] if r.get("note") else []
        for key, value in r.get("figures", {}).items():
            lines += markdown_table(value) if key == "rows" else [f"- {key}: {cell(value)}"]
        if r["status"] != "ok":
            lines += ["", f"**{r['status']}**: {r.get('error', 'stderr tail:')}", "", "```",
                      r.get("stderr_tail", "").strip(), "```"]
    (out / "report.md").write_text("\n".join(lines) + "\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="directory for report.md, results.json and logs/ (required)")
    p.add_argument("--budget-s", type=float, default=540.0, help="hard limit on the whole suite's wall time")
    p.add_argument("--cpu-smoke", action="store_true", help="every section on tiny shapes on the CPU (< 2 min)")
    p.add_argument("--probe", choices=PROBES, help=argparse.SUPPRESS)   # one section of this file, in its process
    args = p.parse_args()
    if args.probe:
        print(json.dumps(PROBES[args.probe](args.cpu_smoke)))
    elif not args.out:
        p.error("--out is required")
    else:
        out = args.out.resolve()
        results = run_suite(args.cpu_smoke, out, args.budget_s)
        print(f"wrote {out / 'report.md'} and {out / 'results.json'}")
        sys.exit(any(r["status"] in ("failed", "timeout") for r in results.values()))


if __name__ == "__main__":
    main()
