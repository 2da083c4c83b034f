"""Per-step random draws that depend only on (run seed, step, global sample index).

Each named stream ("t_r", "e", "label_drop", ...) draws the *whole global batch* from its own generator seeded by
(run seed, step, stream name) and keeps this micro-batch's rows. So 1 process and N processes on the same global
batch draw identical values, a resumed run draws what the uninterrupted one would have, and adding a new stream
never shifts an existing one.
"""

from __future__ import annotations

import torch

from meanflow.seeding import stream_seed


class StepRandom:
    """Random draws for one optimizer step, sliced to the rows this process computes.

    rows: positions of the local micro-batch inside the global batch, shape (B_local,).
    """

    def __init__(self, seed: int, step: int, global_batch: int, rows: torch.Tensor, device: torch.device):
        if rows.numel() and int(rows.max()) >= global_batch:
            raise ValueError(f"row {int(rows.max())} outside the global batch of {global_batch}")
        self.seed, self.step, self.global_batch = seed, step, global_batch
        self.rows = rows.to(device)
        self.device = torch.device(device)

    def _generator(self, stream: str) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(stream_seed(self.seed, self.step, stream))
        return gen

    def normal(self, stream: str, *shape: int, dtype=torch.float32, transform=None) -> torch.Tensor:
        """N(0, 1) draws for the local rows. ``transform`` runs on the whole global draw before slicing, so
        its result per row is bitwise independent of how the batch is split (vectorised math is not)."""
        full = torch.randn(self.global_batch, *shape, generator=self._generator(stream), device=self.device,
                           dtype=dtype)
        return (full if transform is None else transform(full))[self.rows]

    def uniform(self, stream: str, *shape: int, dtype=torch.float32) -> torch.Tensor:
        full = torch.rand(self.global_batch, *shape, generator=self._generator(stream), device=self.device,
                          dtype=dtype)
        return full[self.rows]

    def spread_share(self, share: float) -> torch.Tensor:
        """Bool mask of local rows in the global batch's share set: row i is in it iff ⌊(i+1)·share⌋ > ⌊i·share⌋.

        A fixed count, ⌊share·B_global⌋, spread evenly over the global index, so every contiguous slice a rank
        takes holds its fair part of the set (within one row). The first ⌊share·B⌋ rows would hand one kind of row
        to some ranks and the other kind to the rest: MF's r = t share 0.75 on 8 ranks gave the JVP's rows to the
        last two ranks only, which then carried ~2× the step time and activation memory.
        """
        return self._share_position(share)[0]

    def first_of_spread(self, share: float, count: int) -> torch.Tensor:
        """Bool mask of local rows among the first ``count`` rows in this order: the ``spread_share(share)`` set by
        index, then the other rows by index (with share 0, the first ``count`` rows of the global batch)."""
        in_set, seen = self._share_position(share)
        set_size = int(share * self.global_batch)        # = ⌊B·share⌋, the last row's seen count
        rows = self.rows.to(torch.float64)
        position = torch.where(in_set, seen - 1, set_size + rows - seen)
        return position < count

    def _share_position(self, share: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(in the set, how many set rows lie at or before this row) for the local rows."""
        rows = self.rows.to(torch.float64)
        seen = torch.floor((rows + 1) * share)
        return seen > torch.floor(rows * share), seen

    def binomial_count(self, stream: str, p: float) -> int:
        """A Bin(B_global, p) count for this step: how many of the global batch's uniform draws fall below p
        (the same on every rank, whatever its rows)."""
        full = torch.rand(self.global_batch, generator=self._generator(stream), device=self.device)
        return int(full.lt(p).sum())
