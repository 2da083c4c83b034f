"""Datasets that ship with an installed package (sklearn digits, the 2-D toys) as deterministic batch streams.

Global batch number k is a pure function of (seed, k), so 1 or N processes see exactly the same global batch; each
process slices its own rows out of it, the same way ``objectives.randomness.StepRandom`` slices its draws. The
stream's position is the number of global batches consumed or skipped (``state_dict``), the same interface as the
WebDataset stream.
"""

from __future__ import annotations

import torch

from meanflow.data_pipeline import digits
from meanflow.data_pipeline.toys2d import TOY_NAMES, marginal_velocity_oracle, sample_toy
from meanflow.seeding import stream_seed

EMBEDDED_NAMES: tuple[str, ...] = ("digits", *TOY_NAMES)


def _generator(*parts: object) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(stream_seed(*parts))
    return g


class EmbeddedStream:
    """Global batches of an embedded dataset.

    digits: epochs are consecutive permutations of the train split, one per (seed, epoch); global sample index i
    is item i % N of epoch i // N's permutation, so a batch may straddle two epochs and every epoch visits every
    train image once. toys: fresh samples from a generator seeded by (seed, step), y is None.
    """

    def __init__(self, name: str, global_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        if name not in EMBEDDED_NAMES:
            raise ValueError(f"unknown data.name {name!r}; embedded datasets: {', '.join(EMBEDDED_NAMES)}")
        if global_batch <= 0 or global_batch % world_size:
            raise ValueError(f"global batch must be positive and divisible by the world size {world_size}, "
                             f"got {global_batch}")
        self._name, self.batch_size, self.seed = name, int(global_batch), int(seed)
        local = global_batch // world_size
        self.rows = slice(rank * local, (rank + 1) * local)
        self.batches = 0
        if name == "digits":
            self._train_x, self._train_y = digits.load_digits_split("train")

    @property
    def name(self) -> str:
        return self._name

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return digits.IMAGE_SHAPE if self._name == "digits" else (2,)

    @property
    def num_classes(self) -> int:
        return digits.NUM_CLASSES if self._name == "digits" else 0

    def _epoch_permutation(self, epoch: int) -> torch.Tensor:
        n = len(self._train_y)
        return torch.randperm(n, generator=_generator(self.seed, "digits-epoch", epoch))

    def global_batch(self, step: int) -> dict[str, torch.Tensor | None]:
        """The whole global batch of ``step``: x (B, *sample_shape), y (B,) or None, index (B,) global indices."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        index = step * self.batch_size + torch.arange(self.batch_size)
        if self._name != "digits":
            x = sample_toy(self._name, self.batch_size, _generator(self.seed, "toy", self._name, step))
            return dict(x=x, y=None, index=index)
        n = len(self._train_y)
        epoch, pos = index // n, index % n
        rows = torch.empty_like(index)
        for e in torch.unique(epoch).tolist():  # at most ceil(B / N) + 1 epochs per batch
            mask = epoch == e
            rows[mask] = self._epoch_permutation(e)[pos[mask]]
        return dict(x=self._train_x[rows], y=self._train_y[rows], index=index)

    def next_batch(self) -> dict[str, torch.Tensor | None]:
        """This rank's rows of the next global batch."""
        batch = self.global_batch(self.batches)
        self.batches += 1
        return {k: (v[self.rows] if v is not None else None) for k, v in batch.items()}

    def skip(self, n_samples: int) -> None:
        if n_samples % self.batch_size:
            raise ValueError(f"skip({n_samples}): must be a multiple of the global batch {self.batch_size}")
        self.batches += n_samples // self.batch_size

    def metrics(self) -> dict[str, int]:
        return {}

    def marginal_velocity(self):
        """The 2-D toys' marginal velocity v(z, t) (a sampled oracle); None for the digits."""
        return marginal_velocity_oracle(self._name, seed=self.seed) if self._name in TOY_NAMES else None

    def close(self) -> None:
        pass

    def real_samples(self, n: int, seed: int = 0) -> torch.Tensor:
        """Reference samples for evaluation: toys draw n fresh points (from ``seed``, independent of the training
        stream); digits return the first n test-split images (``seed`` unused; at most 360, else ValueError, so a
        metric never silently compares sets of different sizes)."""
        if self._name != "digits":
            return sample_toy(self._name, n, _generator(seed, "real", self._name))
        x, _ = digits.load_digits_split("test")
        if n > len(x):
            raise ValueError(f"digits test split has {len(x)} images; asked for {n} real samples")
        return x[:n]

    def _identity(self) -> dict[str, object]:
        return {"kind": "embedded", "name": self._name, "seed": self.seed, "global_batch": self.batch_size}

    def state_dict(self) -> dict[str, object]:
        return {**self._identity(), "batches": self.batches}

    def load_state_dict(self, state: dict[str, object]) -> str:
        diff = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if diff:
            raise ValueError(f"checkpoint data stream differs from config (checkpoint, config): {diff}")
        self.batches = int(state["batches"])
        return "exact"


def build_embedded_stream(name: str, global_batch: int, seed: int, rank: int = 0,
                          world_size: int = 1) -> EmbeddedStream:
    """Stream for ``data.name`` in {"digits"} and the 2-D toys."""
    return EmbeddedStream(name, global_batch, seed, rank, world_size)
