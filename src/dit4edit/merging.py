"""Token merging (ToMe) around PixArt self-attention: merge similar patches, attend over fewer tokens, unmerge.

Bipartite soft matching over the 2-D patch grid, after Bolya & Hoffman 2023, "Token Merging for Fast Stable
Diffusion" (tomesd), written for PixArt-alpha: `token_merging(transformer, ...)` merges the input of each chosen
block's self-attention `attn1` (and, optionally, its feed-forward `ff`) and unmerges their output, by forward hooks
on those modules, so the `ada_norm_single` block, its modulation and its gates stay untouched, and whichever attention
processor is installed (diffusers' own, or attention control's) runs on the merged tokens unaware of merging.

How a plan is made (`plan_merge`):
1. Partition. The `(h, w)` token grid is cut into `stride = (sh, sw)` cells; each complete cell gives one
   destination, drawn at random from a seeded `torch.Generator`. Every other token is a source, including the
   leftover rows/columns when `h` or `w` is not a multiple of the stride (they can merge into any destination, so the
   requested ratio is reached on any grid; a grid with no complete cell is left unmerged).
2. Match. Each source finds its most cosine-similar destination (anywhere on the grid, as in ToMe).
3. Merge. The `r = floor(ratio * N)` sources with the highest similarity are averaged into their destination; the
   other sources are kept. Every token enters with size 1 (each layer unmerges back to the full grid), so ToMe's
   size-weighted mean is the plain mean of a destination and the sources merged into it.
4. Unmerge. Every token of a group receives the group's output; kept tokens get their own output back exactly.

A plan is one index vector `slot` of length `N` (token -> row of the merged sequence) and the group sizes, so
`merge` is one `index_add` and a division, `unmerge` one `index_select`. One plan serves every row of the batch,
computed from one row (for an edit, the source branch's conditional row): row i of every merged row is then the same
group of patches, which attention control needs (target queries against source keys and values). `token_merging`
makes a plan per block and step, or, with `MergeConfig.plan_every`, one per group of consecutive blocks and step.

`ratio` is the fraction of ALL tokens removed. A cell keeps at least its destination, so at most
`1 - 1/(sh*sw)` can go: 0.75 with a 2x2 stride, 0.889 with 3x3 (the paper's 0.8 needs 3x3).
"""

from __future__ import annotations

import inspect
import math
import numbers
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import DiT4EditError

Grid = tuple[int, int]
MergeFn = Callable[[Tensor], Tensor]


#: Largest merge cell side (a cell of stride rows x cols gives one destination token).
MAX_STRIDE = 64


@dataclass(frozen=True)
class MergeConfig:
    """What to merge. `ratio` and `stride` matter; `seed` only picks which token of each cell is the destination.

    ratio:  fraction of all tokens removed before self-attention (0 = off; the paper uses 0.8).
    stride: (rows, cols) of the cell that contributes one destination; bounds the ratio (see module docstring).
    seed:   seeds the destination draw (one draw per block, part and step in `token_merging`; `plan_merge` uses
            it when it gets no generator).
    merge_ff: also merge the feed-forward input of the same blocks (own plan per block, computed from that input;
            not with diffusers' feed-forward chunking, which feeds the FF slices of the grid).
    min_tokens: the pipeline merges only token grids at least this large (the functions here merge what they
            are given). The saving grows with the grid (attention is quadratic in it) while the lost detail does
            not shrink; BENCHMARKS.md ("Patch merging") has the measurements behind the default (a 512x512 image).
    blocks: `[start, end)` transformer blocks that merge in an edit (None = all).
    skip_steps: the first `skip_steps` denoising steps of an edit run unmerged (the layout is decided early).
    plan_every: make a fresh plan every `plan_every` merging blocks and let the blocks in between reuse it.
            1 (the default) plans in every block. With k, the merging blocks form groups of k consecutive ones
            (counted from the first merging block); the first block of a group plans from its own input at the
            current step, exactly as with 1, and the others merge by that plan, so a step makes
            ceil(blocks / k) plans instead of one per block. Any k >= the number of merging blocks means one plan
            per step. On a GPU planning (a similarity product, a sort, scatters) is a large part of what
            merging costs (see BENCHMARKS.md); reusing a plan saves it, at the price of grouping a deeper block's
            tokens by a shallower block's features.
            With `merge_ff`, the feed-forward plans are grouped the same way, each made from the feed-forward
            input of its group's first block.
    """

    ratio: float = 0.8
    stride: tuple[int, int] = (3, 3)
    seed: int = 0
    merge_ff: bool = False
    min_tokens: int = 1024
    blocks: tuple[int, int] | None = None
    skip_steps: int = 0
    plan_every: int = 1

    def __post_init__(self):
        def integer(value) -> bool:  # a whole number, not a bool and not 2.0 or 2.7
            return isinstance(value, numbers.Integral) and not isinstance(value, bool)

        def pair(value) -> bool:
            return isinstance(value, (list, tuple)) and len(value) == 2 and all(integer(v) for v in value)

        if not pair(self.stride) or any(s < 1 or s > MAX_STRIDE for s in self.stride):
            raise DiT4EditError(f"merge stride must be two positive integers (rows, cols) up to {MAX_STRIDE}, got "
                                f"{self.stride!r}")
        object.__setattr__(self, "stride", (int(self.stride[0]), int(self.stride[1])))
        ratio = self.ratio
        if isinstance(ratio, (bool, str)) or not isinstance(ratio, numbers.Real) or not 0.0 <= ratio < 1.0:
            raise DiT4EditError(f"merge ratio is the fraction of tokens removed, in [0, 1); got {ratio!r}")
        object.__setattr__(self, "ratio", float(ratio))
        if not integer(self.seed) or not 0 <= self.seed < 2**64:
            raise DiT4EditError(f"merge seed must be an integer from 0 to 2**64 - 1, got {self.seed!r}")
        if not isinstance(self.merge_ff, bool):
            raise DiT4EditError(f"merge_ff must be true or false, got {self.merge_ff!r}")
        if not integer(self.min_tokens) or self.min_tokens < 0:
            raise DiT4EditError(f"merge min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if self.blocks is not None:
            if not pair(self.blocks) or not 0 <= self.blocks[0] < self.blocks[1]:
                raise DiT4EditError(f"merge blocks must be [start, end) with 0 <= start < end, got {self.blocks!r}")
            object.__setattr__(self, "blocks", (int(self.blocks[0]), int(self.blocks[1])))
        if not integer(self.skip_steps):
            raise DiT4EditError(f"merge skip_steps must be an integer, got {self.skip_steps!r}")
        if self.skip_steps < 0:
            raise DiT4EditError(f"merge skip_steps must be >= 0, got {self.skip_steps}")
        plan_every = self.plan_every
        if isinstance(plan_every, bool) or not isinstance(plan_every, numbers.Integral) or plan_every < 1:
            raise DiT4EditError(f"merge plan_every must be an integer >= 1 (blocks per plan), got {self.plan_every!r}")
        object.__setattr__(self, "plan_every", int(self.plan_every))
        if self.ratio > self.max_ratio + 1e-9:
            raise DiT4EditError(
                f"merge ratio {self.ratio} is too high for stride {self.stride}: it removes at most "
                f"{self.max_ratio:.3f} of the tokens (1 - 1/{self.stride[0] * self.stride[1]}); "
                f"use stride {required_stride(self.ratio)} or larger"
            )

    def applies(self, grid: Grid) -> bool:
        """Whether this config merges anything on a token grid of this size."""
        return self.ratio > 0 and grid[0] * grid[1] >= self.min_tokens

    def merges_block(self, block: int) -> bool:
        return self.blocks is None or self.blocks[0] <= block < self.blocks[1]

    def block_indices(self, num_blocks: int) -> range:
        """The blocks that merge in a transformer of `num_blocks` blocks."""
        if self.blocks is None:
            return range(num_blocks)
        if self.blocks[1] > num_blocks:
            raise DiT4EditError(f"merge blocks {self.blocks[0]}:{self.blocks[1]} are outside the model's "
                             f"{num_blocks} blocks")
        return range(*self.blocks)

    @property
    def max_ratio(self) -> float:
        """Largest removable fraction: every token but one per complete cell."""
        return 1.0 - 1.0 / (self.stride[0] * self.stride[1])

    def removed(self, num_tokens: int) -> int:
        """`r`, the number of tokens a plan over `num_tokens` tokens removes."""
        return int(self.ratio * num_tokens + 1e-9)


def required_stride(ratio: float) -> tuple[int, int]:
    """Smallest square stride whose cells allow removing `ratio` of the tokens: 1 - 1/s^2 >= ratio."""
    side = math.ceil(math.sqrt(1.0 / (1.0 - ratio)) - 1e-9)
    return (side, side)


def token_grid(latent_hw: tuple[int, int], patch_size: int = 2) -> Grid:
    """Token grid `(h, w)` of a PixArt transformer for a latent of `latent_hw` (PixArt patchifies 2x2)."""
    return (latent_hw[0] // patch_size, latent_hw[1] // patch_size)


def identity(x: Tensor) -> Tensor:
    return x


# --- planning ------------------------------------------------------------------------------------------------


def _partition(grid: Grid, stride: tuple[int, int], generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(src, dst) token indices: one random destination per complete cell, every other token a source."""
    h, w = grid
    sh, sw = stride
    gh, gw = h // sh, w // sw
    pick = torch.randint(sh * sw, (gh, gw, 1), generator=generator, device=generator.device)  # (gh, gw, 1)
    in_cell = torch.zeros(gh, gw, sh * sw, dtype=torch.bool, device=pick.device).scatter_(2, pick, True)
    in_cell = in_cell.view(gh, gw, sh, sw).transpose(1, 2).reshape(gh * sh, gw * sw)  # (gh*sh, gw*sw)
    is_dst = torch.zeros(h, w, dtype=torch.bool, device=pick.device)
    is_dst[: gh * sh, : gw * sw] = in_cell  # leftover rows/cols stay sources
    is_dst = is_dst.flatten()  # (N,)
    # A stable sort puts the sources first and the destinations last, each in grid order. Unlike `nonzero`, it
    # needs no host sync on a GPU (the number of destinations, one per complete cell, is known in advance).
    order = torch.sort(is_dst.to(torch.uint8), stable=True).indices
    return order[: h * w - gh * gw], order[h * w - gh * gw :]


def _best_match(metric: Tensor, src: Tensor, dst: Tensor) -> tuple[Tensor, Tensor]:
    """For each source: the cosine similarity of its most similar destination and that destination's index
    (ToMe, Bolya & Hoffman 2023, Sec. 3: bipartite soft matching). metric: (B, N, C); returns two (B, Ns)."""
    metric = metric.to(_acc_dtype(metric))
    dst_unit = F.normalize(metric[:, dst], dim=-1)  # (B, Nd, C)
    # x_i . d_j / |d_j| for every token i: its argmax over j is the cosine one, and dividing the maximum by |x_i|
    # makes it the cosine. Scoring all N rows costs Nd/N more flops than scoring the sources only, and saves
    # normalising and gathering the (B, Ns, C) source features, which is slower on memory-bound machines.
    best, best_dst = (metric @ dst_unit.transpose(1, 2)).max(dim=-1)  # (B, N)
    best = best / metric.norm(dim=-1).clamp_min(1e-12)
    return best[:, src], best_dst[:, src]


def _match(metric: Tensor, src: Tensor, dst: Tensor, r: int) -> tuple[Tensor, Tensor]:
    """Merge the r best-matched sources into their destinations. metric: (B, N, C).

    Returns `slot` (B, N): the row of the merged sequence each token goes to (kept sources first, in grid order,
    then the destinations), and `size` (B, N - r): how many tokens each merged row averages.
    """
    batch, n = metric.shape[:2]
    best, best_dst = _best_match(metric, src, dst)  # (B, Ns)
    order = torch.sort(best, dim=-1, descending=True, stable=True).indices  # (B, Ns), most similar first
    merged, kept = order[:, :r], order[:, r:].sort(dim=-1).values  # (B, r), (B, Ns - r)
    n_kept = src.numel() - r
    src_slot = torch.empty_like(best_dst)  # (B, Ns)
    src_slot.scatter_(1, kept, torch.arange(n_kept, device=src.device).expand(batch, -1))
    src_slot.scatter_(1, merged, n_kept + best_dst.gather(1, merged))
    slot = torch.empty(batch, n, dtype=torch.long, device=src.device)
    slot[:, src] = src_slot
    slot[:, dst] = n_kept + torch.arange(dst.numel(), device=src.device)
    size = torch.zeros(batch, n - r, device=src.device).scatter_add_(1, slot, torch.ones(batch, n, device=src.device))
    return slot, size


def _plan(metric: Tensor, grid: Grid, config: MergeConfig, generator) -> tuple[Tensor, Tensor] | None:
    """(slot, size) for metric (B, N, C), or None when nothing is merged."""
    n = metric.shape[1]
    if grid[0] * grid[1] != n:
        raise ValueError(f"token grid {grid} has {grid[0] * grid[1]} tokens, the features have {n}")
    if generator is None:
        generator = torch.Generator().manual_seed(config.seed)
    src, dst = _partition(grid, config.stride, generator)
    r = min(config.removed(n), src.numel()) if dst.numel() else 0
    if r == 0:
        return None
    src, dst = src.to(metric.device), dst.to(metric.device)
    return _match(metric, src, dst, r)


def plan_merge(
    metric: Tensor, grid: Grid, config: MergeConfig, generator: torch.Generator | None = None
) -> tuple[MergeFn, MergeFn]:
    """One ToMe plan (Bolya & Hoffman 2023) from one row's features, applied alike to every batch row.

    metric: (N, C) features of ONE row (for editing: the source branch), grid (h, w) with h * w == N.
    Returns merge: (B, N, C) -> (B, N - r, C) and unmerge: (B, N - r, C) -> (B, N, C), r = floor(ratio * N).
    Sharing the plan keeps row i of every merged batch row the same group of patches, which attention control
    needs (edit queries against source keys/values). At ratio 0 both are `identity` (the input object comes back).
    generator draws the destinations; None means a fresh one seeded with `config.seed` (the same cells every call).
    """
    plan = _plan(metric[None], grid, config, generator)
    if plan is None:
        return identity, identity
    slot, size = plan[0][0], plan[1][0]  # (N,), (N - r,)

    def merge(x: Tensor) -> Tensor:
        acc = x.new_zeros(x.shape[0], size.numel(), x.shape[-1], dtype=_acc_dtype(x))  # (B, N - r, C)
        acc.index_add_(1, slot, x.to(acc.dtype))
        return (acc / size.to(acc.dtype)[:, None]).to(x.dtype)

    def unmerge(y: Tensor) -> Tensor:
        return y.index_select(1, slot)  # (B, N, C)

    return merge, unmerge


def _acc_dtype(x: Tensor) -> torch.dtype:
    """Sum half-precision groups in float32; keep float32/float64 as they are."""
    return torch.promote_types(x.dtype, torch.float32)


# --- install / restore ---------------------------------------------------------------------------------------


def layer_seed(seed: int, block: int, ff: bool = False) -> int:
    """Seed of the destination draw of block `block` (its attn1, or its feed-forward): distinct per (seed, block,
    part) for blocks < 1009, and independent of which other blocks merge."""
    return 2 * (seed * 1009 + block) + int(ff)


@contextmanager
def token_merging(transformer, config: MergeConfig, grid: Grid, plan_row: int = 0) -> Iterator[None]:
    """Merge tokens around the self-attention (and, with `config.merge_ff`, the feed-forward) of the blocks
    `config.blocks` of a PixArt transformer while in the block; the hooks are removed on exit, even after an
    exception. The only way merging is turned on: any attention processor installed meanwhile runs on the merged
    tokens.

    grid: the `(h, w)` token grid of the latents the transformer will see.
    plan_row: the batch row whose tokens make each plan (one plan for all rows: `plan_merge`); for an edit, the
        conditional source row of its `BatchLayout`.
    The step index, for `config.skip_steps` and for drawing a fresh plan each step, comes from the loop through
    `cross_attention_kwargs={"step_index": i}` (no step index: step 0); it is not handed on to processors that do
    not take it. Plans are drawn on the device of the hidden states, from `layer_seed(config.seed, block)` and the step,
    where `block` is the block that makes the plan: with `config.plan_every = k`, the first block of each group of k
    merging blocks, whose plan the rest of its group reuses within the same forward. Every forward starts with no
    plans, so a reused plan never outlives the step it was made at.
    """
    blocks = config.block_indices(len(transformer.transformer_blocks))  # a range outside the model: one-line error
    # The block that makes the plan each merging block uses: the first of its group of `plan_every`, by position
    # among the merging blocks (fixed here, at install time; no call counting).
    planner = {block: blocks[i - i % config.plan_every] for i, block in enumerate(blocks)}
    handles = []
    state = {"step": 0}
    plans: dict[tuple[int, bool], tuple[MergeFn, MergeFn]] = {}  # (planning block, ff) -> this forward's plan

    def read_step(module, args, kwargs):
        plans.clear()  # a new forward: every group plans afresh from this forward's features
        extra = kwargs.get("cross_attention_kwargs") or {}
        state["step"] = extra.get("step_index") or 0
        if "step_index" in extra and not _processors_take(module, "step_index"):
            kwargs = {**kwargs, "cross_attention_kwargs": {k: v for k, v in extra.items() if k != "step_index"}}
        return args, kwargs

    def plan_for(hidden_states: Tensor, block: int, ff: bool) -> tuple[MergeFn, MergeFn]:
        """The plan of `block` in this forward: its own when it starts a group (or finds none), else its group's."""
        key = (planner[block], ff)
        if block == planner[block] or key not in plans:
            generator = torch.Generator(device=hidden_states.device)
            generator.manual_seed(layer_seed(config.seed, planner[block], ff) * 1009 + state["step"])
            plans[key] = plan_merge(hidden_states[plan_row], grid, config, generator)
        return plans[key]

    def around(module, block: int, ff: bool):
        pending: list[MergeFn] = []

        def before(module, args, kwargs):
            if kwargs.get("attention_mask") is not None:
                raise ValueError("token merging does not support a self-attention mask")
            if state["step"] < config.skip_steps:
                pending.append(identity)
                return None
            hidden_states = args[0]  # (B, N, C)
            merge, unmerge = plan_for(hidden_states, block, ff)
            pending.append(unmerge)
            return (merge(hidden_states), *args[1:]), kwargs  # (B, N - r, C)

        def after(module, args, kwargs, output):
            return pending.pop()(output)  # (B, N - r, C) -> (B, N, C)

        return [module.register_forward_pre_hook(before, with_kwargs=True),
                module.register_forward_hook(after, with_kwargs=True)]

    try:
        if config.ratio > 0:
            handles.append(transformer.register_forward_pre_hook(read_step, with_kwargs=True))
            for i in blocks:
                block = transformer.transformer_blocks[i]
                handles += around(block.attn1, i, ff=False)
                if config.merge_ff:
                    handles += around(block.ff, i, ff=True)
        yield
    finally:
        for handle in handles:
            handle.remove()
        plans.clear()


def _processors_take(transformer, name: str) -> bool:
    """Whether any attention processor of `transformer` takes the keyword `name` (diffusers warns on every call to
    one that does not)."""
    return any(name in inspect.signature(p.__call__).parameters for p in transformer.attn_processors.values())
