"""Where each branch sits in an editing batch: the one place that knows the row order.

An edit runs a source branch and `num_targets` target branches through the transformer in one batch, each with
classifier-free guidance, so the model sees `2 * (1 + num_targets)` rows:

    [ uncond: source, target_1, ..., target_k,   cond: source, target_1, ..., target_k ]

With one target this is `[src_uncond, tgt_uncond, src_cond, tgt_cond]`. Nothing else in the package indexes rows
by number.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BatchLayout:
    num_targets: int = 1

    def __post_init__(self):
        if self.num_targets < 0:
            raise ValueError(f"num_targets must be >= 0, got {self.num_targets}")

    @property
    def branches(self) -> int:
        """Branches per guidance half: the source plus the targets."""
        return 1 + self.num_targets

    @property
    def rows(self) -> int:
        return 2 * self.branches

    @property
    def source_rows(self) -> list[int]:
        """The source branch's row in the unconditional half, then in the conditional half."""
        return [0, self.branches]

    @property
    def target_rows(self) -> list[int]:
        """Every target row, unconditional half first."""
        return [half * self.branches + 1 + k for half in (0, 1) for k in range(self.num_targets)]

    def source_of(self, device=None) -> torch.Tensor:
        """For each row, the index of the source row in the same guidance half: `x[layout.source_of()]` puts the
        source branch's features in every row."""
        index = [half * self.branches for half in (0, 1) for _ in range(self.branches)]
        return torch.tensor(index, device=device)

    def is_target(self, device=None) -> torch.Tensor:
        """Boolean mask over rows, True for target rows."""
        flags = [k > 0 for _ in (0, 1) for k in range(self.branches)]
        return torch.tensor(flags, device=device)

    def target_index(self, row: int) -> int | None:
        """Which target (0-based) a row belongs to, or None for a source row."""
        k = row % self.branches
        return None if k == 0 else k - 1

    def split_guidance(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(uncond, cond) halves, each `(branches, ...)` ordered source, targets."""
        return x[: self.branches], x[self.branches :]

    def join_guidance(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return torch.cat([uncond, cond])
