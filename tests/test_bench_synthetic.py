"""The synthetic editing benchmark: metrics, and a resumable run on the tiny model."""

from __future__ import annotations

import json

import numpy as np

from dit4edit import bench_synthetic as bench


def test_ssim_and_masked_psnr():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    assert bench.ssim(a, a) == 1.0
    def noisy(amount):
        return np.clip(a.astype(int) + rng.integers(-amount, amount + 1, a.shape), 0, 255).astype(np.uint8)

    assert 1.0 > bench.ssim(a, noisy(20)) > bench.ssim(a, noisy(80)) > bench.ssim(a, 255 - a)
    keep = np.zeros((32, 32), bool)
    keep[:, :16] = True
    b = a.copy()
    b[:, 16:] = 0  # differs only where keep is False
    assert bench.masked_psnr(a, b, keep) == float("inf")
    assert np.isfinite(bench.masked_psnr(a, b, ~keep))


def test_pairs_are_held_out_deterministic_and_cover_kinds():
    pairs = bench.make_pairs(10)
    again = bench.make_pairs(10)
    assert [p.target_caption for p in pairs] == [p.target_caption for p in again]
    assert {p.edit.kind for p in pairs} == {"colour", "shape", "pattern", "size", "background"}
    assert {(p.source.width, p.source.height) for p in pairs} == {(128, 128), (256, 128)}
    assert all(p.source.seed >= bench.HELD_OUT_SEED for p in pairs)


def test_ground_truth_scores_perfectly():
    pair = bench.make_pairs(1)[0]
    scores = bench.score(pair.target.pil(), pair, seconds=0.0)
    assert scores["psnr"] == float("inf") and scores["ssim"] == 1.0 and scores["success"]
    assert scores["background_psnr"] == float("inf")
    unchanged = bench.score(pair.source.pil(), pair, seconds=0.0)
    assert not unchanged["success"]


def test_run_resumes_without_repeating(tiny_pipe, tmp_path):
    summary = bench.run_editing(tiny_pipe, tmp_path, count=2, methods=["no-control", "sdedit-0.6"], steps=2,
                                grid_pairs=2, disable_progress=True)
    lines = (tmp_path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4 and set(summary) == {"no-control", "sdedit-0.6"}
    # a crash mid-line: the cut line is redone, the complete ones are kept
    (tmp_path / "results.jsonl").write_text("\n".join(lines[:3]) + '\n{"pair": 1, "meth')
    bench.run_editing(tiny_pipe, tmp_path, count=2, methods=["no-control", "sdedit-0.6"], steps=2,
                      grid_pairs=2, disable_progress=True)
    rows = [json.loads(l) for l in (tmp_path / "results.jsonl").read_text().splitlines() if l.endswith("}")]
    assert sorted((r["pair"], r["method"]) for r in rows) == sorted(
        (k, m) for k in range(2) for m in ("no-control", "sdedit-0.6"))
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "summary.md").read_text().count("| no-control |") >= 2
