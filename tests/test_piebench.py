"""PIE-Bench harness: mask decoding, every metric against an independent computation, the command on a tiny
PIE-format data set (all ten types), NaN handling in the tables, and resume after kill -9."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import kill_9_after_first_record, random_image
from PIL import Image

from dit4edit import batch, metrics, piebench
from dit4edit.request import Settings
from dit4edit.cli import main
from dit4edit.control import AttentionControl

SIDE = 32  # the fixture's images (the benchmark's are 512x512; the protocol is the same)


# --- fixtures --------------------------------------------------------------------------------------------------


def rle_of(mask: np.ndarray) -> list[int]:
    """Flat (start, length) pairs, 0-indexed starts, of the 1 runs of a row-major mask (the benchmark's format)."""
    flat = np.concatenate([[0], mask.reshape(-1).astype(int), [0]])
    edges = np.flatnonzero(np.diff(flat))
    return [int(v) for start, end in zip(edges[0::2], edges[1::2]) for v in (start, end - start)]


@pytest.fixture(scope="module")
def pie_data(tmp_path_factory):
    """Ten entries, one per editing type; entry 9's mask covers everything (no unedited part: NaN metrics)."""
    data = tmp_path_factory.mktemp("pie")
    mapping = {}
    colours = ["red", "green", "blue", "yellow", "purple", "orange", "red", "green", "blue", "yellow"]
    for k in range(10):
        key = f"{k}{k:011d}"
        image_path = f"{k}_type_{k}/{key}.jpg"
        (data / "annotation_images" / image_path).parent.mkdir(parents=True, exist_ok=True)
        random_image(SIDE, SIDE, seed=k).save(data / "annotation_images" / image_path)
        mask = np.zeros((SIDE, SIDE), dtype=np.uint8)
        mask[8 : 8 + k + 4, 6 : 20] = 1
        if k == 9:
            mask[:] = 1
        mapping[key] = {
            "image_path": image_path,
            "original_prompt": f"a [{colours[k]}] circle on a white background",
            "editing_prompt": f"a [{colours[(k + 1) % 10]}] circle on a white background",
            "editing_instruction": "change the colour",
            "editing_type_id": str(k),
            "blended_word": f"{colours[k]} {colours[(k + 1) % 10]}" if k % 2 == 0 else "",
            "mask": rle_of(mask),
        }
    (data / "mapping_file.json").write_text(json.dumps(mapping))
    return data


def tiny_vit():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    config = ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                       patch_size=16, image_size=224)
    return ViTModel(config).eval()


def tiny_clip():
    """A random CLIP (1 layer each side) with a character-level tokenizer and CLIP's Pillow image processor."""
    import string

    import transformers
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    letters = list(string.ascii_lowercase)
    vocab = {piece: n for n, piece in enumerate(letters + [c + "</w>" for c in letters])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    torch.manual_seed(0)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=len(vocab) - 2,
                         eos_token_id=len(vocab) - 1, pad_token_id=len(vocab) - 1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=224, patch_size=32),
        projection_dim=8,
    )
    processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return CLIPModel(config).eval(), tokenizer, processor()


@pytest.fixture(scope="module")
def metric_models(tmp_path_factory):
    """Folders holding the tiny ViT and CLIP, as --dino-model / --clip-model take them."""
    folder = tmp_path_factory.mktemp("metric-models")
    tiny_vit().save_pretrained(folder / "vit")
    for part in tiny_clip():
        part.save_pretrained(folder / "clip")
    return folder


# --- masks and pixel metrics -----------------------------------------------------------------------------------


def test_decode_mask_matches_masks_drawn_by_hand():
    drawn = np.array([
        [1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 0, 1],
        [1, 0, 0, 0, 0, 1],
        [1, 1, 0, 0, 0, 1],
        [1, 1, 1, 1, 1, 1],
    ], dtype=np.float32)
    # runs over the flat 5x6 array, starts 0-indexed: 0-2 (row 0), 7-9 (row 1, columns 1-3), 18-19 (row 3,
    # columns 0-1) and one past the end, clipped; then the border is set to 1.
    decoded = metrics.decode_mask([0, 3, 7, 3, 18, 2, 28, 100], (5, 6))
    assert decoded.dtype == np.float32 and np.array_equal(decoded, drawn)
    inner = metrics.decode_mask([14, 1], (5, 6))  # one pixel: row 2, column 2
    assert inner[2, 2] == 1 and inner[1:-1, 1:-1].sum() == 1
    empty = metrics.decode_mask([], (4, 4))
    assert empty.sum() == 12 and empty[1:3, 1:3].sum() == 0  # border only
    for bad in ([1], [30, 1], [-1, 2]):
        with pytest.raises(ValueError):
            metrics.decode_mask(bad, (5, 6))


def test_rle_round_trip_of_the_fixture_format():
    rng = np.random.default_rng(1)
    mask = (rng.uniform(size=(16, 16)) > 0.6).astype(np.float32)
    decoded = metrics.decode_mask(rle_of(mask), (16, 16))
    assert np.array_equal(decoded[1:-1, 1:-1], mask[1:-1, 1:-1]) and decoded[0].all() and decoded[:, -1].all()


def _pair(seed=0, shape=(24, 20, 3)):
    rng = np.random.default_rng(seed)
    a = rng.uniform(size=shape)
    b = np.clip(a + rng.normal(scale=0.1, size=shape), 0, 1)
    return a, b


def test_psnr_and_mse_on_masked_images_match_the_formula():
    a, b = _pair()
    mask = np.zeros(a.shape[:2])
    mask[5:15, 4:12] = 1
    ka, kb = metrics.unedited(a, mask), metrics.unedited(b, mask)
    assert np.all(ka[5:15, 4:12] == 0) and np.array_equal(ka[0], a[0])
    squared = [(x - y) ** 2 for x, y in zip(ka.ravel(), kb.ravel())]  # zeros of the masked part counted
    expected_mse = sum(squared) / len(squared)
    assert metrics.mse(ka, kb) == pytest.approx(expected_mse, rel=1e-12)
    assert metrics.psnr(ka, kb) == pytest.approx(-10 * math.log10(expected_mse), rel=1e-12)
    assert metrics.psnr(ka, ka) == math.inf


def _ssim_by_windows(x, y, size=11, sigma=1.5):
    """SSIM the slow way: at every position whose window fits, weighted statistics over that window."""
    taps = np.exp(-0.5 * ((np.arange(size) - size // 2) / sigma) ** 2)
    weights = np.outer(taps, taps) / np.outer(taps, taps).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    for ch in range(x.shape[2]):
        for i in range(x.shape[0] - size + 1):
            for j in range(x.shape[1] - size + 1):
                wx, wy = x[i : i + size, j : j + size, ch], y[i : i + size, j : j + size, ch]
                mx, my = (weights * wx).sum(), (weights * wy).sum()
                vx, vy = (weights * (wx - mx) ** 2).sum(), (weights * (wy - my) ** 2).sum()
                cov = (weights * (wx - mx) * (wy - my)).sum()
                values.append((2 * mx * my + c1) * (2 * cov + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_ssim_matches_windowed_statistics():
    a, b = _pair(2)
    mask = np.zeros(a.shape[:2])
    mask[3:9, 2:16] = 1
    ka, kb = metrics.unedited(a, mask), metrics.unedited(b, mask)
    expected = _ssim_by_windows(ka, kb)
    assert metrics.ssim(ka, kb) == pytest.approx(expected, rel=1e-9)
    assert metrics.ssim(ka, ka) == pytest.approx(1.0, rel=1e-12)
    assert 0 < metrics.ssim(ka, kb) < 1
    # scikit-image's default (sample covariance) differs, and only slightly
    assert abs(metrics.ssim(ka, kb, sample_covariance=True) - expected) > 1e-6


def test_ssim_matches_scikit_image_when_installed():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    a, b = _pair(3, (40, 36, 3))
    reference = skimage_metrics.structural_similarity(a, b, gaussian_weights=True, sigma=1.5, data_range=1.0,
                                                      channel_axis=-1, use_sample_covariance=False)
    assert metrics.ssim(a, b) == pytest.approx(reference, rel=1e-9)


# --- model metrics ---------------------------------------------------------------------------------------------


def test_structure_distance_is_zero_for_identical_images_and_positive_otherwise():
    from transformers import Dinov2Config, Dinov2Model

    one, other = random_image(64, 48, seed=1), random_image(64, 48, seed=2)
    for model in (tiny_vit(), Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                                       patch_size=16, image_size=224)).eval()):
        distance = metrics.StructureDistance(model)
        assert distance(one, one) == 0.0
        assert distance(one, other) > 0
    sim = metrics.StructureDistance(tiny_vit()).self_similarity(one)
    assert sim.shape == (1 + (224 // 16) * (298 // 16), 1 + (224 // 16) * (298 // 16))  # 64x48 -> 298x224
    assert torch.allclose(sim.diagonal(), torch.ones(sim.shape[0]), atol=1e-5)


def test_structure_distance_uses_the_last_blocks_keys():
    """The self-similarity equals one computed from the last block's input hidden state by hand."""
    model = tiny_vit()
    distance = metrics.StructureDistance(model)
    image = random_image(32, 32, seed=4)
    with torch.no_grad():
        hidden = model(pixel_values=distance.preprocess(image), output_hidden_states=True,
                       interpolate_pos_encoding=True).hidden_states[-2][0]  # input of the last block, (T, D)
        last = model.layers[-1] if hasattr(model, "layers") else model.encoder.layer[-1]
        keys = last.attention.k_proj(last.layernorm_before(hidden))
        unit = keys / keys.norm(dim=-1, keepdim=True)
    assert torch.allclose(distance.self_similarity(image), unit @ unit.T, atol=1e-5)


def test_clip_score_is_100_times_the_cosine_floored_at_zero():
    model, tokenizer, processor = tiny_clip()
    score = metrics.ClipScore(model, tokenizer, processor)
    values = []
    for seed, text in [(0, "a red circle"), (1, "a blue square on grass"), (2, "x"), (3, "a dog")]:
        image = random_image(48, 40, seed)
        inputs = processor(images=[image], return_tensors="pt")
        tokens = tokenizer([text], return_tensors="pt")
        with torch.no_grad():
            logits = model(input_ids=tokens.input_ids, pixel_values=inputs.pixel_values).logits_per_image
        expected = max(100 * (logits / model.logit_scale.exp()).item(), 0.0)  # logits = scale x cosine
        values.append(score(image, text))
        assert values[-1] == pytest.approx(expected, rel=1e-4, abs=1e-4)
    assert any(value > 0 for value in values) and all(value >= 0 for value in values)


def test_lpips_runs_the_squeeze_net_on_inputs_in_minus_one_to_one(monkeypatch):
    """The lpips package cannot be installed beside this torch: a stand-in records what the wrapper asks of it."""
    import types

    calls = {}

    class FakeLpips(torch.nn.Module):
        def __init__(self, net, verbose):
            super().__init__()
            calls.update(net=net, verbose=verbose)

        def forward(self, x, y):
            calls.update(shape=tuple(x.shape), low=float(min(x.min(), y.min())), high=float(max(x.max(), y.max())))
            return (x - y).abs().mean().reshape(1, 1, 1, 1)

    monkeypatch.setitem(sys.modules, "lpips", types.SimpleNamespace(LPIPS=FakeLpips))
    a, b = np.zeros((8, 6, 3)), np.ones((8, 6, 3))
    value = metrics.Lpips()(a, b)
    assert calls["net"] == "squeeze" and calls["shape"] == (1, 3, 8, 6)
    assert (calls["low"], calls["high"]) == (-1.0, 1.0) and value == pytest.approx(2.0)
    monkeypatch.setitem(sys.modules, "lpips", None)  # not importable: a one-line reason, no exception
    loaded, reason = metrics.load_metric(metrics.Lpips)
    assert loaded is None and "LPIPS needs the lpips package" in reason and "\n" not in reason


def test_scorer_applies_the_protocol(pie_data, tmp_path):
    """Unedited-part metrics on images multiplied by (1 - mask); NaN (null) when the mask covers everything."""
    scorer = piebench.Scorer(pie_data, tmp_path, ("psnr", "mse", "ssim", "clip_edited"))
    scorer.models = {"clip": lambda image, text: float(np.asarray(image).mean())}  # stand-in: mean of the pixels
    source, edited = random_image(SIDE, SIDE, 0), random_image(SIDE, SIDE, 5)
    mask = np.zeros((SIDE, SIDE), dtype=np.float32)
    mask[4:20, 4:20] = 1
    row = scorer.score(source, edited, mask, "a prompt")
    src, tgt = np.asarray(source, np.float64) / 255, np.asarray(edited, np.float64) / 255
    keep = (1 - mask)[..., None]
    assert row["mse"] == pytest.approx(np.mean((src * keep - tgt * keep) ** 2), rel=1e-12)
    assert row["psnr"] == pytest.approx(10 * np.log10(1 / row["mse"]), rel=1e-12)
    assert row["ssim"] == pytest.approx(_ssim_by_windows(tgt * keep, src * keep), rel=1e-9)
    assert row["clip_edited"] == pytest.approx(np.uint8(np.asarray(edited, np.float64) * mask[..., None]).mean())
    full = scorer.score(source, edited, np.ones_like(mask), "a prompt")
    assert full["psnr"] is None and full["mse"] is None and full["ssim"] is None
    assert full["clip_edited"] == pytest.approx(np.asarray(edited).mean())


def refused_endpoint():
    """An http URL on this machine whose port refuses connections (bound, never listening), and its socket."""
    import socket

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return f"http://127.0.0.1:{sock.getsockname()[1]}", sock


def test_unreachable_hub_costs_one_line_per_metric_and_no_retries(pie_data, tmp_path, monkeypatch, capfd):
    from huggingface_hub import constants
    from transformers import AutoModel, CLIPModel  # noqa: F401 - loaded before the clock starts

    endpoint, sock = refused_endpoint()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    said = []
    scorer = piebench.Scorer(pie_data, tmp_path, ("psnr", "structure_distance", "clip_whole"),
                             clip_model="dit4edit-tests/no-such-clip", dino_model="dit4edit-tests/no-such-dino",
                             say=said.append)
    capfd.readouterr()
    start = time.perf_counter()
    try:
        scorer.load()
    finally:
        sock.close()
    elapsed = time.perf_counter() - start
    assert elapsed < 10, f"loading two missing metric models took {elapsed:.0f} s: the hub was retried"
    assert len(said) == 2 and all("\n" not in line and "did not answer" in line for line in said), said
    assert set(scorer.skipped) == {"structure_distance", "clip"}
    assert capfd.readouterr().err == ""  # nothing but the two lines, which go through `say`
    row = scorer.score(random_image(SIDE, SIDE, 0), random_image(SIDE, SIDE, 1), np.zeros((SIDE, SIDE)), "a cat")
    assert set(row) == {"psnr"}


def test_hub_offline_asks_nothing_when_the_variable_is_set(monkeypatch):
    import huggingface_hub.utils

    asked = []
    monkeypatch.setattr(huggingface_hub.utils, "get_session", lambda: asked.append(1))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert metrics.hub_offline() == "HF_HUB_OFFLINE is set" and asked == []


def test_local_metric_models_load_without_asking_the_hub(pie_data, metric_models, tmp_path, monkeypatch):
    asked = []
    monkeypatch.setattr(metrics, "hub_offline", lambda *args, **kwargs: asked.append(1))
    scorer = piebench.Scorer(pie_data, tmp_path, ("structure_distance", "clip_whole"),
                             clip_model=str(metric_models / "clip"), dino_model=str(metric_models / "vit"))
    scorer.load()
    assert asked == [] and scorer.skipped == {} and scorer.models["clip"] is not None


# --- the data set and the command ------------------------------------------------------------------------------


def test_benchmark_entries_become_jobs(pie_data):
    settings = Settings(control=AttentionControl())
    jobs = piebench.read_benchmark(pie_data, settings, local_blend=True)
    assert [job.fields["editing_type_id"] for job in jobs] == [str(k) for k in range(10)]
    first = jobs[0].request
    assert first.source == "a red circle on a white background" and "[" not in first.targets[0]
    assert jobs[0].outputs == ("annotation_images/0_type_0/000000000000.jpg",)
    assert first.image == str(pie_data / "annotation_images" / "0_type_0" / "000000000000.jpg")
    assert first.settings.control.local_blend_words == ("red", "green")
    assert jobs[1].request.settings.control.local_blend_words == ()  # blended_word "" blends nothing
    assert piebench.read_benchmark(pie_data, settings)[0].request.settings.control.local_blend_words == ()
    picked = piebench.read_benchmark(pie_data, settings, types=["3", "7"], limit=1)
    assert [job.item for job in picked] == ["300000000003"]
    assert piebench.blend_words("cat dog") == ("cat", "dog") and piebench.blend_words("a b c") == ()


def test_pie_bench_command_end_to_end(pie_data, metric_models, tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "out"
    command = ["pie-bench", "--data", str(pie_data), "-o", str(out), "--model", str(tiny_model_dir), "--steps", "2",
               "--inversion", "ddim", "--quiet", "--clip-model", str(metric_models / "clip"),
               "--dino-model", str(metric_models / "vit"), "--local-blend-from-bench"]
    assert main(command) == 0
    captured = capsys.readouterr()
    rows = batch.read_rows(out / "results.jsonl")
    assert len(rows) == 10 and all(row["status"] == "ok" for row in rows)
    assert [row["id"] for row in rows] == sorted(json.loads((pie_data / "mapping_file.json").read_text()))
    lpips_available = all("lpips" in row for row in rows)
    if not lpips_available:
        assert "lpips metric skipped" in captured.err and captured.err.count("\n") == 1
    mapping = json.loads((pie_data / "mapping_file.json").read_text())
    for row in rows:
        entry = mapping[row["id"]]
        assert row["editing_type_id"] == entry["editing_type_id"] and row["seconds"] > 0
        saved = out / "annotation_images" / entry["image_path"]
        assert row["output"] == f"annotation_images/{entry['image_path']}" and saved.is_file()
        # recompute from the files as the benchmark's evaluation would
        source = np.asarray(Image.open(pie_data / "annotation_images" / entry["image_path"]).convert("RGB")) / 255
        edited = np.asarray(Image.open(saved).convert("RGB")) / 255
        keep = 1 - metrics.decode_mask(entry["mask"], (SIDE, SIDE))[..., None]
        if row["editing_type_id"] == "9":
            assert row["psnr"] is None and row["mse"] is None and row["ssim"] is None
        else:
            assert row["mse"] == pytest.approx(np.mean((source * keep - edited * keep) ** 2), rel=1e-9)
            assert row["psnr"] == pytest.approx(-10 * np.log10(row["mse"]), rel=1e-9)
        assert row["structure_distance"] > 0 and row["clip_whole"] >= 0 and row["clip_edited"] >= 0
    summary = (out / "summary.md").read_text()
    assert "types evaluated: 10 of 10" in summary and "cpu" in summary
    assert captured.out.startswith("# PIE-Bench results") and "10 done, 0 failed" in captured.out
    table = {line.split(",")[0]: line.split(",") for line in (out / "summary.csv").read_text().splitlines()}
    head = table["type"]
    overall = dict(zip(head, table["all"]))
    assert overall["images"] == "10" and overall["psnr_nan"] == "1" and overall["mse_nan"] == "1"
    mses = [row["mse"] for row in rows if row["mse"] is not None]
    assert float(overall["mse"]) == pytest.approx(np.mean(mses) * 1e4, rel=1e-9)  # papers' scale, NaN excluded
    assert float(overall["ssim"]) == pytest.approx(np.mean([row["ssim"] for row in rows if row["ssim"]]) * 100)
    assert dict(zip(head, table["9"]))["psnr"] == ""  # a type whose only image is NaN has no value
    assert "psnr 1" in summary  # NaN rows counted in the markdown too


def test_pie_bench_bad_input_is_one_line(pie_data, tmp_path, capsys):
    for args, message in [(["--data", str(tmp_path / "none")], "PIE-Bench folder not found"),
                          (["--data", str(tmp_path)], "no mapping_file.json"),
                          (["--data", str(pie_data), "--types", "1,12"], "--types takes"),
                          (["--data", str(pie_data), "--metrics", "fid"], "--metrics takes"),
                          (["--data", str(pie_data), "--limit", "0"], "--limit must be"),
                          (["--data", str(pie_data), "--local-blend-from-bench", "--no-attention-control"],
                           "needs attention control"),
                          (["--data", str(pie_data), "--mask", str(pie_data / "mapping_file.json")], "--mask does not")]:
        assert main(["pie-bench", *args, "-o", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_pie_bench_resumes_after_kill_9(pie_data, metric_models, tiny_model_dir, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "dit4edit", "pie-bench", "--data", str(pie_data), "-o", str(out),
               "--model", str(tiny_model_dir), "--steps", "2", "--inversion", "ddim", "--quiet",
               "--metrics", "psnr,mse,ssim,structure_distance", "--dino-model", str(metric_models / "vit")]
    shard = out / "shards" / "results-00000.jsonl"
    kill_9_after_first_record(command, shard)
    first = batch.read_rows(shard)
    assert 0 < len(first) < 10, "the kill came after the run had finished"
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = batch.read_rows(out / "results.jsonl")
    assert len(rows) == 10 and len({row["id"] for row in rows}) == 10 and all(row["status"] == "ok" for row in rows)
    assert batch.read_rows(shard)[: len(first)] == first and len(batch.read_rows(shard)) == 10
    assert len(list((out / "annotation_images").rglob("*.jpg"))) == 10 and not list(out.rglob("*.tmp"))
    assert {"psnr", "structure_distance"} <= set(rows[0]) and "clip_whole" not in rows[0]


def test_pie_bench_under_accelerate_launch_with_two_processes(pie_data, tiny_model_dir, tmp_path):
    import socket

    with socket.socket() as probe:  # a free port for the processes' rendezvous
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    out = tmp_path / "out"
    done = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
         "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
         "-m", "dit4edit", "pie-bench", "--data", str(pie_data), "-o", str(out), "--model", str(tiny_model_dir),
         "--steps", "2", "--inversion", "ddim", "--quiet", "--metrics", "psnr,mse,ssim"],
        capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    shards = [{row["id"] for row in batch.read_rows(out / "shards" / f"results-{rank:05d}.jsonl")} for rank in (0, 1)]
    assert shards[0] and shards[1] and not shards[0] & shards[1] and len(shards[0] | shards[1]) == 10
    rows = batch.read_rows(out / "results.jsonl")
    assert len(rows) == 10 and {row["id"] for row in rows} == shards[0] | shards[1]
    assert len(list((out / "annotation_images").rglob("*.jpg"))) == 10
    assert "processes: 2" in (out / "summary.md").read_text() and done.stdout.count("# PIE-Bench results") == 1


def test_pie_bench_runs_each_method_by_name(pie_data, metric_models, tiny_model_dir, tmp_path):
    outputs = {}
    for method in ("infedit", "sdedit", "masactrl"):
        out = tmp_path / method
        assert main(["pie-bench", "--data", str(pie_data), "-o", str(out), "--model", str(tiny_model_dir), "--steps",
                     "2", "--quiet", "--clip-model", str(metric_models / "clip"), "--dino-model",
                     str(metric_models / "vit"), "--method", method]) == 0
        rows = batch.read_rows(out / "results.jsonl")
        assert len(rows) == 10 and all(row["status"] == "ok" for row in rows)
        outputs[method] = np.asarray(Image.open(out / rows[0]["output"]), dtype=float)
    assert np.abs(outputs["infedit"] - outputs["sdedit"]).max() > 1  # the method was the one asked for
    assert np.abs(outputs["infedit"] - outputs["masactrl"]).max() > 1
