"""The PIE-Bench harness's own cost per image on the CPU: edit time vs metric time vs bookkeeping.

    OMP_NUM_THREADS=1 python benchmarks/bench_harness.py                 # 10 images at 512², embedded model
    OMP_NUM_THREADS=1 python benchmarks/bench_harness.py --images 4 --size 256 --steps 10

It writes a PIE-format data set (smooth random images, one per editing type, rectangular run-length masks), builds
the protocol's metric models with their real architectures and random weights (DINO ViT-B/8 and CLIP ViT-L/14:
weights do not change speed; no weights are downloaded), and runs `dit4edit pie-bench` on it in this process. From
the per-image rows it reports the edit's seconds (inversion + edit), the metrics' seconds (load the two images,
decode the mask, every metric), and what is left of the wall time per image: the harness's bookkeeping (saving,
results shard). A second table times each metric alone on one image pair (best of 3).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from dit4edit import metrics
from dit4edit.batch import read_rows
from dit4edit.cli import main


def smooth_image(side: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, size=(8, 8, 3)).astype(np.uint8)
    return Image.fromarray(small).resize((side, side), Image.BICUBIC)


def write_dataset(folder: Path, count: int, side: int) -> None:
    mapping = {}
    for k in range(count):
        key = f"{k % 10}{k:011d}"
        image_path = f"{k % 10}_type/{key}.jpg"
        (folder / "annotation_images" / image_path).parent.mkdir(parents=True, exist_ok=True)
        smooth_image(side, k).save(folder / "annotation_images" / image_path)
        start = (side // 4) * side + side // 4
        runs = [v for row in range(side // 2) for v in (start + row * side, side // 2)]
        mapping[key] = dict(image_path=image_path, original_prompt="a [red] circle on a white background",
                            editing_prompt="a [blue] circle on a white background", editing_instruction="",
                            editing_type_id=str(k % 10), blended_word="red blue", mask=runs)
    (folder / "mapping_file.json").write_text(json.dumps(mapping))


def write_metric_models(folder: Path) -> tuple[Path, Path]:
    """DINO ViT-B/8 and CLIP ViT-L/14 architectures with random weights, saved as --dino-model / --clip-model take
    them (the CLIP tokenizer is a character-level stand-in: prompt length barely matters to the cost)."""
    import string

    import transformers
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer, ViTConfig, ViTModel

    dino, clip = folder / "dino-vitb8", folder / "clip-vit-large-patch14"
    ViTModel(ViTConfig(patch_size=8, image_size=224)).save_pretrained(dino)  # ViT-B: 768 wide, 12 blocks
    letters = list(string.ascii_lowercase)
    vocab = {piece: n for n, piece in enumerate(letters + [c + "</w>" for c in letters])}
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(clip)
    config = CLIPConfig(
        text_config=dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                         num_attention_heads=12, max_position_embeddings=77, bos_token_id=len(vocab) - 2,
                         eos_token_id=len(vocab) - 1),
        vision_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                           image_size=224, patch_size=14),
        projection_dim=768,
    )
    CLIPModel(config).save_pretrained(clip)
    processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    processor().save_pretrained(clip)
    return dino, clip


def best_of(fn, rounds: int = 3) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main_bench() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--inversion", default="dpm")
    parser.add_argument("--model", default=None, help="default: the embedded model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_dataset(tmp / "pie", args.images, args.size)
        dino, clip = write_metric_models(tmp / "models")
        out = tmp / "out"
        command = ["pie-bench", "--data", str(tmp / "pie"), "-o", str(out), "--steps", str(args.steps),
                   "--inversion", args.inversion, "--dino-model", str(dino), "--clip-model", str(clip), "--quiet"]
        if args.model:
            command += ["--model", args.model]
        start = time.perf_counter()
        code = main(command)
        wall = time.perf_counter() - start
        if code != 0:
            sys.exit(code)
        rows = read_rows(out / "results.jsonl")
        edit = statistics.mean(row["seconds"] for row in rows)
        scoring = statistics.mean(row["metric_seconds"] for row in rows)
        per_image = wall / len(rows)

        # each metric alone on one pair
        first = rows[0]
        source = Image.open(tmp / "pie" / "annotation_images" / first["output"].split("/", 1)[1]).convert("RGB")
        edited = Image.open(out / first["output"]).convert("RGB")
        mask = metrics.decode_mask(json.loads((tmp / "pie" / "mapping_file.json").read_text())[first["id"]]["mask"],
                                   (args.size, args.size))
        src, tgt = metrics.unedited(metrics.to_unit(source), mask), metrics.unedited(metrics.to_unit(edited), mask)
        structure = metrics.StructureDistance.from_pretrained(str(dino))
        score = metrics.ClipScore.from_pretrained(str(clip))
        alone = {
            "mask decode": best_of(lambda: metrics.decode_mask(
                json.loads((tmp / "pie" / "mapping_file.json").read_text())[first["id"]]["mask"],
                (args.size, args.size))),
            "PSNR + MSE": best_of(lambda: (metrics.psnr(tgt, src), metrics.mse(tgt, src))),
            "SSIM": best_of(lambda: metrics.ssim(tgt, src)),
            "structure distance (ViT-B/8, 2 forwards)": best_of(lambda: structure(source, edited)),
            "CLIP whole (ViT-L/14)": best_of(lambda: score(edited, "a blue circle on a white background")),
            "CLIP edited (ViT-L/14)": best_of(lambda: score(metrics.masked_uint8(edited, mask),
                                                            "a blue circle on a white background")),
        }
    print(f"# PIE-Bench harness cost per image ({platform.machine()}, {torch.get_num_threads()} thread, "
          f"{len(rows)} images at {args.size}x{args.size}, {args.model or 'embedded model'}, {args.steps} steps, {args.inversion})\n")
    print("| part | s / image | share |\n|---|---|---|")
    for name, seconds in [("edit (inversion + edit)", edit), ("metrics (all)", scoring),
                          ("bookkeeping (save, results shard, load)", per_image - edit - scoring),
                          ("wall", per_image)]:
        print(f"| {name} | {seconds:.2f} | {100 * seconds / per_image:.0f}% |")
    print("\n| metric alone (one pair, best of 3) | s |\n|---|---|")
    for name, seconds in alone.items():
        print(f"| {name} | {seconds:.3f} |")


if __name__ == "__main__":
    main_bench()
