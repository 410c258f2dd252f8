"""Local blend (Prompt-to-Prompt, Hertz et al. 2022, Sec. 3.2 "local editing"): keep the source latent outside the
region the edited words attend to."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention_blend_mask(
    maps: torch.Tensor, size: tuple[int, int], threshold: float = 0.3, dilate: int = 1, normalize: str = "max"
) -> torch.Tensor:
    """Editable region from word attention maps, Prompt-to-Prompt's `LocalBlend.get_mask`.

    maps: `(R, h, w)` maps on the token grid, one per branch (the source map of the source's blend words, each
    target's own map of its blend words). Each is dilated by a `(2 * dilate + 1)` max-pool, resized (nearest) to
    the latent `size = (H, W)`, normalised (`"max"`: divided by its maximum; `"minmax"`: its minimum to 0, its
    maximum to 1) and thresholded; the mask is the union over the maps. Returns `(H, W)` float with 1 = editable.
    """
    maps = maps.float()[:, None]  # (R, 1, h, w)
    if dilate > 0:
        maps = F.max_pool2d(maps, 2 * dilate + 1, stride=1, padding=dilate)
    maps = F.interpolate(maps, size=tuple(size), mode="nearest")  # (R, 1, H, W)
    if normalize == "minmax":
        maps = maps - maps.amin(dim=(-2, -1), keepdim=True)
    elif normalize != "max":
        raise ValueError(f"normalize must be 'max' or 'minmax', got {normalize!r}")
    peak = maps.amax(dim=(-2, -1), keepdim=True).clamp_min(torch.finfo(maps.dtype).tiny)
    mask = (maps / peak > threshold).any(dim=0)[0]  # (H, W)
    return mask.float()


def apply_local_blend(x_target: torch.Tensor, x_source: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`mask * x_target + (1 - mask) * x_source`: the target latent inside the mask, the source latent outside
    (exactly, for a 0/1 mask).

    x_target, x_source: `(..., C, H, W)`; mask: `(H, W)` (or `(h, w)`, then resized with nearest), 1 = editable.
    """
    size = x_target.shape[-2:]
    mask = mask.to(device=x_target.device, dtype=x_target.dtype)
    if mask.shape[-2:] != size:
        mask = F.interpolate(mask[None, None], size=tuple(size), mode="nearest")[0, 0]
    return mask * x_target + (1 - mask) * x_source
