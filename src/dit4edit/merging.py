"""Token merging (ToMe) around PixArt self-attention: merge similar patches, attend over fewer tokens, unmerge.

Bipartite soft matching over the 2-D patch grid, after Bolya & Hoffman 2023, "Token Merging for Fast Stable
Diffusion" (tomesd), written for PixArt-alpha: merging happens inside the `attn1` processor (merge before
`to_q/k/v`, unmerge after `to_out`), so the `ada_norm_single` block, its modulation and its gates stay untouched.

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
`merge` is one `index_add` and a division, `unmerge` one `index_select`.

`ratio` is the fraction of ALL tokens removed. A cell keeps at least its destination, so at most
`1 - 1/(sh*sw)` can go: 0.75 with a 2x2 stride, 0.889 with 3x3 (the paper's 0.8 needs 3x3).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import DiT4EditError

Grid = tuple[int, int]
MergeFn = Callable[[Tensor], Tensor]


@dataclass(frozen=True)
class MergeConfig:
    """What to merge. `ratio` and `stride` matter; `seed` only picks which token of each cell is the destination.

    ratio:  fraction of all tokens removed before self-attention (0 = off; the paper uses 0.8).
    stride: (rows, cols) of the cell that contributes one destination; bounds the ratio (see module docstring).
    seed:   seeds the destination draw (one generator per layer in `apply_token_merging`; the plan functions
            use it when they get no generator).
    merge_ff: also merge the feed-forward input of the same blocks (own plan per block, computed from that input;
            not with diffusers' feed-forward chunking, which feeds the FF slices of the grid).
    min_tokens: the pipeline merges only token grids at least this large (the functions here merge what they
            are given). Below ~1024 tokens (512² images) merging saves
            little (measured 0.86x of a forward at 1024 tokens on the CPU) and costs detail; see BENCHMARKS.md.
    blocks: `[start, end)` transformer blocks that merge in an edit (None = all).
    skip_steps: the first `skip_steps` denoising steps of an edit run with unmerged self-attention (the layout is
            decided early); the feed-forward merging of `merge_ff` is not step-aware and merges in every step.
    """

    ratio: float = 0.8
    stride: tuple[int, int] = (3, 3)
    seed: int = 0
    merge_ff: bool = False
    min_tokens: int = 1024
    blocks: tuple[int, int] | None = None
    skip_steps: int = 0

    def __post_init__(self):
        if len(self.stride) != 2 or any(int(s) != s or s < 1 for s in self.stride):
            raise ValueError(f"merge stride must be two positive integers (rows, cols), got {self.stride}")
        object.__setattr__(self, "stride", (int(self.stride[0]), int(self.stride[1])))
        if not 0.0 <= self.ratio < 1.0:
            raise ValueError(f"merge ratio is the fraction of tokens removed, in [0, 1); got {self.ratio}")
        if self.blocks is not None:
            if len(self.blocks) != 2 or not 0 <= self.blocks[0] < self.blocks[1]:
                raise ValueError(f"merge blocks must be [start, end) with 0 <= start < end, got {self.blocks}")
            object.__setattr__(self, "blocks", (int(self.blocks[0]), int(self.blocks[1])))
        if self.skip_steps < 0:
            raise ValueError(f"merge skip_steps must be >= 0, got {self.skip_steps}")
        if self.ratio > self.max_ratio + 1e-9:
            raise ValueError(
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


def plan_merge_per_row(
    metric: Tensor, grid: Grid, config: MergeConfig, generator: torch.Generator | None = None
) -> tuple[MergeFn, MergeFn]:
    """Each batch row its own ToMe plan (Bolya & Hoffman 2023), for plain generation without editing.

    metric: (B, N, C), one row per batch row (pass `x[rows]` to let rows borrow another row's plan, e.g.
    `x[layout.source_of()]` gives every branch its source row's plan). The destination cells are drawn once for the
    batch; the matching is per row. Same shapes and ratio-0 identity as `plan_merge`; merge/unmerge take batches of
    exactly B rows.
    """
    plan = _plan(metric, grid, config, generator)
    if plan is None:
        return identity, identity
    slot, size = plan  # (B, N), (B, N - r)
    batch, n, kept = slot.shape[0], slot.shape[1], size.shape[1]
    # one flat index over the batch: row b's token t goes to merged row b * (N - r) + slot[b, t]
    flat = (slot + kept * torch.arange(batch, device=slot.device)[:, None]).flatten()  # (B * N,)

    def merge(x: Tensor) -> Tensor:
        acc = x.new_zeros(1, batch * kept, x.shape[-1], dtype=_acc_dtype(x))  # (1, B * (N - r), C)
        acc.index_add_(1, flat, x.reshape(1, batch * n, -1).to(acc.dtype))
        acc = acc.view(batch, kept, -1)  # (B, N - r, C)
        return (acc / size.to(acc.dtype)[..., None]).to(x.dtype)

    def unmerge(y: Tensor) -> Tensor:
        return y.reshape(1, batch * kept, -1).index_select(1, flat).view(batch, n, -1)  # (B, N, C)

    return merge, unmerge


def _acc_dtype(x: Tensor) -> torch.dtype:
    """Sum half-precision groups in float32; keep float32/float64 as they are."""
    return torch.promote_types(x.dtype, torch.float32)


def plan_for_batch(
    hidden_states: Tensor,
    grid: Grid,
    config: MergeConfig,
    generator: torch.Generator | None = None,
    plan_rows: int | Sequence[int] | Tensor | None = None,
) -> tuple[MergeFn, MergeFn]:
    """Plan for a (B, N, C) batch. plan_rows: None, each row plans from itself; an int, that row's plan is shared
    by all rows (`plan_merge`); a sequence of B row indices, row b uses the plan of row `plan_rows[b]`."""
    if config.ratio == 0:
        return identity, identity
    if plan_rows is None:
        return plan_merge_per_row(hidden_states, grid, config, generator)
    if isinstance(plan_rows, int):
        return plan_merge(hidden_states[plan_rows], grid, config, generator)
    rows = torch.as_tensor(plan_rows, device=hidden_states.device)
    return plan_merge_per_row(hidden_states[rows], grid, config, generator)


# --- attention -----------------------------------------------------------------------------------------------


def sdpa(query: Tensor, key: Tensor, value: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """softmax(q k^T / sqrt(d)) v through SDPA; q, k, v: (B, heads, N, d)."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)


def merged_self_attention(
    attn,
    hidden_states: Tensor,
    merge: MergeFn = identity,
    unmerge: MergeFn = identity,
    attention: Callable[..., Tensor] = sdpa,
    attention_mask: Tensor | None = None,
) -> Tensor:
    """merge -> to_q/k/v -> attention(q, k, v) -> to_out -> unmerge, for a diffusers `Attention` (self-attention).

    The ToMe wrapping (Bolya & Hoffman 2023) as one reusable step: an attention-control processor passes its own
    `attention(query, key, value)` on (B, heads, N - r, d) tensors. With identity merge/unmerge and `sdpa` it is
    diffusers' `AttnProcessor2_0` for 3-D inputs without group/spatial norm, op for op.
    """
    if attn.spatial_norm is not None or attn.group_norm is not None:
        raise ValueError("token merging supports self-attention without spatial/group norm (PixArt's attn1)")
    residual = hidden_states
    hidden_states = merge(hidden_states)  # (B, N - r, C)
    batch, length = hidden_states.shape[:2]
    if attention_mask is not None:
        if hidden_states is not residual:
            raise ValueError("token merging cannot merge a self-attention mask; pass attention_mask=None")
        attention_mask = attn.prepare_attention_mask(attention_mask, length, batch)
        attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
    query = attn.to_q(hidden_states)
    key = attn.to_k(hidden_states)
    value = attn.to_v(hidden_states)
    head_dim = key.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)  # (B, heads, N - r, d)
    key = key.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    value = value.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    if attention_mask is None:
        hidden_states = attention(query, key, value)
    else:
        hidden_states = attention(query, key, value, attention_mask)
    hidden_states = hidden_states.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim)  # (B, N - r, C)
    hidden_states = hidden_states.to(query.dtype)
    hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
    hidden_states = unmerge(hidden_states)  # (B, N, C)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


class TokenMergingAttnProcessor:
    """Self-attention processor for PixArt's `attn1` with ToMe (Bolya & Hoffman 2023) around it.

    grid: the (h, w) token grid; PixArt's processors do not know it, so give it here or per call through
    `cross_attention_kwargs={"grid": ...}` (then every processor of the model must accept `grid`, or diffusers
    warns on each call). generator: draws the destinations; it advances with every call, so a run is reproducible
    when it starts from the same seed (`apply_token_merging` seeds one per layer); None: one seeded with
    `config.seed` on every call (the same cells every step). plan_rows: see `plan_for_batch`
    (None: every row its own plan; for editing, the source row or `BatchLayout.source_of()`).
    """

    def __init__(
        self,
        config: MergeConfig,
        grid: Grid | None = None,
        generator: torch.Generator | None = None,
        plan_rows: int | Sequence[int] | None = None,
    ):
        self.config = config
        self.grid = grid
        self.generator = generator
        self.plan_rows = plan_rows

    def __call__(
        self,
        attn,
        hidden_states: Tensor,
        encoder_hidden_states: Tensor | None = None,
        attention_mask: Tensor | None = None,
        temb: Tensor | None = None,
        grid: Grid | None = None,
    ) -> Tensor:
        if encoder_hidden_states is not None or hidden_states.ndim != 3:
            raise ValueError("TokenMergingAttnProcessor is for self-attention on (B, N, C) tokens (attn1)")
        grid = grid or self.grid
        if grid is None:
            raise ValueError("TokenMergingAttnProcessor needs the token grid (h, w): constructor or grid=...")
        merge, unmerge = plan_for_batch(hidden_states, grid, self.config, self.generator, self.plan_rows)
        return merged_self_attention(attn, hidden_states, merge, unmerge, attention_mask=attention_mask)


# --- feed-forward (optional) ---------------------------------------------------------------------------------


def _merge_feed_forward(ff: torch.nn.Module, config: MergeConfig, grid: Grid, generator) -> list:
    """Forward hooks on a block's `ff` that merge its input and unmerge its output; returns the hook handles.

    The FF is per token, so merging its input is ToMe's "merge before every module" (Bolya & Hoffman 2023,
    Sec. 4) applied to PixArt's MLP; the block's code and state dict stay untouched.
    """
    pending: list[MergeFn] = []

    def before(module, args, kwargs):
        x = args[0]
        merge, unmerge = plan_for_batch(x, grid, config, generator)
        pending.append(unmerge)
        return (merge(x), *args[1:]), kwargs

    def after(module, args, kwargs, output):
        return pending.pop()(output)

    return [
        ff.register_forward_pre_hook(before, with_kwargs=True),
        ff.register_forward_hook(after, with_kwargs=True),
    ]


# --- install / restore ---------------------------------------------------------------------------------------


def layer_seed(seed: int, block: int, ff: bool = False) -> int:
    """Seed of the destination draw of block `block` (its attn1, or its feed-forward): distinct per (seed, block,
    part) for blocks < 1009, and independent of which other blocks merge."""
    return 2 * (seed * 1009 + block) + int(ff)


def merge_planner(config: MergeConfig, grid: Grid):
    """The attention controller's hook: `planner(metric (N, C), block, step_index) -> (merge, unmerge)`, one plan
    per (step, block) computed from the source branch's tokens and shared by every row, reproducible from
    `config.seed`. None when the config does not merge on this grid."""
    if not config.applies(grid):
        return None

    def planner(metric: Tensor, block: int, step_index: int | None):
        if not config.merges_block(block) or (step_index or 0) < config.skip_steps:
            return None
        generator = torch.Generator(device=metric.device)
        generator.manual_seed(layer_seed(config.seed, block) * 1009 + (step_index or 0))
        return plan_merge(metric, grid, config, generator)

    return planner


def _generator(transformer, seed: int) -> torch.Generator:
    """A seeded generator on the device the model computes on, so drawing a plan's destinations needs no
    host-device copy (plans on a GPU therefore differ from plans on the CPU for the same seed)."""
    return torch.Generator(device=execution_device(transformer)).manual_seed(seed)


def execution_device(module: torch.nn.Module) -> torch.device:
    """The device `module` computes on: its offload hook's execution device when accelerate's CPU offloading is
    installed (the weights then wait on the CPU or the meta device), else the device of its parameters."""
    for sub in module.modules():
        device = getattr(getattr(sub, "_hf_hook", None), "execution_device", None)
        if device is not None:
            return torch.device(device)
    return next(module.parameters()).device


@contextmanager
def merged_feed_forward(transformer, config: MergeConfig, grid: Grid, blocks: Sequence[int] | None = None):
    """Merge the feed-forward input of the chosen blocks (per-row plans: the FF is per token) while in the block;
    the hooks are removed on exit, even after an exception. Does nothing unless `config.merge_ff` is set and
    the ratio is above 0 (`min_tokens` is the caller's decision, see `MergeConfig.applies`)."""
    handles = []
    try:
        if config.merge_ff and config.ratio > 0:
            for i in range(len(transformer.transformer_blocks)) if blocks is None else blocks:
                generator = _generator(transformer, layer_seed(config.seed, i, ff=True))
                handles += _merge_feed_forward(transformer.transformer_blocks[i].ff, config, grid, generator)
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def apply_token_merging(
    transformer,
    config: MergeConfig,
    grid: Grid,
    blocks: Sequence[int] | None = None,
    plan_rows: int | Sequence[int] | None = None,
) -> Iterator[dict[str, TokenMergingAttnProcessor]]:
    """Install `TokenMergingAttnProcessor` on `transformer_blocks.{i}.attn1` for i in `blocks` (default all) and
    restore the previous processors (and remove FF hooks) on exit, even after an exception.

    Yields the installed processors by name. Each gets its own generator seeded with `layer_seed(config.seed, i)`.
    """
    blocks = range(len(transformer.transformer_blocks)) if blocks is None else blocks
    saved = dict(transformer.attn_processors)
    installed = {}
    for i in blocks:
        name = f"transformer_blocks.{i}.attn1.processor"
        if name not in saved:
            raise ValueError(f"the transformer has no layer {name}")
        generator = _generator(transformer, layer_seed(config.seed, i))
        installed[name] = TokenMergingAttnProcessor(config, grid, generator, plan_rows)
    transformer.set_attn_processor({**saved, **installed})  # a fresh dict: diffusers empties the one it gets
    try:
        with merged_feed_forward(transformer, config, grid, blocks):
            yield installed
    finally:
        transformer.set_attn_processor(dict(saved))
