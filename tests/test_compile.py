"""Regional compilation of the transformer blocks: same results as eager, attention control still per step, and
later edits reuse the graphs.

The fast tests compile with the `aot_eager` backend: dynamo captures the graphs and guards exactly as with the
default `inductor` backend, without generating kernels (a C++ build takes minutes on a small CPU). The inductor run
is the slow test at the end (set DIT4EDIT_SLOW=1).
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import SOURCE, TARGET, fresh_pipe, random_image, relative_error
from torch._dynamo.utils import counters

from dit4edit.compiling import blocks_compiled, compiled_blocks, uncompile_blocks
from dit4edit.errors import DiT4EditError
from dit4edit.merging import MergeConfig
from dit4edit.pipeline import DiT4EditPipeline

MERGE = MergeConfig(ratio=0.5, stride=(2, 2), min_tokens=0)  # merging applies at 64 px


@pytest.fixture(scope="module")
def eager():
    pipe = fresh_pipe()
    inversion = pipe.invert(random_image(64, 64), SOURCE, num_inference_steps=4, method="dpm")
    return inversion, pipe.edit(inversion, TARGET), pipe.edit(inversion, TARGET, merge=MERGE)


def unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def check_compiled_matches_eager(pipe, eager, rtol):
    inversion, edited, merged = eager
    mine = pipe.invert(random_image(64, 64), SOURCE, num_inference_steps=4, method="dpm")
    assert relative_error(mine.trajectory, inversion.trajectory) < rtol
    # The default edit switches its self-attention edit per step (source, then mutual) and runs Prompt-to-Prompt in
    # a step window: equal results mean the processors saw every step's index inside the compiled blocks.
    assert relative_error(pipe.edit(mine, TARGET).latents, edited.latents) < rtol
    return mine


def test_compiled_blocks_match_eager_and_a_second_edit_does_not_recompile(eager):
    _, _, merged = eager
    pipe = fresh_pipe().compile_blocks(backend="aot_eager")
    assert blocks_compiled(pipe.transformer)
    torch._dynamo.reset()
    counters.clear()
    inversion = check_compiled_matches_eager(pipe, eager, rtol=1e-5)
    compiled = unique_graphs()
    assert compiled > 0  # the blocks really ran compiled
    with torch._dynamo.config.patch(error_on_recompile=True):
        again = pipe.edit(inversion, "a green circle on a white background")  # other prompt, same shapes
        with_merging = pipe.edit(inversion, TARGET, merge=MERGE)  # merging lives in the eager attention
    assert unique_graphs() == compiled
    assert relative_error(with_merging.latents, merged.latents) < 1e-5
    assert again.images[0].size == (64, 64)


def test_uncompile_restores_eager_blocks(eager):
    pipe = fresh_pipe()
    attn = pipe.transformer.transformer_blocks[0].attn1
    with compiled_blocks(pipe.transformer, backend="aot_eager"):
        assert attn._compiled_call_impl is not None
        assert pipe.transformer.transformer_blocks[0]._compiled_call_impl is not None
    assert not blocks_compiled(pipe.transformer) and "_call_impl" not in attn.__dict__
    assert all(module._compiled_call_impl is None for module in pipe.transformer.modules())
    uncompile_blocks(pipe.transformer)  # idempotent
    inversion, edited, _ = eager
    assert relative_error(pipe.edit(inversion, TARGET).latents, edited.latents) < 1e-5


def test_merged_feed_forward_on_compiled_blocks_is_an_error(eager):
    inversion, _, _ = eager
    pipe = fresh_pipe().compile_blocks(backend="aot_eager")
    with pytest.raises(DiT4EditError, match="merge_ff"):
        pipe.edit(inversion, TARGET, merge=MergeConfig(ratio=0.5, stride=(2, 2), min_tokens=0, merge_ff=True))


@pytest.mark.skipif(not os.environ.get("DIT4EDIT_SLOW"), reason="inductor compiles C++ kernels: minutes on a small "
                    "CPU (set DIT4EDIT_SLOW=1)")
def test_inductor_compiled_blocks_match_eager(eager):
    pipe = fresh_pipe().compile_blocks()
    check_compiled_matches_eager(pipe, eager, rtol=1e-4)  # fused kernels round differently


def test_compile_flag(tiny_model_dir, tmp_path, capsys, monkeypatch):
    from dit4edit.cli import main

    source, output = tmp_path / "in.png", tmp_path / "out.png"
    random_image(32, 32).save(source)
    argv = ["edit", str(source), "-s", SOURCE, "-t", TARGET, "-o", str(output), "--model", str(tiny_model_dir),
            "--steps", "2", "--inversion", "ddim", "--quiet", "--compile"]
    monkeypatch.setattr(DiT4EditPipeline, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    assert main([*argv, "--merge-ff"]) == 2
    err = capsys.readouterr().err
    assert "--compile does not work with --merge-ff" in err and len(err.strip().splitlines()) == 1
    monkeypatch.undo()
    calls = []
    monkeypatch.setattr(DiT4EditPipeline, "compile_blocks", lambda self, **options: calls.append(options) or self)
    assert main(argv) == 0 and calls == [{}] and output.is_file()
