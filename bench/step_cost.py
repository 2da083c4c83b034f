"""Step time and memory of every objective relative to flow matching, on the same model and batch.

    python bench/step_cost.py [--config tiny_mf] [--steps 20] [--warmup 3] [--objectives fm,mf,...]
                              [--synthetic] [--keep-going] [key=value ...]

A row is ``OBJECTIVE[+VARIANT...]``:
  +all       the JVP's tangent pass on every row (objective.jvp_all_rows) instead of only the rows with r ≠ t
  +naive     MF the way public PyTorch ports write it: torch.func.jvp over the whole model on every row, math
             attention, no compile (the baseline)
  +two_pass  MF the peers' other way (NVlabs/FastGen, zhuyu-cs/MeanFlow): that JVP under no_grad for the target
             only, then a grad forward with the default (SDPA) attention for u, then the backward
  +math      attention inside the JVP forced to math (objective.jvp_attention=math; default auto = fused on GPU)
  +compiled  engine.compile=outside_jvp         +compiled_jvp  engine.compile=all (the JVP compiled too)
  +ckpt      engine.activation_checkpointing=true

On a CPU every row is built first, then timed in ``--rounds`` interleaved rounds of ``--steps`` steps (median
shown), so that the machine's noise hits every row alike; on a GPU one row at a time (memory), each printed as
soon as it is measured. Prints ms/step, ratio to fm, the FLOP floor in forward-equivalents F (F measured: one
no-grad forward of the batch) and ÷ floor, the activations autograd keeps for the backward (one step, measured with
saved-tensor hooks), on CUDA the peak memory, the model TFLOP/s of the floor and MFU (against the GPU model's
datasheet bf16 peak, or the measured matmul peak for a GPU the table lacks; the ``# MFU peak`` line says which).
Models are built on the device they are timed on. ``--synthetic``: random data of the model's shape (latent
models, B/2 and XL/2 on a GPU; bench/gpu_suite.py runs both). Figures go to bench/RESULTS.md by hand, with the
machine they came from.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
import traceback

import torch
from torch.utils.flop_counter import FlopCounterMode

from meanflow.data_pipeline import build_embedded_stream
from meanflow.jobs.components import resolve_device
from meanflow.models import build_model, count_parameters
from meanflow.models.execution import configure_execution, set_block_execution
from meanflow.objectives import AlphaFlow, ObjectiveContext, build_objective
from meanflow.objectives.base import adaptive_weighted_loss, expand_like, model_u
from meanflow.objectives.time_sampling import sample_time_pairs
from meanflow.platform.config import load_config
from meanflow.platform.engines import build_engine

OBJECTIVES = ("fm", "mf", "mf+all", "mf+naive", "mf+two_pass", "imf", "imf+all", "sg_lambda", "stability",
              "tangent_beta", "alphaflow", "split_mf", "dmf")
VARIANTS = ("all", "naive", "two_pass", "math", "compiled", "compiled_jvp", "ckpt")
# Datasheet dense bf16 peak (no sparsity) in TFLOP/s for MFU, by a part of torch.cuda.get_device_name(); the first
# part found wins, so the H100's three models (SXM "80GB HBM3", PCIe, NVL) each get their own. A GPU named
# otherwise is measured instead (matmul_flops).
PEAK_BF16_TFLOPS = (("H100 PCIe", 756), ("H100 NVL", 835), ("H100 80GB HBM3", 989), ("H100 SXM", 989),
                    ("H200 NVL", 835), ("H200", 989), ("A100", 312))


def configure(cfg, row: str) -> tuple[str, set[str]]:
    name, *variants = row.split("+")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"--objectives: unknown variant(s) {sorted(unknown)} in {row!r}; known: {VARIANTS}")
    peer = set(variants) & set(PEER_LOSS_FNS)
    if (peer and name != "mf") or len(peer) > 1:
        raise SystemExit(f"--objectives: {' and '.join(sorted(peer))} applies to mf alone, got {row!r}")
    cfg.objective.name = name
    cfg.objective.jvp_all_rows = "all" in variants
    if peer or "math" in variants:
        cfg.objective.jvp_attention = "math"
    cfg.engine.compile = ("all" if "compiled_jvp" in variants else "outside_jvp" if "compiled" in variants
                          else "none")
    cfg.engine.activation_checkpointing = "ckpt" in variants
    if name == "sg_lambda":                       # λ = 1: the full extra backward through the JVP
        cfg.objective.sg_lambda.start = cfg.objective.sg_lambda.end = 1.0
    if name == "imf" and cfg.model.family != "imf_dit":
        cfg.objective.imf.tangent = "boundary"
    if name == "dmf":                             # DMF trains the decoupled MF-DiT (same parameters + one head)
        cfg.model.conditioning = "decoupled"
    configure_execution(cfg.objective.jvp_attention, cfg.engine.compile, cfg.engine.activation_checkpointing,
                        cfg.engine.compile_backend)
    return name, set(variants)


def _peer_mf_jvp(cfg, model, batch, step, ctx):
    """MF's draw for this step (the objective's t, r and noise) and one torch.func.jvp over the whole batch, in the
    caller's grad mode. Returns (u_of, (z, t, r), u, target), target = sg(v − (t − r) du/dt); no training CFG."""
    x, y = batch["x"], batch.get("y")
    rand = ctx.random(step, x.device)
    t, r = sample_time_pairs(rand, cfg.objective.time, x.dtype)
    e = rand.normal("e", *x.shape[1:], dtype=x.dtype)
    z, v = (1 - expand_like(t, x)) * x + expand_like(t, x) * e, e - x
    u_of = lambda z, t, r: model_u(model(z, t=t, r=r, y=y))
    u, dudt = torch.func.jvp(u_of, (z, t, r), (v, torch.ones_like(t), torch.zeros_like(r)))
    return u_of, (z, t, r), u, (v - expand_like(t - r, x) * dudt).detach()


def naive_mf_loss(cfg, model, batch, step, ctx):
    """MF as public ports write it: u and du/dt from one grad-enabled JVP, then the stop-gradient target."""
    _, _, u, target = _peer_mf_jvp(cfg, model, batch, step, ctx)
    return adaptive_weighted_loss(u - target, cfg.objective.weight_p, cfg.objective.weight_c)[0]


def two_pass_mf_loss(cfg, model, batch, step, ctx):
    """MF as NVlabs/FastGen and zhuyu-cs/MeanFlow write it: the JVP under no_grad gives only the target (its
    attention has a tangent: math); a second, grad-enabled forward gives u (no tangent: SDPA, the fast backend)."""
    with torch.no_grad():
        u_of, inputs, _, target = _peer_mf_jvp(cfg, model, batch, step, ctx)
    return adaptive_weighted_loss(u_of(*inputs) - target, cfg.objective.weight_p, cfg.objective.weight_c)[0]


PEER_LOSS_FNS = {"naive": naive_mf_loss, "two_pass": two_pass_mf_loss}   # variant -> loss(cfg, model, batch, ...)


def make_batches(cfg, n: int, device, synthetic: bool) -> list[dict]:
    if synthetic:
        gen = torch.Generator().manual_seed(0)
        m, b = cfg.model, cfg.data.global_batch
        shape = (m.data_dim,) if m.family == "mlp" else (m.in_channels, m.image_size, m.image_size)
        out = [{"x": torch.randn(b, *shape, generator=gen)} for _ in range(n)]
        if m.num_classes:
            for batch in out:
                batch["y"] = torch.randint(0, m.num_classes, (b,), generator=gen)
    else:
        stream = build_embedded_stream(cfg.data.name, cfg.data.global_batch, cfg.run.seed)
        out = [stream.global_batch(s) for s in range(n)]
    return [{k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()} for b in out]


def saved_activation_mb(step_fn, params) -> float:
    """MB of tensors autograd keeps for the backward during one step (parameters excluded)."""
    pointers = {p.untyped_storage().data_ptr() for p in params}
    kept: dict[int, int] = {}

    def pack(t):
        try:
            storage = t.untyped_storage()
            if storage.data_ptr() not in pointers:
                kept[storage.data_ptr()] = storage.nbytes()
        except (RuntimeError, NotImplementedError):   # forward AD's zero tensors hold no memory
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step_fn()
    return sum(kept.values()) / 2**20


class Row:
    """One benchmark row, built once and timed in several interleaved rounds (machine noise hits every row)."""

    def __init__(self, cfg, row: str, steps: int, warmup: int, device, synthetic: bool):
        self.cfg, self.device, self.steps = cfg, device, steps
        name, self.variants = configure(cfg, row)
        peer = self.variants & set(PEER_LOSS_FNS)
        self.peer_loss = PEER_LOSS_FNS[peer.pop()] if peer else None   # MF as a peer writes it, not the objective
        torch.manual_seed(0)
        self.engine = build_engine(cfg.engine, cfg.optim, lambda: build_on(device, cfg.model), device, world_size=1)
        self.objective = build_objective(cfg.objective, cfg.model.num_classes)
        self.ctx = ObjectiveContext.single_process(cfg.data.global_batch, cfg.run.seed,
                                                   ema_model=self.engine.ema_model)
        self.batches = make_batches(cfg, steps + warmup, device, synthetic)
        self.floor = floor_in_forwards(cfg, name, self.variants)
        self.saved_mb = saved_activation_mb(lambda: self.loss_of(0), self.engine.model.parameters())
        self.times_ms: list[float] = []
        self.peak_mb = 0.0
        self.run(range(steps, steps + warmup))      # warm-up (and compilation) on batches never timed

    def loss_of(self, step):
        with self.engine.autocast():
            if self.peer_loss:
                return self.peer_loss(self.cfg, self.engine.model, self.batches[step], step, self.ctx)
            return self.objective(self.engine.model, self.batches[step], step, self.ctx)[0]

    def run(self, steps) -> float:
        configure_execution(self.cfg.objective.jvp_attention, self.cfg.engine.compile,
                            self.cfg.engine.activation_checkpointing, self.cfg.engine.compile_backend)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for step in steps:
            self.engine.backward(self.loss_of(step))
            self.engine.apply(step)
        if cuda:
            torch.cuda.synchronize()
            self.peak_mb = max(self.peak_mb, torch.cuda.max_memory_allocated() / 2**20)
        return (time.perf_counter() - start) / len(steps) * 1e3

    def time_round(self) -> None:
        self.times_ms.append(self.run(range(self.steps)))

    def release(self) -> None:
        del self.engine, self.objective, self.ctx, self.batches

    @property
    def ms(self) -> float:
        return statistics.median(self.times_ms)


def forward_cost(cfg, device, synthetic: bool, repeats: int = 10) -> tuple[float, float]:
    """F: one no-grad forward of the model over the global batch, in ms and in FLOPs (unit of the floors)."""
    set_block_execution("none")
    torch.manual_seed(0)
    model = build_on(device, cfg.model)
    batch = make_batches(cfg, 1, device, synthetic)[0]
    x, y = batch["x"], batch.get("y")
    t = torch.rand(len(x), device=device)
    omega = (torch.tensor([1.0, 0.0, 1.0], device=device).expand(len(x), 3)
             if cfg.model.family == "imf_dit" else None)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=cfg.engine.precision == "bf16")
    with torch.no_grad(), autocast:
        counter = FlopCounterMode(display=False)
        with counter:
            model(x, t=t, r=t, y=y, omega=omega)
        for i in range(repeats + 2):
            if i == 2:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
            model(x, t=t, r=t, y=y, omega=omega)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats * 1e3, float(counter.get_total_flops())


def floor_in_forwards(cfg, name: str, variants: set[str]) -> float:
    """Issue 8's FLOP floor in forward-equivalents F: forward + backward 3F; the JVP's tangent pass 1F on the rows
    with r ≠ t only (on every row for +all/+naive/+two_pass); each no-grad forward 1F (training CFG: 2, or 1 at
    κ = 0; iMF: 2; the EMA or boundary proxy of tangent_beta: 1); SG_λ's backward through the JVP 2F on those rows;
    stability 3F. The peers' MF computes no training CFG: +naive 4F (the JVP's primal is the forward); +two_pass 5F
    (a no-grad JVP, primal 1F + tangent 1F, then its own forward and backward 3F). docs/objectives.md: alphaflow
    1F more on its r < t rows unless α = 1 (the no-grad u(z_s, r, s), or at α = 0 the JVP's tangent); split_mf 2F
    more on its interval rows (two no-grad forwards), training CFG on its boundary rows only; dmf two branches
    (3F + 4F) with training CFG in each."""
    o = cfg.objective
    if variants & set(PEER_LOSS_FNS):
        return 5.0 if "two_pass" in variants else 4.0
    share = 1.0 if "all" in variants else 1.0 - o.time.share_r_eq_t
    cfg_on = cfg.model.num_classes and not (o.guidance.omega == 1.0 and o.guidance.kappa == 0.0)
    guidance = (2.0 if o.guidance.kappa else 1.0) if cfg_on else 0.0
    base = o.stability.base if name == "stability" else name
    if base == "fm":
        floor = 3.0
    elif base == "imf":
        floor = 3.0 + share + 2.0
    elif base == "alphaflow":
        alpha = AlphaFlow(o).alpha(0)
        floor = 3.0 + (1.0 - o.alphaflow.share_fm) * (alpha < 1) + guidance
    elif base == "split_mf":
        boundary = o.split_mf.share_boundary
        floor = 3.0 + 2.0 * (1.0 - boundary) + guidance * boundary
    elif base == "dmf":
        floor = 7.0 + 2.0 * guidance
    else:
        floor = 3.0 + share + guidance
        floor += 2.0 * share if base == "sg_lambda" else 0.0
        floor += 1.0 if base == "tangent_beta" and o.tangent_beta.proxy != "v_head" else 0.0
    return floor + (3.0 if name == "stability" else 0.0)


def datasheet_tflops(gpu_name: str) -> tuple[str, float] | None:
    """(the table's name part, dense bf16 TFLOP/s) of a GPU named ``gpu_name``, or None if the table lacks it."""
    return next(((part, tflops) for part, tflops in PEAK_BF16_TFLOPS if part in gpu_name), None)


def matmul_flops(device, n: int = 8192, dtype=torch.bfloat16, repeats: int = 20) -> float:
    """FLOP/s of an n×n matmul measured on ``device`` (after 3 warm-up calls)."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for i in range(repeats + 3):
        if i == 3:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def mfu_peak(device) -> tuple[float | None, str]:
    """(FLOP/s that MFU divides by, where it comes from): the datasheet's figure for this GPU model, else the bf16
    matmul peak measured here (MFU then says how much of what this GPU reaches, not of its datasheet)."""
    if device.type != "cuda":
        return None, "none on a CPU (no MFU)"
    gpu = torch.cuda.get_device_name(device)
    if known := datasheet_tflops(gpu):
        return known[1] * 1e12, f"{known[1]} TFLOP/s dense bf16, datasheet of {known[0]} ({gpu})"
    flops = matmul_flops(device)
    return flops, f"{flops / 1e12:.0f} TFLOP/s measured (bf16 matmul 8192²): {gpu} is not in the datasheet table"


def build_on(device, model_cfg) -> torch.nn.Module:
    """The model with every tensor created on ``device`` (XL/2's initialisation takes ~7 s on a CPU)."""
    with torch.device(device):
        return build_model(model_cfg)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="tiny_mf")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--objectives", default=",".join(OBJECTIVES))
    p.add_argument("--synthetic", action="store_true", help="random data of the model's shape")
    p.add_argument("--keep-going", action="store_true",
                   help="leave out a row that raises (traceback on stderr), print the others, exit with status 1")
    p.add_argument("overrides", nargs="*")
    args = p.parse_args()
    base = load_config(args.config, args.overrides)
    device = resolve_device(base.engine.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"# {args.config}: {base.model.family}/{base.model.size} "
          f"{count_parameters(build_on('meta', base.model)) / 1e6:.2f}M params, global batch {base.data.global_batch}, "
          f"{base.engine.precision}, device {device} ({where}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}")
    make_row = lambda row: Row(load_config(args.config, args.overrides), row, args.steps, args.warmup, device,
                               args.synthetic)
    failed: list[str] = []

    def attempt(build, name: str):
        """build(name), or with --keep-going None once its traceback is on stderr (the exit status becomes 1)."""
        try:
            return build(name)
        except Exception:
            if not args.keep_going:
                raise
            traceback.print_exc()
            failed.append(name)
            return None

    def measured_alone(name: str) -> Row:   # one model in GPU memory at a time (XL/2: ~11 GB of weights and Adam)
        row = make_row(name)
        for _ in range(args.rounds):
            row.time_round()
        row.release()
        torch.cuda.empty_cache()
        return row

    f_ms, f_flops = forward_cost(base, device, args.synthetic)
    peak, peak_source = mfu_peak(device)
    print(f"F (one no-grad forward of the batch) = {f_ms:.1f} ms, {f_flops / 1e12:.4f} TFLOP; median of {args.rounds} "
          f"rounds of {args.steps} steps")
    print(f"# MFU peak: {peak_source}")
    print(f"{'row':<20}{'ms/step':>9}{'÷ fm':>7}{'floor F':>8}{'floor ms':>9}{'÷ floor':>8}{'saved MB':>10}"
          f"{'peak MB':>9}{'TFLOP/s':>9}{'MFU':>6}", flush=True)

    def print_row(name: str, r: Row, fm_ms: float) -> None:
        tflops = r.floor * f_flops / (r.ms / 1e3) / 1e12
        mfu = f"{tflops * 1e12 / peak:>6.0%}" if peak else f"{'-':>6}"
        peak_mb = f"{r.peak_mb:>9.0f}" if device.type == "cuda" else f"{'-':>9}"
        print(f"{name:<20}{r.ms:>9.1f}{r.ms / fm_ms:>7.2f}{r.floor:>8.2f}{r.floor * f_ms:>9.1f}"
              f"{r.ms / (r.floor * f_ms):>8.2f}{r.saved_mb:>10.1f}{peak_mb}{tflops:>9.3f}{mfu}", flush=True)

    names = args.objectives.split(",")
    if device.type == "cpu":      # all rows alive at once, rounds interleaved
        rows = {name: row for name in names if (row := attempt(make_row, name))}
        for _ in range(args.rounds):
            for row in rows.values():
                row.time_round()
        for name, row in rows.items():
            print_row(name, row, rows["fm"].ms if "fm" in rows else float("nan"))
    else:                         # each row printed once measured (a killed run keeps them; ÷ fm: list fm first)
        fm_ms = float("nan")
        for name in names:
            if row := attempt(measured_alone, name):
                fm_ms = row.ms if name == "fm" else fm_ms
                print_row(name, row, fm_ms)
    if failed:
        print(f"# failed rows (tracebacks on stderr): {','.join(failed)}")
        raise SystemExit(1)


if __name__ == "__main__":
    main()
