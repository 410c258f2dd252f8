"""Image-editing metrics as the PIE-Bench protocol computes them (PnPInversion's evaluation code).

- `decode_mask`: the benchmark's run-length mask (0-indexed starts, one-pixel border set to 1).
- `psnr`, `mse`, `ssim` on images in [0, 1] (data range 1), as computed there on the unedited part: both images
  multiplied by `1 - mask`, statistics over the whole array, zeros included (`unedited`).
- `StructureDistance`: DINO ViT self-similarity of the last block's keys, MSE between source and edit.
- `ClipScore`: 100 x cosine between CLIP image and text embeddings, floored at 0 (whole or masked image).
- `Lpips`: LPIPS with the SqueezeNet backbone on inputs in [-1, 1]; needs the `lpips` package and torchvision.

Metric models load with transformers from a local folder or hub id; the caller decides what to do when one is
missing (`load_metric` turns the failure into a one-line reason). Ask `hub_offline` once per run and load with
`local_files_only=True` when it gives a reason: otherwise each missing file is retried for tens of seconds.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

#: Hub ids of the protocol's metric models.
DINO_MODEL = "facebook/dino-vitb8"
CLIP_MODEL = "openai/clip-vit-large-patch14"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


# --- masks and pixel metrics -----------------------------------------------------------------------------------


def decode_mask(rle: Sequence[int], shape: tuple[int, int] = (512, 512)) -> np.ndarray:
    """(H, W) float32 0/1 mask from flat (start, length) pairs over the row-major array, starts 0-indexed, runs
    clipped at the end; then the one-pixel border is set to 1, as the benchmark's decoder does."""
    height, width = shape
    total = height * width
    if len(rle) % 2:
        raise ValueError(f"a run-length mask has (start, length) pairs; got {len(rle)} numbers")
    flat = np.zeros(total, dtype=np.float32)
    for start, length in zip(rle[0::2], rle[1::2]):
        start, length = int(start), int(length)
        if not 0 <= start < total or length < 0:
            raise ValueError(f"run ({start}, {length}) is outside a {height}x{width} mask")
        flat[start : start + min(length, total - start)] = 1.0
    mask = flat.reshape(height, width)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = 1.0
    return mask


def to_unit(image: Image.Image | np.ndarray) -> np.ndarray:
    """(H, W, 3) float64 in [0, 1] from an RGB image or uint8 array."""
    return np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float64) / 255.0


def unedited(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The image (H, W, 3) in [0, 1] with the edited region (mask 1) zeroed: `image * (1 - mask)`."""
    return image * (1.0 - mask)[..., None]


def mse(a: np.ndarray, b: np.ndarray) -> float:
    """Mean squared error over every element."""
    return float(np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2))


def psnr(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over every element (inf for identical arrays)."""
    error = mse(a, b)
    return math.inf if error == 0 else 10.0 * math.log10(data_range**2 / error)


def gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Normalised 1-D Gaussian taps centred on the middle one."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    taps = np.exp(-0.5 * (x / sigma) ** 2)
    return taps / taps.sum()


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0, size: int = 11, sigma: float = 1.5,
         sample_covariance: bool = False) -> float:
    """Mean SSIM (Wang et al. 2004) of two (H, W, C) arrays, channels averaged: Gaussian-weighted local statistics
    (11 taps, sigma 1.5), K1 0.01, K2 0.03, averaged over the positions where the window lies inside the image.

    This is the benchmark's evaluation, torchmetrics' `StructuralSimilarityIndexMeasure(data_range=1.0)`, as
    torchmetrics computed it before version 1.5.0 (windows inside the image only). From 1.5.0 torchmetrics averages
    over every pixel, the windows at the border reaching into a reflection of the image, and gives other scores.
    It is also scikit-image's `structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
    data_range=1, channel_axis=-1)`; `sample_covariance=True` gives scikit-image's default (variances x N/(N-1))."""
    x, y = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if x.shape != y.shape or x.ndim != 3:
        raise ValueError(f"ssim takes two (H, W, C) arrays of one shape, got {x.shape} and {y.shape}")
    if min(x.shape[:2]) < size:
        raise ValueError(f"ssim needs images of at least {size}x{size} pixels, got {x.shape[1]}x{x.shape[0]}")
    taps = gaussian_window(size, sigma)

    def local_mean(z: np.ndarray) -> np.ndarray:  # (H, W, C) -> (H - size + 1, W - size + 1, C)
        rows = sum(t * z[k : k + z.shape[0] - size + 1] for k, t in enumerate(taps))
        return sum(t * rows[:, k : k + z.shape[1] - size + 1] for k, t in enumerate(taps))

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    norm = size * size / (size * size - 1) if sample_covariance else 1.0
    mx, my = local_mean(x), local_mean(y)
    vx = norm * (local_mean(x * x) - mx * mx)
    vy = norm * (local_mean(y * y) - my * my)
    cov = norm * (local_mean(x * y) - mx * my)
    s = ((2 * mx * my + c1) * (2 * cov + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2))
    return float(s.mean())


# --- model-based metrics ---------------------------------------------------------------------------------------


def _last_key_projection(model: torch.nn.Module) -> torch.nn.Module:
    """The key projection of a ViT's last block, found by name (`k_proj` or `key`, the last in module order)."""
    keys = [module for name, module in model.named_modules()
            if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in ("k_proj", "key")]
    if not keys:
        raise ValueError(f"{type(model).__name__} has no key projection named k_proj or key")
    return keys[-1]


class StructureDistance:
    """Structure distance (Tumanyan et al., Splice): the cosine self-similarity matrix of the keys of a DINO ViT's
    last block, for the source and the edited image; the metric is the MSE between the two matrices.

    Preprocessing follows the benchmark's code: the image as float values in 0-255 (not divided by 255), resized
    bilinearly (no antialiasing) so its shorter side is 224 (longer side at most 480), then normalised with the
    ImageNet mean and std (a quirk of the reference that sets the metric's scale; kept so numbers compare)."""

    def __init__(self, model: torch.nn.Module, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.device = torch.device(device)
        self.key = _last_key_projection(model)
        accepts = inspect.signature(model.forward).parameters
        self.forward_kwargs = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in accepts else {}

    @classmethod
    def from_pretrained(cls, name: str = DINO_MODEL, device: str | torch.device = "cpu",
                        local_files_only: bool = False) -> StructureDistance:
        from transformers import AutoModel  # deferred: transformers is heavy and only model-based metrics need it

        return cls(AutoModel.from_pretrained(name, dtype=torch.float32, local_files_only=local_files_only), device)

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        pixels = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32)).permute(2, 0, 1)  # (3, H, W)
        height, width = pixels.shape[1:]
        short, long = min(height, width), max(height, width)
        new_short, new_long = 224, int(224 * long / short)
        if new_long > 480:
            new_short, new_long = int(480 * short / long), 480
        size = (new_short, new_long) if height <= width else (new_long, new_short)
        pixels = F.interpolate(pixels[None], size=size, mode="bilinear", align_corners=False, antialias=False)
        mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        return ((pixels - mean) / std).to(self.device)  # (1, 3, h, w)

    @torch.no_grad()
    def self_similarity(self, image: Image.Image) -> torch.Tensor:
        """(T, T) cosine similarity of the last block's keys (all tokens, class token included)."""
        captured = []
        handle = self.key.register_forward_hook(lambda module, inputs, output: captured.append(output))
        try:
            self.model(pixel_values=self.preprocess(image), **self.forward_kwargs)
        finally:
            handle.remove()
        keys = captured[-1][0].float()  # (T, D): the heads' keys side by side
        norms = keys.norm(dim=-1, keepdim=True)
        return (keys @ keys.T) / torch.clamp(norms @ norms.T, min=1e-8)

    def __call__(self, source: Image.Image, edited: Image.Image) -> float:
        return float(F.mse_loss(self.self_similarity(edited), self.self_similarity(source)))


class ClipScore:
    """CLIP score: `max(100 * cos(image embedding, text embedding), 0)` (torchmetrics' CLIPScore, the benchmark's
    choice, with openai/clip-vit-large-patch14). Text is truncated to the model's 77 tokens."""

    def __init__(self, model, tokenizer, image_processor, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, name: str = CLIP_MODEL, device: str | torch.device = "cpu",
                        local_files_only: bool = False) -> ClipScore:
        from transformers import AutoTokenizer, CLIPModel  # deferred: heavy, and only this metric needs them

        local = {"local_files_only": local_files_only}
        return cls(CLIPModel.from_pretrained(name, dtype=torch.float32, **local),
                   AutoTokenizer.from_pretrained(name, **local), _clip_image_processor(name, **local), device)

    @torch.no_grad()
    def __call__(self, image: Image.Image | np.ndarray, text: str) -> float:
        image = Image.fromarray(image) if isinstance(image, np.ndarray) else image.convert("RGB")
        pixels = self.image_processor(images=[image], return_tensors="pt")["pixel_values"].to(self.device)
        tokens = self.tokenizer([text], padding=True, truncation=True, return_tensors="pt",
                                max_length=self.model.config.text_config.max_position_embeddings).to(self.device)
        image_features = _pooled(self.model.get_image_features(pixel_values=pixels))
        text_features = _pooled(self.model.get_text_features(**tokens))
        cosine = F.cosine_similarity(image_features.float(), text_features.float()).item()
        return max(100.0 * cosine, 0.0)


def _pooled(features) -> torch.Tensor:
    """Projected embeddings, whether transformers returns them as a tensor or in `pooler_output`."""
    return features if isinstance(features, torch.Tensor) else features.pooler_output


def _clip_image_processor(name: str, local_files_only: bool = False):
    """CLIP's Pillow image processor (resize shorter side, centre crop, normalise); the torchvision-backed default
    of recent transformers is not installed beside this torch."""
    import transformers  # deferred: heavy, and only the CLIP metric needs it

    processor = getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor
    return processor.from_pretrained(name, local_files_only=local_files_only)


def masked_uint8(image: Image.Image, mask: np.ndarray) -> np.ndarray:
    """(H, W, 3) uint8: the image where mask is 1, black elsewhere (the edited region, for `clip_edited`)."""
    return np.uint8(np.asarray(image.convert("RGB"), dtype=np.float64) * mask[..., None])


class Lpips:
    """LPIPS (Zhang et al. 2018) with the SqueezeNet backbone, the benchmark's choice, on images in [-1, 1]."""

    def __init__(self, device: str | torch.device = "cpu"):
        try:
            import lpips  # needs torchvision and its pretrained SqueezeNet
        except Exception as error:  # noqa: BLE001 - torchvision may fail at import, not only be missing
            raise ModuleNotFoundError(f"LPIPS needs the lpips package and a torchvision that imports ({error})") from None

        self.device = torch.device(device)
        self.model = lpips.LPIPS(net="squeeze", verbose=False).eval().to(self.device)

    @torch.no_grad()
    def __call__(self, a: np.ndarray, b: np.ndarray) -> float:
        """`a`, `b`: (H, W, 3) in [0, 1]."""
        to = lambda z: torch.from_numpy(np.asarray(z, np.float32)).permute(2, 0, 1)[None].to(self.device) * 2 - 1  # noqa: E731
        return float(self.model(to(a), to(b)).item())


def hub_offline(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot serve metric models now, or None when it can: `HF_HUB_OFFLINE` is set, or one
    HEAD request to the hub's endpoint gets no answer within `timeout` seconds (any HTTP answer counts as online).
    One quick check instead of every loader retrying every file with back-off."""
    # Deferred: huggingface_hub comes with transformers, and only runs that load metric models ask.
    from huggingface_hub import constants
    from huggingface_hub.utils import get_session

    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"} or constants.HF_HUB_OFFLINE:
        return "HF_HUB_OFFLINE is set"
    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as error:  # noqa: BLE001 - DNS, refused, timeout, proxy: all mean "no hub now"
        return f"{constants.ENDPOINT} did not answer ({type(error).__name__})"
    return None


def load_metric(loader, *args, **kwargs):
    """`(metric, None)`, or `(None, one-line reason)` when its model or package cannot be loaded."""
    try:
        return loader(*args, **kwargs), None
    except Exception as error:  # noqa: BLE001 - missing package, weights, hub access: all mean "skip, say why"
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        return None, f"{type(error).__name__}: {lines[0] if lines else 'cannot load'}"
