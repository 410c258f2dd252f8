"""The GPU benchmark script, run on the CPU at tiny sizes: every field it reports, ratios computed from its own
measured times, and its FLOP formula checked against torch's FLOP counter on the full-size architectures."""

from __future__ import annotations

import importlib
import json
import statistics
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def bench_gpu(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module("bench_gpu")


def close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * max(abs(a), abs(b))


def test_tiny_run_reports_every_field_from_its_measurements(bench_gpu, tmp_path, capsys):
    out = tmp_path / "tiny.json"
    # the eager backend: dynamo's capture and guards without AOT tracing (compiling is tested in test_compile.py)
    assert bench_gpu.main(["--tiny", "--sizes", "64x128", "--compile-backend", "eager", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["card"] and results["device"] == "cpu" and results["tiny"] and results["steps"] == 2
    assert results["peak_tflops"] > 0 and "measured" in results["peak_source"] and "N" in results["flops_formula"]
    (size,) = results["sizes"]
    assert size["size"] == "64x128" and size["model"] == "2 blocks x 24, PixArt-XL-2-1024-MS layout"
    assert size["tokens"] == (128 // 8 // 2) * (64 // 8 // 2)
    assert size["generation_s"] > 0 and size["generation_sample_forwards"] == 2 * 2  # 2 steps x [uncond, cond]
    assert size["generation_peak_gib"] is None  # no GPU
    assert close(size["floor_s"], size["floor_flops"] / (results["peak_tflops"] * 1e12))
    variants = {v["name"]: v for v in size["variants"]}
    assert list(variants) == bench_gpu.DEFAULT_VARIANTS.split(",")
    # naive inversion: 2 steps x 2 rows; edit: 2 steps x 4 rows (3 without the source's unconditional row)
    assert variants["base"]["sample_forwards"] == 2 * 2 + 2 * 4
    assert variants["rows3"]["sample_forwards"] == 2 * 2 + 2 * 3
    assert variants["merge"]["sample_forwards"] == variants["merge+plan28"]["sample_forwards"] == 2 * 2 + 2 * 4
    assert close(size["floor_flops"], variants["base"]["sample_forwards"] * size["flops_per_forward"])
    # what users run: the default inversion, its NFE reported (naive inversion: one evaluation a step)
    from dit4edit.defaults import DEFAULTS

    assert variants["base"]["inversion_method"] == "dpm" and variants["base"]["inversion_nfe"] == 2
    assert variants["definv"]["inversion_method"] == DEFAULTS.inversion and variants["definv"]["inversion_nfe"] >= 2
    assert variants["definv"]["sample_forwards"] == 2 * variants["definv"]["inversion_nfe"] + 2 * 4
    for v in variants.values():
        assert v["whole_edit_s"] == statistics.median(v["times"]) and len(v["times"]) == results["rounds"]
        assert close(v["floor_ratio"], v["whole_edit_s"] / size["floor_s"])
        assert close(v["edit_over_generation"], v["whole_edit_s"] / size["generation_s"])
        assert close(v["flops"], v["sample_forwards"] * size["flops_per_forward"])
        assert v["peak_gib"] is None and v["inversion_s"] > 0 and v["edit_s"] > 0
        assert (v["compile_s"] is not None) == ("compile" in v["name"])
    assert close(variants["compile"]["compile_s"], variants["compile"]["first_edit_s"]
                 - variants["compile"]["whole_edit_s"])
    assert size["graphs_compiled"] > 0 and size["graphs_compiled_in_timed_rounds"] == 0
    assert "| compile+merge+rows3 |" in capsys.readouterr().out


def test_variant_names(bench_gpu):
    assert bench_gpu.Variant.parse("merge+plan7+rows3") == bench_gpu.Variant("merge+plan7+rows3", merge=True,
                                                                             rows3=True, plan_every=7)
    assert bench_gpu.Variant.parse("merge").plan_every == 1
    for bad in ("plan4", "merge+plan0", "merge+plan2+plan3", "merge+planx", "compile+offload"):
        with pytest.raises(SystemExit, match="unknown or unsupported variant"):
            bench_gpu.Variant.parse(bad)


@pytest.mark.parametrize("sample_size, height, width", [(64, 64, 64), (128, 128, 256)])  # 512; 1024-MS, 1024x2048
def test_flop_formula_matches_torch_flop_counter(bench_gpu, sample_size, height, width):
    """Full-size PixArt-XL-2 on the meta device: torch counts every matmul and convolution without computing."""
    from torch.utils.flop_counter import FlopCounterMode

    from dit4edit.tiny import pixart_xl_transformer

    with torch.device("meta"):
        transformer = pixart_xl_transformer(28, sample_size)
        rows = 2
        added = {"resolution": None, "aspect_ratio": None}
        if transformer.config.use_additional_conditions:
            added = {"resolution": torch.ones(rows, 2), "aspect_ratio": torch.ones(rows, 1)}
        inputs = dict(hidden_states=torch.randn(rows, 4, height, width),
                      encoder_hidden_states=torch.randn(rows, bench_gpu.TEXT_TOKENS, 4096),
                      encoder_attention_mask=torch.ones(rows, bench_gpu.TEXT_TOKENS), timestep=torch.ones(rows),
                      added_cond_kwargs=added)
    with FlopCounterMode(display=False) as counter:
        transformer(**inputs, return_dict=False)
    counted = counter.get_total_flops() / rows
    formula = bench_gpu.forward_flops(transformer.config, height, width)
    assert abs(formula - counted) / counted < 1e-6
