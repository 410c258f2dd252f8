"""Joint-attention control: every edit against the explicit full softmax on random heads, and the processors
against diffusers' own (SD3 `JointAttnProcessor2_0`, FLUX `FluxAttnProcessor`) and through tiny models."""

from __future__ import annotations

import pytest
import torch

from conftest import relative_error

TOL = 1e-5  # float32 round-off of two orderings of the same sums; a wrong part or mass is off by >1e-2


def explicit(query, key, value, spans, layout, edit):
    """The edit written with explicit `(L, L)` softmax maps: the target image queries' probabilities split into the
    image part and the text part of their softmax, one part replaced, nothing renormalised."""
    scale = query.shape[-1] ** -0.5
    probs = (query @ key.transpose(-1, -2) * scale).softmax(-1)  # (B, H, L, L)
    out = probs @ value
    if edit is None:
        return out
    img, txt = spans.image, spans.text
    src = layout.source_of()
    cond = layout.cond_rows
    for r in range(layout.rows):
        s = int(src[r])
        if s == r:
            continue
        own = probs[r]
        image_probs, image_values = probs[r][:, img, img], value[r][:, img]
        if edit.image == "source":
            image_probs, image_values = probs[s][:, img, img], value[s][:, img]
        elif edit.image == "mutual":
            k, v = key[r].clone(), value[r].clone()
            k[:, img], v[:, img] = key[s][:, img], value[s][:, img]
            own = (query[r] @ k.transpose(-1, -2) * scale).softmax(-1)
            image_probs, image_values = own[:, img, img], v[:, img]
        text_probs = own[:, img, txt]  # (H, N, L_txt)
        if edit.text is not None and r in cond[1:]:
            t = cond.index(r) - 1
            own_coef = edit.text.own_coef[t] if edit.text.own_coef is not None else torch.zeros(text_probs.shape[-1])
            moved = probs[cond[0]][:, img, txt] @ edit.text.mapper[t]  # the source's text part on target tokens
            text_probs = text_probs * own_coef + moved * edit.text.source_coef[t]
        out[r][:, img] = image_probs @ image_values + text_probs @ value[r][:, txt]
    return out


def random_heads(rows, heads=2, num_image=12, num_text=5, dim=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    length = num_image + num_text
    return [torch.randn(rows, heads, length, dim, generator=g) * 1.5 for _ in range(3)]


def random_text_edit(targets, num_text, own: bool, seed=1):
    from dit4edit.control.joint import TextEdit

    g = torch.Generator().manual_seed(seed)
    mapper = torch.rand(targets, num_text, num_text, generator=g)
    source_coef = torch.rand(targets, num_text, generator=g)
    own_coef = 1.0 - source_coef if own else None
    return TextEdit(mapper, source_coef, own_coef)


@pytest.mark.parametrize("order", [("image", "text"), ("text", "image")])
@pytest.mark.parametrize("image_edit", [None, "source", "mutual"])
@pytest.mark.parametrize("text_edit", [None, "replace", "refine"])
@pytest.mark.parametrize("layout_kind", ["cfg-4", "cfg-3-two-targets", "no-cfg"])
def test_joint_edit_matches_the_explicit_softmax(order, image_edit, text_edit, layout_kind):
    from dit4edit.control.joint import JointEdit, Spans, joint_attention_edit
    from dit4edit.layout import BatchLayout

    layout = {"cfg-4": BatchLayout(1), "cfg-3-two-targets": BatchLayout(2, uncond_source=False),
              "no-cfg": BatchLayout(1, guidance=False)}[layout_kind]
    num_image, num_text = 12, 5
    query, key, value = random_heads(layout.rows, num_image=num_image, num_text=num_text)
    spans = Spans.of(order, num_image, num_text)
    text = None if text_edit is None else random_text_edit(layout.num_targets, num_text, own=text_edit == "refine")
    edit = JointEdit(image_edit, text)
    ours = joint_attention_edit(query, key, value, spans, layout, edit)
    reference = explicit(query, key, value, spans, layout, edit if (image_edit or text) else None)
    assert relative_error(ours, reference) < TOL
    default = explicit(query, key, value, spans, layout, None)
    for r in layout.source_rows:  # the source rows keep their own attention
        assert relative_error(ours[r], default[r]) < TOL
    assert relative_error(ours[:, :, spans.text], default[:, :, spans.text]) < TOL  # text queries untouched
    if image_edit or text:  # the test can fail: the edit does change the target image queries
        target = layout.row(1, True)
        assert relative_error(ours[target][:, spans.image], default[target][:, spans.image]) > 1e-2


def test_the_text_part_keeps_its_share_of_one_softmax():
    """Replacing the text part with the source's probabilities does not renormalise: with the source's and the
    target's text masses m_s, m_t, the edited row sums to 1 - m_t + m_s (ones as values read the row's mass)."""
    from dit4edit.control.joint import JointEdit, Spans, TextEdit, joint_attention_edit
    from dit4edit.layout import BatchLayout

    layout = BatchLayout(1, guidance=False)
    query, key, _ = random_heads(2, num_image=6, num_text=4, seed=3)
    ones = torch.ones(2, 2, 10, 8)
    spans = Spans.of(("text", "image"), 6, 4)
    edit = JointEdit(None, TextEdit(torch.eye(4)[None], torch.ones(1, 4)))
    mass = joint_attention_edit(query, key, ones, spans, layout, edit)[1, :, spans.image, 0]  # (H, N)
    probs = (query @ key.transpose(-1, -2) * 8**-0.5).softmax(-1)[:, :, spans.image, spans.text].sum(-1)
    expected = 1.0 - probs[1] + probs[0]
    assert relative_error(mass, expected) < TOL
    assert (expected - 1).abs().max() > 1e-2


@pytest.mark.parametrize("order", [("image", "text"), ("text", "image")])
def test_text_maps_are_the_full_softmaxs_text_columns(order):
    from dit4edit.control.joint import Spans, text_attention_probs

    query, key, _ = random_heads(3, num_image=12, num_text=5, seed=9)
    spans = Spans.of(order, 12, 5)
    probs = (query @ key.transpose(-1, -2) * 8**-0.5).softmax(-1)  # (B, H, L, L)
    expected = probs[[2, 0]][:, :, spans.image, spans.text][..., [1, 3]].mean(dim=1)  # (2, N, 2)
    ours = text_attention_probs(query, key, spans, [2, 0], [1, 3])
    assert relative_error(ours, expected) < TOL
    restricted = (query @ key[:, :, spans.text].transpose(-1, -2) * 8**-0.5).softmax(-1)[:, :, spans.image]
    assert relative_error(ours, restricted[[2, 0]][..., [1, 3]].mean(dim=1)) > 1e-2  # not the text-only softmax


# --- processors ----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformers():
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    torch.set_num_threads(1)
    torch.manual_seed(0)
    sd35 = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8,
                                 num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                 pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16,
                                 dual_attention_layers=(0,), qk_norm="rms_norm").eval()
    flux = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, axes_dims_rope=[4, 4, 8], guidance_embeds=True).eval()
    return {"sd3.5": sd35, "flux": flux}


def sd3_inputs(rows, text=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g).expand(rows, -1, -1, -1).clone(),
                encoder_hidden_states=torch.randn(rows, text, 32, generator=g),
                pooled_projections=torch.randn(rows, 16, generator=g),
                timestep=torch.full((rows,), 500.0))


def flux_inputs(rows, text=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(4, 4, 3)
    ids[..., 1], ids[..., 2] = torch.arange(4)[:, None], torch.arange(4)[None, :]
    return dict(hidden_states=torch.randn(1, 16, 4, generator=g).expand(rows, -1, -1).clone(),
                encoder_hidden_states=torch.randn(rows, text, 32, generator=g),
                pooled_projections=torch.randn(rows, 32, generator=g), timestep=torch.full((rows,), 0.5),
                guidance=torch.full((rows,), 3.5), txt_ids=torch.zeros(text, 3), img_ids=ids.reshape(16, 3))


def _layers(transformer):
    from dit4edit.backbones.base import AttentionLayer

    layers = []
    for name in transformer.attn_processors:
        block = int(name.split(".")[1])
        if name.startswith("single_"):
            layers.append(AttentionLayer(name, "single", block, ("text", "image"), ("text", "image")))
        elif name.endswith("attn2.processor"):
            layers.append(AttentionLayer(name, "self", block, ("image",), ("image",)))
        else:
            order = ("text", "image") if "Flux" in type(transformer).__name__ else ("image", "text")
            layers.append(AttentionLayer(name, "joint", block, order, order))
    return layers


@pytest.mark.parametrize("family", ["sd3.5", "flux"])
def test_processor_without_edit_equals_diffusers_default(transformers, family):
    from dit4edit.control.joint import JointController, install_joint
    from dit4edit.layout import BatchLayout

    transformer = transformers[family]
    inputs = (sd3_inputs if family == "sd3.5" else flux_inputs)(rows=4, seed=5)
    inputs["hidden_states"] = inputs["hidden_states"] + 0.3 * torch.randn_like(inputs["hidden_states"])
    with torch.no_grad():
        default = transformer(**inputs, return_dict=False)[0]
        defaults = {type(p).__name__ for p in transformer.attn_processors.values()}
        assert defaults == ({"JointAttnProcessor2_0"} if family == "sd3.5" else {"FluxAttnProcessor"})
        controller = JointController(BatchLayout(1), text_length=6)
        with install_joint(transformer, controller, _layers(transformer)):
            ours = transformer(**inputs, joint_attention_kwargs={"step_index": 0}, return_dict=False)[0]
            assert all("Control" in type(p).__name__ for p in transformer.attn_processors.values())
    assert relative_error(ours, default) < TOL
    assert {type(p).__name__ for p in transformer.attn_processors.values()} == defaults  # restored


def test_processors_come_back_after_an_exception(transformers):
    from dit4edit.control.joint import JointController, install_joint
    from dit4edit.layout import BatchLayout

    transformer = transformers["flux"]
    before = dict(transformer.attn_processors)
    with pytest.raises(RuntimeError, match="boom"):
        with install_joint(transformer, JointController(BatchLayout(1), 6), _layers(transformer)):
            raise RuntimeError("boom")
    assert all(transformer.attn_processors[name] is p for name, p in before.items())


@pytest.mark.parametrize("family", ["sd3.5", "flux"])
def test_edits_through_the_model(transformers, family):
    """Every edit in every layer: with the target's inputs equal to the source's it changes nothing; with other
    text it leaves the source rows exactly as without control and changes the target rows."""
    from dit4edit.control.joint import JointController, TextEdit, install_joint
    from dit4edit.layout import BatchLayout

    transformer = transformers[family]
    layers = _layers(transformer)
    layout = BatchLayout(1) if family == "sd3.5" else BatchLayout(1, guidance=False)
    make = sd3_inputs if family == "sd3.5" else flux_inputs
    text = TextEdit(torch.eye(6)[None], torch.ones(1, 6))  # replace with the identity mapper
    names = frozenset(layer.name for layer in layers)

    def run(inputs, switch_step):
        controller = JointController(layout, text_length=6, image_layers=names, switch_step=switch_step,
                                     text_edit=text, text_steps=1)
        with torch.no_grad(), install_joint(transformer, controller, layers):
            out = transformer(**inputs, joint_attention_kwargs={"step_index": 0}, return_dict=False)[0]
        assert controller.seen == names  # every layer was edited
        return out

    inputs = make(layout.rows, seed=1)
    same = dict(inputs)
    for key in ("encoder_hidden_states", "pooled_projections"):  # every row gets the source's text
        same[key] = inputs[key][layout.source_of()]
    with torch.no_grad():
        plain_same = transformer(**same, return_dict=False)[0]
        plain = transformer(**inputs, return_dict=False)[0]
    for switch_step in (1, 0):  # "source" image part, then "mutual"
        assert relative_error(run(same, switch_step), plain_same) < TOL
        edited = run(inputs, switch_step)
        for r in layout.source_rows:
            assert relative_error(edited[r], plain[r]) < TOL
        target = layout.row(1, True)
        assert relative_error(edited[target], plain[target]) > 1e-3


# --- token merging on the image tokens -----------------------------------------------------------------------------


def _run(transformer, inputs, controller, layers):
    from dit4edit.control.joint import install_joint

    with torch.no_grad(), install_joint(transformer, controller, layers):
        return transformer(**inputs, joint_attention_kwargs={"step_index": 2}, return_dict=False)[0]


@pytest.mark.parametrize("family", ["sd3.5", "flux"])
def test_merging_off_is_bit_identical_and_on_keeps_the_source_rows(transformers, family):
    from dit4edit.control.joint import JointController
    from dit4edit.layout import BatchLayout
    from dit4edit.merging import MergeConfig

    transformer = transformers[family]
    layers = _layers(transformer)
    grid = (8, 8) if family == "sd3.5" else (4, 4)
    make = sd3_inputs if family == "sd3.5" else flux_inputs
    layout = BatchLayout(1) if family == "sd3.5" else BatchLayout(1, guidance=False)
    inputs = make(layout.rows, seed=4)
    inputs["hidden_states"] = inputs["hidden_states"] + 0.5 * torch.randn_like(inputs["hidden_states"])
    names = frozenset(layer.name for layer in layers)

    def controller(lay, merge):
        return JointController(lay, text_length=6, image_layers=names, switch_step=0, merge=merge, grid=grid)

    plain = _run(transformer, inputs, controller(layout, None), layers)
    off = _run(transformer, inputs, controller(layout, MergeConfig(ratio=0.0, min_tokens=1)), layers)
    small = _run(transformer, inputs, controller(layout, MergeConfig(ratio=0.5, stride=(2, 2))), layers)
    assert torch.equal(off, plain) and torch.equal(small, plain)  # off, or a grid under min_tokens: untouched
    merge = MergeConfig(ratio=0.5, stride=(2, 2), min_tokens=1)
    merged = _run(transformer, inputs, controller(layout, merge), layers)
    assert merged.shape == plain.shape and merged.isfinite().all()
    assert relative_error(merged, plain) > 1e-3  # merging does act
    # One plan from the conditional source row: the source rows are what the source alone gets, merged alike.
    alone = BatchLayout(0) if layout.guidance else BatchLayout(0, guidance=False)
    source_inputs = {k: (v[layout.source_rows] if torch.is_tensor(v) and v.shape[0] == layout.rows else v)
                     for k, v in inputs.items()}
    source_alone = _run(transformer, source_inputs, controller(alone, merge), layers)
    assert relative_error(merged[layout.source_rows], source_alone) < TOL


def test_merging_on_flux_merges_rotated_image_tokens_only(transformers):
    """A single-stream layer by hand: q/k normed and rotated per token, then the image tokens merged by the plan
    (text untouched), the explicit softmax, the image outputs unmerged."""
    from diffusers.models.embeddings import apply_rotary_emb

    from dit4edit.control.joint import FluxJointControlProcessor, JointController
    from dit4edit.layout import BatchLayout
    from dit4edit.merging import MergeConfig

    transformer = transformers["flux"]
    attn = transformer.single_transformer_blocks[0].attn
    layout, text, grid = BatchLayout(1, guidance=False), 6, (4, 4)
    controller = JointController(layout, text_length=text, merge=MergeConfig(ratio=0.5, stride=(2, 2), min_tokens=1),
                                 grid=grid)
    g = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, text + 16, attn.query_dim, generator=g)
    ids = torch.cat([torch.zeros(text, 3), flux_inputs(1)["img_ids"]])
    rotary = transformer.pos_embed(ids)
    with torch.no_grad():
        ours = FluxJointControlProcessor(controller, "single", index=1)(attn, hidden, image_rotary_emb=rotary,
                                                                         step_index=0)
        merge, unmerge = controller.merging(1, 0, hidden[:, text:])
        heads = [x.unflatten(-1, (-1, attn.head_dim)) for x in (attn.to_q(hidden), attn.to_k(hidden),
                                                                  attn.to_v(hidden))]
        q, k, v = attn.norm_q(heads[0]), attn.norm_k(heads[1]), heads[2]
        q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
        q, k, v = (torch.cat([x[:, :text].flatten(2), merge(x[:, text:].flatten(2))], dim=1) for x in (q, k, v))
        assert q.shape[1] == text + 8  # half the 16 image tokens merged away, no text token
        q, k, v = (x.unflatten(-1, (-1, attn.head_dim)).transpose(1, 2) for x in (q, k, v))  # (B, H, L', d)
        out = ((q @ k.transpose(-1, -2)) * attn.head_dim**-0.5).softmax(-1) @ v
        out = out.transpose(1, 2).flatten(2)  # (B, L', H * d)
        reference = torch.cat([out[:, :text], unmerge(out[:, text:])], dim=1)
    assert ours.shape == hidden.shape
    assert relative_error(ours, reference) < TOL


# --- an edit through a backbone, end to end ------------------------------------------------------------------------


@pytest.mark.parametrize("family,guidance", [("sd3.5", 4.0), ("flux", 3.5)])
def test_identity_edit_equals_reconstruction_and_an_edit_keeps_the_source(family, guidance):
    """Invert a latent, then denoise source and target branches together under full control (Prompt-to-Prompt on
    the aligned text, source image part early, mutual later, token merging): with the source prompt as target the
    target branch is the reconstruction; with another prompt the source branch still is, and the target is not."""
    from dit4edit.backbones import backbone_for
    from dit4edit.backbones.alignment import align_tokens
    from dit4edit.backbones.flow import INVERTIBLE_SIGMA_MAX
    from dit4edit.backbones.tiny import tiny_pipeline
    from dit4edit.control.joint import JointController, install_joint, prompt_to_prompt
    from dit4edit.merging import MergeConfig
    from dit4edit.solvers import invert_dpm, sample_dpmpp_2m

    pipe = tiny_pipeline(family)
    pipe.set_progress_bar_config(disable=True)
    backbone = backbone_for(pipe, max_sequence_length=32)
    latent_hw, steps, source = (16, 16), 6, "a red circle on a white background"
    schedule = backbone.schedule(steps, latent_hw, sigma_max=INVERTIBLE_SIGMA_MAX)
    image = torch.randn(1, backbone.latent_channels, *latent_hw, generator=torch.Generator().manual_seed(3),
                        dtype=torch.float64)
    noise = invert_dpm(backbone.denoiser([source], schedule, guidance), image, schedule).latent
    reconstruction = sample_dpmpp_2m(backbone.denoiser([source], schedule, guidance), noise, schedule)[-1]
    layers = backbone.attention_layers()
    deep = frozenset(layer.name for layer in layers if layer.block >= 1 or layer.role == "single")

    def edit(target):
        layout = backbone.layout(1, guidance)
        alignment = align_tokens(backbone.prompt_tokens(source), backbone.prompt_tokens(target))
        controller = JointController(layout, text_length=backbone.encode_prompts([source]).prompt_embeds.shape[1],
                                     image_layers=deep, switch_step=2, text_edit=prompt_to_prompt([alignment]),
                                     text_steps=4, merge=MergeConfig(ratio=0.5, stride=(2, 2), min_tokens=1),
                                     grid=(backbone.grid(latent_hw).height, backbone.grid(latent_hw).width))
        denoise = backbone.denoiser([source, target], schedule, guidance, layout, step_kwargs=True)
        with install_joint(backbone.transformer, controller, layers):
            out = sample_dpmpp_2m(denoise, noise.expand(2, -1, -1, -1), schedule)[-1]
        assert deep <= controller.seen
        return out

    merged_reconstruction = edit(source)
    assert relative_error(merged_reconstruction[1], merged_reconstruction[0]) < TOL  # identity edit
    edited = edit("a blue circle on a white background")
    assert relative_error(edited[0], merged_reconstruction[0]) < TOL  # the source branch is untouched by the edit
    assert relative_error(edited[1], edited[0]) > 1e-3
    # merging is the only thing between the source branch and the unmerged reconstruction
    assert 1e-4 < relative_error(edited[0], reconstruction[0]) < 0.5


@pytest.mark.parametrize("family", ["sd3.5", "flux"])
def test_recorded_maps_cover_the_full_token_grid_under_merging(transformers, family):
    """Each branch's own image -> text maps, from the conditional rows, unmerged back to every image token."""
    from dit4edit.control.joint import JointController
    from dit4edit.layout import BatchLayout
    from dit4edit.merging import MergeConfig

    transformer = transformers[family]
    layers = _layers(transformer)
    grid, num_image = ((8, 8), 64) if family == "sd3.5" else ((4, 4), 16)
    layout = BatchLayout(1) if family == "sd3.5" else BatchLayout(1, guidance=False)
    inputs = (sd3_inputs if family == "sd3.5" else flux_inputs)(layout.rows, seed=6)
    recorded = frozenset(layer.name for layer in layers if layer.role in ("joint", "single"))
    maps = {}
    for ratio in (0.0, 0.5):
        controller = JointController(layout, text_length=6, record_layers=recorded, record_columns=(1, 2),
                                     merge=MergeConfig(ratio=ratio, stride=(2, 2), min_tokens=1), grid=grid)
        _run(transformer, inputs, controller, layers)
        assert {layer for _, layer, _ in controller.maps} == recorded
        maps[ratio] = controller.word_map()
        assert maps[ratio].shape == (2, num_image, 2)
        assert (maps[ratio] >= 0).all() and (maps[ratio].sum(-1) <= 1).all()
    # Unmerged: every token of a merged group shows its group's map, so at most N/2 distinct rows per layer.
    controller = JointController(layout, text_length=6, record_layers=recorded, record_columns=(1, 2),
                                 merge=MergeConfig(ratio=0.5, stride=(2, 2), min_tokens=1), grid=grid)
    _run(transformer, inputs, controller, layers)
    for _, _, layer_map in controller.maps:
        assert len(layer_map[0].unique(dim=0)) <= num_image // 2
    assert len(maps[0.0][0].unique(dim=0)) > num_image // 2
    assert relative_error(maps[0.0][0], maps[0.0][1]) > 1e-3  # each branch's own map (the prompts differ)
