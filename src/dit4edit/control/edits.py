"""What each attention edit computes, as pure functions of the heads `(B, H, N, d)` of an edit batch.

Every function leaves the source rows exactly as the default attention computes them and changes only target rows.
All self-attention edits go through `F.scaled_dot_product_attention` (SDPA); no `N x N` map is ever formed. Each
docstring names the identity it relies on, with `A = softmax(Q K^T / sqrt(d) + bias)`; tests check every one of
them against the explicit softmax form.

Rows follow `dit4edit.layout.BatchLayout` (`source_of` names each row's source row, `cond_rows` the conditional
half); a row whose half has no source row (the 3-row layout's unconditional targets) keeps its default attention.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..layout import BatchLayout


def sdpa(query, key, value, attention_mask=None):
    """Attention as diffusers' `AttnProcessor2_0` computes it (default scale `1/sqrt(d)`, no dropout)."""
    return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False)


def _rows(mask, index):
    # An attention mask is `(B, H, Nq, Nk)` or broadcastable with batch 1; follow the rows only when it has them.
    if mask is None or mask.shape[0] == 1:
        return mask
    return mask[index]


def source_self_attention(query, key, value, layout: BatchLayout, attention_mask=None):
    """Paper Eq. 11: each target row takes its source row's self-attention output, `Attention(Q_src, K_src, V_src)`.

    Computed once per distinct row of `layout.source_of()` (the source rows, and any row without a source in its
    half), then copied to the rows that read it (cheaper than default).
    """
    src = layout.source_of(query.device)
    computed, expand = src.unique(return_inverse=True)  # (S,) rows computed; (B,) which of them each row takes
    out = sdpa(query[computed], key[computed], value[computed], _rows(attention_mask, computed))
    return out[expand]  # (S, H, N, d) -> (B, H, N, d)


def p2p_self_attention(query, key, value, layout: BatchLayout, attention_mask=None):
    """Prompt-to-Prompt self-attention replacement: source map, own values.

    Identity: `softmax(Q_src K_src^T) V_tgt = SDPA(Q_src, K_src, V_tgt)`.
    """
    src = layout.source_of(query.device)
    return sdpa(query[src], key[src], value, _rows(attention_mask, src))


def mutual_self_attention(query, key, value, layout: BatchLayout, attention_mask=None):
    """MasaCtrl mutual self-attention: target queries read the source's keys and values, `SDPA(Q_tgt, K_src, V_src)`.

    Source rows get `SDPA(Q_src, K_src, V_src)`, i.e. the default.
    """
    src = layout.source_of(query.device)
    return sdpa(query, key[src], value[src], _rows(attention_mask, src))


def union_self_attention(query, key, value, layout: BatchLayout, attention_mask=None):
    """Mutual self-attention over the union of keys: target rows attend to `[K_src; K_tgt]` with `[V_src; V_tgt]`,
    `SDPA(Q_tgt, [K_src; K_tgt], [V_src; V_tgt])`; source rows get the default attention.

    Two SDPA calls (source rows over N keys, target rows over 2N keys), no mask added, so the fused kernels stay in use.
    """
    src = layout.source_of(query.device)
    edited = src != torch.arange(layout.rows, device=query.device)  # rows that read a source row
    sources, targets = (~edited).nonzero()[:, 0], edited.nonzero()[:, 0]
    out = query.new_empty(*query.shape[:-1], value.shape[-1])  # (B, H, N, d)
    out[sources] = sdpa(query[sources], key[sources], value[sources], _rows(attention_mask, sources))
    key_u = torch.cat([key[src[targets]], key[targets]], dim=2)  # (T2, H, 2N, d), T2 = target rows of both halves
    value_u = torch.cat([value[src[targets]], value[targets]], dim=2)
    mask_u = None
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            blocked = torch.zeros_like(attention_mask, dtype=query.dtype)
            attention_mask = blocked.masked_fill(~attention_mask, float("-inf"))
        attention_mask = attention_mask.expand(query.shape[0], -1, query.shape[2], -1)
        mask_u = torch.cat([attention_mask[src[targets]], attention_mask[targets]], dim=-1)
    out[targets] = sdpa(query[targets], key_u, value_u, mask_u)
    return out


SELF_EDITS = {
    "source": source_self_attention,
    "p2p": p2p_self_attention,
    "mutual": mutual_self_attention,
    "union": union_self_attention,
}


def cross_attention_edit(query, key, value, layout: BatchLayout, attention_mask, mapper, source_coef, own_coef):
    """Prompt-to-Prompt cross-attention edit (replace / refine / reweight, per-word windows) on the conditional
    target rows; every other row gets the default attention.

    Per target `t`, with `A_s`, `A_t` the source's and target's own maps (N x L), `M` the token mapper (rows source
    tokens, columns target tokens: `A_s M` is the source map moved onto the target's tokens) and per-column
    coefficients `c_src`, `c_own` (L,), the edited map is `A_s M diag(c_src) + A_t diag(c_own)`. Its output is

        (A_s M diag(c_src) + A_t diag(c_own)) V_t = SDPA(Q_s, K_s, M (c_src * V_t)) + SDPA(Q_t, K_t, c_own * V_t),

    using `(A D) V = A (D V)` for `D = M diag(c)`: `(M (c * V))[i] = sum_j M[i, j] c[j] V[j]`. Replace is
    `c_src = 1, c_own = 0`; refine has `c_src = f, c_own = 1 - f` with `f` the aligned-column indicator; reweight
    multiplies both by `w`; outside a word's window `c_src = 0, c_own = 1`. `own_coef=None` means all zero (pure
    replace in the window) and skips the second call.

    Shapes: query `(B, H, N, d)`, key/value `(B, H, L, d)`, attention_mask a bias broadcastable to `(B, H, N, L)`,
    mapper `(T, L, L)`, source_coef and own_coef `(T, L)` (or None) with `T = layout.num_targets`.
    """
    out = sdpa(query, key, value, attention_mask)
    # The conditional half's rows, source then targets: a contiguous block, so plain slices (views, no copies).
    cond = layout.cond_rows
    source, targets = slice(cond[0], cond[0] + 1), slice(cond[1], cond[-1] + 1)
    n_targets = len(cond) - 1
    value_t = value[targets]  # (T, H, L, d)
    scaled = source_coef.to(value.dtype)[:, None, :, None] * value_t  # c_src * V_t
    mapped = torch.einsum("tij,thjd->thid", mapper.to(value.dtype), scaled)  # M (c_src * V_t), rows source tokens
    edited = sdpa(
        query[source].expand(n_targets, -1, -1, -1),
        key[source].expand(n_targets, -1, -1, -1),
        mapped,
        _rows(attention_mask, source),
    )
    if own_coef is not None:
        own_v = own_coef.to(value.dtype)[:, None, :, None] * value_t
        edited = edited + sdpa(query[targets], key[targets], own_v, _rows(attention_mask, targets))
    out[targets] = edited.to(out.dtype)
    return out


def cross_attention_probs(query, key, attention_mask, rows, columns=None):
    """Explicit cross-attention probabilities of chosen rows and key columns, averaged over heads: `(R, N, C)`.

    `softmax(Q K^T / sqrt(d) + bias)` on `(R, H, N, L)`, then `[..., columns]` (default: all L) and the mean over
    heads. Only cross-attention (L = 120 keys) is ever made explicit, and only for the rows being recorded.
    """
    scale = query.shape[-1] ** -0.5
    scores = (query[rows].float() * scale) @ key[rows].float().transpose(-1, -2)  # (R, H, N, L)
    if attention_mask is not None:
        scores = scores + _rows(attention_mask, rows).float()
    probs = scores.softmax(dim=-1)
    if columns is not None:
        probs = probs[..., columns]  # (R, H, N, C)
    return probs.mean(dim=1)  # (R, N, C)
