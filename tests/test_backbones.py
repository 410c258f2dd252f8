"""The backbone seam on tiny random models of every family: folders load as the family's own pipeline, prompts
encode as diffusers encodes them, generation through the backbone equals diffusers' own pipeline, the token ->
word map, the token grid and the attention layers by role."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import relative_error

PROMPT = "A Red circle on a white background"  # capitals: PixArt lower-cases, CLIP lower-cases, T5 does not
MULTI_PIECE = "an elephant, at sunset"  # words of several pieces, and punctuation split off a word
FLOAT_TOL = 1e-5  # float32 round-off between two orderings (or kernels) of the same arithmetic


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    from dit4edit.backbones.tiny import TINY_FAMILIES, make_tiny_model

    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("tiny-families")
    return {family: make_tiny_model(family, root / family) for family in TINY_FAMILIES}


@pytest.fixture(scope="module")
def pipes(folders):
    from diffusers import DiffusionPipeline

    loaded = {}
    for family, folder in folders.items():
        pipe = DiffusionPipeline.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        loaded[family] = pipe
    return loaded


def test_folders_load_as_each_familys_own_pipeline(folders, pipes):
    from dit4edit.backbones import BACKBONES, backbone_for, family_of, read_index
    from dit4edit.backbones.tiny import TINY_FAMILIES

    expected = {"pixart": "pixart", "sigma": "pixart", "sd3": "sd3", "sd3.5": "sd3", "flux": "flux",
                "flux-schnell": "flux"}
    for name, folder in folders.items():
        index = read_index(folder)
        assert type(pipes[name]).__name__ == TINY_FAMILIES[name] == index["_class_name"]
        family = family_of(index)
        assert family == expected[name]
        BACKBONES[family].folder.check(index, name)  # every required component, of an accepted class
        assert backbone_for(pipes[name]).family == family
    assert backbone_for(pipes["sigma"]).max_sequence_length == 300
    assert backbone_for(pipes["pixart"]).max_sequence_length == 120


def test_folder_check_names_what_is_wrong(folders):
    from dit4edit.backbones import BACKBONES, family_of, read_index
    from dit4edit.errors import DiT4EditError

    index = read_index(folders["sd3"])
    spec = BACKBONES["sd3"].folder
    with pytest.raises(DiT4EditError, match="text_encoder_3 is a CLIPTextModel"):
        spec.check({**index, "text_encoder_3": ["transformers", "CLIPTextModel"]})
    with pytest.raises(DiT4EditError, match="no tokenizer_2"):
        spec.check({k: v for k, v in index.items() if k != "tokenizer_2"})
    with pytest.raises(DiT4EditError, match="FluxPipeline, not one of StableDiffusion3Pipeline"):
        spec.check(read_index(folders["flux"]))
    with pytest.raises(DiT4EditError, match="StableDiffusionPipeline cannot be edited"):
        family_of({**index, "_class_name": "StableDiffusionPipeline"})


@pytest.mark.parametrize("family", ["sd3", "sd3.5", "flux", "pixart"])
def test_prompts_encode_as_diffusers_encodes_them(pipes, family):
    from dit4edit.backbones import backbone_for

    pipe = pipes[family]
    backbone = backbone_for(pipe)
    text = backbone.encode_prompts([PROMPT, MULTI_PIECE])
    if family.startswith("sd3"):
        embeds, _, pooled, _ = pipe.encode_prompt([PROMPT, MULTI_PIECE], None, None,
                                                  do_classifier_free_guidance=False)
        assert embeds.shape == (2, 77 + 256, 48)
        assert text.prompt_embeds[:, :77, 32:].abs().max() == 0  # the CLIP features zero-padded to the T5 width
    elif family == "flux":
        embeds, pooled, _ = pipe.encode_prompt([PROMPT, MULTI_PIECE], None)
    else:
        embeds, mask, _, _ = pipe.encode_prompt([PROMPT, MULTI_PIECE], do_classifier_free_guidance=False,
                                                clean_caption=False)
        pooled = None
        assert torch.equal(text.prompt_attention_mask, mask)
    assert relative_error(text.prompt_embeds, embeds) < FLOAT_TOL
    if pooled is not None:
        assert relative_error(text.pooled_prompt_embeds, pooled) < FLOAT_TOL
    assert relative_error(text.prompt_embeds[0], text.prompt_embeds[1]) > 1e-2  # the prompts do differ


def _generate(backbone, prompt, steps, guidance, latent_hw, seed):
    """The family's own sampler through the backbone (Euler on s for flows, DPM-Solver++(2M) for PixArt)."""
    schedule = backbone.schedule(steps, latent_hw)
    x = backbone.noise(1, latent_hw, torch.Generator().manual_seed(seed)).double()
    return backbone.sampler()(backbone.denoiser([prompt], schedule, guidance), x, schedule)[-1]


@pytest.mark.parametrize("family,guidance", [("sd3", 5.0), ("sd3.5", 5.0), ("flux", 3.5), ("flux-schnell", 0.0),
                                             ("pixart", 4.5)])
def test_generation_equals_diffusers_pipeline(pipes, family, guidance):
    """Same seed, steps, guidance and size: the backbone's latent is diffusers' own pipeline's."""
    from dit4edit.backbones import backbone_for
    from dit4edit.backbones.flux import pack

    pipe, steps, seed = pipes[family], 4, 7
    backbone = backbone_for(pipe)
    size = 64 if family == "pixart" else 16  # pixels; the tiny PixArt VAE downsamples 8x, the others 1x
    kwargs = dict(use_resolution_binning=False, clean_caption=False) if family == "pixart" else {}
    expected = pipe(PROMPT, height=size, width=size, num_inference_steps=steps, guidance_scale=guidance,
                    generator=torch.Generator().manual_seed(seed), output_type="latent", **kwargs).images
    latent_hw = (size // backbone.vae_scale_factor,) * 2
    ours = _generate(backbone, PROMPT, steps, guidance, latent_hw, seed)
    if family.startswith("flux"):
        ours = pack(ours)  # FluxPipeline returns packed tokens
    assert relative_error(ours.float(), expected) < 1e-5
    # The comparison can fail: another seed, or another guidance where guidance acts, gives another latent.
    other = _generate(backbone, PROMPT, steps, guidance, latent_hw, seed + 1)
    assert relative_error(pack(other) if family.startswith("flux") else other, expected.double()) > 0.1
    if family != "flux-schnell":
        regraded = _generate(backbone, PROMPT, steps, guidance + 2.0, latent_hw, seed)
        assert relative_error(pack(regraded) if family.startswith("flux") else regraded, expected.double()) > 1e-3


def test_token_word_map_points_at_each_words_pieces(pipes):
    from dit4edit.backbones import backbone_for

    sd3, flux, pixart = (backbone_for(pipes[f]) for f in ("sd3", "flux", "pixart"))
    tokens = sd3.prompt_tokens(MULTI_PIECE)
    assert tokens.words == ("an", "elephant,", "at", "sunset")
    assert [(s.encoder, s.start, s.stop) for s in tokens.segments] == [("clip", 0, 77), ("t5", 77, 333)]
    assert len(tokens.word_of_token) == 333
    ids = {"clip": sd3.pipe.tokenizer(MULTI_PIECE, padding="max_length", max_length=77).input_ids,
           "t5": sd3.pipe.tokenizer_3(MULTI_PIECE, padding="max_length", max_length=256).input_ids}
    for encoder, tokenizer, start in (("clip", sd3.pipe.tokenizer, 0), ("t5", sd3.pipe.tokenizer_3, 77)):
        for w, word in enumerate(tokens.words):
            positions = tokens.word_tokens(w, encoder)
            assert positions == list(range(positions[0], positions[-1] + 1))  # contiguous
            text = tokenizer.decode([ids[encoder][p - start] for p in positions]).replace(" ", "")
            assert text == word, (encoder, word, text)
    assert len(tokens.word_tokens(1, "t5")) > 1 and len(tokens.word_tokens(1, "clip")) > 1  # "elephant," splits
    assert tokens.word_of_token[0] is None and tokens.word_of_token[77 + 256 - 1] is None  # BOS, padding
    # FLUX: T5 only; PixArt: lower-cased, T5 only.
    assert flux.prompt_tokens(MULTI_PIECE).word_of_token == tokens.word_of_token[77:] + (None,) * 256
    assert pixart.prompt_tokens("An Elephant").words == ("an", "elephant")


def test_attention_layers_by_role(pipes):
    from dit4edit.backbones import backbone_for

    counts = {}
    for family in ("pixart", "sd3", "sd3.5", "flux"):
        backbone = backbone_for(pipes[family])
        layers = backbone.attention_layers()
        assert {layer.name for layer in layers} <= set(backbone.transformer.attn_processors)
        counts[family] = {role: len(backbone.layers(role)) for role in ("self", "cross", "joint", "single")}
    assert counts["pixart"] == {"self": 2, "cross": 2, "joint": 0, "single": 0}
    assert counts["sd3"] == {"self": 0, "cross": 0, "joint": 4, "single": 0}
    assert counts["sd3.5"] == {"self": 1, "cross": 0, "joint": 4, "single": 0}  # attn2 of block 0
    assert counts["flux"] == {"self": 0, "cross": 0, "joint": 1, "single": 1}
    sd3_joint = backbone_for(pipes["sd3"]).layers("joint")[2]
    assert (sd3_joint.name, sd3_joint.block, sd3_joint.keys) == ("transformer_blocks.2.attn.processor", 2,
                                                                  ("image", "text"))
    single = backbone_for(pipes["flux"]).layers("single")[0]
    assert (single.name, single.keys) == ("single_transformer_blocks.0.attn.processor", ("text", "image"))


def test_flux_token_grid_packing_and_position_ids(pipes):
    from diffusers import FluxPipeline

    from dit4edit.backbones import backbone_for
    from dit4edit.backbones.flux import pack, unpack

    backbone = backbone_for(pipes["flux"])
    latents = torch.randn(2, 1, 6, 10, generator=torch.Generator().manual_seed(0))
    grid = backbone.grid((6, 10))
    assert (grid.height, grid.width, grid.patch, grid.num_tokens) == (3, 5, 2, 15)
    tokens = pack(latents)
    assert torch.equal(tokens, FluxPipeline._pack_latents(latents, 2, 1, 6, 10))
    assert torch.equal(unpack(tokens, (6, 10)), latents)
    assert torch.equal(backbone.image_ids((6, 10)), FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu",
                                                                                            torch.float32))
    # Token k of the grid holds the 2x2 patch at (row, column) = its position ids.
    row, col = backbone.image_ids((6, 10))[7, 1:].long().tolist()
    assert torch.equal(tokens[:, 7].view(2, 1, 2, 2), latents[:, :, 2 * row : 2 * row + 2, 2 * col : 2 * col + 2])


def test_latent_scaling_round_trips_with_the_vae_shift(pipes):
    from dit4edit.backbones import backbone_for

    backbone = backbone_for(pipes["sd3"])
    z = torch.randn(1, 4, 4, 4)
    latent = backbone.to_latent(z)
    assert relative_error(latent, (z - 0.0609) * 1.5305) < 1e-7
    assert relative_error(backbone.from_latent(latent), z) < 1e-6


def test_model_index_of_a_saved_folder_lists_the_components(folders):
    index = json.loads((folders["flux"] / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "FluxTransformer2DModel"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]


def test_alignment_over_the_whole_text_sequence(pipes):
    """Prompt-to-Prompt's mapper on SD3's [CLIP | T5] sequence: unchanged words map to themselves in both segments,
    the swapped word's pieces to the new word's, BOS/EOS/padding in order; refine keeps an inserted word's own."""
    from dit4edit.backbones import backbone_for
    from dit4edit.backbones.alignment import align_tokens
    from dit4edit.control.joint import prompt_to_prompt

    sd3 = backbone_for(pipes["sd3"])
    source, target = sd3.prompt_tokens("a red circle on a white background"), sd3.prompt_tokens(
        "a green circle on a white background")
    replace = align_tokens(source, target)
    assert replace.mode == "replace"
    for segment in ("clip", "t5"):
        for w in range(len(source.words)):
            rows, cols = source.word_tokens(w, segment), target.word_tokens(w, segment)
            block = replace.mapper[rows][:, cols]
            assert block.sum(dim=0).allclose(torch.ones(len(cols)))  # each target piece gets one column's worth
            assert replace.mapper[rows].sum() == pytest.approx(block.sum().item())  # nothing leaks elsewhere
            if w != 1:  # an unchanged word: piece to piece, wherever the swapped word moved it
                assert torch.equal(block, torch.eye(len(rows)))
    red, green = source.word_tokens(1), target.word_tokens(1)
    assert replace.mapper[red][:, green].sum() > 0
    assert replace.mapper[0, 0] == 1  # CLIP's BOS
    eos = [p for p in range(77, 333) if source.word_of_token[p] is None][0], [
        p for p in range(77, 333) if target.word_of_token[p] is None][0]
    assert replace.mapper[eos] == 1 and replace.mapper[:, -1].sum() == 1  # T5's </s> to </s>, padding in order
    assert replace.from_source.sum() == len(source.word_of_token)  # replace: every column from the source
    # Refine: an inserted word keeps its own columns; the rest shift to their new positions.
    longer = sd3.prompt_tokens("a red circle on a plain white background")
    refine = align_tokens(source, longer)
    assert refine.mode == "refine"
    inserted = longer.word_tokens(5)
    assert refine.from_source[inserted].sum() == 0 and refine.mapper.sum() > 0
    last_word = source.word_tokens(6, "t5"), longer.word_tokens(7, "t5")
    assert torch.equal(refine.mapper[last_word[0]][:, last_word[1]], torch.eye(len(last_word[0])))
    edit = prompt_to_prompt([replace, refine])
    assert edit.mapper.shape == (2, 333, 333)
    assert torch.equal(edit.source_coef[0], torch.ones(333)) and torch.equal(edit.own_coef[0], torch.zeros(333))
    assert torch.equal(edit.own_coef[1], 1 - refine.from_source)


def test_pixart_backbone_is_the_current_pipelines_denoiser():
    """On dit4edit's own PixArt pipeline the backbone's data prediction is the pipeline's (lower-case prompts, which
    both encode alike), also in an edit batch with control's step index."""
    from conftest import fresh_pipe

    from dit4edit.backbones import backbone_for
    from dit4edit.layout import BatchLayout

    pipe = fresh_pipe()
    backbone = backbone_for(pipe)
    assert backbone.family == "pixart" and backbone.max_sequence_length == pipe.max_sequence_length
    schedule = backbone.schedule(5, (8, 8))
    prompts = ["a red circle on a white background", "a blue circle on a white background"]
    layout = BatchLayout(1)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ours = backbone.denoiser(prompts, schedule, 4.5, layout)
    theirs = pipe.make_denoiser(prompts, 4.5, schedule, (64, 64), layout=layout)
    for i in (0, 3):
        assert relative_error(ours(x, i), theirs(x, i)) < FLOAT_TOL
