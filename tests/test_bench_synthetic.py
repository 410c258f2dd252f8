"""The synthetic editing benchmark: metrics, and a resumable run on the tiny model."""

from __future__ import annotations

import json

import numpy as np
import torch

from dit4edit_research import bench_synthetic as bench


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
    assert {p.edit.kind for p in pairs} == set(bench.world.EDIT_KINDS)
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


def test_a_sweep_run_in_several_calls_summarises_every_variant_done_on_all_pairs(tiny_pipe, tmp_path):
    run = dict(steps=2, grid_pairs=0, disable_progress=True)
    bench.run_editing(tiny_pipe, tmp_path, count=2, methods=["no-control"], **run)
    bench.run_editing(tiny_pipe, tmp_path, count=1, methods=["cross-only"], **run)  # not on both pairs
    summary = bench.run_editing(tiny_pipe, tmp_path, count=2, methods=["sdedit-0.6"], keep_earlier=True, **run)
    assert list(summary) == ["sdedit-0.6", "no-control"]
    assert "| no-control | all |" in (tmp_path / "summary.md").read_text()
    alone = bench.run_editing(tiny_pipe, tmp_path, count=2, methods=["sdedit-0.6"], **run)
    assert list(alone) == ["sdedit-0.6"]  # without keep_earlier: only the methods asked for


def test_custom_methods_and_merging_reach_the_edit(tiny_pipe, tmp_path):
    from dit4edit.merging import MergeConfig

    available = {
        "plain": bench.Method("plain", inversion="dpm", control=None),
        "no-merge": bench.Method("no-merge", inversion="dpm", control=None, merge=None),
        "merged": bench.Method("merged", inversion="dpm", control=None, merge=MergeConfig(ratio=0.5, min_tokens=0)),
        "controlled": bench.Method("controlled", inversion="dpm"),
        "3-rows": bench.Method("3-rows", inversion="dpm", rows=3),
    }
    bench.run_editing(tiny_pipe, tmp_path, count=1, steps=2, grid_pairs=0, disable_progress=True,
                      available=available)
    psnr = {r["method"]: r["psnr"] for r in map(json.loads, (tmp_path / "results.jsonl").read_text().splitlines())}
    assert set(psnr) == set(available)
    assert psnr["plain"] == psnr["no-merge"]  # the default config never merges grids this small
    assert psnr["merged"] != psnr["plain"]
    assert psnr["3-rows"] != psnr["controlled"]  # 3 rows: the target's unconditional row runs without control


class GroundTruthPipe:
    """Stands in for a perfect generator: returns the held-out scene its caption was written for."""

    def __init__(self, scenes):
        self.scenes = {(scene.caption, scene.width, scene.height): scene for scene in scenes}
        self.prompts = []

    def generate(self, prompt, height, width, steps, guidance, generator=None, disable_progress=None):
        scene = self.scenes[prompt, width, height]  # captions repeat across canvases: the size tells them apart
        self.prompts.append((prompt, width, height))
        return scene.pil(), None


def test_held_out_scenes_are_deterministic_and_cover_the_canvases():
    scenes = bench.held_out_scenes(10)
    assert [s.caption for s in scenes] == [s.caption for s in bench.held_out_scenes(10)]
    assert all(s.seed >= bench.HELD_OUT_SEED for s in scenes)
    assert {(s.width, s.height) for s in scenes} == {(128, 128), (256, 128), (128, 256)}


def test_caption_hits_miss_what_is_not_there():
    from dit4edit_research import synthetic as world

    scene = next(s for s in bench.held_out_scenes(20) if len(s.objects) == 2)
    blank = np.full_like(scene.image, world.BACKGROUNDS[scene.background])
    hits = world.caption_hits(world.oracle(blank), scene)
    assert hits["background"] and not hits["count"]
    assert hits["colour"] == [False, False] and hits["shape"] == [False, False]
    swapped = np.ascontiguousarray(scene.image[:, ::-1])  # mirrored: the objects' left-to-right order is reversed
    hits = world.caption_hits(world.oracle(swapped), scene)
    assert hits["count"] and all(hits["colour_any"]) and all(hits["shape_any"])


def test_generation_scores_ground_truth_perfectly_and_resumes(tmp_path):
    pipe = GroundTruthPipe(bench.held_out_scenes(10))
    bench.run_generation(pipe, tmp_path, count=6, disable_progress=True)
    log = tmp_path / "generation.jsonl"
    lines = log.read_text().splitlines()
    log.write_text("\n".join(lines[:5]) + '\n{"scene": 5, "si')  # a crash mid-line: scene 5 is redone
    summary = bench.run_generation(pipe, tmp_path, count=10, disable_progress=True)
    assert len(pipe.prompts) == 6 + 5 and len(set(pipe.prompts)) == 10
    assert summary["n"] == 10 and summary["items"]["colour"] == sum(
        len(s.objects) for s in bench.held_out_scenes(10))
    assert all(value == 1.0 for value in summary["accuracy"].values() if value is not None)
    assert summary["accuracy"]["colour"] == summary["accuracy"]["shape"] == summary["accuracy"]["background"] == 1.0
    assert set(summary["accuracy_by_canvas"]) == {"128x128", "256x128", "128x256"}
    markdown = (tmp_path / "summary.md").read_text()
    assert "## Generation check" in markdown and "| colour | 100.0% |" in markdown and "90% met" in markdown
    assert "## Editing" not in markdown and (tmp_path / "generation.png").is_file()


def test_reconstruction_exact_beats_naive_and_resumes(tiny_pipe, tmp_path):
    first = bench.run_reconstruction(tiny_pipe, tmp_path, count=1, methods=["dpm-exact", "dpm"], steps=4,
                                     disable_progress=True)
    exact, naive = first["methods"]["dpm-exact"], first["methods"]["dpm"]
    assert exact["latent_nmse"] < 1e-3 * naive["latent_nmse"] and exact["nfe"] > naive["nfe"] == 4
    assert exact["gap"] < naive["gap"] and first["target"]["met"] is not None
    rows = [json.loads(line) for line in (tmp_path / "reconstruction.jsonl").read_text().splitlines()]
    again = bench.run_reconstruction(tiny_pipe, tmp_path, count=1, methods=["dpm-exact", "dpm", "ddim"], steps=4,
                                     disable_progress=True)
    more = [json.loads(line) for line in (tmp_path / "reconstruction.jsonl").read_text().splitlines()]
    assert more[:2] == rows and [r["method"] for r in more[2:]] == ["ddim"]  # only the new method ran
    assert list(again["methods"]) == ["dpm-exact", "dpm", "ddim"]
    assert "| dpm-exact | 1 |" in (tmp_path / "summary.md").read_text()


def test_cli_runs_the_sections_asked_for(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "bench"
    code = bench.main(["--model", str(tiny_model_dir), "-o", str(out), "--sections",
                 "generation,reconstruction", "--generation-n", "2", "--generation-steps", "2",
                 "--reconstruction-n", "1", "--reconstruction-methods", "dpm,ddim", "--steps", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "## Generation check" in printed and "## Reconstruction" in printed and "## Editing" not in printed
    assert {p.name for p in out.iterdir()} >= {"generation.jsonl", "generation.json", "generation.png",
                                                 "reconstruction.jsonl", "reconstruction.json", "summary.md"}
    assert not (out / "results.jsonl").exists()
    assert json.loads((out / "generation.json").read_text())["steps"] == 2
    assert list(json.loads((out / "reconstruction.json").read_text())["methods"]) == ["dpm", "ddim"]
    assert (out / "summary.md").read_text().count("## ") == 2
    for bad in (["--sections", "editing,bogus"], ["--reconstruction-methods", "dpm,nope"], ["--generation-n", "0"]):
        assert bench.main(["--model", str(tiny_model_dir), "-o", str(out), *bad]) == 2
    assert "dit4edit-bench: error:" in capsys.readouterr().err


def test_rows_are_keyed_by_their_settings(tiny_pipe, tmp_path, monkeypatch):
    """A rerun with other steps, guidance, model or model control computes its own rows and summarises only those."""
    from dit4edit.model_folder import ModelDefaults

    run = dict(count=1, methods=["no-control"], grid_pairs=0, disable_progress=True)
    bench.run_editing(tiny_pipe, tmp_path, steps=2, **run)
    bench.run_editing(tiny_pipe, tmp_path, steps=2, **run)  # same settings: resumed, nothing added
    bench.run_editing(tiny_pipe, tmp_path, steps=3, guidance=2.0, **run)
    monkeypatch.setattr(tiny_pipe, "defaults", ModelDefaults(control={"self_replace_steps": 1.0}))
    bench.run_editing(tiny_pipe, tmp_path, steps=3, guidance=2.0, **run)  # the model's control changed: redone
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert [(r["steps"], r["guidance"]) for r in rows] == [(2, 4.5), (3, 2.0), (3, 2.0)]
    assert [r["model_control"] for r in rows] == [None, None, {"self_replace_steps": 1.0}]
    assert all("model" in r for r in rows)
    first = next(iter(tiny_pipe.transformer.parameters()))  # new weights in the same model folder: redone too
    kept = first.detach().clone()
    try:
        with torch.no_grad():
            first.add_(1.0)
        bench.run_editing(tiny_pipe, tmp_path, steps=3, guidance=2.0, **run)
    finally:
        with torch.no_grad():
            first.copy_(kept)
    rows = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and rows[3]["weights"] != rows[2]["weights"] and rows[3]["model"] == rows[2]["model"]
    pipe = GroundTruthPipe(bench.held_out_scenes(2))
    bench.run_generation(pipe, tmp_path, count=2, steps=5, disable_progress=True)
    summary = bench.run_generation(pipe, tmp_path, count=2, steps=6, disable_progress=True)
    assert len(pipe.prompts) == 4 and summary["n"] == 2 and summary["steps"] == 6


def test_the_paper_methods_run_on_the_same_pairs_and_report_their_model_evaluations(tiny_pipe, tmp_path):
    summary = bench.run_editing(tiny_pipe, tmp_path, count=1, methods=list(bench.PAPER_METHODS), steps=2,
                                grid_pairs=0, disable_progress=True, inversion="ddim")
    assert list(summary) == list(bench.PAPER_METHODS)
    nfe = {name: summary[name]["all"]["nfe"] for name in summary}
    assert nfe["infedit"] == 2 and nfe["sdedit"] == 1  # no inversion; SDEdit's 0.6 of 2 steps
    assert nfe["p2p"] == nfe["dit4edit"] == 4 and nfe["pix2pix-zero"] == 6  # naive DDIM inversion: 2 + 2
