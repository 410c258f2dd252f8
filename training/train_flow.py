"""A small SD3-architecture (MM-DiT, joint attention) rectified-flow model on the synthetic world, resumable.

Reuses the embedded PixArt model's VAE, T5 encoder and T5 tokenizer (`--base`, default src/dit4edit/models/shapes)
as the VAE and `text_encoder_3` / `tokenizer_3`, and builds the two CLIP text encoders StableDiffusion3Pipeline needs
locally: tiny `CLIPTextModelWithProjection`s with a CLIP BPE tokenizer trained on the caption grammar with the
`tokenizers` library. Text enters the transformer exactly as the pipeline forms it:

    prompt_embeds = cat([pad(cat(clip_1.hidden_states[-2], clip_2.hidden_states[-2]), to T5's width), t5(ids)], seq)
    pooled        = cat(clip_1.text_embeds, clip_2.text_embeds)

(CLIP padded to the tokenizers' `model_max_length`, `--clip-tokens`; T5 padded to `--t5-tokens` with no attention
mask, i.e. the pipeline called with `max_sequence_length=--t5-tokens`.) Loss: rectified flow, x_s = (1 - s) x0 + s eps,
the transformer (timestep 1000 s) predicts v = eps - x0, MSE (optionally more weight on latent pixels near objects);
s drawn logit-normal (or uniform) and shifted by `--shift`. Captions are dropped `--drop-caption` of the time (the
empty prompt, encoded as the pipeline encodes the negative prompt) for classifier-free guidance. EMA weights are kept.

Latents of `--scenes` training scenes (seeds 0..) are encoded once and cached in `--out`. Data and noise are drawn
per step from (seed, step), so a resumed run replays exactly the batches an uninterrupted one would. Rerun the same
command to continue from `--out/flow.ckpt`; `--stop-at` stops early (checkpoint saved) keeping the schedule of
`--steps`. At the end (or with `--export-only`) the EMA weights are saved as a StableDiffusion3Pipeline folder
(`--out/pipeline_ema`; float16 with `--fp16`).

    python training/train_flow.py --out /root/runs/flow-main --steps 8000 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import (AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel,
                       StableDiffusion3Pipeline)
from tqdm import tqdm
from transformers import CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel, T5Tokenizer

from common import LossLog, TimeBudget, draw_bucket, load_checkpoint, log, lr_at, save_checkpoint, setup
from train_dit import EMA, encode_latents, grammar_captions, object_weights, training_scenes

DEFAULT_BASE = Path(__file__).resolve().parents[1] / "src/dit4edit/models/shapes"


# --- text side -----------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP's byte-level alphabet, in byte order."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("\u00a1"), ord("\u00ac") + 1)) + \
        list(range(ord("\u00ae"), ord("\u00ff") + 1))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def train_clip_tokenizer(captions, max_length: int) -> CLIPTokenizer:
    """A CLIP BPE tokenizer built locally: `<|startoftext|>` 0, `<|endoftext|>` 1 (also pad and unknown), the 256
    byte-level characters and their word-final `</w>` forms (as CLIP's own vocabulary), then the merges of a
    deterministic byte-pair training on the words of `captions` (most frequent pair first, ties by the pair's text)
    until every word is one token. (The `tokenizers` library's trainer breaks ties differently from call to call, so
    a rebuilt run would get other token ids.)"""
    counts: dict = {}
    for caption in captions:
        for word in caption.lower().split():
            counts[word] = counts.get(word, 0) + 1
    words = {w: tuple(w[:-1]) + (w[-1] + "</w>",) for w in sorted(counts)}
    alphabet = _bytes_to_unicode()
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for token in alphabet + [c + "</w>" for c in alphabet]:
        vocab.setdefault(token, len(vocab))
    merges = []
    while True:
        pairs: dict = {}
        for w, symbols in words.items():
            for pair in zip(symbols, symbols[1:]):
                pairs[pair] = pairs.get(pair, 0) + counts[w]
        if not pairs:
            break
        best = min(pairs, key=lambda q: (-pairs[q], q))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        for w, symbols in words.items():
            out, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    out.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    out.append(symbols[i])
                    i += 1
            words[w] = tuple(out)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=max_length)


def build_clip(vocab_size: int, width: int, layers: int, max_tokens: int, projection: int) -> CLIPTextModelWithProjection:
    return CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=vocab_size, hidden_size=width, intermediate_size=4 * width, num_hidden_layers=layers,
        num_attention_heads=max(width // 32, 1), max_position_embeddings=max_tokens, projection_dim=projection,
        hidden_act="gelu", bos_token_id=0, eos_token_id=1, pad_token_id=1))


def build_transformer(width: int, layers: int, head_dim: int, joint_dim: int, pooled_dim: int,
                      qk_norm: str | None = "rms_norm", sample_size: int = 16, pos_max: int = 16) -> SD3Transformer2DModel:
    return SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=4, out_channels=4, num_layers=layers,
        attention_head_dim=head_dim, num_attention_heads=width // head_dim, joint_attention_dim=joint_dim,
        caption_projection_dim=width, pooled_projection_dim=pooled_dim, pos_embed_max_size=pos_max, qk_norm=qk_norm)


def tokenize_all(tokenizers, captions, t5_tokens: int):
    """Token ids (CLIP 1, CLIP 2, T5), padded and truncated exactly as StableDiffusion3Pipeline does."""
    tok1, tok2, tok3 = tokenizers
    ids1 = tok1(list(captions), padding="max_length", max_length=tok1.model_max_length, truncation=True,
                return_tensors="pt").input_ids
    ids2 = tok2(list(captions), padding="max_length", max_length=tok2.model_max_length, truncation=True,
                return_tensors="pt").input_ids
    ids3 = tok3(list(captions), padding="max_length", max_length=t5_tokens, truncation=True,
                add_special_tokens=True, return_tensors="pt").input_ids
    return ids1, ids2, ids3


def encode_text(clip1, clip2, t5, ids1, ids2, ids3, joint_dim: int, t5_grad: bool = True):
    """(prompt_embeds, pooled) as `StableDiffusion3Pipeline.encode_prompt` forms them (clip_skip None)."""
    o1 = clip1(ids1, output_hidden_states=True)
    o2 = clip2(ids2, output_hidden_states=True)
    clip = torch.cat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1)
    clip = F.pad(clip, (0, joint_dim - clip.shape[-1]))
    with torch.set_grad_enabled(t5_grad and torch.is_grad_enabled()):
        t5_out = t5(ids3)[0]
    return torch.cat([clip, t5_out], dim=-2), torch.cat([o1.text_embeds, o2.text_embeds], dim=-1)


# --- timesteps -----------------------------------------------------------------------------------------------------


def sample_sigmas(rng: np.random.Generator, n: int, mode: str, mean: float, std: float, shift: float) -> np.ndarray:
    """s in (0, 1): logit-normal(mean, std) or uniform, then SD3's shift s' = k s / (1 + (k - 1) s)."""
    if mode == "logit-normal":
        s = 1 / (1 + np.exp(-(mean + std * rng.standard_normal(n))))
    elif mode == "uniform":
        s = rng.random(n)
    else:
        raise ValueError(mode)
    s = shift * s / (1 + (shift - 1) * s)
    return np.clip(s, 1e-4, 1 - 1e-4)


# --- saving --------------------------------------------------------------------------------------------------------


def save_pipeline(folder: Path, parts: dict, tokenizers, vae_dir: Path, shift: float, fp16: bool) -> None:
    """A StableDiffusion3Pipeline folder: the given transformer / CLIPs / T5, the base VAE (shift_factor 0 set, which
    the pipeline needs), the tokenizers and a FlowMatchEulerDiscreteScheduler with `shift`."""
    dtype = torch.float16 if fp16 else torch.float32
    vae = AutoencoderKL.from_pretrained(vae_dir, torch_dtype=torch.float32, shift_factor=0.0)
    vae.register_to_config(_name_or_path="shapes/vae")

    def prep(m):
        return copy.deepcopy(m).to("cpu", dtype).eval()

    pipe = StableDiffusion3Pipeline(
        transformer=prep(parts["transformer"]),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift),
        vae=prep(vae), text_encoder=prep(parts["clip1"]), tokenizer=tokenizers[0],
        text_encoder_2=prep(parts["clip2"]), tokenizer_2=tokenizers[1],
        text_encoder_3=prep(parts["t5"]), tokenizer_3=tokenizers[2])
    pipe.save_pretrained(folder)
    # transformers loads a model in the dtype its config names, diffusers in float32: name float32 for the text
    # encoders too, so a plain `from_pretrained(folder)` runs in one dtype (their weights stay float16 on disk).
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        cfg_path = Path(folder) / name / "config.json"
        cfg = json.loads(cfg_path.read_text())
        if cfg.get("dtype") not in (None, "float32"):
            cfg["dtype"] = "float32"
            cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


# --- main ----------------------------------------------------------------------------------------------------------


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--base", type=Path, default=DEFAULT_BASE, help="folder with vae/, text_encoder/, tokenizer/ (T5)")
    p.add_argument("--steps", type=int, default=8000)
    p.add_argument("--batch", type=int, default=64, help="128x128 samples per step (non-square buckets: half)")
    p.add_argument("--nonsquare-share", type=float, default=0.2, help="share of steps on 256x128 / 128x256")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--text-lr-mult", type=float, default=1.0, help="learning-rate multiplier of the text encoders")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--drop-caption", type=float, default=0.1)
    p.add_argument("--object-weight", type=float, default=3.0, help="extra loss weight near objects (0 = off)")
    p.add_argument("--timesteps", choices=("logit-normal", "uniform"), default="logit-normal")
    p.add_argument("--logit-mean", type=float, default=0.0)
    p.add_argument("--logit-std", type=float, default=1.0)
    p.add_argument("--shift", type=float, default=1.0, help="shift of the training timesteps")
    p.add_argument("--sampler-shift", type=float, default=1.0, help="the exported scheduler's shift")
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=7)
    p.add_argument("--head-dim", type=int, default=32)
    p.add_argument("--qk-norm", default="rms_norm", help="'rms_norm' (SD3.5) or 'none' (SD3)")
    p.add_argument("--clip-width", type=int, default=64, help="each CLIP's width (both together <= T5's width)")
    p.add_argument("--clip-layers", type=int, default=3)
    p.add_argument("--clip-projection", type=int, default=64, help="each CLIP's projection (pooled = 2x this)")
    p.add_argument("--clip-tokens", type=int, default=20, help="CLIP tokenizers' model_max_length")
    p.add_argument("--t5-tokens", type=int, default=24, help="T5 length: the pipeline's max_sequence_length")
    p.add_argument("--freeze-t5", action="store_true", help="keep the base T5 fixed (default: trained with the rest)")
    p.add_argument("--scenes", type=int, default=8000, help="training scenes encoded once (seeds 0..)")
    p.add_argument("--workers", type=int, default=1, help="processes that render the training scenes")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds of training: --steps is set from the speed of steps 10-40 (logged; rerun with "
                        "that --steps to replay the run)")
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--ckpt-every", type=int, default=100)
    p.add_argument("--keep-every", type=int, default=0, help="also keep a copy of the EMA weights every N steps")
    p.add_argument("--stop-at", type=int, default=None, help="stop (checkpoint saved) at this step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--fp16", action="store_true", help="store the saved pipeline's weights as float16")
    p.add_argument("--export-only", type=Path, default=None,
                   help="save the checkpoint's EMA weights as a pipeline folder here and exit")
    p.add_argument("--snapshot", type=Path, default=None, help="with --export-only: export this ema_*.pt file")
    p.add_argument("--log-file", type=Path, default=None, help="also log to this file (default: --out/log.txt)")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


#: Arguments that fix the architecture (taken from the checkpoint by --export-only).
ARCHITECTURE = ("width", "layers", "head_dim", "qk_norm", "clip_width", "clip_layers", "clip_projection",
                "clip_tokens", "t5_tokens", "freeze_t5", "seed")


def build_tokenizers(args):
    tok_dir = args.out / "tokenizers"
    if (tok_dir / "clip").exists():
        clip_tok = CLIPTokenizer.from_pretrained(tok_dir / "clip")
    else:
        clip_tok = train_clip_tokenizer(grammar_captions() + ["and"], args.clip_tokens)
        clip_tok.save_pretrained(tok_dir / "clip")
    t5_tok = T5Tokenizer.from_pretrained(args.base / "tokenizer")
    return clip_tok, clip_tok, t5_tok


def build_models(args, clip_vocab: int):
    t5 = T5EncoderModel.from_pretrained(args.base / "text_encoder", torch_dtype=torch.float32)
    joint = t5.config.d_model
    if 2 * args.clip_width > joint:
        raise SystemExit(f"two CLIPs of width {args.clip_width} do not fit T5's width {joint}")
    torch.manual_seed(args.seed)
    clip1 = build_clip(clip_vocab, args.clip_width, args.clip_layers, args.clip_tokens, args.clip_projection)
    clip2 = build_clip(clip_vocab, args.clip_width, args.clip_layers, args.clip_tokens, args.clip_projection)
    qk = None if args.qk_norm in ("none", "") else args.qk_norm
    transformer = build_transformer(args.width, args.layers, args.head_dim, joint, 2 * args.clip_projection, qk)
    return {"transformer": transformer, "clip1": clip1, "clip2": clip2, "t5": t5}


def main(argv=None) -> int:
    args = parse(argv)
    device = setup(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    log.setLevel(logging.INFO)
    handler = None
    if not args.export_only:
        handler = logging.FileHandler(args.log_file or args.out / "log.txt")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    try:
        return run(args, device)
    finally:
        if handler is not None:
            log.removeHandler(handler)
            handler.close()


def run(args, device) -> int:
    log.info("train_flow %s", " ".join(f"--{k}={v}" for k, v in vars(args).items()))

    ckpt_path = args.out / "flow.ckpt"
    state = load_checkpoint(ckpt_path)
    if args.export_only and state is not None:  # the architecture the run was started with
        for key in ARCHITECTURE:
            setattr(args, key, state["args"][key])
    tokenizers = build_tokenizers(args)
    parts = build_models(args, len(tokenizers[0]))
    joint_dim = parts["t5"].config.d_model
    for k, m in parts.items():
        log.info("%s: %.3fM parameters", k, sum(q.numel() for q in m.parameters()) / 1e6)
    log.info("CLIP tokens: %s", tokenizers[0].tokenize("a large red circle and a small blue star on a beige background"))

    trained = {k: m for k, m in parts.items() if not (k == "t5" and args.freeze_t5)}
    ema = EMA(trained, args.ema)
    if state is not None:
        for k, m in parts.items():
            m.load_state_dict(state["parts"][k])
        for k in trained:
            ema.shadow[k].load_state_dict(state["ema"][k])
        if args.time_budget:
            args.steps = state["args"]["steps"]  # the schedule the budget fixed when the run started
    if args.export_only:
        if state is None:
            raise SystemExit(f"no checkpoint in {args.out}")
        if args.snapshot:  # a kept copy of the EMA weights (--keep-every) instead of the latest
            snap = torch.load(args.snapshot, map_location="cpu", weights_only=False)
            for k in trained:
                ema.shadow[k].load_state_dict(snap["ema"][k])
            state["step"] = snap["step"]
        weights = {**parts, **ema.shadow}
        save_pipeline(args.export_only, weights, tokenizers, args.base / "vae", args.sampler_shift, args.fp16)
        log.info("step %d EMA weights saved to %s", state["step"], args.export_only)
        return 0

    # Latent cache (VAE posterior modes x scaling factor) and object covers.
    cache, covers = args.out / f"latents_{args.scenes}.pt", args.out / f"covers_{args.scenes}.pt"
    if cache.exists() and covers.exists():
        data, weights_by_bucket = torch.load(cache, weights_only=False), torch.load(covers)
    else:
        t0 = time.time()
        vae = AutoencoderKL.from_pretrained(args.base / "vae", torch_dtype=torch.float32).to(device)
        scenes = training_scenes(args.scenes, args.workers)
        data, weights_by_bucket = encode_latents(vae, scenes, device), object_weights(scenes)
        torch.save(data, cache)
        torch.save(weights_by_bucket, covers)
        del scenes, vae
        log.info("rendered and encoded %d scenes in %.0fs", args.scenes, time.time() - t0)
    buckets = sorted(data)
    square = (128, 128)
    others = [b for b in buckets if b != square]
    ids_by_bucket = {b: tokenize_all(tokenizers, data[b][1], args.t5_tokens) for b in buckets}
    empty_ids = tokenize_all(tokenizers, [""], args.t5_tokens)

    for m in parts.values():
        m.to(device).train()
    if args.freeze_t5:
        parts["t5"].eval().requires_grad_(False)
    text_params = [q for k in ("clip1", "clip2", "t5") if k in trained for q in parts[k].parameters()]
    text_params += list(parts["transformer"].context_embedder.parameters())
    text_params += list(parts["transformer"].time_text_embed.text_embedder.parameters())
    text_ids = {id(q) for q in text_params}
    main_params = [q for q in parts["transformer"].parameters() if id(q) not in text_ids]
    opt = torch.optim.AdamW([{"params": main_params, "mult": 1.0}, {"params": text_params, "mult": args.text_lr_mult}],
                            lr=args.lr, weight_decay=0.01)
    start = 0
    if state is not None:
        opt.load_state_dict(state["opt"])
        start = state["step"]
        log.info("resumed from step %d", start)
    del state

    loss_log = LossLog(args.out / "flow_loss.jsonl")
    stop = args.stop_at or args.steps
    bar = tqdm(total=stop, initial=start, disable=args.no_progress)
    budget = TimeBudget(args, start, bar)
    t_begin = t_log = time.time()
    step, recent = start, []
    all_params = [q for m in trained.values() for q in m.parameters()]
    while step < stop:
        stop = budget.stop_at(step, stop)
        rng, bucket, batch = draw_bucket(args, step, square, others)
        latents_all = data[bucket][0]
        batch = min(batch, len(latents_all))
        idx = torch.from_numpy(rng.choice(len(latents_all), size=batch, replace=False))
        x0 = latents_all[idx].to(device)
        drop = torch.from_numpy(rng.random(batch) < args.drop_caption)
        ids = [torch.where(drop[:, None], e, i[idx]).to(device) for i, e in zip(ids_by_bucket[bucket], empty_ids)]
        sig = torch.from_numpy(sample_sigmas(rng, batch, args.timesteps, args.logit_mean, args.logit_std,
                                             args.shift)).float().to(device)
        gen = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        s = sig[:, None, None, None]
        xs = (1 - s) * x0 + s * noise
        target = noise - x0

        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup) * group["mult"]
        emb, pooled = encode_text(parts["clip1"], parts["clip2"], parts["t5"], *ids, joint_dim,
                                  t5_grad=not args.freeze_t5)
        v = parts["transformer"](hidden_states=xs, encoder_hidden_states=emb, pooled_projections=pooled,
                                 timestep=sig * 1000, return_dict=False)[0]
        if args.object_weight:
            w = 1.0 + args.object_weight * weights_by_bucket[bucket][idx].to(device)
        else:
            w = torch.ones_like(x0[:, :1])
        loss = ((v.float() - target) ** 2 * w).mean() / w.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(all_params, 1.0)
        opt.step()
        ema.update(trained, step)
        loss_log.write(step=step + 1, loss=loss.item(), grad_norm=float(grad_norm), bucket=list(bucket),
                       lr=opt.param_groups[0]["lr"])
        recent.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.4f}")
        bar.update(1)
        step += 1
        if step % args.ckpt_every == 0 or step == stop:
            save_checkpoint(ckpt_path, parts={k: m.state_dict() for k, m in parts.items()},
                            ema={k: m.state_dict() for k, m in ema.shadow.items()}, opt=opt.state_dict(),
                            step=step, args={k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()})
            if args.keep_every and step % args.keep_every == 0:
                torch.save({"step": step, "ema": {k: m.state_dict() for k, m in ema.shadow.items()}},
                           args.out / f"ema_{step:06d}.pt")
            now = time.time()
            log.info("step %d loss %.4f (mean of %d) lr %.2e, %.0f ms/step", step, float(np.mean(recent)),
                     len(recent), opt.param_groups[0]["lr"], 1e3 * (now - t_log) / max(len(recent), 1))
            recent, t_log = [], now
    bar.close()
    log.info("%d steps in %.0fs", step - start, time.time() - t_begin)
    if stop < args.steps:
        return 0
    save_pipeline(args.out / "pipeline_ema", {**parts, **ema.shadow}, tokenizers, args.base / "vae",
                  args.sampler_shift, args.fp16)
    log.info("saved %s", args.out / "pipeline_ema")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
