"""Where an evaluation's results go: ``<run>/eval/step-000NNNNN/`` (metrics.json, a sample grid or scatter plot per
guidance setting) and one row per setting appended to ``<run>/eval/metrics.jsonl`` (what ``plot`` reads).

metrics.json is written last, via temp-then-rename where the store can rename. It accumulates: a later evaluation
of the same step with other settings (a guidance sweep, another sampler, more samples) adds its results, and one
with the same settings (guidance, sampler, time grid, NFE, number of samples, seed) replaces them. Evaluation jobs
skip a step whose metrics.json already holds every requested setting.
"""

from __future__ import annotations

import json

from meanflow.platform.checkpoint.upload import BoundedWriter
from meanflow.platform.metrics import append_records
from meanflow.platform.storage import join, read_bytes

from .evaluator import SettingResult, guidance_tag, sampler_tag
from .images import save_image_grid, save_scatter_png


def describe_metrics(metrics: dict) -> str:
    """One setting's result as a log line: ``guidance {...}, sampler flow_map, nfe 1, fid 12.3, is_mean 4.5, ...``
    (``steps`` only when a grid was given)."""
    keys = ("guidance", "sampler", "nfe", "steps", "fid", "suspect", "is_mean", "class_accuracy", "sw1", "sw2",
            "samples_per_s")
    return ", ".join(f"{k} {metrics[k]:.4g}" if isinstance(metrics[k], float) else f"{k} {metrics[k]}"
                     for k in keys if metrics.get(k) not in (None, []))


def step_dir(run_dir: str, step: int) -> str:
    return join(run_dir, "eval", f"step-{step:08d}")


def metrics_url(run_dir: str, step: int) -> str:
    return join(step_dir(run_dir, step), "metrics.json")


def setting_key(row: dict) -> str:
    """What makes two results of one step comparable: the same sampling setting. Rows from before the sampler was
    recorded are flow-map rows on the uniform grid."""
    return json.dumps([row.get("guidance"), row.get("sampler", "flow_map"), row.get("steps", []), row["nfe"],
                       row["num_samples"], row["seed"]], sort_keys=True)


def fid_series(row: dict) -> tuple[str, str, str]:
    """The FID series a metrics row belongs to: (feature extractor, its weights' sha256, reference statistics);
    FIDs of different series do not compare. Empty strings for rows scored without features (2-D toys)."""
    features = row.get("feature_extractor") or {}
    return features.get("name", ""), features.get("weights_sha256", ""), row.get("reference_stats", "")


def stored_results(run_dir: str, step: int) -> list[dict]:
    try:
        return json.loads(read_bytes(metrics_url(run_dir, step)))["results"]
    except FileNotFoundError:
        return []


def is_evaluated(run_dir: str, step: int, wanted: list[dict]) -> bool:
    """Whether the step's metrics.json holds a result for each wanted setting (dicts with the setting_key fields)."""
    have = {setting_key(r) for r in stored_results(run_dir, step)}
    return all(setting_key(w) in have for w in wanted)


def write_results(run_dir: str, step: int, results: list[SettingResult], extra: dict | None = None,
                  writer: BoundedWriter | None = None) -> str:
    """Pictures, then metrics.json, then the jsonl rows, each access bounded by ``writer`` (default: the
    checkpoint section's default limits); returns metrics.json's URL."""
    writer = writer or BoundedWriter("checkpoint")
    out = step_dir(run_dir, step)
    rows = []
    for result in results:
        m = result.metrics
        name = f"samples{guidance_tag(m['guidance'])}{sampler_tag(m)}.png"
        if result.points is not None and result.points.shape[1] == 2:
            title = f"step {step}: {m['nfe']}-NFE {m['sampler']}, SW1 {m['sw1']:.3f}"
            writer.call(lambda: save_scatter_png(result.points, join(out, name), reference=result.real, title=title),
                        join(out, name), "upload")
        elif result.grid is not None:
            writer.call(lambda: save_image_grid(result.grid, join(out, name), nrow=8), join(out, name), "upload")
        rows.append({**m, **(extra or {}), "picture": name})
    url = metrics_url(run_dir, step)
    new = {setting_key(r) for r in rows}
    kept = [r for r in writer.call(lambda: stored_results(run_dir, step), url, "read") if setting_key(r) not in new]
    writer.write(url, json.dumps({"step": step, "results": kept + rows}, indent=1).encode())
    append_records(join(run_dir, "eval", "metrics.jsonl"), rows, writer)
    return url
