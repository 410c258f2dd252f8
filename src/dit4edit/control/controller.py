"""The runtime side of attention control: which edit applies at (step, block), the recorded cross-attention maps,
and the local-blend mask. One controller serves one edit (or one recording pass); processors ask it, by their block
index and the `step_index` the loop passes, what to do.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from ..errors import DiT4EditError
from ..layout import SOURCE, BatchLayout
from ..prompts import PIXART_ALPHA_TOKENS, align, reweight_vector, tokenize, word_token_indices
from .blend import apply_local_blend, attention_blend_mask
from .config import AttentionControl, block_range, steps_before

logger = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class TokenEdit:
    """One target prompt's Prompt-to-Prompt edit on the T5 key columns (L = 120), resolved from words to tokens.

    mapper: `(L, L)`, rows source tokens, columns target tokens: the edited target map is `A_src @ mapper`.
    from_source: `(L,)`, 1 where target column j takes the source's attention, 0 where it keeps its own (refine).
    cross_steps: `(L,)` int, target column j is edited in the steps `i < cross_steps[j]` (per-word windows).
    weights: `(L,)` reweight factor per target column (1 = unchanged), applied inside the window.
    """

    mapper: torch.Tensor
    from_source: torch.Tensor
    cross_steps: torch.Tensor
    weights: torch.Tensor

    @classmethod
    def from_alignment(
        cls,
        alignment,
        config: AttentionControl,
        num_steps: int,
        tokenizer=None,
        target_prompt: str | None = None,
    ) -> "TokenEdit":
        """Build from a `prompts.TokenAlignment`; per-word windows and reweighting look words up in `target_prompt`
        (a named word's window wins over `cross_replace_changed`)."""
        mapper = alignment.mapper.float()
        length = mapper.shape[-1]
        cross_steps = torch.full((length,), steps_before(config.cross_replace_steps, num_steps), dtype=torch.long)
        weights = torch.ones(length)
        if config.cross_replace_changed is not None:
            cross_steps[list(alignment.changed_columns)] = steps_before(config.cross_replace_changed, num_steps)
        if config.cross_replace_words or config.reweight:
            if tokenizer is None or target_prompt is None:
                raise ValueError("cross_replace_words and reweight need the tokenizer and the target prompt")
            for word, fraction in config.cross_replace_words.items():
                columns = word_token_indices(tokenizer, target_prompt, word, length)
                cross_steps[columns] = steps_before(fraction, num_steps)
            if config.reweight:
                weights = reweight_vector(tokenizer, target_prompt, dict(config.reweight), length).float()
                _warn_idle_reweight(config, tokenizer, target_prompt, cross_steps, length)
        return cls(mapper, alignment.from_source.float(), cross_steps, weights)


#: False while a controller is built only to check an edit (`quiet_dry_run`): its warnings come from the real run.
_WARN = contextvars.ContextVar("dit4edit_controller_warn", default=True)


@contextlib.contextmanager
def quiet_dry_run():
    """Build controllers without their warnings (a check before the edit, which builds its own and warns)."""
    token = _WARN.set(False)
    try:
        yield
    finally:
        _WARN.reset(token)


def _warn_idle_reweight(config: AttentionControl, tokenizer, target_prompt: str, cross_steps: torch.Tensor,
                        length: int) -> None:
    """One warning line per reweighted word whose cross-attention window is 0 steps: the weights act only inside
    the window, so such a reweight cannot change the edit (e.g. the changed word under `cross_replace_changed: 0`)."""
    from ..checks import printable
    from ..prompts import word_token_indices

    if not _WARN.get():
        return
    for word in config.reweight:
        columns = word_token_indices(tokenizer, target_prompt, word, length)
        if columns and not bool((cross_steps[columns] > 0).any()):
            logging.getLogger(__name__).warning(
                "reweight of '%s' does nothing: its cross-attention window is 0 steps (cross_replace_changed or "
                "cross_replace_words); widen the window to let it act", printable(word))


def _unique(words: Sequence[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(words))


def prompt_words(tokenizer, prompt: str, max_length: int | None = None) -> dict[str, list[int]]:
    """`{word: token indices}` for every word of `prompt` as T5 pieces it (a repeated word is named `word#i`, with
    `i` its position among the words)."""
    tokens = tokenize(tokenizer, prompt, PIXART_ALPHA_TOKENS if max_length is None else max_length)
    words = {}
    for index, word in enumerate(tokens.words):
        words[word if word not in words else f"{word}#{index}"] = tokens.word_tokens(index)
    return words


class AttentionController:
    """Attention control for one edit: schedule, recorded cross-attention maps, local blend.

    Arguments that matter:
        config: what to control and when (`AttentionControl`).
        layout: the rows of the edit batch (`BatchLayout`).
        num_steps: denoising steps of the edit; the loop passes `step_index` in `[0, num_steps)` (0 = noisiest).
        num_blocks: transformer blocks of the model (28 for PixArt-XL-2); layer ranges are checked against it.
        grid: `(h, w)` token grid of the latent, `(latent_h // patch_size, latent_w // patch_size)`.
        token_edits: one `TokenEdit` per target (cross-attention control), or empty for no cross-attention edit.
        words: per branch (0 = source, k = target k), `{word: token indices}` whose cross-attention maps are
            recorded (the local-blend words, or every word of a prompt for pictures). Nothing else is recorded.
        user_mask: `(H, W)` latent-resolution editable region (1 = edit); overrides the attention mask.
        blend_words: per target, `(source words, target words)` whose maps (in the source branch, in the target's
            branch) make its local-blend mask; default `config.local_blend_words` on both sides (`for_edit` adds
            the changed words under `config.local_blend_changed`).

    Arguments to tinker with:
        patch_size: the transformer's patch size (latent side = grid side * patch_size).
        record_layers: `[start, end)` blocks whose maps are recorded; default `config.local_blend_layers` (all).
    """

    def __init__(
        self,
        config: AttentionControl,
        layout: BatchLayout,
        *,
        num_steps: int,
        num_blocks: int,
        grid: tuple[int, int],
        token_edits: Sequence[TokenEdit] = (),
        words: Sequence[Mapping[str, Sequence[int]]] = (),
        user_mask: torch.Tensor | None = None,
        blend_words: Sequence[tuple[Sequence[str], Sequence[str]]] | None = None,
        patch_size: int = 2,
        record_layers: tuple[int, int] | None = None,
    ):
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        if len(grid) != 2 or min(grid) < 1:
            raise ValueError(f"grid must be (h, w) token counts, got {grid}")
        if token_edits and len(token_edits) != layout.num_targets:
            raise ValueError(f"{len(token_edits)} token edits for {layout.num_targets} targets")
        if len(words) > layout.branches:
            raise ValueError(f"words for {len(words)} branches, the layout has {layout.branches}")
        if blend_words is None:
            blend_words = [(config.local_blend_words, config.local_blend_words)] * layout.num_targets
        if len(blend_words) != layout.num_targets:
            raise ValueError(f"blend words for {len(blend_words)} targets, the layout has {layout.num_targets}")
        self.config = config
        self.layout = layout
        self.num_steps = num_steps
        self.num_blocks = num_blocks
        self.grid = (int(grid[0]), int(grid[1]))
        self.latent_size = (self.grid[0] * patch_size, self.grid[1] * patch_size)
        self.self_blocks = config.self_blocks(num_blocks)
        self.record_blocks = (
            block_range(record_layers, num_blocks, "record_layers", default="all")
            if record_layers is not None
            else config.blend_blocks(num_blocks)
        )
        self.self_switch = steps_before(config.self_replace_steps, num_steps)
        self.blend_start = steps_before(config.local_blend_start, num_steps)
        if user_mask is not None:
            user_mask = torch.as_tensor(user_mask).float()
            if tuple(user_mask.shape) != self.latent_size:
                raise DiT4EditError(
                    f"mask is {user_mask.shape[-1]}x{user_mask.shape[0]} (width x height) at latent resolution, "
                    f"the latent is {self.latent_size[1]}x{self.latent_size[0]}"
                )
        self.user_mask = user_mask
        self.blend_words = [(tuple(src), tuple(tgt)) for src, tgt in blend_words]

        if token_edits:
            self._mapper = torch.stack([e.mapper.float() for e in token_edits])  # (T, L, L)
            self._from_source = torch.stack([e.from_source.float() for e in token_edits])  # (T, L)
            self._cross_steps = torch.stack([e.cross_steps for e in token_edits])  # (T, L)
            self._weights = torch.stack([e.weights.float() for e in token_edits])  # (T, L)
        self._has_cross = bool(token_edits)
        self._cross_cache: dict[tuple[int, torch.device], tuple] = {}

        # Recording: per branch, the union of the recorded words' tokens; maps[branch][step] = [sum (n, N), count].
        self.words = [dict((w, list(map(int, idx))) for w, idx in branch.items()) for branch in words]
        self._tokens = [sorted({i for idx in branch.values() for i in idx}) for branch in self.words]
        self._maps: list[dict[int, list]] = [{} for _ in self.words]
        cond = torch.tensor(layout.cond_rows)  # the conditional rows, by branch
        self._record_branches = [b for b, tokens in enumerate(self._tokens) if tokens]
        self._record_rows = cond[self._record_branches]
        # Only the recorded key columns leave the processor: their union, and each branch's positions in it.
        self.record_columns = sorted({t for tokens in self._tokens for t in tokens})
        position = {t: i for i, t in enumerate(self.record_columns)}
        self._branch_columns = [[position[t] for t in tokens] for tokens in self._tokens]

    # ---- construction from prompts -------------------------------------------------------------------------
    @classmethod
    def for_edit(
        cls,
        config: AttentionControl,
        tokenizer,
        source_prompt: str,
        target_prompts: Sequence[str],
        *,
        num_steps: int,
        num_blocks: int,
        grid: tuple[int, int],
        alignments: Sequence | None = None,
        record_words: bool = False,
        layout: BatchLayout | None = None,
        max_length: int | None = None,
        **kwargs,
    ) -> "AttentionController":
        """A controller for editing `source_prompt` into each of `target_prompts` (T5 alignment by `prompts.align`
        with `config.edit_mode`, unless `alignments` are given).

        Pass prompts exactly as the text encoder sees them. Local-blend words are looked up in every prompt; each must
        occur in at least one. Under `config.local_blend_changed` each target also blends on the words its alignment
        changes (the source's in the source map, its own in its map). `record_words=True` also records every word
        of every prompt, for pictures.
        `layout` is the edit batch's (default: the 4-row layout with guidance); `max_length` the model's prompt length
        in T5 tokens (default: PixArt-alpha's). Other keyword arguments go to the constructor (`user_mask`,
        `patch_size`, `record_layers`).
        """
        layout = BatchLayout(len(target_prompts)) if layout is None else layout
        length = PIXART_ALPHA_TOKENS if max_length is None else max_length
        if alignments is None:
            alignments = [align(tokenizer, source_prompt, t, mode=config.edit_mode, max_length=length)
                          for t in target_prompts]
        edits = [
            TokenEdit.from_alignment(a, config, num_steps, tokenizer, t) for a, t in zip(alignments, target_prompts)
        ]
        prompts = [source_prompt, *target_prompts]
        words = [prompt_words(tokenizer, p, length) if record_words else {} for p in prompts]
        named = config.local_blend_words
        blend_words = [(named, named) for _ in target_prompts]
        if config.local_blend_changed:
            blend_words = [(_unique(named + a.changed_source_words), _unique(named + a.changed_words))
                           for a in alignments]
        wanted = [set(named)] + [set(target_side) for _, target_side in blend_words]
        wanted[SOURCE] |= {w for source_side, _ in blend_words for w in source_side}
        for branch, prompt, chosen in zip(words, prompts, wanted):
            for word in sorted(chosen):
                try:
                    branch[word] = word_token_indices(tokenizer, prompt, word, length)
                except DiT4EditError:
                    continue  # a source-only or target-only word
        missing = [w for w in named if not any(w in branch for branch in words)]
        if missing:
            raise DiT4EditError(
                f"local-blend word(s) {', '.join(missing)} are in neither the source nor the target prompt"
            )
        return cls(
            config, layout, num_steps=num_steps, num_blocks=num_blocks, grid=grid, token_edits=edits, words=words,
            blend_words=blend_words, **kwargs,
        )  # fmt: skip

    @classmethod
    def recorder(
        cls, tokenizer, prompt: str, *, num_steps: int, num_blocks: int, grid: tuple[int, int], **kwargs
    ) -> "AttentionController":
        """Records every word of `prompt` during a plain (no-edit) pass on a `BatchLayout(0)` batch
        `[uncond, cond]`; read the pictures with `word_maps()` afterwards."""
        return cls(
            AttentionControl(enabled=False), BatchLayout(0), num_steps=num_steps, num_blocks=num_blocks,
            grid=grid, words=[prompt_words(tokenizer, prompt)], **kwargs,
        )  # fmt: skip

    # ---- what the processors ask -----------------------------------------------------------------------------
    def self_edit(self, block: int, step_index: int | None) -> str | None:
        """The self-attention edit at (block, step): None, "source", "p2p", "mutual" or "union"."""
        if step_index is None or not self.config.enabled or block not in self.self_blocks:
            return None
        if step_index < self.self_switch:
            early = self.config.self_mode_early
            return None if early == "target" else early
        return {"source": "mutual", "union": "union", "none": None}[self.config.mutual]

    def cross_edit(self, step_index: int | None, device) -> tuple | None:
        """`(mapper (T, L, L), source_coef (T, L), own_coef (T, L) or None)` for the cross-attention edit at this
        step, or None when no target column is edited (see `edits.cross_attention_edit` for the formula)."""
        if step_index is None or not self.config.enabled or not self._has_cross:
            return None
        key = (step_index, torch.device(device))
        if key not in self._cross_cache:
            window = (step_index < self._cross_steps).float()  # (T, L): 1 inside each column's window
            if not bool(window.any()):
                self._cross_cache[key] = None
            else:
                f, w = self._from_source, self._weights
                source_coef = window * f * w
                own_coef = window * (1 - f) * w + (1 - window)
                own_coef = own_coef.to(device) if bool(own_coef.any()) else None  # None: pure replace
                self._cross_cache[key] = (self._mapper.to(device), source_coef.to(device), own_coef)
        return self._cross_cache[key]

    def record_rows(self, block: int, step_index: int | None) -> torch.Tensor | None:
        """Batch rows whose cross-attention this block records at this step (conditional rows only), or None."""
        if step_index is None or not self._record_branches or block not in self.record_blocks:
            return None
        return self._record_rows

    def record(self, step_index: int, probs: torch.Tensor) -> None:
        """Accumulate `(R, N, C)` head-averaged probabilities of `record_rows` on the `record_columns` keys."""
        for branch, row_probs in zip(self._record_branches, probs):
            kept = row_probs[:, self._branch_columns[branch]].T.float()  # (n_tokens, N)
            slot = self._maps[branch].setdefault(step_index, [torch.zeros_like(kept), 0])
            slot[0] += kept
            slot[1] += 1

    # ---- maps, masks and blending ----------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget the recorded maps (to reuse the controller for another pass)."""
        self._maps = [{} for _ in self.words]

    def recorded_steps(self, branch: int = 0) -> list[int]:
        return sorted(self._maps[branch]) if branch < len(self._maps) else []

    def _token_maps(self, branch: int, steps) -> torch.Tensor | None:
        """`(n_tokens, N)` mean over the chosen recorded steps and the recorded layers, or None if nothing is there."""
        recorded = self._maps[branch] if branch < len(self._maps) else {}
        chosen = [recorded[s] for s in (recorded if steps is None else steps) if s in recorded]
        if not chosen:
            return None
        return sum(s / c for s, c in chosen) / len(chosen)

    def word_maps(self, branch: int = 0, steps: Sequence[int] | None = None) -> dict[str, torch.Tensor]:
        """`{word: (h, w)}` cross-attention map of each recorded word of a branch (0 = source, k = target k): the
        probability mass on the word's pieces, averaged over heads, recorded layers and `steps` (default: all)."""
        maps = self._token_maps(branch, steps)
        if maps is None:
            return {}
        column = {token: i for i, token in enumerate(self._tokens[branch])}
        return {
            word: maps[[column[t] for t in tokens]].sum(0).reshape(self.grid)  # (N,) -> (h, w)
            for word, tokens in self.words[branch].items()
        }

    def blend_mask(self, step_index: int, target: int = 0) -> torch.Tensor | None:
        """`(H, W)` latent-resolution editable region (1 = edit) for target `target` after step `step_index`, or
        None when no blending applies (before `local_blend_start`, or no blend words and no user mask).

        A user mask wins. Otherwise Prompt-to-Prompt's local blend: the maps of the blend words, averaged over the
        recorded steps up to `step_index` and the blend layers, in the source (source map) and in the target (the
        target's own map), each normalised (`local_blend_normalize`) and thresholded; the mask is their union.
        """
        if step_index < self.blend_start:
            return None
        if self.user_mask is not None:
            return self.user_mask
        if not self.config.enabled or not any(self.blend_words[target]):
            return None
        steps = range(step_index + 1)
        maps = []
        for branch, names in zip((SOURCE, self.layout.target_branch(target)), self.blend_words[target]):
            words = self.word_maps(branch, steps) if branch < len(self.words) and names else {}
            chosen = [words[w] for w in names if w in words]
            if chosen:
                maps.append(torch.stack(chosen).sum(0))
        if not maps:
            return None
        return attention_blend_mask(
            torch.stack(maps), self.latent_size, self.config.local_blend_threshold, self.config.local_blend_dilate,
            self.config.local_blend_normalize,
        )

    def local_blend(self, latents: torch.Tensor, step_index: int) -> torch.Tensor:
        """Blend each target's latent with the source latent after denoising step `step_index`.

        latents: `(branches, C, H, W)` in branch order (source, targets), e.g. after guidance is combined.
        Returns the same tensor when no blending applies at this step.
        """
        if latents.shape[0] != self.layout.branches:
            raise ValueError(
                f"local_blend takes one latent per branch ({self.layout.branches}), got {latents.shape[0]}"
            )
        out = latents
        for target in range(self.layout.num_targets):
            mask = self.blend_mask(step_index, target)
            if mask is None:
                continue
            if out is latents:
                out = latents.clone()
            branch = self.layout.target_branch(target)
            out[branch] = apply_local_blend(latents[branch], self.layout.source(latents), mask)
        return out
