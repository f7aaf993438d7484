"""Dream cycles: replay earlier training rows to consolidate what was learnt (the reference's
"every 1000 steps, a 50-step dream cycle replays previous experiences").

The sampling rule, stated once: the buffer is a reservoir sample of every training row seen
(Vitter's algorithm R: the first ``capacity`` rows fill it; the n-th row after that replaces a
uniformly chosen slot with probability capacity / n), so at any time each row seen so far is in
it with equal probability, however long the run. A dream batch is ``batch_size`` distinct slots
drawn uniformly. Random draws come from ``SeedSequence([seed, step, tag])``: a pure function of
the step, so a resumed run, whose buffer comes back from the checkpoint, replays the same rows.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["ReplayBuffer", "in_dream"]

_ADD, _SAMPLE = 1, 2  # the two random streams


def in_dream(step: int, every: int, steps: int) -> bool:
    """Whether 0-based ``step`` is a dream step: the ``steps`` steps after every ``every``-th."""
    return step >= every and step % every < steps


class ReplayBuffer:
    """A reservoir of training rows (module docstring)."""

    def __init__(self, capacity: int, seed: int):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity, self.seed = capacity, int(seed)
        self.rows: torch.Tensor | None = None  # (filled, L + 1) long
        self.seen = 0

    def __len__(self) -> int:
        return 0 if self.rows is None else self.rows.shape[0]

    def add(self, rows: torch.Tensor, step: int) -> None:
        """Offer a batch of rows (B, L + 1) seen at ``step``."""
        rows = rows.detach().to("cpu", torch.long)
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, step, _ADD]))
        for row in rows:
            self.seen += 1
            if len(self) < self.capacity:
                self.rows = row[None].clone() if self.rows is None else torch.cat([self.rows, row[None]])
                continue
            slot = int(rng.integers(0, self.seen))
            if slot < self.capacity:
                self.rows[slot] = row

    def sample(self, batch_size: int, step: int) -> torch.Tensor:
        """``batch_size`` distinct rows (all of them when fewer are stored), uniformly.

        Raises:
            RuntimeError: the buffer is empty.
        """
        if not len(self):
            raise RuntimeError("the replay buffer is empty: a dream cycle needs earlier training rows")
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, step, _SAMPLE]))
        idx = rng.choice(len(self), size=min(batch_size, len(self)), replace=False)
        return self.rows[torch.from_numpy(np.sort(idx))]

    def state_dict(self) -> dict[str, torch.Tensor]:
        out = {"seen": torch.tensor(self.seen, dtype=torch.int64)}
        if self.rows is not None:
            out["rows"] = self.rows.clone()
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.seen = int(state.get("seen", torch.tensor(0)))
        self.rows = state["rows"].clone() if "rows" in state else None
