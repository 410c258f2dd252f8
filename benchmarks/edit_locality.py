"""Does a one-word prompt change stay where the edit is? Diagnostics of a model's editability, and three ways of
confining an edit that need no user mask, on the synthetic benchmark's held-out pairs.

Not a test. Diagnostics (`--diagnose`), per pair:
- text leakage: how far the T5 embedding of each *unchanged* token moves when one word of the prompt changes
  (relative L2 change; T5 is bidirectional, so every token sees the edited word);
- output locality: mean absolute pixel change (output vs input) inside the edited region over that outside it, for an
  edit without attention control (1 = the change is spread evenly over the picture);
- cross-attention mask: the share of the picture that Prompt-to-Prompt's local-blend mask of the changed words
  covers, and its overlap (IoU) with the edited region; with the maps max-normalised (Prompt-to-Prompt's) and
  min-max normalised (`_minmax`).

Sweep (`--sweep`): DiT4Edit's default control and no control, each plain and with one of
- `anchored`: the target prompt's T5 embeddings take the source's at every unchanged token;
- `word-blend`: Prompt-to-Prompt local blend on the changed words (cross-attention maps);
- `latent-blend`: a DiffEdit-like mask from where the target latent departs from the source latent (accumulated
  over the steps after the first 20%, max-normalised, thresholded at 0.3, dilated by one latent pixel);
at the model's guidance and above. Results resume from `rows.jsonl`.

    python benchmarks/edit_locality.py -o benchmarks/results/edit-locality --pairs 24 --diagnose --sweep
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from dit4edit.control import AttentionControl
from dit4edit.control.controller import AttentionController
from dit4edit.pipeline import DiT4EditPipeline, default_model
from dit4edit_research.bench_synthetic import make_pairs, score


def changed_words(source: str, target: str) -> tuple[str, ...]:
    a, b = source.split(), target.split()
    return tuple(sorted((set(a) - set(b)) | (set(b) - set(a))))


def unchanged_tokens(pipe, prompts) -> torch.Tensor:
    """(B, L) bool: tokens of each prompt equal to the source prompt's (row 0) at the same position, when both have
    the same token count (every benchmark edit swaps one word for one word); all False otherwise."""
    tokens = pipe.tokenizer(list(prompts), max_length=pipe.max_sequence_length, padding="max_length",
                            truncation=True, return_tensors="pt")
    ids, mask = tokens.input_ids, tokens.attention_mask.bool()
    same = (ids == ids[:1]) & mask & mask[:1]
    same[mask.sum(1) != mask[0].sum()] = False
    same[0] = False
    return same


@contextlib.contextmanager
def anchored_text(pipe):
    """While inside, every prompt batch is encoded with the unchanged tokens of rows 1.. set to row 0's embeddings."""
    encode = pipe.encode_prompt

    def anchored(prompts):
        embeds, mask = encode(prompts)
        same = unchanged_tokens(pipe, prompts).to(embeds.device)
        if len(prompts) > 1 and same.any():
            embeds = torch.where(same[..., None], embeds[:1].expand_as(embeds), embeds)
        return embeds, mask

    pipe.encode_prompt = anchored
    try:
        yield
    finally:
        del pipe.encode_prompt  # the instance attribute goes; the class method shows again


@contextlib.contextmanager
def latent_blend(start: float = 0.2, threshold: float = 0.3, dilate: int = 1):
    """While inside, a controller's local blend keeps the source outside a mask made from the latents' departure."""
    accumulated: dict[int, torch.Tensor] = {}

    def blend(self, latents, step_index):
        if step_index < int(start * self.num_steps):
            return latents
        out = latents.clone()
        source = latents[0]
        for branch in range(1, latents.shape[0]):
            departure = (latents[branch] - source).abs().mean(0)[None, None]  # (1, 1, h, w)
            departure = F.avg_pool2d(departure, 3, 1, 1)
            acc = accumulated.setdefault(branch, torch.zeros_like(departure))
            acc += departure / departure.max().clamp_min(1e-8)
            mask = (acc / acc.max().clamp_min(1e-8) > threshold).float()
            mask = F.max_pool2d(mask, 2 * dilate + 1, 1, dilate) if dilate else mask
            out[branch] = source + mask[0] * (latents[branch] - source)
        return out

    original = AttentionController.local_blend
    AttentionController.local_blend = blend
    try:
        yield
    finally:
        AttentionController.local_blend = original


def diagnose(pipe, pairs, guidance: float) -> dict:
    leak, locality = [], []
    cover, iou = {"max": [], "minmax": []}, {"max": [], "minmax": []}
    for pair in pairs:
        prompts = [pair.source_caption, pair.target_caption]
        embeds, _ = pipe.encode_prompt(prompts)
        same = unchanged_tokens(pipe, prompts)[1]
        if same.any():
            moved = (embeds[1] - embeds[0]).norm(dim=-1) / embeds[0].norm(dim=-1)  # (L,)
            leak += moved[same.to(moved.device)].tolist()
        inversion = pipe.invert(pair.source.pil(), pair.source_caption, 30, guidance, "dpm", disable_progress=True)
        plain = pipe.edit(inversion, pair.target_caption, guidance, control=None, disable_progress=True).images[0]
        change = np.abs(np.asarray(plain, np.float64) - pair.source.image.astype(np.float64)).mean(-1)  # (H, W)
        locality.append(change[pair.region].mean() / max(change[~pair.region].mean(), 1e-6))
        words = changed_words(*prompts)
        for normalize in cover:
            control = AttentionControl(local_blend_words=words, local_blend_normalize=normalize)
            result = pipe.edit(inversion, pair.target_caption, guidance, control=control, disable_progress=True)
            mask = result.controller.blend_mask(inversion.num_inference_steps - 1)
            mask = F.interpolate(mask[None, None], size=pair.region.shape, mode="nearest")[0, 0].numpy() > 0.5
            cover[normalize].append(mask.mean())
            iou[normalize].append((mask & pair.region).sum() / max((mask | pair.region).sum(), 1))
    stats = lambda v: {"mean": float(np.mean(v)), "median": float(np.median(v)), "max": float(np.max(v))}  # noqa: E731
    return {"unchanged_token_shift": stats(leak), "inside_over_outside_change": stats(locality),
            "word_mask_coverage": stats(cover["max"]), "word_mask_iou": stats(iou["max"]),
            "word_mask_coverage_minmax": stats(cover["minmax"]), "word_mask_iou_minmax": stats(iou["minmax"]),
            "pairs": len(pairs)}


def sweep_variants(guidance: float) -> dict:
    """{name: (edit guidance, control or None, how)}."""
    variants = {}
    for g in sorted({guidance, guidance + 1.0, 4.5}):
        for ctl_name, ctl in (("control", {}), ("no-control", None)):
            for how in ("plain", "anchored", "word-blend", "latent-blend"):
                if ctl is None and how in ("word-blend", "latent-blend"):
                    ctl_used = {"enabled": False}  # a controller must exist to blend; attention stays default
                else:
                    ctl_used = ctl
                variants[f"{ctl_name}-{how}-g{g:g}"] = (g, ctl_used, how)
    return variants


def run_sweep(pipe, pairs, guidance: float, out: Path, only=None) -> list[str]:
    variants = sweep_variants(guidance)
    if only:
        variants = {k: v for k, v in variants.items() if k in only}
    log = out / "rows.jsonl"
    done = {(r["pair"], r["variant"]) for r in map(json.loads, log.read_text().splitlines())} if log.exists() else set()
    with log.open("a") as f:
        for k, pair in enumerate(pairs):
            todo = [name for name in variants if (k, name) not in done]
            if not todo:
                continue
            inversion = pipe.invert(pair.source.pil(), pair.source_caption, 30, guidance, "dpm",
                                    disable_progress=True)
            for name in todo:
                g, ctl, how = variants[name]
                words = changed_words(pair.source_caption, pair.target_caption) if how == "word-blend" else ()
                control = None if ctl is None else AttentionControl(**ctl, local_blend_words=words)
                scope = {"anchored": lambda: anchored_text(pipe), "latent-blend": latent_blend}.get(
                    how, contextlib.nullcontext)
                start = time.perf_counter()
                with scope():
                    image = pipe.edit(inversion, pair.target_caption, g, control=control,
                                      disable_progress=True).images[0]
                f.write(json.dumps(dict(pair=k, variant=name, kind=pair.edit.kind,
                                        **score(image, pair, time.perf_counter() - start))) + "\n")
                f.flush()
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    lines = ["| variant | n | success | background PSNR (all) | background PSNR (object edits) | PSNR vs truth | "
             "colour | shape | size | background |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name in variants:
        mine = [r for r in rows if r["variant"] == name]
        if not mine:
            continue
        kinds = defaultdict(list)
        for r in mine:
            kinds[r["kind"]].append(r["success"])
        finite = [r for r in mine if math.isfinite(r["background_psnr"])]
        objects = [r["background_psnr"] for r in finite if r["kind"] != "background"]
        lines.append(f"| {name} | {len(mine)} | {100 * np.mean([r['success'] for r in mine]):.0f}% | "
                     f"{np.mean([r['background_psnr'] for r in finite]):.2f} | {np.mean(objects):.2f} | "
                     f"{np.mean([r['psnr'] for r in mine]):.2f} | "
                     + " | ".join(f"{100 * np.mean(kinds[k]):.0f}%" if kinds[k] else "-"
                                  for k in ("colour", "shape", "size", "background")) + " |")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("-o", "--output", type=Path, required=True)
    p.add_argument("--model", default=None, help="model folder (default: the embedded model)")
    p.add_argument("--pairs", type=int, default=24)
    p.add_argument("--guidance", type=float, default=None, help="default: the model's (its dit4edit.json)")
    p.add_argument("--diagnose", action="store_true")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--only", default=None, help="comma-separated subset of the sweep's variants")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    pipe = DiT4EditPipeline.from_pretrained(args.model or default_model())
    pipe.set_progress_bar_config(disable=True)
    guidance = pipe.defaults.guidance_scale if args.guidance is None else args.guidance
    pairs = make_pairs(args.pairs)
    args.output.mkdir(parents=True, exist_ok=True)
    text = [f"# Edit locality: {args.pairs} held-out pairs, model {args.model or 'embedded'}, guidance {guidance:g}, "
            "naive 2M inversion, 30 steps\n"]
    if args.diagnose:
        found = diagnose(pipe, pairs, guidance)
        (args.output / "diagnostics.json").write_text(json.dumps(found, indent=1))
        text += ["| diagnostic | mean | median | max |", "|---|---:|---:|---:|"]
        text += [f"| {k} | {v['mean']:.3f} | {v['median']:.3f} | {v['max']:.3f} |"
                 for k, v in found.items() if isinstance(v, dict)]
        text.append("")
    if args.sweep:
        text += run_sweep(pipe, pairs, guidance, args.output, args.only.split(",") if args.only else None)
    (args.output / "summary.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    sys.exit(main())
