"""Fidelity report: do the objectives behave as their papers say, at 2-D toy scale?

    python bench/fidelity.py [--quick] [--workers 2] [--out bench] [--only EXPERIMENT ...]

Trains the toy MLP (3×128 SiLU, batch 256, lr 1e-3, EMA 0.999) through the real trainer, several
seeds per setting, and writes ``FIDELITY.md`` plus PNG plots into ``--out`` (``fidelity/`` beside it). Six
questions, one per paper claim: wrong JVP tangents, the share of rows with r ≠ t, the control-variate tangent β,
iMF against MF, the non-expansivity term, SG_λ's curriculum; and the family side by side (fm, mf, imf,
alphaflow, split_mf at equal steps, each sampled 1-NFE, 2-NFE and with the 2-step consistency sampler).
``--only`` runs the named experiments and replaces just their sections of an existing FIDELITY.md.
Metrics: 1-NFE SW1/SW2 (4096 samples, 500 directions) of the EMA model, the training metrics the trainer logs
(loss, mse, jvp_norm, expansion ratio, β*), and for β the gradient's total variance Tr Cov[∇ℓ] over 8 replica
batches at the end. Claims are reported, never asserted: where a number disagrees with a paper, the report says so.
``--quick`` (CI): few steps, one seed, 512 samples — it checks that the report is produced, not what it says.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from meanflow.data_pipeline import build_embedded_stream
from meanflow.jobs.train import Trainer
from meanflow.objectives import ObjectiveContext
from meanflow.platform.config import load_config

TOYS = ("checkerboard", "swiss_roll", "two_moons", "eight_gaussians")
# The family section's extra samplings of each trained model: label -> eval overrides.
SAMPLINGS = {"2-NFE": ("eval.nfe=2",), "consistency [1, 0.5, 0]": ("eval.sampler=consistency", "eval.steps=[1,0.5,0]")}
BETAS = (0.0, 0.25, 0.5, 0.75, 1.0)
REPLICAS = 8                       # batches for Tr Cov[∇ℓ]


@dataclass(frozen=True)
class Setting:
    experiment: str
    label: str
    config: str                    # toy2d_mf, toy2d_imf, ...
    overrides: tuple[str, ...] = ()
    grad_variance: bool = False
    samplings: bool = False        # also score SAMPLINGS of the trained model


@dataclass
class Result:
    setting: Setting
    seed: int
    sw1: float
    sw2: float
    series: dict[str, list[tuple[int, float]]] = field(default_factory=dict)
    grad_variance: dict[float, float] = field(default_factory=dict)   # β → Tr Cov[∇ℓ_β] at the trained parameters
    sampled_sw1: dict[str, float] = field(default_factory=dict)       # SAMPLINGS label → SW1


def settings(steps: int) -> list[Setting]:
    out = [Setting("tangents", label, "toy2d_mf", (f"objective.time_tangents=[{dt},{dr}]",))
           for label, dt, dr in (("dt=1, dr=0 (MF)", 1.0, 0.0), ("dt=0, dr=0", 0.0, 0.0), ("dt=0, dr=1", 0.0, 1.0))]
    out += [Setting("share", f"{share:.0%} r≠t", "toy2d_mf", (f"objective.time.share_r_eq_t={1 - share}",))
            for share in (0.0, 0.25, 0.5, 1.0)]
    out += [Setting("beta", f"{toy} β={beta}", "toy2d_mf",
                    (f"data.name={toy}", "objective.name=tangent_beta", f"objective.tangent_beta.beta={beta}",
                     f"objective.tangent_beta.beta_star_every={max(1, steps // 30)}"), grad_variance=True)
            for toy in TOYS for beta in BETAS]
    out += [Setting("imf", "MF", "toy2d_mf"), Setting("imf", "iMF", "toy2d_imf")]
    out += [Setting("stability", f"μ={mu}, δ={delta}", "toy2d_mf",
                    ("objective.name=stability", "objective.stability.base=mf", f"objective.stability.delta={delta}",
                     f"objective.stability.mu={mu}", "objective.stability.measure_when_off=true"))
            for mu, delta in ((0.0, 0.01), (0.1, 0.01), (0.5, 0.01), (0.1, 0.5), (0.5, 0.5))]
    out += [Setting("sg_lambda", f"λ={lam}", "toy2d_mf",
                    ("objective.name=sg_lambda", f"objective.sg_lambda.start={lam}", f"objective.sg_lambda.end={lam}"))
            for lam in (0.0, 0.5, 1.0)]
    out += [Setting("sg_lambda", "λ: 0→1 over half the run", "toy2d_mf",
                    ("objective.name=sg_lambda", "objective.sg_lambda.start=0.0", "objective.sg_lambda.end=1.0",
                     f"objective.sg_lambda.warmup_steps={steps // 2}"))]
    out += [Setting("family", name, config, overrides, samplings=True) for name, config, overrides in (
        ("fm", "toy2d_mf", ("objective.name=fm",)), ("mf", "toy2d_mf", ()), ("imf", "toy2d_imf", ()),
        # α reaches 0 (MeanFlow) at two thirds of the run, as the toy config's schedule does
        ("alphaflow", "toy2d_alphaflow", (f"objective.alphaflow.end_step={2 * steps // 3}",)),
        ("split_mf", "toy2d_split_mf", ()))]
    return out


# ------------------------------------------------------------------------------------------------------ running
def train(job: tuple[Setting, int, int, int]) -> Result:
    setting, seed, steps, num_samples = job
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as run_dir:
        cfg = load_config(setting.config, [
            f"run.run_dir=file://{run_dir}", f"run.steps={steps}", f"run.seed={seed}", "run.log_every=1",
            "checkpoint.every=0", f"eval.num_samples={num_samples}", "guard.enabled=false",
            "engine.jvp_smoke_test=false", *setting.overrides])
        trainer = Trainer(cfg, stdout=io.StringIO())
        report = trainer.run()
        result = Result(setting, seed, report["sw1"], report["sw2"], read_series(Path(run_dir) / "metrics.jsonl"))
        if setting.samplings:
            result.sampled_sw1 = score_samplings(trainer, cfg)
        if setting.grad_variance:     # every β at the same parameters: the estimator's variance, controlled
            for beta in BETAS:
                trainer.objective.cfg.tangent_beta.beta = beta
                result.grad_variance[beta] = gradient_total_variance(trainer, cfg)
    return result


def score_samplings(trainer: Trainer, cfg) -> dict[str, float]:
    """SW1 of the trained EMA model under each of SAMPLINGS (the same samples' noise as the 1-NFE score)."""
    from omegaconf import OmegaConf

    from meanflow.evaluation.evaluator import Evaluator, describe_data

    scores = {}
    for label, overrides in SAMPLINGS.items():
        eval_cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(overrides)))
        evaluator = Evaluator(eval_cfg, describe_data(eval_cfg.data, eval_cfg.run.seed), torch.device("cpu"), 0, 1)
        [result] = evaluator.run(trainer.engine.ema_model or trainer.engine.model, trainer.step)
        scores[label] = result.metrics["sw1"]
    return scores


def read_series(path: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list[tuple[int, float]]] = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        if "event" in record:
            continue
        for key, value in record.items():
            if isinstance(value, (int, float)) and key != "step":
                series.setdefault(key, []).append((record["step"], float(value)))
    return series


def gradient_total_variance(trainer: Trainer, cfg) -> float:
    """Tr Cov[∇ℓ] of the trained model over REPLICAS independent batches (unbiased, summed over parameters)."""
    model = trainer.engine.model
    stream = build_embedded_stream(cfg.data.name, cfg.data.global_batch, cfg.run.seed + 1)
    ctx = ObjectiveContext.single_process(cfg.data.global_batch, cfg.run.seed + 1,
                                          ema_model=trainer.engine.ema_model)
    grads = []
    for i in range(REPLICAS):
        step = 10**6 + 7 * i + 1           # fresh draws of (t, r, e), never a β* diagnostic step
        loss, _ = trainer.objective(model, stream.global_batch(i), step, ctx)
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(model.parameters()))]))
    return torch.stack(grads).var(dim=0, unbiased=True).sum().item()


# ------------------------------------------------------------------------------------------------------ summaries
def by_label(results: list[Result], experiment: str) -> dict[str, list[Result]]:
    out: dict[str, list[Result]] = {}
    for r in results:
        if r.setting.experiment == experiment:
            out.setdefault(r.setting.label, []).append(r)
    return out


def mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], digits: int = 3) -> str:
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}g} ± {sd:.2g}" if math.isfinite(mean) else "n/a"


def tail(series: list[tuple[int, float]], fraction: float = 0.5) -> list[float]:
    return [v for _, v in series[int(len(series) * (1 - fraction)):]]


def head(series: list[tuple[int, float]], fraction: float = 0.2) -> list[float]:
    return [v for _, v in series[:max(1, int(len(series) * fraction))]]


def loss_cv(r: Result) -> float:
    """Coefficient of variation of the logged loss over the last half: scale-free, so MF and iMF compare."""
    values = tail(r.series.get("loss", []))
    return statistics.pstdev(values) / abs(statistics.fmean(values)) if len(values) > 1 else math.nan


def stat(r: Result, key: str, how) -> float:
    values = [v for _, v in r.series.get(key, [])]
    return how(values) if values else math.nan


def mean_of(rs: list[Result], fn) -> float:
    return mean_sd([fn(r) for r in rs])[0]


# ------------------------------------------------------------------------------------------------------ report
def write_report(results: list[Result], out: Path, args, elapsed_s: float) -> Path:
    plots = out / "fidelity"
    plots.mkdir(parents=True, exist_ok=True)
    lines = [
        "# Fidelity report: the MeanFlow family at 2-D toy scale",
        "",
        f"Generated by `python bench/fidelity.py{' --quick' if args.quick else ''}` on "
        f"{time.strftime('%Y-%m-%d')}: {args.steps} steps, {args.seeds} seed(s) per setting, 1-NFE SW1/SW2 of the "
        f"EMA model on {args.samples} samples; {len(results)} runs in {elapsed_s / 60:.1f} min on "
        f"{args.workers} worker(s) (CPU). Toy MLP 3×128 SiLU, batch 256, lr 1e-3, EMA 0.999; each objective at the toy "
        f"configs' defaults (`configs/toy2d_mf.yaml`: uniform t, 25% of rows r ≠ t; `toy2d_imf.yaml`: 50%, "
        f"boundary tangent). Mean ± sd over seeds. Lower SW is better.",
        "",
    ]
    sections = {"tangents": tangents_section, "share": share_section, "beta": beta_section, "imf": imf_section,
                "stability": stability_section, "sg_lambda": sg_lambda_section, "family": family_section}
    path = out / "FIDELITY.md"
    if args.only:   # replace the named sections of the existing report, keep the others as they are
        text = path.read_text()
        for name in args.only:
            new = "\n".join(sections[name](results, plots) + [""]) + "\n"
            text = replace_section(text, new)
        path.write_text(text)
        return path
    for section in sections.values():
        lines += section(results, plots) + [""]
    path.write_text("\n".join(lines))
    return path


def replace_section(report: str, section: str) -> str:
    """``report`` with the ``## `` section of the same title as ``section`` replaced by it (appended if new)."""
    title = section.splitlines()[0]
    start = report.find(title + "\n")
    if start < 0:
        return report.rstrip("\n") + "\n\n" + section
    end = report.find("\n## ", start + len(title))
    return report[:start] + section + (report[end + 1:] if end >= 0 else "")


def sw_table(groups: dict[str, list[Result]], extra: dict[str, callable] | None = None) -> list[str]:
    extra = extra or {}
    header = ["setting", "SW1", "SW2", *extra]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, rs in groups.items():
        cells = [label, fmt([r.sw1 for r in rs]), fmt([r.sw2 for r in rs])]
        cells += [fmt([fn(r) for r in rs]) for fn in extra.values()]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def verdict(ok: bool | None, text: str) -> str:
    mark = {True: "**Reproduced.**", False: "**Not reproduced.**", None: "**Inconclusive** (within ±10%)."}[ok]
    return f"{mark} {text}"


def lower(a: float, b: float, margin: float = 0.1) -> bool | None:
    """Is ``a`` clearly below ``b``? True beyond ``margin`` (relative), False beyond it the other way, else None."""
    if a < (1 - margin) * b:
        return True
    return False if a > (1 + margin) * b else None


def tangents_section(results, plots) -> list[str]:
    groups = by_label(results, "tangents")
    correct = mean_of(groups["dt=1, dr=0 (MF)"], lambda r: r.sw1)
    wrong = [mean_of(rs, lambda r: r.sw1) for label, rs in groups.items() if label != "dt=1, dr=0 (MF)"]
    bar_plot(plots / "tangents.png", groups, "JVP tangents (checkerboard, 1-NFE SW1)")
    return ["## 1. Wrong tangents fail (MF paper's ablation)", "",
            "MF on the checkerboard with the JVP tangent (dz, dt, dr) = (v, 1, 0) against (v, 0, 0) and (v, 0, 1) "
            "(`objective.time_tangents`).", "", *sw_table(groups), "",
            verdict(min(wrong) > 1.5 * correct,
                    f"the right tangent gives SW1 {correct:.3f}; the wrong ones {', '.join(f'{w:.3f}' for w in wrong)} "
                    "(claim: the wrong ones collapse; 'reproduced' = both ≥ 1.5× worse)."),
            "", "![tangents](fidelity/tangents.png)"]


def share_section(results, plots) -> list[str]:
    groups = by_label(results, "share")
    sw1 = {label: mean_of(rs, lambda r: r.sw1) for label, rs in groups.items()}
    best = min(sw1, key=sw1.get)
    bar_plot(plots / "share.png", groups, "Share of rows with r ≠ t (checkerboard, 1-NFE SW1)")
    zero_worst = sw1["0% r≠t"] == max(sw1.values())
    return ["## 2. Share of rows with r ≠ t", "",
            "MF on the checkerboard, `objective.time.share_r_eq_t` = 1, 0.75, 0.5, 0 (0%, 25%, 50%, 100% of rows "
            "with r ≠ t). With 0% the model only ever learns r = t (flow matching) and is sampled in one jump.", "",
            *sw_table(groups), "",
            verdict(zero_worst and best == "25% r≠t",
                    f"0% is {'the worst' if zero_worst else 'not the worst'} (SW1 {sw1['0% r≠t']:.3f}); the best is "
                    f"{best} (SW1 {sw1[best]:.3f}). Claim: 0% fails at 1 NFE and 25% is best."),
            "", "![share](fidelity/share.png)"]


def own_beta(r: Result) -> float:
    return float(r.setting.label.rsplit("β=", 1)[1])


def beta_section(results, plots) -> list[str]:
    groups = by_label(results, "beta")
    lines = ["## 3. Control-variate tangent (VaMF): β", "",
             "`tangent_beta` with the EMA proxy, β ∈ {0, 0.25, 0.5, 0.75, 1}. Tr Cov[∇ℓ]: the gradient's total "
             f"variance over {REPLICAS} independent batches at the end of training, with the run's own β. β*: the "
             "live diagnostic the trainer logs (exact on the toys, through a sampled marginal-velocity oracle), "
             "averaged over the run; its no-bias upper bound beside it.", "",
             "| toy | β | SW1 | SW2 | Tr Cov[∇ℓ] | β* (live) | β* bound |", "|---|---|---|---|---|---|---|"]
    improves, best_betas, curves = 0, {}, {}
    for toy in TOYS:
        per_beta = {beta: groups[f"{toy} β={beta}"] for beta in BETAS}
        for beta, rs in per_beta.items():
            lines.append(f"| {toy} | {beta} | {fmt([r.sw1 for r in rs])} | {fmt([r.sw2 for r in rs])} | "
                         f"{fmt([r.grad_variance[own_beta(r)] for r in rs])} | "
                         f"{fmt([stat(r, 'beta_star', statistics.fmean) for r in rs], 2)} | "
                         f"{fmt([stat(r, 'beta_star_bound', statistics.fmean) for r in rs], 2)} |")
        sw1 = [mean_of(rs, lambda r: r.sw1) for rs in per_beta.values()]
        improves += sw1[-1] < sw1[0]
        best_betas[toy] = BETAS[min(range(len(BETAS)), key=sw1.__getitem__)]
        # the controlled comparison: every trained model of this toy, its gradient under each β
        curves[toy] = [mean_sd([r.grad_variance[b] for rs in per_beta.values() for r in rs])[0] for b in BETAS]
    lines += ["", "The same comparison at fixed parameters: every model trained on the toy (all β, all seeds), its "
                  "gradient's Tr Cov[∇ℓ_β] evaluated with each β on the same batches (mean over models):", "",
              "| toy | " + " | ".join(f"β={b}" for b in BETAS) + " |", "|---|" + "---|" * len(BETAS)]
    lines += [f"| {toy} | " + " | ".join(f"{v:.3g}" for v in curve) + " |" for toy, curve in curves.items()]
    monotone = sum(all(b <= a for a, b in zip(c, c[1:])) for c in curves.values())
    falls = sum(c[-1] < 0.9 * c[0] for c in curves.values())
    beta_plot(plots / "beta.png", groups, curves)
    swiss = [mean_of(groups[f"swiss_roll β={b}"], lambda r: r.sw1) for b in (0.0, 1.0)]
    lines += ["", verdict(monotone == len(TOYS) or (None if falls == len(TOYS) else False),
                          f"at fixed parameters Tr Cov[∇ℓ_β] falls monotonically in β on {monotone} of {len(TOYS)} "
                          f"toys, and is ≥ 10% lower at β = 1 than at β = 0 on {falls}."),
              "", verdict(improves >= 3,
                          f"SW1 at β = 1 beats β = 0 on {improves} of {len(TOYS)} toys; swiss roll "
                          f"{swiss[0]:.3f} → {swiss[1]:.3f} (paper: 0.098 → 0.045). Best β per toy: "
                          + ", ".join(f"{t} {b}" for t, b in best_betas.items()) + "."),
              "", "![beta](fidelity/beta.png)"]
    return lines


def imf_section(results, plots) -> list[str]:
    groups = by_label(results, "imf")
    cv = {label: mean_of(rs, loss_cv) for label, rs in groups.items()}
    curve_plot(plots / "imf_loss.png", groups, "loss", "Training loss, MF vs iMF (checkerboard)")
    return ["## 4. iMF against MF", "",
            "Each at its toy config's defaults. Loss variability = coefficient of variation (sd / mean) of the "
            "logged loss over the second half of training (scale-free: the two losses differ in scale).", "",
            *sw_table(groups, {"loss sd/mean (2nd half)": loss_cv}), "",
            verdict(lower(cv["iMF"], cv["MF"]),
                    f"iMF's loss varies {cv['iMF']:.3f} against MF's {cv['MF']:.3f} (claim: lower variance)."),
            "", "![imf](fidelity/imf_loss.png)"]


def family_section(results, plots) -> list[str]:
    groups = by_label(results, "family")
    bar_plot(plots / "family.png", groups, "1-NFE SW1 by objective (checkerboard)")
    rows = ["| setting | 1-NFE SW1 | " + " | ".join(f"{label} SW1" for label in SAMPLINGS) + " |",
            "|" + "---|" * (2 + len(SAMPLINGS))]
    for label, rs in groups.items():
        rows.append(f"| {label} | {fmt([r.sw1 for r in rs])} | "
                    + " | ".join(fmt([r.sampled_sw1[s] for r in rs]) for s in SAMPLINGS) + " |")
    return ["## 7. The family at equal steps", "",
            "Each objective at its toy config (`toy2d_mf` for fm and mf, `toy2d_imf`, `toy2d_alphaflow` with α "
            "reaching 0 at two thirds of the run, `toy2d_split_mf`), the same steps and seeds; every trained EMA "
            "model is sampled 1-NFE, with 2 flow-map steps, and with the consistency sampler (x̂ = z − t·u(z, 0, t), "
            "re-noised to t = 0.5, one more step).", "", *rows, "", "![family](fidelity/family.png)"]


def stability_section(results, plots) -> list[str]:
    groups = by_label(results, "stability")
    metrics = {"max jvp_norm": lambda r: stat(r, "jvp_norm", max),
               "mean jvp_norm": lambda r: stat(r, "jvp_norm", statistics.fmean),
               "max expansion": lambda r: stat(r, "expansion_max", max),
               "mean expansion": lambda r: stat(r, "expansion_mean", statistics.fmean),
               "early mse (first 20%)": lambda r: statistics.fmean(head(r.series.get("mse", [(0, math.nan)])))}
    curve_plot(plots / "stability_jvp.png", groups, "jvp_norm", "jvp_norm over training (checkerboard)")
    value = {label: {k: mean_of(rs, fn) for k, fn in metrics.items()} for label, rs in groups.items()}
    sw1 = {label: mean_of(rs, lambda r: r.sw1) for label, rs in groups.items()}
    off, paper, strong = "μ=0.0, δ=0.01", "μ=0.1, δ=0.01", "μ=0.1, δ=0.5"
    lines = ["## 5. Non-expansivity (Stable MeanFlow)", "",
             "MF plus the stability term, μ ∈ {0, 0.1, 0.5} at the paper's absolute δ = 0.01, and at δ = 0.5 (a "
             "perturbation the size of the toy's structure). At μ = 0 the expansion ratio is measured but not "
             "penalised (`stability.measure_when_off`). Early mse: mean over the first 20% of steps.", "",
             *sw_table(groups, metrics), ""]
    for label in (paper, strong):
        lines += [verdict(lower(value[label]["max jvp_norm"], value[off]["max jvp_norm"]),
                          f"{label}: max jvp_norm {value[off]['max jvp_norm']:.3g} (μ = 0) → "
                          f"{value[label]['max jvp_norm']:.3g}, max expansion {value[off]['max expansion']:.3g} → "
                          f"{value[label]['max expansion']:.3g} (claim: bounded JVP)."), "",
                  verdict(lower(value[label]["early mse (first 20%)"], value[off]["early mse (first 20%)"]),
                          f"{label}: early mse {value[off]['early mse (first 20%)']:.4g} → "
                          f"{value[label]['early mse (first 20%)']:.4g} (claim: faster early convergence)."), ""]
    for small, large in ((paper, "μ=0.5, δ=0.01"), (strong, "μ=0.5, δ=0.5")):
        lines += [verdict(lower(1.2 * sw1[small], sw1[large], margin=0.0),
                          f"SW1 {sw1[small]:.3f} ({small}) against {sw1[large]:.3f} ({large}) (claim: quality "
                          "collapses at large μ; 'reproduced' = ≥ 1.2× worse)."), ""]
    return lines + ["With an absolute δ = 0.01 the penalty is ~1e-4 × (ratio − 1)² (Stable MF's term): compare the "
                    "rows at δ = 0.01 with μ = 0 to see whether the term did anything at all.",
                    "", "![stability](fidelity/stability_jvp.png)"]


def sg_lambda_section(results, plots) -> list[str]:
    groups = by_label(results, "sg_lambda")
    curve_plot(plots / "sg_lambda_loss.png", groups, "loss", "Training loss under SG_λ (checkerboard)")
    cv = {label: mean_of(rs, loss_cv) for label, rs in groups.items()}
    sw1 = {label: mean_of(rs, lambda r: r.sw1) for label, rs in groups.items()}
    curriculum = "λ: 0→1 over half the run"
    return ["## 6. SG_λ curriculum (Modular MeanFlow)", "",
            "λ fixed at 0 (= MF), 0.5, 1, and the linear warm-up 0 → 1 over the first half of training.", "",
            *sw_table(groups, {"loss sd/mean (2nd half)": loss_cv}), "",
            verdict(lower(cv[curriculum], cv["λ=1.0"]),
                    f"loss variability with the curriculum {cv[curriculum]:.3g} against λ = 1 from the start "
                    f"{cv['λ=1.0']:.3g} (claim: the curriculum stabilises training that λ = 1 alone does not)."),
            "", verdict(lower(sw1[curriculum], sw1["λ=1.0"]),
                        f"SW1 with the curriculum {sw1[curriculum]:.3f} against λ = 1 from the start "
                        f"{sw1['λ=1.0']:.3f}; MF (λ = 0) {sw1['λ=0.0']:.3f}, λ = 0.5 {sw1['λ=0.5']:.3f} (claim: the "
                        "curriculum reaches λ = 1 without losing quality)."),
            "", "![sg_lambda](fidelity/sg_lambda_loss.png)"]


# ------------------------------------------------------------------------------------------------------ plots
def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def bar_plot(path: Path, groups: dict[str, list[Result]], title: str) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    labels = list(groups)
    stats = [mean_sd([r.sw1 for r in groups[label]]) for label in labels]
    ax.bar(range(len(labels)), [m for m, _ in stats], yerr=[s for _, s in stats], color="tab:blue", capsize=4)
    ax.set_xticks(range(len(labels)), labels)
    ax.set_ylabel("SW1 (1-NFE)")
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def beta_plot(path: Path, groups: dict[str, list[Result]], curves: dict[str, list[float]]) -> None:
    plt = _figure()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    for toy in TOYS:
        left.plot(BETAS, [mean_of(groups[f"{toy} β={b}"], lambda r: r.sw1) for b in BETAS], marker="o", label=toy)
        right.plot(BETAS, curves[toy], marker="o", label=toy)
    left.set(xlabel="β (training)", ylabel="SW1 (1-NFE)", title="Sample quality vs β")
    right.set(xlabel="β (gradient)", ylabel="Tr Cov[∇ℓ_β]", title="Gradient variance at fixed parameters",
              yscale="log")
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curve_plot(path: Path, groups: dict[str, list[Result]], key: str, title: str) -> None:
    plt = _figure()
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for label, rs in groups.items():
        series = rs[0].series.get(key, [])
        if series:
            ax.plot([s for s, _ in series], [v for _, v in series], label=f"{label} (seed {rs[0].seed})", lw=0.8)
    ax.set(xlabel="step", ylabel=key, title=title, yscale="log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------------ main
def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="CI size: 100 steps, 1 seed, 512 samples")
    p.add_argument("--steps", type=int)
    p.add_argument("--seeds", type=int)
    p.add_argument("--samples", type=int)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--out", default=str(Path(__file__).resolve().parent))
    p.add_argument("--only", nargs="+", metavar="EXPERIMENT",
                   help="run these experiments only (tangents, share, beta, imf, stability, sg_lambda, family) and "
                        "replace their sections of the existing FIDELITY.md")
    args = p.parse_args()
    args.steps = args.steps or (100 if args.quick else 3000)
    args.seeds = args.seeds or (1 if args.quick else 3)
    args.samples = args.samples or (512 if args.quick else 4096)
    chosen = [s for s in settings(args.steps) if not args.only or s.experiment in args.only]
    jobs = [(s, seed, args.steps, args.samples) for s in chosen for seed in range(args.seeds)]
    print(f"fidelity: {len(jobs)} runs of {args.steps} steps on {args.workers} worker(s)", flush=True)
    started = time.perf_counter()
    results = []
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        for i, result in enumerate(pool.imap_unordered(train, jobs), 1):
            results.append(result)
            done = time.perf_counter() - started
            print(f"[{i}/{len(jobs)}] {result.setting.experiment}: {result.setting.label} seed {result.seed}: "
                  f"SW1 {result.sw1:.3f} | {done / 60:.1f} min, ETA {done / i * (len(jobs) - i) / 60:.1f} min",
                  flush=True)
    order = {s: i for i, s in enumerate(settings(args.steps))}
    results.sort(key=lambda r: (order[r.setting], r.seed))
    path = write_report(results, Path(args.out), args, time.perf_counter() - started)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
