"""Structured run configuration: dataclass schema + ``configs/<name>.yaml`` + dotlist overrides.

Every field has a docstring (the string under it), and every numeric field its range (``bounded(default, ge=1)``
beside it). Loading validates against the schema: an unknown key, a wrong type, a number out of its range or a
name not among ``CHOICES`` raises ``ConfigError`` naming the key and the file (or the command-line override) it
came from; the CLI turns that into exit code 2. The resolved config is written into every run directory.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

REPO_CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class ConfigError(ValueError):
    """A config that cannot be used; the message names the key and where it came from."""


# ------------------------------------------------------------------------------------------------- ranges


@dataclass(frozen=True)
class Range:
    """Bounds of a number (of each element, for a list); a bound left as None does not apply."""

    ge: Optional[float] = None
    gt: Optional[float] = None
    le: Optional[float] = None
    lt: Optional[float] = None

    def __contains__(self, value: float) -> bool:   # NaN compares false with every bound: refused where bounded
        return ((self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def __str__(self) -> str:
        low = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else ""
        high = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else ""
        if low and high:
            return f"in {low}, {high}"
        one_sided = ((self.ge, "≥"), (self.gt, ">"), (self.le, "≤"), (self.lt, "<"))
        return next((f"{op} {bound:g}" for bound, op in one_sided if bound is not None), "any number")


def bounded(default: Any, *, ge=None, gt=None, le=None, lt=None) -> Any:
    """A schema field whose value (each element, for a list; None passes) ``validate`` checks against the range."""
    meta = {"range": Range(ge=ge, gt=gt, le=le, lt=lt)}
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata=meta)
    return field(default=default, metadata=meta)


# ----------------------------------------------------------------------------------------------- sections


@dataclass
class RunConfig:
    name: str = "run"
    """Run name; the default run directory is ./runs/<name>."""
    run_dir: str = "file://./runs/${run.name}"
    """fsspec URL of the run directory (file://, s3://, memory://). Holds config, metrics, checkpoints, samples."""
    seed: int = bounded(0, ge=0)
    """Run seed: every random draw is seeded by (seed, step, global sample index)."""
    steps: int = bounded(1000, ge=1)
    """Optimizer steps to train."""
    log_every: int = bounded(50, ge=1)
    """Steps between progress lines and metrics records."""
    resume: bool = False
    """Require a checkpoint to continue from (an error if run_dir holds none). A run_dir that holds committed
    checkpoints is always continued (a requeued job restarts the same command), provided its stored model,
    objective and data sections equal this config's, and its FID measurement too (eval.new_series)."""
    trackers: List[str] = field(default_factory=list)
    """Experiment trackers fed by rank 0 beside metrics.jsonl: tensorboard (event files in <run_dir>/tb/), wandb
    (offline unless WANDB_MODE says otherwise; run id in <run_dir>/trackers/wandb.json). The trackers extra."""
    wandb_project: str = "meanflow"
    """W&B project (the entity is WANDB_ENTITY's; credentials only from the environment)."""


@dataclass
class ModelConfig:
    family: str = "mf_dit"
    """mf_dit (adaLN-zero, MF), imf_dit (in-context tokens, iMF), or mlp (2-D toys)."""
    size: str = "tiny"
    """tiny (CPU), S, B, M, L, XL. MF-DiT and iMF-DiT share names but not shapes (docs/objectives.md)."""
    patch_size: int = 2
    """Patch size: 2, 4 or 8."""
    image_size: int = bounded(8, ge=1)
    """Input height = width (latent size for latent models)."""
    in_channels: int = bounded(1, ge=1)
    """Input channels (4 for SD-VAE latents)."""
    num_classes: int = bounded(0, ge=0)
    """Number of classes; 0 = unconditional. The null label is index num_classes."""
    v_head: bool = False
    """imf_dit only: add the auxiliary v-head branch (dropped at inference)."""
    v_head_depth: int = bounded(8, ge=1)
    """Blocks in the v-head branch (and in the u branch after the shared trunk)."""
    depth: Optional[int] = bounded(None, ge=0)
    """Override the registry's depth (null or 0: the registry's)."""
    width: Optional[int] = bounded(None, ge=0)
    """Override the registry's width (null or 0: the registry's)."""
    heads: Optional[int] = bounded(None, ge=0)
    """Override the registry's head count (null or 0: the registry's)."""
    prefix_tokens: Optional[List[int]] = bounded(None, ge=1)
    """imf_dit only: tokens per condition [class, ω, t_min, t_max, h]; null = iMF's [8, 4, 2, 2, 4]."""
    mlp_hidden: int = bounded(128, ge=1)
    """mlp only: hidden width."""
    mlp_layers: int = bounded(3, ge=1)
    """mlp only: hidden SiLU layers."""
    data_dim: int = bounded(2, ge=1)
    """mlp only: data dimension."""
    conditioning: str = "standard"
    """mf_dit only: standard (every block on emb(t) + emb(h) + emb(y)) or decoupled (Decoupled MeanFlow: the first
    dmf_depth blocks on emb(t) + emb(y), the rest and the final layer on emb(r) + emb(y), one time embedder, plus a
    zero-initialised log-variance head). objective.name=dmf needs decoupled."""
    dmf_depth: int = bounded(0, ge=0)
    """decoupled: blocks conditioned on t (XL: 20 of 28); 0 = two thirds of the depth, rounded down."""
    init_from: str = ""
    """Start from a flow model's weights (an exported .safetensors, or a run directory: its newest checkpoint's
    EMA weights), loaded with weights_only; a decoupled model's r-conditioned blocks start as the flow model's."""


@dataclass
class TimeSamplerConfig:
    kind: str = "logit_normal"
    """logit_normal or uniform."""
    mu: float = bounded(-0.4)
    """Logit-normal mean. MF ImageNet −0.4; MF CIFAR −2.0; iMF −0.4."""
    sigma: float = bounded(1.0, gt=0)
    """Logit-normal std. MF ImageNet 1.0; MF CIFAR 2.0; iMF 1.0."""
    share_r_eq_t: float = bounded(0.75, ge=0, le=1)
    """Share of the global batch with r = t: a fixed count, spread evenly over the global index so every rank holds
    its part of the JVP rows. MF ImageNet 0.75; CIFAR 0.25; iMF 0.5."""


@dataclass
class GuidanceConfig:
    omega: float = bounded(1.0, ge=0)
    """MF training CFG ω (v_c weight). ω = 1, κ = 0 turns training CFG off."""
    kappa: float = bounded(0.0, ge=0, lt=1)
    """MF training CFG κ (weight of u(z,t,t|y)); effective scale ω/(1−κ). B/2 default: ω = 1, κ = 0.5."""
    t_start: float = bounded(0.0, ge=0, le=1)
    """Guidance window start."""
    t_end: float = bounded(1.0, ge=0, le=1)
    """Guidance window end."""
    drop_layout: str = "official"
    """Which rows lose their label (objective.label_drop): official = Bin(B, label_drop) rows, the first ones of the
    r = t set, so unconditional rows are flow-matching rows (both official codes drop the first rows of a batch
    whose r = t rows come first);
    independent = a Bernoulli draw per sample."""


@dataclass
class SGLambdaConfig:
    start: float = bounded(0.0, ge=0, le=1)
    """λ at step 0 (λ = 0 is MF's gradient)."""
    end: float = bounded(1.0, ge=0, le=1)
    """λ after warm-up (λ = 1 differentiates fully through the JVP)."""
    warmup_steps: int = bounded(5000, ge=0)
    """Curriculum length T_warmup."""
    shape: str = "linear"
    """linear or cosine."""


@dataclass
class StabilityConfig:
    base: str = "mf"
    """Base objective the non-expansivity penalty is added to (fm, mf, sg_lambda, imf, tangent_beta)."""
    delta: float = bounded(0.01, gt=0)
    """Perturbation size δ. The paper's numbers use an absolute δ = 0.01."""
    relative_delta: bool = False
    """Read δ as a fraction of ‖z‖ per sample (absolute δ makes the penalty ~1e-4·(ratio − 1)²)."""
    mu: float = bounded(0.1, ge=0)
    """Penalty weight μ; μ ≥ 0.5 collapses quality."""
    active_until_step: Optional[int] = bounded(None, ge=0)
    """Step at which μ reaches 0 (null: always active)."""
    decay: str = "none"
    """Shape of μ's decay to active_until_step: none, linear, cosine."""
    measure_when_off: bool = False
    """Log the expansion ratio even where μ = 0 (one more no-grad forward per step): for control runs."""


@dataclass
class IMFConfig:
    tangent: str = "v_head"
    """JVP tangent v_θ: v_head (needs model.v_head), boundary (u(z,t,t)), or v_c (ablation; ω ≡ 1 gives MF)."""
    s_max: float = bounded(7.0, ge=0)
    """ω ∈ [1, 1 + s_max]; 0 disables guidance conditioning (ω ≡ 1)."""
    beta_cfg: float = bounded(1.0)
    """ω density ∝ ω^−β_cfg (1: log-uniform)."""
    t_min_high: float = bounded(0.5, ge=0, le=1)
    """t_min ~ U[0, t_min_high)."""
    t_max_low: float = bounded(0.5, ge=0, le=1)
    """t_max ~ U[t_max_low, 1)."""


@dataclass
class TangentBetaConfig:
    beta: float = bounded(0.5, ge=0, le=1)
    """Tangent (1 − β)·v_c + β·v̂. β = 0 is MF; β = 1 the iMF corner."""
    proxy: str = "ema"
    """v̂: ema (EMA model's u(z,t,t)), boundary (u_θ(z,t,t)), v_head."""
    beta_star_every: int = bounded(100, ge=0)
    """Log the β* diagnostic every N steps (0: never)."""
    fm_anchor: float = bounded(0.0, ge=0)
    """λ_fm of the optional flow-matching anchor (0.1 in the paper; 0 = off)."""
    anchor_delta: float = bounded(1e-3, ge=0, le=1)
    """Anchor uses r = t − δ, δ ~ U[0, anchor_delta]."""


@dataclass
class AlphaFlowConfig:
    share_fm: float = bounded(0.5, ge=0, le=1)
    """Share of the global batch (spread over it as time.share_r_eq_t is) trained as flow matching (r = t)
    whatever α is."""
    start_step: int = bounded(0, ge=0)
    """s0 of the sigmoid α schedule: α = 1 (trajectory flow matching) until here."""
    end_step: int = bounded(400000, ge=0)
    """s1: α = 0 (MeanFlow, with its JVP) from here on. B/2: (0, 400k); XL/2: (600k, 1M) of 1.2M steps."""
    gamma: float = bounded(25.0, gt=0)
    """Steepness γ of α = 1 − σ(γ·p), p = (step − (s0 + s1)/2)/(s1 − s0); α < 0.005 snaps to 0, > 0.995 to 1."""
    eps: float = bounded(1e-3, gt=0)
    """The official per-element eps of w = α/(mean‖Δ‖² + eps); in our sum-over-elements convention the
    constant is c = eps·D (D = C·H·W), which is what is used (objective.weight_c is not)."""
    clamp_target: float = bounded(0.0, ge=0)
    """Clip u_tgt elementwise to ±this (XL/2: 4.0); 0 = off."""


@dataclass
class SplitMeanFlowConfig:
    share_boundary: float = bounded(0.5, ge=0, le=1)
    """Share of the global batch (spread over it as time.share_r_eq_t is) with r = t, trained on ‖u(z,t,t) − ṽ‖².
    Train it with plain L2 (objective.weight_p=0, as toy2d_split_mf does): under MF's adaptive weight the noise-free
    interval rows outweigh the boundary rows ~100× and the toy run diverged."""
    v_source: str = "conditional"
    """Boundary target: conditional (v_c, with training CFG as in MF) or teacher (a frozen flow model's velocity)."""
    teacher: str = ""
    """v_source=teacher: the flow model, an exported .safetensors or a run directory (its newest checkpoint), built
    with this config's model section; set model.init_from to the same URL to start the student from it."""


@dataclass
class DecoupledMeanFlowConfig:
    fm_mu: float = bounded(0.0)
    """Flow-matching branch: t ~ logit-normal(fm_mu, fm_sigma), r = t."""
    fm_sigma: float = bounded(1.0, gt=0)
    mf_mu: list[float] = bounded([0.4, -1.2])
    """MeanFlow branch: two draws from logit-normal(mf_mu[0], mf_sigma) and (mf_mu[1], mf_sigma); t = max, r = min."""
    mf_sigma: float = bounded(1.0, gt=0)
    logvar_scale: float = bounded(0.01, gt=0)
    """Each branch's loss is log(m + logvar_scale·e^l), m the per-sample mean squared error, l the log-variance head."""


@dataclass
class ObjectiveConfig:
    name: str = "mf"
    """fm, mf, sg_lambda, stability, imf, tangent_beta, alphaflow, split_mf, dmf."""
    time: TimeSamplerConfig = field(default_factory=TimeSamplerConfig)
    """(t, r) sampler."""
    weight_p: float = bounded(1.0, ge=0)
    """Adaptive weight power p in w = 1/(‖Δ‖² + c)^p (0 = plain L2; fm always uses plain L2)."""
    weight_c: float = bounded(0.01, gt=0)
    """Adaptive weight constant c."""
    label_drop: float = bounded(0.1, ge=0, le=1)
    """Share of labels replaced by the null class (class-conditional models)."""
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    """MF training-time CFG."""
    sg_lambda: SGLambdaConfig = field(default_factory=SGLambdaConfig)
    """SG_λ curriculum."""
    stability: StabilityConfig = field(default_factory=StabilityConfig)
    """Non-expansivity penalty (name: stability)."""
    imf: IMFConfig = field(default_factory=IMFConfig)
    """iMF options."""
    tangent_beta: TangentBetaConfig = field(default_factory=TangentBetaConfig)
    """Control-variate tangent options."""
    alphaflow: AlphaFlowConfig = field(default_factory=AlphaFlowConfig)
    """α-Flow options (docs/objectives.md, alphaflow)."""
    split_mf: SplitMeanFlowConfig = field(default_factory=SplitMeanFlowConfig)
    """SplitMeanFlow options (docs/objectives.md, split_mf)."""
    dmf: DecoupledMeanFlowConfig = field(default_factory=DecoupledMeanFlowConfig)
    """Decoupled MeanFlow options (docs/objectives.md, dmf; the model needs model.conditioning=decoupled)."""
    jvp_all_rows: bool = False
    """Run the JVP's tangent pass on every row, as public ports do, instead of only the rows with r ≠ t (where
    t − r = 0 multiplies it away). The result is the same; for benchmarks and checks."""
    time_tangents: list[float] = bounded([1.0, 0.0])
    """(dt, dr) of the MF-family JVP. (1, 0) is MeanFlow's total derivative d/dt; any other pair is a wrong one,
    offered only to reproduce the MF paper's ablation (bench/fidelity.py)."""
    jvp_attention: str = "auto"
    """Attention inside the JVP: auto (the fused jvp-flash-attention kernel on CUDA where it applies, else math),
    math, or fused (models/attention.py)."""


@dataclass
class DataConfig:
    name: str = "digits"
    """Embedded dataset (digits = scikit-learn's 8×8 digits, or a 2-D toy: checkerboard, eight_gaussians, ...),
    or "webdataset" to stream the shards at data.url."""
    global_batch: int = bounded(128, ge=1)
    """Samples per optimizer step over all processes and micro-batches."""
    url: str = ""
    """WebDataset shards (data.name = webdataset): a directory holding manifest.json, or a brace pattern such as
    s3://bucket/train-{000000..000127}.tar. Credentials and endpoints come from the environment
    (AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL_S3, ...) or an fsspec profile, never from this file."""
    num_workers: int = bounded(2, ge=0)
    """DataLoader worker processes per rank; each reads its own shards (0 = read in the training process)."""
    shuffle_block: int = bounded(1000, ge=1)
    """Records shuffled together (a seeded permutation of each block of consecutive records of a worker)."""
    latent_norm: str = "mf"
    """Latent shards: mf (× the VAE's scale, 0.18215), imf (iMF's per-channel SD-VAE mean/std) or measured
    (per-channel mean/std the shard writer measured on this data)."""
    latent_flip: bool = True
    """Latent shards only: pick the image or its horizontal flip at random each visit (both were encoded). Pixel
    shards are never flipped by it: see pixel_flip."""
    pixel_flip: bool = False
    """Pixel shards (image or array samples of shape (C, H, W)): mirror each sample at random each visit, drawn
    from (run seed, epoch, index). Off unless chosen: a mirrored digit or text is another symbol; natural photos
    (CIFAR, ImageNet pixels) are usually trained with it. Refused for latent shards and embedded data."""
    io_retries: int = bounded(5, ge=0)
    """Retries (exponential backoff from 0.5 s) of a transient storage error before the run fails."""


@dataclass
class OptimConfig:
    lr: float = bounded(1e-3, gt=0)
    """Peak AdamW learning rate."""
    betas: List[float] = bounded([0.9, 0.95], ge=0, lt=1)
    """AdamW betas (iMF: β2 = 0.95)."""
    weight_decay: float = bounded(0.0, ge=0)
    """AdamW weight decay."""
    warmup_steps: int = bounded(100, ge=0)
    """Linear LR warm-up steps."""
    grad_clip: float = bounded(1.0, ge=0)
    """Clip the global grad norm to this (0 = no clipping; the norm is always reported)."""
    ema_decay: float = bounded(0.999, ge=0, lt=1)
    """EMA decay of the weights used for sampling (0 = no EMA)."""
    grad_accum: int = bounded(1, ge=1)
    """Micro-batches per optimizer step (global_batch must divide evenly)."""


@dataclass
class EngineConfig:
    kind: str = "single"
    """single (one process), ddp (replicated model, gradients all-reduced by the engine), fsdp2 (parameters,
    gradients, optimizer state and EMA sharded with fully_shard) or deepspeed (ZeRO-1/2). The world size comes from the launcher
    (torchrun-style RANK/WORLD_SIZE/... variables, which submitit exports under SLURM)."""
    device: str = "auto"
    """auto (cuda if available), cpu, or cuda."""
    precision: str = "fp32"
    """fp32, or bf16: autocast around the objective (forward and JVP); losses are reduced in fp32."""
    deepspeed_stage: int = 2
    """deepspeed: ZeRO stage 1 (optimizer state sharded) or 2 (+ gradients). Stage 3 is refused (deepspeed#7913)."""
    fsdp_strategy: str = "full_shard"
    """fsdp2: full_shard (re-shard parameters after forward) or shard_grad_op (keep them until backward)."""
    jvp_smoke_test: bool = True
    """Before step 1, compare the engine's JVP with a finite difference of the same model; fail fast if off."""
    compile: str = "none"
    """torch.compile of the transformer blocks: none, outside_jvp (the no-grad guidance forwards, the rows with
    r = t, flow matching and sampling; the JVP runs eager) or all (models/execution.py)."""
    compile_backend: str = "inductor"
    """The torch.compile backend of engine.compile: inductor, or aot_eager / eager to tell whether a fault is in
    the generated kernels or in tracing (also the CPU smoke of bench/gpu_suite.py: no C++ build)."""
    activation_checkpointing: bool = False
    """Recompute each block's activations in the backward (correct under the JVP's forward AD) to fit XL batches."""
    process_group_timeout_s: float = bounded(600.0, gt=0)
    """Collective timeout: a lost rank fails the job after this long instead of hanging (gloo's default: 30 min)."""


@dataclass
class CheckpointConfig:
    every: int = bounded(0, ge=0)
    """Steps between checkpoints (0: only at the end)."""
    keep_last: int = bounded(3, ge=0)
    """Newest committed checkpoints to keep (the newest healthy one is kept whatever its age)."""
    keep_every: int = bounded(0, ge=0)
    """Also keep every step that is a multiple of this as a milestone (0: none)."""
    url: str = ""
    """Where checkpoints go (any fsspec URL); empty: <run.run_dir>/checkpoints."""
    async_save: bool = False
    """Stage the state in memory, then upload and commit in a background thread while training goes on (one
    upload in flight at most; the next save waits for it)."""
    upload_timeout_s: float = bounded(300.0, gt=0)
    """One attempt to reach the store (an upload, a read of the run directory) that has not finished after this long
    is abandoned and retried (with backoff). At most max_outage_s; long enough for the largest file of a save (the
    default: XL/2's 5.4 GB optimizer state at 20 MB/s)."""
    max_outage_s: float = bounded(1800.0, gt=0)
    """If the store stays unreachable this long (from the first attempt that failed or did not answer), the job
    stops loudly instead of training unprotected: within this plus one short last attempt, whatever hangs. A full
    disk, a read-only target, a missing permission or bucket fails at once instead."""


@dataclass
class InjectConfig:
    kind: str = "none"
    """Fault injection for tests: none, jvp_nan (the loss and jvp_norm become NaN, as when the JVP overflows),
    loss_spike (loss × factor) or grad_ramp (loss × (1 + rate)^(steps since start), a slowly growing grad norm)."""
    start: int = bounded(0, ge=0)
    """First training step attempt (counting repeats after rollbacks) that is hit."""
    count: int = bounded(1, ge=1)
    """Attempts hit from ``start`` on (a large number: a persistent fault)."""
    factor: float = bounded(100.0, gt=0)
    """loss_spike: the multiplier."""
    rate: float = bounded(0.2, ge=0)
    """grad_ramp: growth per attempt."""


@dataclass
class GuardConfig:
    enabled: bool = True
    """Detect non-finite values and spikes and respond: skip → rollback → fail."""
    window: int = bounded(128, ge=1)
    """Healthy values per stat that the z-score compares against."""
    z_threshold: float = bounded(6.0, ge=0)
    """Spike: a value this many standard deviations above the window's mean (0: off)."""
    warmup: int = bounded(20, ge=1)
    """Healthy values per stat before spike detection starts."""
    ratio: float = bounded(10.0, ge=0)
    """Ramp: a value above this multiple of the maximum of the stat's healthy values older than the window
    (0: off)."""
    ratio_warmup: int = bounded(1000, ge=0)
    """Healthy values per stat before the ramp test starts (norms legitimately grow by orders of magnitude early
    in training, from the zero-initialised output)."""
    max_skips: int = bounded(3, ge=1)
    """This many skipped steps within skip_window attempts trigger a rollback."""
    skip_window: int = bounded(50, ge=1)
    """Attempts over which skips are counted."""
    max_rollbacks: int = bounded(3, ge=0)
    """More rollbacks than this within rollback_window attempts fail the run."""
    rollback_window: int = bounded(1000, ge=1)
    """Attempts over which rollbacks are counted."""
    snapshot_every: int = bounded(50, ge=0)
    """Steps between in-memory snapshots (replicated engines; sharded ones roll back to the newest healthy
    committed checkpoint). 0: none after the one taken at the start (roll back to checkpoints)."""
    skip_batches: int = bounded(256, ge=0)
    """Global batches the data stream jumps over after a rollback (exact and recorded)."""
    cooldown_steps: int = bounded(0, ge=0)
    """Steps after a rollback trained at cooldown_factor × the scheduled LR."""
    cooldown_factor: float = bounded(0.1, gt=0, le=1)
    """LR multiplier during the cool-down."""
    inject: InjectConfig = field(default_factory=InjectConfig)
    """Fault injection (tests only; refused unless allow_inject)."""
    allow_inject: bool = False
    """Permit guard.inject (a run with injected faults is not a real run)."""


@dataclass
class SamplingGuidance:
    omega: float = bounded(1.0, ge=0)
    """iMF guidance scale ω at sampling."""
    t_min: float = bounded(0.0, ge=0, le=1)
    """Start of the guidance interval."""
    t_max: float = bounded(1.0, ge=0, le=1)
    """End of the guidance interval."""


@dataclass
class EvalConfig:
    num_samples: int = bounded(50000, ge=1)
    """Samples generated per evaluation (split over ranks by global index; 2-D toys: SW on 4096, docs/objectives.md)."""
    nfe: int = bounded(1, ge=1)
    """Sampling steps (1-NFE by default)."""
    sampler: str = "flow_map"
    """flow_map: z ← z − (t_i − t_{i+1})·u(z, t_{i+1}, t_i) on linspace(1, 0, nfe + 1); consistency: x̂ = z − t·u(z, 0, t),
    then re-noise to the next time with fresh noise (α-Flow's multi-step sampler)."""
    steps: List[float] = bounded([], ge=0, le=1)
    """Time points from 1 down to 0 for either sampler (α-Flow's XL/2 consistency grid: [1, 0.55, 0]); then the
    NFE is len(steps) − 1. Empty: linspace(1, 0, nfe + 1)."""
    seed: int = bounded(1234, ge=0)
    """Sampling seed: sample i's noise and class label depend only on (seed, i)."""
    guidance: List[SamplingGuidance] = field(default_factory=lambda: [SamplingGuidance()])
    """iMF only: the (omega, t_min, t_max) settings one evaluation sweeps, each scored separately."""
    batch_size: int = bounded(256, ge=1)
    """Samples per forward pass on each rank."""
    dtype: str = "float32"
    """Sampling precision: float32 or bfloat16 (autocast; features are always float32)."""
    feature_extractor: str = "auto"
    """auto (digits-cnn for the embedded digits, else inception-v3-compat), inception-v3-compat or digits-cnn."""
    feature_weights: str = ""
    """Feature extractor weights, a local path or any fsspec URL (required for inception-v3-compat: nothing is
    downloaded at run time)."""
    reference_stats: str = ""
    """FID reference statistics (.npz with mu, sigma) at any fsspec URL; the embedded digits need none."""
    new_series: bool = False
    """Resuming a run with another feature_extractor, feature_weights or reference_stats than it was stored with
    is refused unless this is true: the FIDs after the change start a new series (plot and status show it apart)."""
    vae: str = ""
    """Latent models: the diffusers AutoencoderKL directory (local or fsspec URL) that decodes samples."""
    is_splits: int = bounded(10, ge=1)
    """Inception Score splits."""
    grid: int = bounded(64, ge=0)
    """Samples drawn in the PNG grid (the first ones by global index)."""
    at_end: bool = True
    """Evaluate the final weights when training ends (written to <run>/eval/step-<last>/). On SLURM the final
    evaluation is a separate job that depends (afterok) on the training job."""
    every: int = bounded(0, ge=0)
    """Evaluate every this many steps, from committed checkpoints, as separate jobs (0: off)."""
    mode: str = "job"
    """How scheduled evaluations run: job (one job per committed step, submitted by training rank 0) or watcher
    (one long-lived job that polls the checkpoint store)."""
    tasks: int = bounded(1, ge=1)
    """Ranks of an evaluation job in all (GPUs on a GPU cluster), spread evenly over ``eval.nodes``."""
    nodes: int = bounded(1, ge=1)
    """Nodes of an evaluation job; must divide ``eval.tasks``."""
    time: str = "01:00:00"
    """Wall-time limit of an evaluation job."""
    watch_idle_s: int = bounded(3600, ge=1)
    """Watcher mode: stop after this long without a new committed step (or when the final step is evaluated)."""


@dataclass
class ClusterConfig:
    partition: Optional[str] = None
    """SLURM partition."""
    account: Optional[str] = None
    """SLURM account."""
    qos: Optional[str] = None
    """SLURM QoS."""
    constraint: Optional[str] = None
    """SLURM node constraint (e.g. h100)."""
    time: str = "01:00:00"
    """Wall-time limit per job ([D-]HH:MM:SS or minutes); a longer run is requeued from its checkpoints. Quote it in
    YAML and overrides (cluster.time='12:00:00'): unquoted, YAML reads 12:00:00 as the number 43200."""
    nodes: int = bounded(1, ge=1)
    """Nodes per training job."""
    gpus_per_node: int = bounded(0, ge=0)
    """GPUs per node; one task (rank) per GPU. 0: CPU jobs with tasks_per_node processes."""
    tasks_per_node: int = bounded(1, ge=1)
    """Processes per node of a CPU job (gpus_per_node = 0)."""
    cpus_per_task: int = bounded(0, ge=0)
    """CPU cores per task (0: SLURM's default); data workers run in these."""
    mem_gb: int = bounded(0, ge=0)
    """Memory per node in GB (0: SLURM's default)."""
    setup: List[str] = field(default_factory=list)
    """Shell lines the sbatch script runs before the job (module load ..., source venv/bin/activate)."""
    sbatch: Dict[str, str] = field(default_factory=dict)
    """Extra sbatch parameters, e.g. {exclusive: "", reservation: big-run}."""
    signal_delay_s: int = bounded(120, ge=0)
    """Seconds before the time limit at which SLURM sends USR2: enough for one step and a checkpoint save."""
    max_requeues: int = bounded(10, ge=0)
    """Times a job that hit its time limit is requeued (preemptions are not counted)."""
    log_dir: str = "./slurm_logs"
    """Shared-filesystem folder for submitit's job files and logs (each submission gets its own subfolder)."""
    network_interface: Optional[str] = None
    """The interface ranks talk over (e.g. ib0, eth0): exported to every task as NCCL_SOCKET_IFNAME and
    GLOO_SOCKET_IFNAME. Unset: NCCL and gloo pick one themselves (on hosts with several, not always the right one)."""


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


# -------------------------------------------------------------------------------------------------- loading


def resolve_config_path(name_or_path: str) -> Path:
    """``tiny_imf`` -> configs/tiny_imf.yaml; a path to a .yaml file is taken as is."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = REPO_CONFIGS / f"{name_or_path}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in REPO_CONFIGS.glob("*.yaml")))
        raise ConfigError(f"config {name_or_path!r}: no file {path} (known configs: {known})")
    return path


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        reason = str(err).splitlines()[0]  # omegaconf appends full_key/reference_type lines
        raise ConfigError(f"{source}: key '{key}': {reason}") from None


def load_config(name_or_path: str, overrides: Optional[List[str]] = None) -> DictConfig:
    """Schema defaults <- YAML file <- dotlist overrides, validated. Returns a typed, struct-mode DictConfig."""
    path = resolve_config_path(name_or_path)
    return load_config_text(path.read_text(), str(path), overrides)


def load_config_text(text: str, source: str, overrides: Optional[List[str]] = None) -> DictConfig:
    """As ``load_config``, from YAML text (a run directory's stored config.yaml); ``source`` names it in errors."""
    cfg = OmegaConf.structured(Config)
    try:
        yaml_cfg = OmegaConf.create(text)
    except Exception as err:  # YAML syntax errors come from several libraries
        raise ConfigError(f"{source}: cannot parse YAML: {err}") from None
    if not isinstance(yaml_cfg, DictConfig):
        raise ConfigError(f"{source}: the top level must be a mapping of sections (run:, model:, ...), not a list")
    cfg = _merge(cfg, yaml_cfg, source)
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value")
        cfg = _merge(cfg, OmegaConf.from_dotlist([item]), f"override {item!r}")
    try:
        OmegaConf.resolve(cfg)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{source}: cannot resolve key '{getattr(err, 'full_key', '?')}': {err}") from None
    validate(cfg, f"{source} with overrides {overrides}" if overrides else source)
    return cfg


# ------------------------------------------------------------------------------------------------ validation

# run.trackers' names (platform/trackers/ imports them from here: validation must not import the trackers' libraries).
TRACKERS = ("tensorboard", "wandb")

# Names no module lists yet (each is an if-chain in the module named): kept here until that module exports a tuple.
LOCAL_CHOICES = {
    "objective.time.kind": ("logit_normal", "uniform"),            # objectives/time_sampling.py
    "objective.sg_lambda.shape": ("linear", "cosine"),             # objectives/meanflow.py (SGLambda)
    "objective.stability.decay": ("none", "linear", "cosine"),     # objectives/stability.py
    "objective.imf.tangent": ("v_head", "boundary", "v_c"),        # objectives/imf.py
    "objective.tangent_beta.proxy": ("ema", "boundary", "v_head"),  # objectives/tangent_beta.py
    "guard.inject.kind": ("none", "jvp_nan", "loss_spike", "grad_ramp"),   # platform/guard/inject.py
    "engine.precision": ("fp32", "bf16"),
    "engine.device": ("auto", "cpu", "cuda"),
    "eval.dtype": ("float32", "bfloat16"),
    "eval.mode": ("job", "watcher"),
    "eval.sampler": ("flow_map", "consistency"),                   # evaluation/sampling.py
    "objective.guidance.drop_layout": ("official", "independent"),  # objectives/base.py
    "objective.split_mf.v_source": ("conditional", "teacher"),      # objectives/split_meanflow.py
    "model.conditioning": ("standard", "decoupled"),               # models/dit.py
    # evaluation/feature_extractors.py names the two, but importing it imports torch-fidelity (~3 s)
    "eval.feature_extractor": ("auto", "inception-v3-compat", "digits-cnn"),
}


def registry_choices() -> Dict[str, tuple]:
    """Key -> the values it accepts, read from the module that owns the list, so adding an objective, engine, model
    size or dataset is one edit there. Imported here rather than at the top: those modules import torch (4-12 s
    on 2 busy cores), and the CLI imports config for ``--help`` and to reject a bad config before heavy imports."""
    from meanflow.data_pipeline import EMBEDDED_NAMES
    from meanflow.models.attention import JVP_BACKENDS
    from meanflow.models.execution import COMPILE_BACKENDS, COMPILE_MODES
    from meanflow.models.registry import FAMILIES, IMF_DIT_SIZES, MF_DIT_SIZES, PATCH_SIZES
    from meanflow.objectives import OBJECTIVES, WRAPPERS
    from meanflow.platform.engines import KINDS
    from meanflow.platform.engines.deepspeed_engine import STAGES
    from meanflow.platform.engines.fsdp2 import STRATEGIES

    return {
        "model.family": FAMILIES,
        "model.size": tuple(dict.fromkeys([*MF_DIT_SIZES, *IMF_DIT_SIZES])),
        "model.patch_size": PATCH_SIZES,
        "objective.name": (*OBJECTIVES, *WRAPPERS),
        "objective.stability.base": tuple(OBJECTIVES),
        "objective.jvp_attention": JVP_BACKENDS,
        "data.name": (*EMBEDDED_NAMES, "webdataset"),
        "engine.kind": KINDS,
        "engine.fsdp_strategy": STRATEGIES,
        "engine.deepspeed_stage": STAGES,
        "engine.compile": COMPILE_MODES,
        "engine.compile_backend": COMPILE_BACKENDS,
    }


def choices() -> Dict[str, tuple]:
    """Key -> the values it accepts: the registries' lists and the ones kept here."""
    return {**registry_choices(), **LOCAL_CHOICES}


def __getattr__(name: str) -> Any:
    """``config.CHOICES`` is ``choices()``, built when asked for (PEP 562), so that importing config stays light."""
    if name == "CHOICES":
        return choices()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def ranges(schema: type = Config, prefix: str = "") -> Dict[str, Range]:
    """Dotted key -> range of every bounded field; a list of sections (eval.guidance) is keyed without an index."""
    out = {}
    hints = typing.get_type_hints(schema)
    for f in dataclasses.fields(schema):
        section = next((t for t in (hints[f.name], *typing.get_args(hints[f.name])) if dataclasses.is_dataclass(t)),
                       None)
        if "range" in f.metadata:
            out[prefix + f.name] = f.metadata["range"]
        elif section is not None:
            out.update(ranges(section, f"{prefix}{f.name}."))
    return out


def _is_section(node: Any) -> bool:   # a schema section (not a free-form dict such as cluster.sbatch)
    return isinstance(node, DictConfig) and dataclasses.is_dataclass(OmegaConf.get_type(node))


def _check_number(key: str, value: Any, bounds: Optional[Range], source: str) -> None:
    """A number is finite (inf or nan in a config is a typo or an overflow, never a setting) and in its range."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"{source}: key '{key}': {value!r} is out of range (must be a finite number"
                          + (f", {bounds})" if bounds not in (None, Range()) else ")"))
    if bounds is not None and value is not None and value not in bounds:
        raise ConfigError(f"{source}: key '{key}': {value!r} is out of range (must be {bounds})")


def _check_ranges(node: DictConfig, source: str, prefix: str = "") -> None:
    """Walks the config with its schema: each number (each element of a list) is finite and lies in its range."""
    for f in dataclasses.fields(OmegaConf.get_type(node)):
        key, value = prefix + f.name, node[f.name]
        bounds = f.metadata.get("range")
        if _is_section(value):
            _check_ranges(value, source, key + ".")
        elif isinstance(value, ListConfig):
            for i, item in enumerate(value):
                if _is_section(item):
                    _check_ranges(item, source, f"{key}[{i}].")
                else:
                    _check_number(f"{key}[{i}]", item, bounds, source)
        else:
            _check_number(key, value, bounds, source)


def validate(cfg: DictConfig, source: str) -> None:
    """Checks the schema's types cannot express: ranges, choices and cross-field constraints."""
    _check_ranges(cfg, source)
    _check_choices(cfg, source, LOCAL_CHOICES)
    if cfg.data.global_batch % cfg.optim.grad_accum:
        raise ConfigError(f"{source}: key 'optim.grad_accum': {cfg.optim.grad_accum} does not divide "
                          f"data.global_batch = {cfg.data.global_batch}")
    if cfg.eval.tasks % cfg.eval.nodes:
        raise ConfigError(f"{source}: key 'eval.nodes': {cfg.eval.nodes} does not divide eval.tasks = "
                          f"{cfg.eval.tasks} (the tasks are spread evenly over the nodes)")
    if (cfg.data.name == "webdataset") != bool(cfg.data.url):
        raise ConfigError(f"{source}: key 'data.url': set it exactly when data.name is 'webdataset' "
                          f"(data.name={cfg.data.name!r}, data.url={cfg.data.url!r})")
    if cfg.data.pixel_flip and cfg.data.name != "webdataset":
        raise ConfigError(f"{source}: key 'data.pixel_flip': flips pixel shards; the embedded {cfg.data.name!r} "
                          "data is never flipped")
    if cfg.guard.inject.kind != "none" and not cfg.guard.allow_inject:
        raise ConfigError(f"{source}: key 'guard.inject': fault injection is for tests; set guard.allow_inject=true "
                          "to run it on purpose")
    unknown = [name for name in cfg.run.trackers if name not in TRACKERS]
    if unknown or len(set(cfg.run.trackers)) != len(cfg.run.trackers):
        raise ConfigError(f"{source}: key 'run.trackers': {list(cfg.run.trackers)} must name each of "
                          f"{', '.join(TRACKERS)} at most once")
    if cfg.engine.compile == "all" and cfg.objective.jvp_attention == "fused":
        raise ConfigError(f"{source}: key 'objective.jvp_attention': 'fused' cannot run inside the compiled JVP of "
                          "engine.compile=all (the kernel's compiled path has no backward); use 'auto' (math "
                          "attention there) or engine.compile=outside_jvp")
    objective = cfg.objective.stability.base if cfg.objective.name == "stability" else cfg.objective.name
    if objective == "dmf" and (cfg.model.family, cfg.model.conditioning) != ("mf_dit", "decoupled"):
        raise ConfigError(f"{source}: key 'model.conditioning': objective dmf trains a model with a log-variance head: "
                          f"model.family=mf_dit with model.conditioning=decoupled (got {cfg.model.family} with "
                          f"{cfg.model.conditioning})")
    if cfg.checkpoint.upload_timeout_s > cfg.checkpoint.max_outage_s:
        raise ConfigError(f"{source}: key 'checkpoint.upload_timeout_s': {cfg.checkpoint.upload_timeout_s:g} is longer "
                          f"than checkpoint.max_outage_s={cfg.checkpoint.max_outage_s:g} (one attempt may not outlast "
                          "the outage limit): lower it, or raise checkpoint.max_outage_s")
    for key, length, meaning in (("objective.time_tangents", 2, "[dt, dr]"), ("optim.betas", 2, "[beta1, beta2]")):
        if len(OmegaConf.select(cfg, key)) != length:
            raise ConfigError(f"{source}: key '{key}': expected {meaning}, got {list(OmegaConf.select(cfg, key))}")
    _check_choices(cfg, source, registry_choices())   # last: the one check that imports torch


def _check_choices(cfg: DictConfig, source: str, allowed_values: Dict[str, tuple]) -> None:
    for key, allowed in allowed_values.items():
        value = OmegaConf.select(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{source}: key '{key}': {value!r} is not one of {', '.join(map(str, allowed))}")


def save_config(cfg: DictConfig) -> str:
    """The resolved config as YAML text (written into every run directory)."""
    return OmegaConf.to_yaml(cfg, resolve=True)
