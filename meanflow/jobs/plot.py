"""``jobs/submit.py plot --run-dir URL [--out URL]``: one PNG of a run's progress — training loss and jvp_norm vs
step (``metrics.jsonl``, guard events marked), and the evaluation metric vs step (``eval/metrics.jsonl``: FID, or
SW1 for 2-D toys), one line per FID series (feature extractor, its weights, reference statistics) and guidance
setting, suspect values (an FID below the floor) marked ×."""

from __future__ import annotations

import argparse
import io
import json
import posixpath
from collections import defaultdict

from meanflow.evaluation.evaluator import guidance_tag, suspect_reason
from meanflow.evaluation.outputs import fid_series
from meanflow.platform.storage import join, read_bytes, write_bytes_atomic

from .run_dir import check_output_writable


def read_jsonl(url: str) -> list[dict]:
    try:
        text = read_bytes(url).decode()
    except (FileNotFoundError, NotADirectoryError):   # no such run, or a file given as --run-dir
        return []
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run-dir", required=True, help="the run directory (any fsspec URL)")
    p.add_argument("--out", help="PNG URL (default <run>/plots/progress.png)")


def draw(train: list[dict], evals: list[dict]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 3.6), dpi=100)
    FigureCanvasAgg(fig)
    steps = [r for r in train if "event" not in r and "loss" in r]
    events = [r for r in train if r.get("event") in ("skip", "rollback", "fail")]
    for i, key in enumerate(("loss", "jvp_norm")):
        ax = fig.add_subplot(1, 3, i + 1)
        rows = [r for r in steps if key in r]
        ax.plot([r["step"] for r in rows], [r[key] for r in rows], lw=1)
        for e in events:
            ax.axvline(e["step"], color="tab:red" if e["event"] != "skip" else "tab:orange", lw=0.6, alpha=0.6)
        ax.set_xlabel("step")
        ax.set_title(key + (" (guard events: vertical lines)" if events and i == 0 else ""), fontsize=9)
        if key == "jvp_norm" and rows:
            ax.set_yscale("log")
    ax = fig.add_subplot(1, 3, 3)
    metric = "fid" if any("fid" in r for r in evals) else "sw1"
    series = eval_series([r for r in evals if metric in r])
    for label, rows in series:
        ax.plot([r["step"] for r in rows], [r[metric] for r in rows], marker="o", lw=1, label=label)
        suspect = [r for r in rows if suspect_reason(r)]
        ax.plot([r["step"] for r in suspect], [r[metric] for r in suspect], "x", color="tab:red", ms=9)
    if len(series) > 1:
        ax.legend(fontsize=7)
    ax.set_xlabel("step")
    note = " (× suspect)" if any(suspect_reason(r) for r in evals) else ""
    ax.set_title(f"{metric.upper()} ({evals[0]['nfe']}-NFE){note}" if evals else "no evaluations yet", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def eval_series(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """(label, rows sorted by step) per FID series (feature extractor, weights, reference statistics) and guidance
    setting; the label names the extractor and reference only where the rows hold more than one."""
    groups = defaultdict(list)
    for r in rows:
        groups[(fid_series(r), guidance_tag(r.get("guidance")).lstrip("-") or "no guidance")].append(r)
    several = len({series for series, _ in groups}) > 1

    def label(series: tuple[str, str, str], guidance: str) -> str:
        name, sha, reference = series
        return f"{guidance}; {name} {sha[:8]} vs {posixpath.basename(reference)}" if several else guidance

    return [(label(*key), sorted(rows, key=lambda r: r["step"])) for key, rows in sorted(groups.items())]


def run(args) -> int:
    train = read_jsonl(join(args.run_dir, "metrics.jsonl"))
    if not train:
        raise FileNotFoundError(f"--run-dir {args.run_dir}: no metrics.jsonl (not a run directory, or no step "
                                "logged yet)")
    out = args.out or join(args.run_dir, "plots", "progress.png")
    check_output_writable(out, "--out" if args.out else "--run-dir")
    write_bytes_atomic(out, draw(train, read_jsonl(join(args.run_dir, "eval", "metrics.jsonl"))))
    print(f"wrote {out}")
    return 0
