"""Where each branch sits in an editing batch: the one place that knows the row order.

An edit denoises a source branch and `num_targets` target branches (branch 0 = source, branch 1 + k = target k).
With classifier-free guidance each branch runs twice, unconditionally and conditionally, in one transformer batch:

    4-row layout (default):   [ uncond: source, target_1..k,   cond: source, target_1..k ]
    3-row layout:             [ uncond:         target_1..k,   cond: source, target_1..k ]
    no guidance (scale <= 1): [                                cond: source, target_1..k ]

With one target the default is `[src_uncond, tgt_uncond, src_cond, tgt_cond]`. The 3-row layout drops the source's
unconditional row: it only feeds attention control of the target's unconditional row, and Prompt-to-Prompt edits the
conditional half; the target's unconditional row then runs without control and the source branch gets its
conditional prediction alone (the pipeline pins it to the inversion anyway). The layout builds the batch
(`join_guidance`), combines guidance (`guide`) and names every row an attention edit touches (`source_of`,
`cond_rows`); nothing else in the package indexes rows or branches by number.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch

#: The source's branch index; target k is branch `1 + k`.
SOURCE = 0


@dataclass(frozen=True)
class BatchLayout:
    """Rows of an edit batch.

    num_targets: target branches next to the source (0 for a plain pass: inversion, generation, recording).
    guidance: classifier-free guidance, i.e. unconditional rows (diffusers' convention: on for a scale above 1).
    uncond_source: the source has an unconditional row (4-row layout); False gives the 3-row layout.
    """

    num_targets: int = 1
    guidance: bool = True
    uncond_source: bool = True

    def __post_init__(self):
        if self.num_targets < 0:
            raise ValueError(f"num_targets must be >= 0, got {self.num_targets}")

    @classmethod
    def for_scale(cls, num_targets: int, guidance_scale: float, rows: int = 4) -> BatchLayout:
        """The layout of an edit at `guidance_scale` (no unconditional rows at 1 or below) with `rows` 4 or 3."""
        if rows not in (3, 4) or isinstance(rows, bool):
            raise ValueError(f"rows must be 3 or 4, got {rows!r}")
        return cls(num_targets, guidance=guidance_scale > 1.0, uncond_source=rows == 4)

    # --- rows --------------------------------------------------------------------------------------------------

    @property
    def branches(self) -> int:
        """The source plus the targets."""
        return 1 + self.num_targets

    @cached_property
    def slots(self) -> tuple[tuple[int, bool], ...]:
        """`(branch, conditional)` of every row, in batch order."""
        uncond = [(b, False) for b in range(self.branches) if b != SOURCE or self.uncond_source]
        return tuple((uncond if self.guidance else []) + [(b, True) for b in range(self.branches)])

    @property
    def rows(self) -> int:
        return len(self.slots)

    def row(self, branch: int, cond: bool = True) -> int | None:
        """The row of `branch` in the conditional (or unconditional) half, None where the layout has none."""
        return self.slots.index((branch, cond)) if (branch, cond) in self.slots else None

    @property
    def cond_rows(self) -> list[int]:
        """The conditional half's rows in branch order (source, targets)."""
        return [self.row(b, True) for b in range(self.branches)]

    @property
    def source_rows(self) -> list[int]:
        """The source branch's rows, unconditional first."""
        return [r for r, (b, _) in enumerate(self.slots) if b == SOURCE]

    @property
    def target_rows(self) -> list[int]:
        """Every target row, unconditional half first."""
        return [r for r, (b, _) in enumerate(self.slots) if b != SOURCE]

    def source_of(self, device=None) -> torch.Tensor:
        """For each row, the source row of the same guidance half (a row whose half has no source row maps to itself,
        so an edit leaves it as it is): `x[layout.source_of()]` puts the source's features in every row."""
        index = [self.row(SOURCE, cond) if self.row(SOURCE, cond) is not None else r
                 for r, (_, cond) in enumerate(self.slots)]
        return torch.tensor(index, device=device)

    def is_target(self, device=None) -> torch.Tensor:
        """Boolean mask over rows, True for target rows."""
        return torch.tensor([b != SOURCE for b, _ in self.slots], device=device)

    def branch_of(self, device=None) -> torch.Tensor:
        """For each row, its branch."""
        return torch.tensor([b for b, _ in self.slots], device=device)

    # --- building and splitting the batch ------------------------------------------------------------------------

    def join_guidance(self, uncond: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """The batch `(rows, ...)` from per-branch tensors `(branches or 1, ...)` of each half."""
        uncond, cond = uncond.expand(self.branches, *uncond.shape[1:]), cond.expand(self.branches, *cond.shape[1:])
        return torch.stack([(cond if c else uncond)[b] for b, c in self.slots])

    def guide(self, out: torch.Tensor, scale: float) -> torch.Tensor:
        """Classifier-free guidance, `(rows, ...) -> (branches, ...)`: `u + scale (c - u)` for a branch with an
        unconditional row, its conditional prediction alone otherwise."""
        guided = []
        for b in range(self.branches):
            c, u = self.row(b, True), self.row(b, False)
            guided.append(out[c] if u is None else out[u] + scale * (out[c] - out[u]))
        return torch.stack(guided)

    # --- branches (one latent per branch, after guidance) ----------------------------------------------------------

    @staticmethod
    def target_branch(target: int) -> int:
        return 1 + target

    @staticmethod
    def with_source(latents: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """`(branches, ...)` latents with the source branch replaced by `source` `(1, ...)`."""
        return torch.cat([source, latents[SOURCE + 1 :]])

    @staticmethod
    def source(latents: torch.Tensor) -> torch.Tensor:
        """The source branch of `(branches, ...)` latents."""
        return latents[SOURCE]
