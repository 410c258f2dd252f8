"""Token merging: plans, merge/unmerge identities, the hooks around attn1/ff on a tiny PixArt, install/restore."""

import contextlib

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from dit4edit.errors import DiT4EditError
from dit4edit import merging
from dit4edit.merging import (MergeConfig, _partition, identity, layer_seed, plan_merge, required_stride,
                              token_merging)
from dit4edit.tiny import tiny_components, tiny_transformer


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
    with pytest.raises(DiT4EditError, match=r"too high for stride \(2, 2\).*use stride \(3, 3\)"):
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
        (dict(plan_every=0), r"plan_every must be an integer >= 1 .*got 0"),
        (dict(plan_every=-2), r"plan_every must be an integer >= 1"),
        (dict(plan_every=1.5), r"plan_every must be an integer >= 1"),
        (dict(plan_every=True), r"plan_every must be an integer >= 1"),
        (dict(plan_every="2"), r"plan_every must be an integer >= 1"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(DiT4EditError, match=message) as error:
        MergeConfig(**kwargs)
    assert "\n" not in str(error.value)


def test_grid_must_match_token_count():
    with pytest.raises(ValueError, match=r"grid \(8, 8\) has 64 tokens, the features have 63"):
        plan_merge(torch.randn(63, 4), (8, 8), MergeConfig(), gen())


# --- processor on a tiny PixArt ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformer():
    return tiny_components()["transformer"]


def run(transformer, latent_hw=(8, 8), batch=2, **kwargs):
    g = gen(11)  # the same inputs every call
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


def hooks(transformer) -> int:
    modules = [transformer, *(m for b in transformer.transformer_blocks for m in (b.attn1, b.ff))]
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in modules)


def test_ratio_zero_equals_default(transformer):
    assert set(processors(transformer).values()) == {AttnProcessor2_0}
    reference = run(transformer, (16, 26))
    with token_merging(transformer, MergeConfig(ratio=0.0), (8, 13)):
        assert hooks(transformer) == 0
        merged = run(transformer, (16, 26))
    assert torch.equal(merged, reference)


def test_merges_chosen_blocks_and_restores(transformer):
    latent_hw = (16, 26)  # an 8x13 token grid, not a multiple of the stride
    before = dict(transformer.attn_processors)
    reference = run(transformer, latent_hw)
    seen = []
    probe = transformer.transformer_blocks[1].attn1.register_forward_hook(
        lambda module, args, output: seen.append(args[0].shape[1]))
    try:
        with token_merging(transformer, MergeConfig(ratio=0.8, blocks=(1, 2)), (8, 13)):
            merged = run(transformer, latent_hw)
            assert transformer.transformer_blocks[0].attn1._forward_pre_hooks == {}  # block 0 is not merged
    finally:
        probe.remove()
    assert seen == [104 - MergeConfig(ratio=0.8).removed(104)]  # attn1 of block 1 saw the merged tokens
    assert merged.shape == reference.shape and not torch.allclose(merged, reference)
    assert transformer.attn_processors == before and hooks(transformer) == 0
    assert torch.equal(run(transformer, latent_hw), reference)


def test_one_plan_from_the_plan_row_for_every_row(transformer):
    """Rows whose inputs equal the plan row's come out equal to it: every row is grouped by the same plan."""
    g = gen(4)
    latents = torch.randn(3, 4, 8, 8, generator=g)
    latents[2] = latents[1]  # row 2 repeats the plan row
    text = torch.randn(1, 6, 32, generator=g).expand(3, -1, -1)
    with token_merging(transformer, MergeConfig(ratio=0.5), (4, 4), plan_row=1), torch.no_grad():
        out = transformer(latents, encoder_hidden_states=text, timestep=torch.full((3,), 500),
                          added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    torch.testing.assert_close(out[2], out[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[0], out[1])


def test_same_seed_same_output_and_steps(transformer):
    config = MergeConfig(ratio=0.5, seed=3, skip_steps=2)
    outs = {}
    for step in (0, 1, 2, 2, 3):
        with token_merging(transformer, config, (4, 4)):
            outs.setdefault(step, []).append(run(transformer, cross_attention_kwargs={"step_index": step}))
    assert torch.equal(outs[2][0], outs[2][1])  # the same seed and step draw the same plan
    reference = run(transformer)
    assert torch.equal(outs[0][0], reference) and torch.equal(outs[1][0], reference)  # skipped steps: unmerged
    assert not torch.allclose(outs[2][0], reference) and not torch.equal(outs[2][0], outs[3][0])  # a plan a step


def test_restored_after_exception(transformer):
    before = dict(transformer.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with token_merging(transformer, MergeConfig(ratio=0.8, merge_ff=True), (4, 4)):
            assert hooks(transformer) > 0
            raise RuntimeError("boom")
    assert transformer.attn_processors == before and hooks(transformer) == 0


def test_feed_forward_merging_is_reversible(transformer):
    reference = run(transformer)
    with token_merging(transformer, MergeConfig(ratio=0.5), (4, 4)):
        attn_only = run(transformer)
    with token_merging(transformer, MergeConfig(ratio=0.5, merge_ff=True), (4, 4)):
        with_ff = run(transformer)
    assert with_ff.shape == reference.shape and not torch.allclose(with_ff, attn_only)
    torch.testing.assert_close(run(transformer), reference, rtol=0, atol=0)


def test_blocks_outside_the_model(transformer):
    with pytest.raises(DiT4EditError, match="outside the model's 2 blocks"):
        with token_merging(transformer, MergeConfig(blocks=(1, 5)), (4, 4)):
            pass
    assert hooks(transformer) == 0


# --- plans reused across blocks (plan_every) -----------------------------------------------------------------


@pytest.fixture(scope="module")
def deep():
    """A tiny PixArt with 5 blocks, so groups of 2 blocks end inside the model."""
    torch.manual_seed(1)
    return tiny_transformer(5)


class PlanSpy:
    """Records every `plan_merge` call of `token_merging`: the features it plans from and the seed."""

    def __init__(self, monkeypatch):
        self.calls = []
        monkeypatch.setattr(merging, "plan_merge", self)

    def __call__(self, metric, grid, config, generator):
        self.calls.append(dict(metric=metric.clone(), seed=generator.initial_seed()))
        return plan_merge(metric, grid, config, generator)


@contextlib.contextmanager
def recorded(transformer, part="attn1", first=True):
    """`inputs[i]`: the input of block i's `part`, one per forward: as it arrives (`first`: before any merging hook)
    or as the module sees it (installed inside `token_merging`: after merging)."""
    inputs, handles = {}, []
    try:
        for i, block in enumerate(transformer.transformer_blocks):
            handles.append(getattr(block, part).register_forward_pre_hook(
                lambda m, args, i=i: inputs.setdefault(i, []).append(args[0].clone()), prepend=first))
        yield inputs
    finally:
        for handle in handles:
            handle.remove()


def seed_of(config, block, step, ff=False):
    return layer_seed(config.seed, block, ff) * 1009 + step


@pytest.mark.parametrize("plan_every, blocks, planners", [
    (1, None, [0, 1, 2, 3, 4]),
    (2, None, [0, 2, 4]),
    (3, None, [0, 3]),
    (2, (1, 5), [1, 3]),  # groups count from the first merging block
    (5, None, [0]),
    (99, None, [0]),  # more than the model has: one plan per step
])
def test_a_fresh_plan_at_each_group_start_and_step(deep, monkeypatch, plan_every, blocks, planners):
    spy = PlanSpy(monkeypatch)
    config = MergeConfig(ratio=0.5, seed=2, blocks=blocks, plan_every=plan_every, merge_ff=True)
    with recorded(deep) as attn_in, recorded(deep, "ff") as ff_in:
        with token_merging(deep, config, (4, 4), plan_row=1):
            for step in (3, 4):
                run(deep, batch=3, cross_attention_kwargs={"step_index": step})
    assert hooks(deep) == 0
    expected = [(block, step, ff) for step in (0, 1) for block in planners for ff in (False, True)]
    assert len(spy.calls) == len(expected)
    for call, (block, forward, ff) in zip(spy.calls, expected):
        features = (ff_in if ff else attn_in)[block][forward][1]  # the plan row of the planning block's input
        assert torch.equal(call["metric"], features)
        assert call["seed"] == seed_of(config, block, 3 + forward, ff)


def test_blocks_of_a_group_merge_by_the_first_blocks_plan(deep):
    """Each block's merged attn1 input equals a plan made by hand from its group's first block, applied to the
    block's own input; the next group's first block does not follow the previous plan."""
    config, grid, step = MergeConfig(ratio=0.5, plan_every=2), (4, 4), 7
    with recorded(deep) as inputs, token_merging(deep, config, grid, plan_row=1), recorded(deep, first=False) as merged:
        run(deep, batch=3, cross_attention_kwargs={"step_index": step})
    plans = {}
    for block in range(5):
        first = block - block % 2
        if first not in plans:
            plans[first] = plan_merge(inputs[first][0][1], grid, config, gen(seed_of(config, first, step)))
        merge = plans[first][0]
        assert merged[block][0].shape[1] == 16 - config.removed(16)
        torch.testing.assert_close(merged[block][0], merge(inputs[block][0]), rtol=1e-6, atol=1e-7)
    previous = plans[0][0](inputs[2][0])
    assert (merged[2][0] - previous).abs().max() > 1e-3


def test_plan_every_one_is_one_plan_per_block(deep):
    """plan_every=1 merges every block exactly as that block merging alone would (a single-block install plans
    from its own input with the block's own seed): bit for bit, the same code path."""
    config = MergeConfig(ratio=0.5, seed=4, merge_ff=True)
    assert config.plan_every == 1
    with token_merging(deep, config, (4, 4), plan_row=1):
        together = run(deep, batch=3)
    with contextlib.ExitStack() as stack:
        for block in range(5):
            stack.enter_context(token_merging(deep, MergeConfig(ratio=0.5, seed=4, merge_ff=True, plan_every=3,
                                                                blocks=(block, block + 1)), (4, 4), plan_row=1))
        alone = run(deep, batch=3)
    assert torch.equal(together, alone)
    with token_merging(deep, MergeConfig(ratio=0.5, seed=4, merge_ff=True, plan_every=2), (4, 4), plan_row=1):
        grouped = run(deep, batch=3)
    assert not torch.allclose(grouped, together)
    unmerged = run(deep, batch=3)
    assert not torch.allclose(grouped, unmerged) and hooks(deep) == 0


def test_a_reused_plan_serves_every_row(deep):
    """Rows equal to the plan row stay equal to it when later blocks reuse the first block's plan."""
    g = gen(4)
    latents = torch.randn(3, 4, 8, 8, generator=g)
    latents[2] = latents[1]
    text = torch.randn(1, 6, 32, generator=g).expand(3, -1, -1)
    with token_merging(deep, MergeConfig(ratio=0.5, plan_every=5), (4, 4), plan_row=1), torch.no_grad():
        out = deep(latents, encoder_hidden_states=text, timestep=torch.full((3,), 500),
                   added_cond_kwargs={"resolution": None, "aspect_ratio": None}, return_dict=False)[0]
    torch.testing.assert_close(out[2], out[1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[0], out[1])
