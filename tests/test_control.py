"""Attention control on tiny random PixArt transformers (CPU): exactness without edits, every SDPA edit against its
explicit softmax form, source rows untouched, identical prompts, restore, local blend, validation."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from dit4edit.control import (
    AttentionControl,
    AttentionController,
    TokenEdit,
    apply_local_blend,
    attention_blend_mask,
    install,
    steps_before,
)
from dit4edit.control import edits
from dit4edit.control.config import MAX_REWEIGHT
from dit4edit.errors import DiT4EditError
from dit4edit.layout import BatchLayout

L = 120  # T5 sequence length
NUM_STEPS = 10
GRID = (4, 4)  # sample_size 8, patch 2


# ---- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def transformer():
    from dit4edit.tiny import tiny_transformer

    torch.manual_seed(0)
    return tiny_transformer(num_layers=4)


def batch(layout: BatchLayout, same: bool = False, seed: int = 1):
    """Inputs for one forward: latents, prompt embeddings and 0/1 text masks with padding, per row.

    `same=True` gives every target row exactly its source row's inputs.
    """
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(layout.rows, 4, 8, 8, generator=g)
    embeds = torch.randn(layout.rows, L, 32, generator=g)
    lengths = torch.randint(3, 12, (layout.rows,), generator=g)
    mask = (torch.arange(L)[None] < lengths[:, None]).float()  # (B, L)
    if same:
        src = layout.source_of()
        latents, embeds, mask = latents[src], embeds[src], mask[src]
    return latents, embeds, mask


def forward(model, inputs, step_index=None):
    latents, embeds, mask = inputs
    kwargs = {} if step_index is None else {"cross_attention_kwargs": {"step_index": step_index}}
    with torch.no_grad():
        return model(
            latents,
            encoder_hidden_states=embeds,
            timestep=torch.full((latents.shape[0],), 500),
            encoder_attention_mask=mask,
            added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            return_dict=False,
            **kwargs,
        )[0]


def identity_edit(num_steps=NUM_STEPS, fraction=0.8):
    return TokenEdit(torch.eye(L), torch.ones(L), torch.full((L,), steps_before(fraction, num_steps)), torch.ones(L))


def shuffled_edit(seed=0, refine=False, reweight=False):
    """A mapper mixing a permutation and a many-to-one map, optionally refine columns and reweighting."""
    g = torch.Generator().manual_seed(seed)
    mapper = torch.eye(L)[torch.randperm(L, generator=g)]
    mapper[:, 3] = 0
    mapper[[4, 5], 3] = 0.5  # target token 3 takes the mean of source tokens 4 and 5
    from_source = torch.ones(L)
    if refine:
        from_source[[1, 6, 7]] = 0
    weights = torch.ones(L)
    if reweight:
        weights[[2, 3]] = torch.tensor([2.0, 0.5])
    cross_steps = torch.full((L,), steps_before(0.8, NUM_STEPS))
    cross_steps[[0, 2]] = steps_before(0.3, NUM_STEPS)  # a per-word window
    return TokenEdit(mapper, from_source, cross_steps, weights)


def controller(config, layout=BatchLayout(1), token_edits=None, **kwargs):
    if token_edits is None:
        token_edits = [identity_edit() for _ in range(layout.num_targets)]
    return AttentionController(
        config, layout, num_steps=NUM_STEPS, num_blocks=4, grid=GRID, token_edits=token_edits, **kwargs
    )


CONTROLS = {
    "source+mutual": AttentionControl(self_replace_steps=0.5, self_layers=(0, 4)),
    "p2p+union": AttentionControl(self_replace_steps=0.5, self_layers=(1, 4), self_mode_early="p2p", mutual="union"),
    "target+mutual": AttentionControl(self_replace_steps=0.5, self_mode_early="target"),
    "default": AttentionControl(),
}


# ---- exactness without edits ------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["disabled", "no step", "no token edits, no self layers reached"])
def test_no_active_control_equals_default_processor(transformer, case):
    layout = BatchLayout(1)
    inputs = batch(layout)
    reference = forward(transformer, inputs)
    if case == "disabled":
        ctrl, step = controller(AttentionControl(enabled=False)), 0
    elif case == "no step":
        ctrl, step = controller(AttentionControl()), None
    else:  # step after every window, self edits only in block 3 with "target" before S -> none at step 0
        config = AttentionControl(self_layers=(3, 4), self_mode_early="target", self_replace_steps=1.0)
        ctrl, step = controller(config), NUM_STEPS - 1
    with install(transformer, ctrl):
        out = forward(transformer, inputs, step)
    torch.testing.assert_close(out, reference, atol=1e-6, rtol=1e-5)


def test_processors_named_by_block_and_restored(transformer):
    before = dict(transformer.attn_processors)
    with install(transformer, controller(AttentionControl())):
        during = transformer.attn_processors
        assert during["transformer_blocks.2.attn1.processor"].block == 2
        assert not during["transformer_blocks.2.attn1.processor"].cross
        assert during["transformer_blocks.3.attn2.processor"].cross
    assert transformer.attn_processors == before


def test_restored_after_exception(transformer):
    before = dict(transformer.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with install(transformer, controller(AttentionControl())):
            raise RuntimeError("boom")
    assert transformer.attn_processors == before
    assert all(isinstance(p, AttnProcessor2_0) for p in before.values())


# ---- each SDPA form against its explicit softmax form -------------------------------------------------------------
def explicit(q, k, v, bias=None):
    """softmax(Q K^T / sqrt(d) + bias) V, with the map materialised."""
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    if bias is not None:
        scores = scores + bias
    return scores.softmax(-1) @ v


def heads(rows, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 2, n, 8, generator=g, dtype=torch.float64) for _ in range(3)]


@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("num_targets", [1, 2])
def test_self_attention_edits_equal_explicit_softmax(num_targets, with_bias):
    layout = BatchLayout(num_targets)
    q, k, v = heads(layout.rows, 16)
    # PixArt's self-attention has no mask; a per-row key bias checks that masks follow the keys they belong to.
    bias = torch.randn(layout.rows, 1, 1, 16, dtype=torch.float64) if with_bias else None
    b = (lambda rows: bias[rows]) if with_bias else (lambda rows: None)  # noqa: E731
    src = layout.source_of()
    is_target = layout.is_target()
    rows = torch.arange(layout.rows)
    union_bias = torch.cat([bias[src], bias], -1) if with_bias else None
    expected = {
        "source": explicit(q[src], k[src], v[src], b(src)),  # Eq. 11
        "p2p": explicit(q[src], k[src], v, b(src)),
        "mutual": explicit(q, k[src], v[src], b(src)),
        "union": explicit(q, torch.cat([k[src], k], 2), torch.cat([v[src], v], 2), union_bias),
    }
    default = explicit(q, k, v, b(rows))
    for name, form in edits.SELF_EDITS.items():
        out = form(q, k, v, layout, bias)
        torch.testing.assert_close(out[is_target], expected[name][is_target], atol=1e-12, rtol=0, msg=name)
        torch.testing.assert_close(out[~is_target], default[~is_target], atol=1e-12, rtol=0, msg=name)


@pytest.mark.parametrize("variant", ["replace", "refine", "refine+reweight"])
def test_cross_attention_edit_equals_explicit_softmax(variant):
    layout = BatchLayout(2)
    q, _, _ = heads(layout.rows, 16, seed=1)
    _, k, v = heads(layout.rows, L, seed=2)
    lengths = torch.tensor([5, 9, 7, 6, 11, 8])
    bias = ((torch.arange(L)[None] >= lengths[:, None]).double() * -10000.0)[:, None, None, :]  # (B, 1, 1, L)
    token_edits = [
        shuffled_edit(seed=t, refine="refine" in variant, reweight="reweight" in variant) for t in range(2)
    ]
    ctrl = controller(AttentionControl(), layout, token_edits=token_edits)
    for step in (0, 4):  # inside, then outside, the per-word window of tokens 0 and 2
        mapper, source_coef, own_coef = ctrl.cross_edit(step, "cpu")
        out = edits.cross_attention_edit(q, k, v, layout, bias, mapper, source_coef, own_coef)

        probs = (q @ k.transpose(-1, -2) / 8**0.5 + bias).softmax(-1)  # (B, H, N, L)
        expected = probs @ v
        cond = torch.tensor(layout.cond_rows)
        for t, edit in enumerate(token_edits):
            window = (step < edit.cross_steps).double()
            f, w = edit.from_source.double(), edit.weights.double()
            a_src, a_tgt = probs[cond[0]], probs[cond[1 + t]]  # (H, N, L)
            # Prompt-to-Prompt: (A_src M) f + A_tgt (1 - f) in the window, reweighted; own map outside it.
            edited = (a_src @ edit.mapper.double()) * f + a_tgt * (1 - f)
            a_new = window * edited * w + (1 - window) * a_tgt
            expected[cond[1 + t]] = a_new @ v[cond[1 + t]]
        torch.testing.assert_close(out, expected, atol=1e-12, rtol=0, msg=f"{variant} step {step}")


def test_cross_attention_probs_equal_softmax():
    layout = BatchLayout(1)
    q, _, _ = heads(layout.rows, 16)
    _, k, _ = heads(layout.rows, L, seed=3)
    rows = torch.tensor([2, 3])
    probs = edits.cross_attention_probs(q, k, None, rows)
    expected = (q[rows] @ k[rows].transpose(-1, -2) / 8**0.5).softmax(-1).mean(1)
    torch.testing.assert_close(probs, expected.float())
    torch.testing.assert_close(edits.cross_attention_probs(q, k, None, rows, [5, 2]), expected[..., [5, 2]].float())


# ---- whole-transformer invariants -------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CONTROLS))
@pytest.mark.parametrize("num_targets", [1, 2])
def test_source_rows_untouched_by_every_control(transformer, name, num_targets):
    layout = BatchLayout(num_targets)
    inputs = batch(layout, seed=3)
    reference = forward(transformer, inputs)
    token_edits = [shuffled_edit(seed=t, refine=True, reweight=True) for t in range(num_targets)]
    ctrl = controller(CONTROLS[name], layout, token_edits=token_edits, words=[{"a": [0, 1]}, {"b": [2]}])
    source = ~layout.is_target()
    changed = False
    with install(transformer, ctrl):
        for step in (0, 3, 7, 9):
            out = forward(transformer, inputs, step)
            torch.testing.assert_close(out[source], reference[source], atol=1e-6, rtol=1e-5)
            changed |= not torch.allclose(out[~source], reference[~source], atol=1e-4)
    assert changed, "the control never changed a target row"


@pytest.mark.parametrize("name", list(CONTROLS))
def test_identical_prompts_give_target_equal_source(transformer, name):
    layout = BatchLayout(2)
    inputs = batch(layout, same=True, seed=4)
    refine = TokenEdit(torch.eye(L), (torch.arange(L) % 3 != 0).float(), torch.full((L,), 8), torch.ones(L))
    ctrl = controller(CONTROLS[name], layout, token_edits=[identity_edit(), refine])
    src = layout.source_of()
    with install(transformer, ctrl):
        for step in (0, 5, 9):
            out = forward(transformer, inputs, step)
            torch.testing.assert_close(out, out[src], atol=1e-6, rtol=1e-5)


def test_control_runs_on_merged_tokens(transformer):
    """Under token merging the processors receive merged tokens, one plan for every row: control still leaves the
    source rows as merging alone computes them and edits the target rows."""
    from dit4edit.merging import MergeConfig, token_merging

    layout = BatchLayout(1)
    inputs = batch(layout, seed=5)
    reference = forward(transformer, inputs)
    with token_merging(transformer, MergeConfig(ratio=0.5, stride=(2, 2)), GRID, layout.row(0, cond=True)):
        merged = forward(transformer, inputs, 6)  # default processors: the step index is not handed on to them
        with install(transformer, controller(AttentionControl(enabled=False))):
            idle = forward(transformer, inputs, 6)
        with install(transformer, controller(AttentionControl(self_layers=(0, 4)))):
            controlled = forward(transformer, inputs, 6)
    assert not torch.allclose(merged, reference, atol=1e-4)
    torch.testing.assert_close(idle, merged, atol=1e-6, rtol=1e-5)
    source = ~layout.is_target()
    torch.testing.assert_close(controlled[source], merged[source], atol=1e-6, rtol=1e-5)
    assert not torch.allclose(controlled[~source], merged[~source], atol=1e-4)


# ---- recording, masks, local blend --------------------------------------------------------------------------------
def test_recorded_maps_are_probabilities(transformer):
    layout = BatchLayout(1)
    inputs = batch(layout, seed=6)
    n_text = int(inputs[2][layout.source_rows[1]].sum())
    words = [{"text": list(range(n_text)), "first": [0]}, {"first": [0]}]
    ctrl = controller(AttentionControl(enabled=False), words=words, record_layers=(1, 3))
    with install(transformer, ctrl):
        forward(transformer, inputs, 0)
        forward(transformer, inputs, 1)
    assert ctrl.recorded_steps(0) == [0, 1] and ctrl.recorded_steps(1) == [0, 1]
    maps = ctrl.word_maps(0)
    assert set(maps) == {"text", "first"} and maps["text"].shape == GRID
    # All unpadded tokens together hold (almost) all probability mass: padding is masked out.
    torch.testing.assert_close(maps["text"], torch.ones(GRID), atol=1e-3, rtol=0)
    assert (maps["first"] <= maps["text"]).all()
    assert ctrl._maps[0][0][1] == 2  # two recorded layers per step


def test_blend_mask_from_synthetic_attention_map():
    layout = BatchLayout(1)
    config = AttentionControl(local_blend_words=("cat", "dog"), local_blend_start=0.2, local_blend_dilate=0)
    grid = (8, 8)
    ctrl = AttentionController(
        config, layout, num_steps=NUM_STEPS, num_blocks=4, grid=grid,
        words=[{"cat": [1, 2]}, {"dog": [3]}],
    )  # fmt: skip
    probs = torch.full((2, 64, L), 0.01)
    square = torch.zeros(grid)
    square[2:5, 3:6] = 1  # the cat, in the source
    probs[0, :, 1] += 0.5 * square.flatten()
    probs[0, :, 2] += 0.3 * square.flatten()
    inner = torch.zeros(grid)
    inner[3:5, 4:6] = 1  # the dog, in the target, inside the cat's square (the mask is the union)
    probs[1, :, 3] += 0.9 * inner.flatten()
    for step in range(3):
        ctrl.record(step, probs[..., ctrl.record_columns])  # (R, N, C): the recorded key columns
    assert ctrl.blend_mask(1) is None  # before local_blend_start (2 of 10 steps)
    mask = ctrl.blend_mask(2)
    expected = torch.nn.functional.interpolate(square[None, None], scale_factor=2, mode="nearest")[0, 0]
    torch.testing.assert_close(mask, expected)  # latent resolution (16, 16), the square exactly

    dilated = AttentionController(
        dataclasses.replace(config, local_blend_dilate=1), layout, num_steps=NUM_STEPS, num_blocks=4, grid=grid,
        words=[{"cat": [1, 2]}, {"dog": [3]}],
    )  # fmt: skip
    dilated.record(2, probs[..., dilated.record_columns])
    assert dilated.blend_mask(2)[2 * 1 : 2 * 6, 2 * 2 : 2 * 7].eq(1).all()
    assert dilated.blend_mask(2).sum() == (2 * 5) * (2 * 5)

    latents = torch.randn(2, 4, 16, 16)  # (branches, C, H, W): source, target
    blended = ctrl.local_blend(latents, 5)
    inside = expected.bool()
    # Exact on any CPU: with a 0/1 mask the blend is 1*x + 0*y elementwise, which IEEE arithmetic returns unrounded.
    assert torch.equal(blended[1][:, inside], latents[1][:, inside])
    assert torch.equal(blended[1][:, ~inside], latents[0][:, ~inside])
    assert torch.equal(blended[0], latents[0])
    assert ctrl.local_blend(latents, 0) is latents


def test_blend_mask_union_and_threshold():
    maps = torch.zeros(2, 4, 4)
    maps[0, 0, 0] = 1.0
    maps[1, 3, 3] = 2.0
    maps[1, 3, 2] = 0.5  # 0.25 of its map's peak: below the 0.3 threshold
    mask = attention_blend_mask(maps, (4, 4), threshold=0.3, dilate=0)
    assert mask[0, 0] == 1 and mask[3, 3] == 1 and mask.sum() == 2


def test_blend_mask_minmax_ignores_a_high_floor():
    # A word map on a high floor (a small T5 without a start token spreads attention everywhere): divided by its
    # peak it exceeds the threshold everywhere; min-max normalised only the peak's cells remain.
    maps = torch.full((1, 4, 4), 0.6)
    maps[0, 1, 2] = 1.0
    maps[0, 2, 2] = 0.9
    assert attention_blend_mask(maps, (4, 4), threshold=0.5, dilate=0).sum() == 16
    mask = attention_blend_mask(maps, (4, 4), threshold=0.5, dilate=0, normalize="minmax")
    assert mask[1, 2] == 1 and mask[2, 2] == 1 and mask.sum() == 2
    flat = attention_blend_mask(torch.full((1, 4, 4), 0.6), (4, 4), threshold=0.5, dilate=0, normalize="minmax")
    assert flat.sum() == 0  # a map that points nowhere blends nothing in
    with pytest.raises(DiT4EditError, match="local_blend_normalize"):
        AttentionControl(local_blend_normalize="mean")


def test_user_mask_overrides_attention_mask():
    user = torch.zeros(8, 8)
    user[:, :4] = 1
    config = AttentionControl(local_blend_words=("cat",), local_blend_start=0.0)
    ctrl = controller(config, words=[{"cat": [1]}], user_mask=user)
    assert torch.equal(ctrl.blend_mask(0), user)
    x_tgt, x_src = torch.ones(4, 8, 8), torch.zeros(4, 8, 8)
    assert torch.equal(apply_local_blend(x_tgt, x_src, user), user.expand(4, 8, 8))
    with pytest.raises(DiT4EditError, match="mask is 4x8 .* the latent is 8x8"):
        controller(config, user_mask=torch.ones(8, 4))


# ---- schedule and validation --------------------------------------------------------------------------------------
def test_schedule():
    config = AttentionControl(self_replace_steps=0.3, self_layers=(2, 4), cross_replace_steps=0.5)
    alignment = SimpleNamespace(mapper=torch.eye(L), from_source=torch.ones(L))
    ctrl = controller(config, token_edits=[TokenEdit.from_alignment(alignment, config, NUM_STEPS)])
    assert [ctrl.self_edit(3, i) for i in (0, 2, 3, 9)] == ["source", "source", "mutual", "mutual"]
    assert ctrl.self_edit(1, 0) is None and ctrl.self_edit(3, None) is None
    window = controller(dataclasses.replace(config, self_mode_early="p2p", mutual="none"))
    assert [window.self_edit(3, i) for i in (0, 2, 3, 9)] == ["p2p", "p2p", None, None]  # P2P's window
    assert ctrl.cross_edit(4, "cpu") is not None and ctrl.cross_edit(5, "cpu") is None
    default = controller(AttentionControl())
    assert list(default.self_blocks) == [2, 3]  # the deeper half of 4 blocks
    assert list(controller(AttentionControl(self_layers=(-1, 4))).self_blocks) == [3]
    assert steps_before(0.3, 10) == 3 and steps_before(0.29, 100) == 29 and steps_before(1.0, 7) == 7


def test_layer_range_outside_model_is_one_line_error(transformer):
    with pytest.raises(DiT4EditError, match=r"^self_layers 2:9 is outside the model, which has 4 transformer blocks"):
        controller(AttentionControl(self_layers=(2, 9)))
    with pytest.raises(DiT4EditError, match="local_blend_layers 3:3"):
        controller(AttentionControl(local_blend_layers=(3, 3)))
    wrong = AttentionController(AttentionControl(), BatchLayout(1), num_steps=5, num_blocks=28, grid=GRID)
    with pytest.raises(DiT4EditError, match="built for 28 transformer blocks, the model has 4"):
        with install(transformer, wrong):
            pass
    assert all(isinstance(p, AttnProcessor2_0) for p in transformer.attn_processors.values())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(self_replace_steps=1.5), "self_replace_steps must be a fraction"),
        (dict(cross_replace_words={"cat": -0.1}), "cross_replace_words"),
        (dict(mutual="both"), "mutual must be one of source, union"),
        (dict(edit_mode="swap"), "edit_mode must be one of auto, replace, refine"),
        (dict(reweight={"cat": float("nan")}), "reweight factor for 'cat'"),
        (dict(local_blend_threshold=0.0), "local_blend_threshold"),
        (dict(self_layers=(1, 2, 3)), "self_layers must be a"),
    ],
)
def test_config_validation(kwargs, message):
    with pytest.raises(DiT4EditError, match=message):
        AttentionControl(**kwargs)


def test_config_is_frozen_and_normalised():
    config = AttentionControl(reweight={"cat": 2}, local_blend_words="cat, dog", self_layers=[1, 3])
    assert config.local_blend_words == ("cat", "dog") and config.self_layers == (1, 3)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.enabled = False
    with pytest.raises(TypeError):
        config.reweight["cat"] = 3


def test_wrong_batch_is_reported(transformer):
    inputs = batch(BatchLayout(2))
    with install(transformer, controller(AttentionControl())):
        with pytest.raises(ValueError, match="expects the 4-row batch"):
            forward(transformer, inputs, 0)


# ---- construction from prompts (T5 alignment from dit4edit.prompts) -----------------------------------------------
@pytest.fixture(scope="module")
def tokenizer():
    from dit4edit.tiny import TINY_CAPTIONS
    from dit4edit.tokenizer import train_t5_tokenizer

    return train_t5_tokenizer(TINY_CAPTIONS, vocab_size=96)


def test_for_edit_resolves_words_to_tokens(tokenizer):
    from dit4edit.prompts import word_token_indices

    source, target = "a small red cat on a white background", "a small red elephant on a white background"
    config = AttentionControl(
        reweight={"elephant": 2.0}, cross_replace_words={"elephant": 0.3}, local_blend_words=("cat", "elephant")
    )
    ctrl = AttentionController.for_edit(
        config, tokenizer, source, [target], num_steps=NUM_STEPS, num_blocks=4, grid=GRID
    )
    elephant = word_token_indices(tokenizer, target, "elephant")
    assert len(elephant) > 1  # a multi-piece word
    assert ctrl.words == [{"cat": word_token_indices(tokenizer, source, "cat")}, {"elephant": elephant}]
    assert ctrl._weights[0, elephant].eq(2).all() and ctrl._weights[0].sum() == L + len(elephant)
    assert ctrl._cross_steps[0, elephant].eq(3).all() and (ctrl._cross_steps[0] == 8).sum() == L - len(elephant)
    with pytest.raises(DiT4EditError, match="horse are in neither"):
        AttentionController.for_edit(
            AttentionControl(local_blend_words=("horse",)), tokenizer, source, [target],
            num_steps=NUM_STEPS, num_blocks=4, grid=GRID,
        )  # fmt: skip


def test_for_edit_changed_words_get_their_own_cross_window(tokenizer):
    from dit4edit.prompts import word_token_indices

    source = "a small red cat on a white background"
    targets = ["a small blue elephant on a white background", "a small red cat on a black background"]
    config = AttentionControl(cross_replace_steps=0.8, cross_replace_changed=0.0)
    ctrl = AttentionController.for_edit(config, tokenizer, source, targets, num_steps=NUM_STEPS, num_blocks=4,
                                        grid=GRID)
    # Each target's changed words attend with their own maps from step 0; every other column keeps 0.8 of 10 steps.
    for k, words in enumerate([("blue", "elephant"), ("black",)]):
        changed = [i for w in words for i in word_token_indices(tokenizer, targets[k], w)]
        assert ctrl._cross_steps[k, changed].eq(0).all() and (ctrl._cross_steps[k] == 8).sum() == L - len(changed)
    # A window named for the word wins over the changed words' window.
    named = AttentionController.for_edit(dataclasses.replace(config, cross_replace_words={"black": 0.3}), tokenizer, source,
                                         targets[1:], num_steps=NUM_STEPS, num_blocks=4, grid=GRID)
    black = word_token_indices(tokenizer, targets[1], "black")
    assert named._cross_steps[0, black].eq(3).all() and (named._cross_steps[0] == 8).sum() == L - len(black)
    plain = AttentionController.for_edit(AttentionControl(cross_replace_steps=0.8), tokenizer, source, targets,
                                         num_steps=NUM_STEPS, num_blocks=4, grid=GRID)
    assert plain._cross_steps.eq(8).all()
    with pytest.raises(DiT4EditError, match="cross_replace_changed must be a fraction"):
        AttentionControl(cross_replace_changed=1.5)


def test_for_edit_blends_on_the_changed_words(tokenizer):
    from dit4edit.prompts import word_token_indices

    source = "a small red cat on a white background"
    targets = ["a small blue cat on a white background", "a small red cat on a black background"]
    config = AttentionControl(local_blend_changed=True, local_blend_words=("small",))
    ctrl = AttentionController.for_edit(
        config, tokenizer, source, targets, num_steps=NUM_STEPS, num_blocks=4, grid=(8, 8)
    )
    # Each target blends on its own changed words (source side, target side) plus the named ones.
    assert ctrl.blend_words == [(("small", "red"), ("small", "blue")), (("small", "white"), ("small", "black"))]
    assert set(ctrl.words[0]) == {"small", "red", "white"} and set(ctrl.words[2]) == {"small", "black"}
    assert ctrl.words[1]["blue"] == word_token_indices(tokenizer, targets[0], "blue")
    # Maps on the words decide each target's mask: target 0's words sit at (1, 1), target 1's at (6, 6).
    probs = torch.full((3, 64, L), 0.01)
    for branch, word, cell in ((0, "red", 9), (1, "blue", 9), (0, "white", 54), (2, "black", 54)):
        probs[branch, cell, ctrl.words[branch][word]] = 1.0
    ctrl.record(NUM_STEPS - 1, probs[..., ctrl.record_columns])
    first, second = ctrl.blend_mask(NUM_STEPS - 1, 0), ctrl.blend_mask(NUM_STEPS - 1, 1)
    assert first[2:4, 2:4].eq(1).all() and first[12:14, 12:14].eq(0).all()
    assert second[12:14, 12:14].eq(1).all() and second[2:4, 2:4].eq(0).all()
    plain = AttentionController.for_edit(
        AttentionControl(), tokenizer, source, targets, num_steps=NUM_STEPS, num_blocks=4, grid=GRID
    )
    assert plain.blend_words == [((), ())] * 2 and plain.blend_mask(NUM_STEPS - 1, 0) is None


def test_for_edit_identical_prompts_and_recorder(transformer, tokenizer):
    prompt = "a photo of a cat sitting on a wooden table"
    ctrl = AttentionController.for_edit(
        AttentionControl(local_blend_words=("cat",), self_layers=(0, 4)), tokenizer, prompt, [prompt],
        num_steps=NUM_STEPS, num_blocks=4, grid=GRID, record_words=True,
    )  # fmt: skip
    inputs = batch(ctrl.layout, same=True, seed=7)
    with install(transformer, ctrl):
        for step in (0, 6):
            out = forward(transformer, inputs, step)
            torch.testing.assert_close(out, out[ctrl.layout.source_of()], atol=1e-6, rtol=1e-5)
    assert ctrl.blend_mask(6).shape == (8, 8)
    source_maps, target_maps = ctrl.word_maps(0), ctrl.word_maps(1)
    assert "wooden" in source_maps and list(source_maps) == list(target_maps)
    torch.testing.assert_close(source_maps["cat"], target_maps["cat"], atol=1e-6, rtol=1e-5)

    recorder = AttentionController.recorder(tokenizer, prompt, num_steps=NUM_STEPS, num_blocks=4, grid=GRID)
    plain = batch(recorder.layout, seed=8)
    with install(transformer, recorder):
        forward(transformer, plain, 0)
    maps = recorder.word_maps()
    assert list(maps) == ["a", "photo", "of", "a#3", "cat", "sitting", "on", "a#7", "wooden", "table"]
    assert all(m.shape == GRID for m in maps.values())


@pytest.mark.parametrize("kwargs, message", [
    (dict(cross_replace_changed=False), "cross_replace_changed must be a fraction"),
    (dict(local_blend_start=True), "local_blend_start must be a fraction"),
    (dict(cross_replace_words={"cat": "0.5"}), "cross_replace_words\\['cat'\\] must be a fraction"),
    (dict(enabled=0), "enabled must be true or false"),
    (dict(enabled="false"), "enabled must be true or false"),
    (dict(local_blend_changed=1), "local_blend_changed must be true or false"),
    (dict(local_blend_dilate=2.0), "local_blend_dilate must be an integer"),
    (dict(local_blend_dilate=True), "local_blend_dilate must be an integer"),
    (dict(self_layers=(True, 3)), "self_layers must be a"),
    (dict(local_blend_layers=(0.5, 3)), "local_blend_layers must be a"),
    (dict(self_layers="14:28"), "self_layers must be a"),
    (dict(local_blend_words=7), "local_blend_words must be words"),
    (dict(mutual=["none"]), "mutual must be one of"),
    (dict(local_blend_threshold=True), "local_blend_threshold"),
    (dict(reweight="cat=2"), "reweight must map words to numbers"),
    (dict(reweight={"cat": "2"}), "reweight factor for 'cat' must be a finite number"),
    (dict(reweight={"cat": True}), "reweight factor for 'cat' must be a finite number"),
])
def test_control_types_are_strict(kwargs, message):
    """A bool is not a fraction or a count, a string is not a flag or a factor."""
    with pytest.raises(DiT4EditError, match=message) as info:
        AttentionControl(**kwargs)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("factor", [1e39, 3.5e38, 1e4, MAX_REWEIGHT * 1.001, 0.0, -2.0, 1e-320 * -1])
def test_reweight_factor_beyond_a_safe_range_is_refused_up_front(factor):
    with pytest.raises(DiT4EditError, match="reweight factor for 'blue' must be > 0 and <= 1000"):
        AttentionControl(reweight={"blue": factor})


@pytest.mark.parametrize("factor", [MAX_REWEIGHT, 1e-3, 2, 0.5])
def test_reweight_factor_in_range_fits_float32_and_float16_weights(factor):
    config = AttentionControl(reweight={"blue": factor})
    assert isinstance(config.reweight["blue"], float)
    weights = torch.tensor([config.reweight["blue"]]) * torch.ones(4)  # the factor times attention of at most 1
    assert torch.isfinite(weights.half() * 60).all()  # room for values up to 60 in float16


def test_model_settings_with_strict_types(tmp_path):
    from dit4edit.model_folder import ModelDefaults

    for control, message in (({"enabled": "no"}, "enabled must be true or false"),
                             ({"self_replace_steps": True}, "self_replace_steps must be a fraction"),
                             ({"reweight": {"blue": 1e300}}, "reweight factor for 'blue' must be > 0")):
        with pytest.raises(DiT4EditError, match=message):
            ModelDefaults(control=control).attention_control()
