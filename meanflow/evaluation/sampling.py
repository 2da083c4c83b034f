"""Generation for evaluation, split over ranks by global sample index.

Sample i's noise and class label depend only on (eval seed, i), and rank r of W generates indices r, r+W, …, so the
set of generated images is the same for any world size and batch size; so are the consistency sampler's re-noise
draws (``renoise_noise``). Images become uint8 through the one formula
``clamp(127.5·x + 128, 0, 255)`` (``images.to_uint8``), recorded with the metrics.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from tqdm import tqdm

from meanflow.objectives.samplers import SAMPLERS, renoise_count, renoise_noise, sample, sample_noise
from meanflow.seeding import stream_seed

UINT8_FORMULA = "clamp(127.5*x + 128, 0, 255) -> uint8 (truncation)"


def sample_labels(indices: Sequence[int], num_classes: int, seed: int) -> torch.Tensor | None:
    """Class label of each global sample index, a pure function of (seed, index); None if unconditional."""
    if not num_classes:
        return None
    return torch.tensor([stream_seed(seed, "eval_label", int(i)) % num_classes for i in indices])


def sampling_setting(eval_cfg) -> dict:
    """``{"sampler", "steps", "nfe"}`` of an ``eval`` section, validated (ValueError names the key). ``steps`` is the
    time grid as given ([]: ``linspace(1, 0, eval.nfe + 1)``); with a grid, the NFE is its number of intervals."""
    sampler, steps = eval_cfg.sampler, [float(s) for s in eval_cfg.steps]
    if sampler not in SAMPLERS:
        raise ValueError(f"eval.sampler: unknown {sampler!r}; known: {', '.join(SAMPLERS)}")
    if steps and (len(steps) < 2 or steps[0] != 1.0 or steps[-1] != 0.0
                  or any(a <= b for a, b in zip(steps, steps[1:]))):
        raise ValueError(f"eval.steps: {steps} must go from 1 down to 0, strictly decreasing (e.g. [1, 0.55, 0]); "
                         "empty for linspace(1, 0, eval.nfe + 1)")
    return {"sampler": sampler, "steps": steps, "nfe": len(steps) - 1 if steps else int(eval_cfg.nfe)}


def rank_indices(num_samples: int, rank: int, world_size: int) -> list[int]:
    return list(range(rank, num_samples, world_size))


@torch.no_grad()
def generate(model, indices: Sequence[int], shape: Sequence[int], num_classes: int, seed: int, *,
             nfe: int = 1, sampler: str = "flow_map", steps: Sequence[float] = (),
             omega: torch.Tensor | None = None, batch_size: int = 256, device="cpu",
             autocast_dtype: torch.dtype | None = None,
             show_progress: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]]:
    """Yields (indices, samples (B, *shape) float32 on ``device``, labels or None) batch by batch, with ``sampler``
    on the time grid ``steps`` (empty: ``nfe`` uniform steps; see ``sampling_setting``). ``omega``: iMF's
    guidance conditions (1, 3), repeated for every sample. ``autocast_dtype``: run the model under autocast (bf16 on
    a GPU); the noise is drawn in float32 either way."""
    indices = list(indices)
    grid = list(steps) or nfe
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, len(indices), batch_size), desc="sampling", unit="batch",
                          disable=not show_progress):
            batch = indices[start:start + batch_size]
            noise = sample_noise(batch, shape, seed, device=device)
            labels = sample_labels(batch, num_classes, seed)
            y = None if labels is None else labels.to(device)
            conditions = None if omega is None else omega.to(device).expand(len(batch), -1)
            renoise = (renoise_noise(batch, shape, seed, renoise_count(grid), device=device)
                       if sampler == "consistency" else None)
            with torch.autocast(torch.device(device).type, dtype=autocast_dtype,
                                enabled=autocast_dtype is not None):
                x = sample(model, noise, steps=grid, y=y, omega=conditions, sampler=sampler, renoise=renoise)
            yield torch.tensor(batch), x.float(), labels
    finally:
        model.train(was_training)
