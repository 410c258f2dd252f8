"""Token merging: plans, merge/unmerge identities, the attn1 processor on a tiny PixArt, install/restore."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from dit4edit.layout import BatchLayout
from dit4edit.merging import (
    MergeConfig,
    TokenMergingAttnProcessor,
    _partition,
    apply_token_merging,
    identity,
    layer_seed,
    merged_self_attention,
    plan_for_batch,
    plan_merge,
    plan_merge_per_row,
    required_stride,
    token_grid,
)
from dit4edit.tiny import tiny_components


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def groups_of(merge, unmerge, n, batch=1):
    """(B, N, N) membership: row t holds 1/|group(t)| at each member of t's group (one-hot tokens merged)."""
    eye = torch.eye(n, dtype=torch.float64).expand(batch, n, n)
    return unmerge(merge(eye))


# --- plans ---------------------------------------------------------------------------------------------------


def test_ratio_zero_is_identity():
    x = torch.randn(2, 64, 8)
    merge, unmerge = plan_merge(x[0], (8, 8), MergeConfig(ratio=0.0), gen())
    assert merge is identity and unmerge is identity and merge(x) is x
    merge, unmerge = plan_merge_per_row(x, (8, 8), MergeConfig(ratio=0.0), gen())
    assert merge(x) is x and unmerge(x) is x


@pytest.mark.parametrize("grid", [(8, 16), (7, 13), (33, 65), (3, 3), (9, 4)])
@pytest.mark.parametrize("ratio", [0.5, 0.8, 8 / 9])
def test_shapes_and_round_trip(grid, ratio):
    n = grid[0] * grid[1]
    config = MergeConfig(ratio=ratio, stride=(3, 3))
    x = torch.randn(3, n, 6, dtype=torch.float64)
    merge, unmerge = plan_merge(torch.randn(n, 6), grid, config, gen())
    r = config.removed(n)
    merged = merge(x)
    assert merged.shape == (3, n - r, 6)
    back = unmerge(merged)
    assert back.shape == x.shape

    members = groups_of(merge, unmerge, n)[0]  # (N, N)
    size = (members > 0).sum(1)  # (N,)
    assert torch.equal(back[:, size == 1], x[:, size == 1])  # kept tokens come back bit for bit
    torch.testing.assert_close(back, torch.einsum("tn,bnc->btc", members, x))  # merged ones: their group mean
    assert len({tuple(row.nonzero().flatten().tolist()) for row in members}) == n - r


def test_groups_hold_one_destination_per_cell_and_leftovers_are_sources():
    grid, stride = (7, 13), (3, 3)
    config = MergeConfig(ratio=0.8, stride=stride, seed=0)
    src, dst = _partition(grid, stride, gen(5))
    assert dst.numel() == (7 // 3) * (13 // 3)
    rows, cols = dst // 13, dst % 13
    assert rows.max() < 6 and cols.max() < 12  # leftover row 6 and column 12 hold no destination
    cells = set(zip((rows // 3).tolist(), (cols // 3).tolist()))
    assert len(cells) == dst.numel()  # one per cell

    merge, unmerge = plan_merge(torch.randn(91, 4), grid, config, gen(5))
    members = groups_of(merge, unmerge, 91)[0] > 0
    is_dst = torch.zeros(91, dtype=torch.bool)
    is_dst[dst] = True
    for row in members:
        if row.sum() > 1:
            assert is_dst[row].sum() == 1


def test_most_similar_sources_merge_into_their_match():
    grid, config = (6, 6), MergeConfig(ratio=4 / 36, stride=(3, 3))
    src, dst = _partition(grid, config.stride, gen(1))
    metric = torch.randn(36, 16)
    copies = src[:4]
    metric[copies] = 3.0 * metric[dst]  # cosine 1 with one destination each
    merge, unmerge = plan_merge(metric, grid, config, gen(1))
    members = groups_of(merge, unmerge, 36)[0] > 0
    for s, d in zip(copies.tolist(), dst.tolist()):
        assert members[s, d] and members[s].sum() == 2


def test_shared_plan_applies_to_every_row():
    n, grid = 72, (8, 9)
    merge, unmerge = plan_merge(torch.randn(n, 8), grid, MergeConfig(ratio=0.6), gen())
    members = groups_of(merge, unmerge, n, batch=4)
    assert all(torch.equal(members[0], members[b]) for b in range(1, 4))


def test_per_row_plans_differ_and_match_the_shared_plan_of_each_row():
    n, grid, config = 72, (8, 9), MergeConfig(ratio=0.6)
    metric = torch.randn(2, n, 8)
    merge, unmerge = plan_merge_per_row(metric, grid, config, gen(3))
    members = groups_of(merge, unmerge, n, batch=2)
    assert not torch.equal(members[0], members[1])
    for b in range(2):
        one = groups_of(*plan_merge(metric[b], grid, config, gen(3)), n)[0]
        assert torch.equal(members[b], one)


def test_plan_rows_let_targets_borrow_the_source_plan():
    layout, n, grid = BatchLayout(num_targets=1), 36, (6, 6)
    hidden = torch.randn(layout.rows, n, 8)
    merge, unmerge = plan_for_batch(hidden, grid, MergeConfig(ratio=0.7), gen(), layout.source_of())
    members = groups_of(merge, unmerge, n, batch=layout.rows)
    for row in layout.target_rows:
        source = layout.source_of()[row]
        assert torch.equal(members[row], members[source])
    assert not torch.equal(members[layout.source_rows[0]], members[layout.source_rows[1]])
    merge, unmerge = plan_for_batch(hidden, grid, MergeConfig(ratio=0.7), gen(), plan_rows=0)
    members = groups_of(merge, unmerge, n, batch=layout.rows)
    assert all(torch.equal(members[0], m) for m in members)


def test_seed_determinism():
    metric, grid, config = torch.randn(96, 8), (8, 12), MergeConfig(ratio=0.5)
    first = groups_of(*plan_merge(metric, grid, config, gen(7)), 96)
    again = groups_of(*plan_merge(metric, grid, config, gen(7)), 96)
    other = groups_of(*plan_merge(metric, grid, config, gen(8)), 96)
    assert torch.equal(first, again) and not torch.equal(first, other)
    seeded = groups_of(*plan_merge(metric, grid, MergeConfig(ratio=0.5, seed=7), None), 96)
    assert torch.equal(seeded, first)  # no generator: one seeded with config.seed


def test_grid_smaller_than_stride_is_left_unmerged():
    merge, unmerge = plan_merge(torch.randn(4, 3), (2, 2), MergeConfig(ratio=0.8), gen())
    assert merge is identity and unmerge is identity


def test_half_precision_keeps_dtype():
    x = torch.randn(2, 64, 8, dtype=torch.bfloat16)
    merge, unmerge = plan_merge(x[0], (8, 8), MergeConfig(ratio=0.8), gen())
    assert merge(x).dtype == torch.bfloat16 and unmerge(merge(x)).shape == x.shape


# --- validation ----------------------------------------------------------------------------------------------


def test_ratio_needs_a_large_enough_stride():
    with pytest.raises(ValueError, match=r"too high for stride \(2, 2\).*use stride \(3, 3\)"):
        MergeConfig(ratio=0.8, stride=(2, 2))
    MergeConfig(ratio=0.75, stride=(2, 2))
    MergeConfig(ratio=0.8, stride=(2, 3))  # 1 - 1/6 = 0.833
    assert required_stride(0.8) == (3, 3) and required_stride(0.5) == (2, 2) and required_stride(0.95) == (5, 5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ratio=1.0), r"in \[0, 1\)"),
        (dict(ratio=-0.1), r"in \[0, 1\)"),
        (dict(stride=(0, 3)), "positive integers"),
        (dict(stride=(3,)), "positive integers"),
        (dict(ratio=0.5, stride=(1, 1)), r"use stride \(2, 2\)"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MergeConfig(**kwargs)


def test_grid_must_match_token_count():
    with pytest.raises(ValueError, match=r"grid \(8, 8\) has 64 tokens, the features have 63"):
        plan_merge(torch.randn(63, 4), (8, 8), MergeConfig(), gen())


# --- processor on a tiny PixArt ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformer():
    return tiny_components()["transformer"]


def run(transformer, latent_hw=(8, 8), batch=2, **kwargs):
    g = gen(11)
    latents = torch.randn(batch, 4, *latent_hw, generator=g)
    text = torch.randn(batch, 6, 32, generator=g)
    with torch.no_grad():
        out = transformer(
            latents,
            encoder_hidden_states=text,
            timestep=torch.full((batch,), 500),
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
            **kwargs,
        )[0]
    return out


def processors(transformer):
    return {k: type(v) for k, v in transformer.attn_processors.items()}


@pytest.mark.parametrize("latent_hw", [(8, 8), (16, 26)])
def test_processor_at_ratio_zero_equals_default(transformer, latent_hw):
    assert set(processors(transformer).values()) == {AttnProcessor2_0}
    reference = run(transformer, latent_hw)
    with apply_token_merging(transformer, MergeConfig(ratio=0.0), token_grid(latent_hw)):
        merged = run(transformer, latent_hw)
    assert torch.equal(merged, reference)  # bit-identical, well inside the 1e-6 asked for


def test_processor_merges_and_restores(transformer):
    latent_hw = (16, 26)  # an 8x13 token grid, not a multiple of the stride
    before = dict(transformer.attn_processors)
    reference = run(transformer, latent_hw)
    with apply_token_merging(transformer, MergeConfig(ratio=0.8), token_grid(latent_hw), blocks=[1]) as installed:
        merged_name, other_name = "transformer_blocks.1.attn1.processor", "transformer_blocks.0.attn1.processor"
        assert list(installed) == [merged_name]
        assert isinstance(transformer.attn_processors[merged_name], TokenMergingAttnProcessor)
        assert transformer.attn_processors[other_name] is before[other_name]
        merged = run(transformer, latent_hw)
    assert merged.shape == reference.shape and not torch.allclose(merged, reference)
    assert transformer.attn_processors == before


def test_same_seed_same_output(transformer):
    outs = []
    for _ in range(2):
        with apply_token_merging(transformer, MergeConfig(ratio=0.5, seed=3), (4, 4)):
            outs.append(run(transformer))
    assert torch.equal(outs[0], outs[1])


def test_grid_through_cross_attention_kwargs(transformer):
    config = MergeConfig(ratio=0.5)
    with apply_token_merging(transformer, config, (4, 4), blocks=[0]):
        expected = run(transformer)
    saved = dict(transformer.attn_processors)
    name = "transformer_blocks.0.attn1.processor"
    try:
        transformer.set_attn_processor(
            {**saved, name: TokenMergingAttnProcessor(config, generator=gen(layer_seed(config.seed, 0)))}
        )
        # diffusers hands `grid` only to processors that name it; the others log a warning and ignore it
        got = run(transformer, cross_attention_kwargs={"grid": (4, 4)})
    finally:
        transformer.set_attn_processor(dict(saved))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


def test_restored_after_exception(transformer):
    before = dict(transformer.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with apply_token_merging(transformer, MergeConfig(ratio=0.8, merge_ff=True), (4, 4)):
            raise RuntimeError("boom")
    assert transformer.attn_processors == before
    assert not transformer.transformer_blocks[0].ff._forward_pre_hooks
    assert not transformer.transformer_blocks[0].ff._forward_hooks


def test_feed_forward_merging_is_reversible(transformer):
    reference = run(transformer)
    with apply_token_merging(transformer, MergeConfig(ratio=0.5), (4, 4)):
        attn_only = run(transformer)
    with apply_token_merging(transformer, MergeConfig(ratio=0.5, merge_ff=True), (4, 4)):
        with_ff = run(transformer)
    assert with_ff.shape == reference.shape and not torch.allclose(with_ff, attn_only)
    torch.testing.assert_close(run(transformer), reference, rtol=0, atol=0)


def test_unknown_block_and_missing_grid(transformer):
    with pytest.raises(ValueError, match="no layer transformer_blocks.5.attn1"):
        with apply_token_merging(transformer, MergeConfig(), (4, 4), blocks=[5]):
            pass
    attn = transformer.transformer_blocks[0].attn1
    with pytest.raises(ValueError, match="needs the token grid"):
        TokenMergingAttnProcessor(MergeConfig())(attn, torch.randn(1, 16, 16))


def test_merged_self_attention_takes_a_custom_attention(transformer):
    """The hook the attention-control processors use: their own attention on merged q/k/v."""

    def explicit(query, key, value):
        weights = (query @ key.transpose(-1, -2) / query.shape[-1] ** 0.5).softmax(dim=-1)  # (B, heads, N', N')
        return weights @ value

    attn = transformer.transformer_blocks[0].attn1
    hidden = torch.randn(2, 36, 16, generator=gen(2))
    merge, unmerge = plan_merge(hidden[0], (6, 6), MergeConfig(ratio=0.5), gen())
    with torch.no_grad():
        got = merged_self_attention(attn, hidden, merge, unmerge, attention=explicit)
        expected = merged_self_attention(attn, hidden, merge, unmerge)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
