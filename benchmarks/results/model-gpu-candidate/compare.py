"""Shipped model vs the GPU-trained candidate on the same 40 held-out editing pairs (naive 2M inversion).

    python benchmarks/results/model-gpu-candidate/compare.py
"""
import json
from pathlib import Path

HERE = Path(__file__).parent
rows = {}
for model in ("shipped", "gpu-candidate"):
    for line in (HERE / f"{model}-results.jsonl").read_text().splitlines():
        if line.endswith("}"):
            r = json.loads(line)
            rows[(model, r["pair"], r["method"])] = r
print("| method | model | n | PSNR vs truth | SSIM | background PSNR | success | s / edit |")
print("|---|---|---:|---:|---:|---:|---:|---:|")
for method in ("dit4edit", "no-control"):
    pairs = sorted({p for (m, p, k) in rows if k == method and m == "shipped"}
                   & {p for (m, p, k) in rows if k == method and m == "gpu-candidate"})
    for model in ("shipped", "gpu-candidate"):
        rs = [rows[(model, p, method)] for p in pairs]
        mean = lambda key: sum(min(r[key], 60.0) for r in rs) / len(rs)  # identical images: PSNR capped at 60
        print(f"| {method} | {model} | {len(rs)} | {mean('psnr'):.2f} | {mean('ssim'):.3f} | "
              f"{mean('background_psnr'):.2f} | {100 * mean('success'):.0f}% | {mean('seconds'):.2f} |")
