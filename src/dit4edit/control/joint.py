"""Attention control on joint attention (MM-DiT: SD3 / SD3.5, FLUX): Prompt-to-Prompt on the image-query / text-key
part, the source's image-token keys and values for the target, one softmax over both key sets handled exactly.

In joint attention an image query attends to image and text keys under one softmax. Split a target image query's
probabilities into an image part `A_img` (over image keys) and a text part `A_txt` (over text keys); an edit
replaces one part and keeps the other, *without* renormalising (the parts share the normaliser of the softmax they
come from). With `P_t`, `P_s` the target's and source's own softmaxes, `P_m = softmax(Q_t [K_s,img; K_t,txt]^T)`
the mutual one, `M` the token mapper and `c_src`, `c_own` Prompt-to-Prompt's per-column coefficients (as in
`edits.cross_attention_edit`), a target image query's output is

    A_img V_img + A_txt V_t,txt,   A_txt = own_txt diag(c_own) + (P_s,txt M) diag(c_src)

    image edit   A_img, V_img          own (the text part's softmax)
    none         P_t,img, V_t,img      P_t
    "source"     P_s,img, V_s,img      P_t     (self-attention replacement: the source's image part)
    "mutual"     P_m,img, V_s,img      P_m     (mutual self-attention: target queries, source image keys/values)

and no Prompt-to-Prompt means `c_own = 1, c_src = 0`. Source rows, text-query rows and rows whose guidance half has
no source row keep the default attention; Prompt-to-Prompt acts on the conditional target rows only, as
cross-attention control does.

Computed with SDPA only, never an `N x N` map: a part of a softmax is its mass times the softmax restricted to the
part, `A_txt V = m_txt SDPA(Q, K_txt, V)`, and the text mass `m_txt` comes out of the same SDPA call as the full
output by giving the values one more channel, 1 on text keys and 0 on image keys (`_with_text_mass`); the image
part is the full output minus the text part. The two key sets' masses are `exp(lse_part - lse_all)`, the
log-sum-exp split of the shared normaliser, which this channel yields without forming either log-sum-exp.

Token merging (`JointController.merge`) acts on the image tokens only, inside the processor: after the projections,
q/k norms and (FLUX) RoPE, so each merged token averages already-rotated queries and keys (the rotary positions are
merged along); the text tokens are never merged; the image outputs are unmerged after the output projection. One
plan per (step, layer) from the conditional source row serves every row, so edits still line target rows up with
source rows. At ratio 0 nothing is touched: the outputs are bit-identical to no merging.

Batch rows follow `dit4edit.layout.BatchLayout` (source / targets x unconditional / conditional; FLUX-dev has no
unconditional rows). The step reaches the processors as `step_index` through `joint_attention_kwargs`; layers are
named at install time; nothing counts calls.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch

from ..errors import DiT4EditError
from ..layout import BatchLayout
from ..masks import latent_mask
from ..merging import MergeConfig, MergeFn, identity, layer_seed, plan_merge
from .blend import apply_local_blend
from .config import steps_before
from .edits import SELF_EDITS, sdpa

IMAGE_EDITS = ("source", "mutual")


@dataclass(frozen=True)
class Spans:
    """Where the image and the text tokens sit in a joint sequence: SD3 `[image, text]`, FLUX `[text, image]`."""

    image: slice
    text: slice

    @classmethod
    def of(cls, order: Sequence[str], num_image: int, num_text: int) -> Spans:
        if tuple(order) == ("image", "text"):
            return cls(slice(0, num_image), slice(num_image, num_image + num_text))
        if tuple(order) == ("text", "image"):
            return cls(slice(num_text, num_text + num_image), slice(0, num_text))
        raise ValueError(f"a joint sequence is image and text in some order, got {tuple(order)}")


@dataclass(frozen=True, eq=False)
class TextEdit:
    """Prompt-to-Prompt on the text keys: mapper `(T, L, L)` (rows source tokens, columns target tokens, over the
    model's whole text sequence), `source_coef` `(T, L)` and `own_coef` `(T, L)` or None (all zero), T targets."""

    mapper: torch.Tensor
    source_coef: torch.Tensor
    own_coef: torch.Tensor | None = None


def prompt_to_prompt(alignments) -> TextEdit:
    """Prompt-to-Prompt's text edit for one alignment per target (`dit4edit.backbones.alignment.align_tokens`):
    replace takes every text column from the source (`c_src = 1`, `c_own = 0`); refine takes the aligned columns
    from the source and keeps the target's own elsewhere (`c_src = f`, `c_own = 1 - f`, f = `from_source`)."""
    mapper = torch.stack([a.mapper for a in alignments])  # (T, L, L)
    refine = [a.mode == "refine" for a in alignments]
    from_source = torch.stack([a.from_source for a in alignments])  # (T, L)
    source_coef = torch.where(torch.tensor(refine)[:, None], from_source, torch.ones_like(from_source))
    own_coef = torch.where(torch.tensor(refine)[:, None], 1.0 - from_source, torch.zeros_like(from_source))
    return TextEdit(mapper, source_coef, own_coef if any(refine) else None)


@dataclass(frozen=True, eq=False)
class JointEdit:
    """What the target image queries get at one (step, layer): an image-part edit (None, "source", "mutual")
    and/or a text-part edit."""

    image: str | None = None
    text: TextEdit | None = None

    def __post_init__(self):
        if self.image is not None and self.image not in IMAGE_EDITS:
            raise ValueError(f"image edit must be one of {', '.join(IMAGE_EDITS)} or None, got {self.image!r}")


# --- the edit as a pure function of the heads ----------------------------------------------------------------------


def _text_mass(query, key, text: slice):
    """Each query's softmax mass on the keys in `text`, `(B, H, N, 1)`: SDPA with a one-channel value, 1 on them."""
    indicator = torch.zeros(*key.shape[:-1], 1, dtype=key.dtype, device=key.device)  # (B, H, L, 1)
    indicator[:, :, text] = 1.0
    return sdpa(query, key, indicator)


def _with_text_mass(query, key, value, text: slice):
    """`SDPA(Q, K, V)` and each query's softmax mass on the keys in `text`, from one call: `(B, H, N, d)`,
    `(B, H, N, 1)`."""
    indicator = torch.zeros(*value.shape[:-1], 1, dtype=value.dtype, device=value.device)  # (B, H, L, 1)
    indicator[:, :, text] = 1.0
    out = sdpa(query, key, torch.cat([value, indicator], dim=-1))  # (B, H, N, d + 1)
    return out[..., :-1], out[..., -1:]


def joint_attention_edit(query, key, value, spans: Spans, layout: BatchLayout, edit: JointEdit | None):
    """Joint attention `(B, H, L, d) -> (B, H, L, d)` with `edit` on the target rows' image queries (module
    docstring: the formula, and which rows change). `edit=None` is the default attention."""
    out = sdpa(query, key, value)
    if edit is None or (edit.image is None and edit.text is None):
        return out
    img, txt = spans.image, spans.text
    device = query.device
    src = layout.source_of(device)  # (B,) each row's source row
    rows = (src != torch.arange(layout.rows, device=device)).nonzero()[:, 0]  # target rows with a source row
    if len(rows) == 0:
        return out
    s_rows = src[rows]
    q_t, k_t, v_t = query[rows], key[rows], value[rows]  # (R, H, L, d)
    q_ti = q_t[:, :, img]  # (R, H, N, d) the target image queries

    if edit.image == "mutual" and edit.text is None:  # one softmax over [K_s,img; K_t,txt]: plain SDPA
        k_m, v_m = k_t.clone(), v_t.clone()
        k_m[:, :, img], v_m[:, :, img] = key[s_rows][:, :, img], value[s_rows][:, :, img]
        result = sdpa(q_ti, k_m, v_m)  # (R, H, N, d)
        return _put_image_rows(out, rows, img, result)

    # The image part and the softmax the target's own text part lives in.
    if edit.image == "source":
        image_out, image_mass = _with_text_mass(query[s_rows][:, :, img], key[s_rows], value[s_rows], txt)
        image_part = image_out - image_mass * sdpa(query[s_rows][:, :, img], key[s_rows][:, :, txt],
                                                   value[s_rows][:, :, txt])
        own_mass = _text_mass(q_ti, k_t, txt)
    else:
        if edit.image == "mutual":
            k_t, v_t = k_t.clone(), v_t.clone()
            k_t[:, :, img], v_t[:, :, img] = key[s_rows][:, :, img], value[s_rows][:, :, img]
        own_out, own_mass = _with_text_mass(q_ti, k_t, v_t, txt)
        image_part = own_out - own_mass * sdpa(q_ti, k_t[:, :, txt], v_t[:, :, txt])
    k_tt, v_tt = k_t[:, :, txt], v_t[:, :, txt]  # the target's own text keys and values (R, H, L_txt, d)

    own_coef = torch.ones(len(rows), v_tt.shape[2], dtype=value.dtype, device=device)  # (R, L_txt)
    p2p_rows = []
    if edit.text is not None:  # Prompt-to-Prompt on the conditional target rows
        cond = layout.cond_rows
        p2p_rows = [int((rows == r).nonzero()[0, 0]) for r in cond[1:]]  # positions in `rows`, target order
        own = edit.text.own_coef
        own_coef[p2p_rows] = 0.0 if own is None else own.to(device, value.dtype)
    text_part = own_mass * sdpa(q_ti, k_tt, own_coef[:, None, :, None] * v_tt)
    result = image_part + text_part
    if p2p_rows:
        source = cond[0]
        q_si = query[source : source + 1, :, img]  # (1, H, N, d)
        source_mass = _text_mass(q_si, key[source : source + 1], txt)
        scaled = edit.text.source_coef.to(device, value.dtype)[:, None, :, None] * v_tt[p2p_rows]  # c_src * V_t
        mapped = torch.einsum("tij,thjd->thid", edit.text.mapper.to(device, value.dtype), scaled)  # M (c_src V_t)
        n = len(p2p_rows)
        moved = source_mass * sdpa(q_si.expand(n, -1, -1, -1), key[source : source + 1, :, txt].expand(n, -1, -1, -1),
                                   mapped)
        result[p2p_rows] = result[p2p_rows] + moved
    return _put_image_rows(out, rows, img, result)


def _put_image_rows(out, rows, img: slice, result):
    """`out (B, H, L, d)` with the image positions of `rows` replaced by `result (R, H, N, d)`."""
    positions = torch.arange(out.shape[2], device=out.device)[img]  # (N,)
    out[rows[:, None], :, positions[None, :]] = result.transpose(1, 2).to(out.dtype)  # indexed as (R, N, H, d)
    return out


def text_attention_probs(query, key, spans: Spans, rows, columns=None) -> torch.Tensor:
    """Probabilities of the image queries on text keys *within the full joint softmax*, averaged over heads:
    `(R, N, C)` for batch rows `rows` and text positions `columns` (default: all).

    `P[i, j] = exp(s_ij - lse_txt,i) * m_txt,i`: the softmax over the text keys alone (explicit, `N x L_txt`, as
    cheap as a cross-attention map) times the text mass of the full softmax, from SDPA with a one-channel value
    (1 on text keys); no `N x N` map."""
    img, txt = spans.image, spans.text
    q, k = query[rows][:, :, img].float(), key[rows].float()  # (R, H, N, d), (R, H, L, d)
    mass = _text_mass(q, k, txt)  # (R, H, N, 1)
    probs = (q @ k[:, :, txt].transpose(-1, -2) * q.shape[-1] ** -0.5).softmax(-1) * mass  # (R, H, N, L_txt)
    if columns is not None:
        probs = probs[..., columns]
    return probs.mean(dim=1)  # (R, N, C)


# --- when: the controller ------------------------------------------------------------------------------------------


@dataclass(eq=False)
class JointController:
    """Which edit applies at (step, layer) of an edit batch laid out as `layout`.

    image_layers: names of the layers (processor names) whose target image queries take the source's image part:
        "source" for steps before `switch_step`, "mutual" from it on (the paper's deeper blocks).
    text_edit: Prompt-to-Prompt on the text keys of every joint / single-stream layer for steps before
        `text_steps` (None: no Prompt-to-Prompt).
    text_length: the model's text sequence length, which single-stream layers cannot see.
    merge: token merging of the image tokens (`dit4edit.merging.MergeConfig`: ratio, stride, seed, blocks as
        positions in model order of the controlled layers, skip_steps, min_tokens) on the `grid` of image tokens;
        None: off.
    record_layers, record_columns: the joint / single layers whose image -> text maps are kept in `maps`, and the
        text positions kept (None: all); each branch's own map, before any edit.
    user_mask: `(h, w)` latent mask, 1 = editable: after every step each target latent is the source's outside it
        (`local_blend`); None: no blend.
    """

    layout: BatchLayout
    text_length: int
    image_layers: frozenset[str] = frozenset()
    switch_step: int = 0
    text_edit: TextEdit | None = None
    text_steps: int = 0
    merge: MergeConfig | None = None
    grid: tuple[int, int] | None = None
    record_layers: frozenset[str] = frozenset()  # joint / single layers whose maps `record` keeps
    record_columns: tuple[int, ...] | None = None
    seen: set[str] = field(default_factory=set)  # layers that received an edit (for tests and pictures)
    maps: list[tuple[int, str, torch.Tensor]] = field(default_factory=list)  # (step, layer, (branches, N, C))
    user_mask: torch.Tensor | None = None
    num_steps: int = 0  # the edit's denoising steps (what the pictures of an edit ask)

    def blend_mask(self, step_index: int, target: int = 0) -> torch.Tensor | None:
        """The editable region at `step_index`: the user mask (`(h, w)`, 1 = editable), or None."""
        return self.user_mask

    def word_maps(self, branch: int, steps=None) -> dict[str, torch.Tensor]:
        """Per-word attention pictures, as `AttentionController.word_maps` gives them: none yet on joint attention
        (the recorded image -> text maps are in `maps`, by text position)."""
        return {}

    def local_blend(self, latents: torch.Tensor, step_index: int) -> torch.Tensor:
        """`(branches, C, h, w)` latents after step `step_index` with each target outside `user_mask` reset to the
        source (`blend.apply_local_blend`); the same tensor without a mask."""
        if self.user_mask is None:
            return latents
        out = latents.clone()
        for target in range(self.layout.num_targets):
            branch = self.layout.target_branch(target)
            out[branch] = apply_local_blend(latents[branch], self.layout.source(latents), self.user_mask)
        return out

    def record(self, layer: str, step: int | None, query, key, spans: Spans, unmerge: MergeFn) -> None:
        """Store each branch's own (pre-edit) image -> text map of `layer` at `step`, on the conditional rows, over
        `record_columns`, unmerged to the full token grid."""
        if layer not in self.record_layers:
            return
        probs = text_attention_probs(query, key, spans, self.layout.cond_rows, self.record_columns)  # (R, N', C)
        self.maps.append((step or 0, layer, unmerge(probs)))

    def word_map(self) -> torch.Tensor:
        """The recorded maps averaged over steps and layers: `(branches, N, C)` (local blend, pictures)."""
        if not self.maps:
            raise ValueError("no attention maps were recorded")
        return torch.stack([m for _, _, m in self.maps]).mean(dim=0)

    def merging(self, index: int, step: int | None, image_states: torch.Tensor) -> tuple[MergeFn, MergeFn]:
        """`(merge, unmerge)` of the image tokens `(B, N, C)` at the layer in position `index` (model order) and
        `step`: one plan from the conditional source row, drawn from `layer_seed(seed, index)` and the step."""
        config, step = self.merge, step or 0
        if (config is None or self.grid is None or not config.applies(self.grid) or step < config.skip_steps
                or not config.merges_block(index)):
            return identity, identity
        generator = torch.Generator(device=image_states.device)
        generator.manual_seed(layer_seed(config.seed, index) * 1009 + step)
        plan_row = self.layout.row(0, True)  # the source branch's conditional row
        return plan_merge(image_states[plan_row], self.grid, config, generator)

    def edit(self, layer: str, step: int | None) -> JointEdit | None:
        if step is None:
            return None
        image = None
        if layer in self.image_layers:
            image = "source" if step < self.switch_step else "mutual"
        text = self.text_edit if step < self.text_steps else None
        if image is None and text is None:
            return None
        self.seen.add(layer)
        return JointEdit(image, text)


# --- processors ----------------------------------------------------------------------------------------------------


class JointControlProcessor:
    """SD3 / SD3.5's `JointAttnProcessor2_0` written out, with `joint_attention_edit` at its core; heads
    `(B, H, L, d)`, joint order `[image, text]`. On an image-only layer (SD3.5's `attn2`, role "self") the
    image edit is `edits.SELF_EDITS`' "source" / "mutual" on the target rows."""

    def __init__(self, controller: JointController, name: str, index: int = 0):
        self.controller, self.name, self.index = controller, name, index

    def __repr__(self):
        return f"{type(self).__name__}({self.name})"

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 step_index: int | None = None):
        controller = self.controller
        batch_size = hidden_states.shape[0]
        head_dim = attn.to_k.out_features // attn.heads

        def heads(x):  # (B, L, H * d) -> (B, H, L, d)
            return x.view(batch_size, -1, attn.heads, head_dim).transpose(1, 2)

        query, key, value = heads(attn.to_q(hidden_states)), heads(attn.to_k(hidden_states)), heads(
            attn.to_v(hidden_states))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        merge, unmerge = controller.merging(self.index, step_index, hidden_states)
        if merge is not identity:  # (B, H, N, d) -> (B, H, N - r, d)
            query, key, value = (_merge_heads(merge, x) for x in (query, key, value))
        num_image = query.shape[2]
        edit = controller.edit(self.name, step_index)
        _check_rows(controller, edit, batch_size)
        if encoder_hidden_states is None:  # image-only attention
            if edit is None or edit.image is None:
                out = sdpa(query, key, value)
            else:
                out = SELF_EDITS[edit.image](query, key, value, controller.layout)
        else:
            c_query = heads(attn.add_q_proj(encoder_hidden_states))
            c_key = heads(attn.add_k_proj(encoder_hidden_states))
            c_value = heads(attn.add_v_proj(encoder_hidden_states))
            if attn.norm_added_q is not None:
                c_query = attn.norm_added_q(c_query)
            if attn.norm_added_k is not None:
                c_key = attn.norm_added_k(c_key)
            query = torch.cat([query, c_query], dim=2)  # (B, H, N + L, d): [image, text]
            key = torch.cat([key, c_key], dim=2)
            value = torch.cat([value, c_value], dim=2)
            spans = Spans.of(("image", "text"), num_image, encoder_hidden_states.shape[1])
            controller.record(self.name, step_index, query, key, spans, unmerge)
            out = joint_attention_edit(query, key, value, spans, controller.layout, edit)
        out = out.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim).to(query.dtype)  # (B, L, H * d)
        if encoder_hidden_states is None:
            return unmerge(attn.to_out[1](attn.to_out[0](out)))
        out, context = out[:, :num_image], out[:, num_image:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return unmerge(attn.to_out[1](attn.to_out[0](out))), context


class FluxJointControlProcessor:
    """FLUX's `FluxAttnProcessor` written out (heads `(B, L, H, d)`, RMS q/k norms, RoPE over the joint sequence),
    with `joint_attention_edit` at its core; joint order `[text, image]`. Double-stream layers get text and image
    as two streams; single-stream layers get them concatenated (text first, `controller.text_length` tokens)."""

    def __init__(self, controller: JointController, name: str, index: int = 0):
        self.controller, self.name, self.index = controller, name, index

    def __repr__(self):
        return f"{type(self).__name__}({self.name})"

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 step_index: int | None = None):
        from diffusers.models.embeddings import apply_rotary_emb  # deferred: diffusers' model code loads slowly

        controller = self.controller
        if attention_mask is not None:
            raise ValueError("attention control on FLUX takes no attention mask")
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query = attn.norm_q(query.unflatten(-1, (-1, attn.head_dim)))  # (B, L, H, d)
        key = attn.norm_k(key.unflatten(-1, (-1, attn.head_dim)))
        value = value.unflatten(-1, (-1, attn.head_dim))
        num_text = controller.text_length
        if encoder_hidden_states is not None:
            num_text = encoder_hidden_states.shape[1]
            c_query = attn.norm_added_q(attn.add_q_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            c_key = attn.norm_added_k(attn.add_k_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim)))
            c_value = attn.add_v_proj(encoder_hidden_states).unflatten(-1, (-1, attn.head_dim))
            query = torch.cat([c_query, query], dim=1)  # (B, L + N, H, d): [text, image]
            key = torch.cat([c_key, key], dim=1)
            value = torch.cat([c_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        image_states = hidden_states if encoder_hidden_states is not None else hidden_states[:, num_text:]
        merge, unmerge = controller.merging(self.index, step_index, image_states)
        if merge is not identity:  # the image tokens, already rotated: (B, L + N, H, d) -> (B, L + N - r, H, d)
            query, key, value = (torch.cat([x[:, :num_text], merge(x[:, num_text:].flatten(2)).unflatten(
                2, (-1, attn.head_dim))], dim=1) for x in (query, key, value))
        edit = controller.edit(self.name, step_index)
        _check_rows(controller, edit, query.shape[0])
        spans = Spans.of(("text", "image"), query.shape[1] - num_text, num_text)
        query, key, value = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, H, L, d)
        controller.record(self.name, step_index, query, key, spans, unmerge)
        out = joint_attention_edit(query, key, value, spans, controller.layout, edit)  # (B, H, L, d)
        out = out.transpose(1, 2).flatten(2, 3).to(query.dtype)  # (B, L, H * d)
        if encoder_hidden_states is None:
            return out if merge is identity else torch.cat([out[:, :num_text], unmerge(out[:, num_text:])], dim=1)
        context, out = out[:, :num_text], out[:, num_text:]
        out = unmerge(attn.to_out[1](attn.to_out[0](out.contiguous())))
        return out, attn.to_add_out(context.contiguous())


def _merge_heads(merge: MergeFn, x: torch.Tensor) -> torch.Tensor:
    """Merge the tokens of heads `(B, H, N, d) -> (B, H, N - r, d)` (the plan acts on `(B, N, C)`)."""
    heads = x.shape[1]
    merged = merge(x.transpose(1, 2).flatten(2))  # (B, N, H * d) -> (B, N - r, H * d)
    return merged.unflatten(2, (heads, -1)).transpose(1, 2)


def _check_rows(controller: JointController, edit, batch_size: int) -> None:
    if edit is not None and batch_size != controller.layout.rows:
        raise ValueError(f"attention control expects the {controller.layout.rows}-row batch of "
                         f"{controller.layout}, got {batch_size} rows")


@contextmanager
def install_joint(transformer, controller: JointController, layers) -> Iterator[JointController]:
    """Put a control processor on every layer of `layers` (`dit4edit.backbones.AttentionLayer`s of roles joint,
    single and self, in model order: a layer's position there is its index for merging) for the `with` block;
    the previous processors come back in `finally`."""
    flux = any(layer.keys[0] == "text" for layer in layers if layer.role in ("joint", "single"))
    processor = FluxJointControlProcessor if flux else JointControlProcessor
    previous = dict(transformer.attn_processors)
    wanted = {layer.name for layer in layers if layer.role in ("joint", "single", "self")}
    index = {layer.name: i for i, layer in enumerate(layers)}  # the layer's position in model order
    processors = {name: processor(controller, name, index[name]) if name in wanted else p
                  for name, p in previous.items()}
    transformer.set_attn_processor(dict(processors))  # set_attn_processor empties the dict it gets
    try:
        yield controller
    finally:
        transformer.set_attn_processor(dict(previous))


def joint_controller_for(pipe, control, inversion, targets, mask=None, layout=None, merge=None):
    """The `JointController` of one edit on a joint-attention model: Prompt-to-Prompt on the text keys of every
    joint / single-stream layer before `cross_replace_steps`, the source's image keys and values before
    `self_replace_steps` and mutual self-attention after it in the `self_layers` blocks (default the deeper
    half), the user mask as a latent blend, merging on image tokens. One-line errors for what joint control
    does not do (word reweighting, local blend by words)."""
    latent_hw = tuple(inversion.trajectory.shape[-2:])
    if control is not None and control.enabled and control.reweight:
        raise DiT4EditError("word reweighting (--reweight) is not available on joint-attention models "
                            f"({pipe.backbone.family})")
    if control is not None and control.enabled and (control.local_blend_words or control.local_blend_changed):
        raise DiT4EditError("local blend by words is not available on joint-attention models "
                            f"({pipe.backbone.family}); give a mask instead")
    enabled = control is not None and control.enabled
    if not enabled and mask is None and merge is None:
        return None
    layout = layout or pipe.backbone.layout(len(targets), inversion.guidance_scale)
    num_steps = inversion.num_inference_steps
    layers = pipe.backbone.attention_layers()
    first_single = len(pipe.transformer.transformer_blocks)
    source = pipe.backbone.prompt_tokens(inversion.source_prompt)
    image_layers, text_edit, switch, text_steps = frozenset(), None, 0, 0
    if enabled:
        blocks = control.self_blocks(pipe.num_blocks)
        image_layers = frozenset(
            layer.name for layer in layers if layer.role in ("joint", "single", "self")
            and layer.block + (first_single if layer.role == "single" else 0) in blocks)
        from ..backbones.alignment import align_tokens  # deferred: only joint edits align whole sequences

        text_edit = prompt_to_prompt([align_tokens(source, pipe.backbone.prompt_tokens(t), control.edit_mode)
                                      for t in targets])
        switch = steps_before(control.self_replace_steps, num_steps)
        text_steps = steps_before(control.cross_replace_steps, num_steps)
    user_mask = None if mask is None else latent_mask(mask, inversion.original_size, latent_hw)
    return JointController(layout=layout, text_length=len(source.word_of_token), image_layers=image_layers,
                           switch_step=switch, text_edit=text_edit, text_steps=text_steps, merge=merge,
                           grid=pipe._token_grid(latent_hw), user_mask=user_mask, num_steps=num_steps)
