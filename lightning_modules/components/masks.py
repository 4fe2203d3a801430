"""Artifact-mask conventions and morphology.

Convention (the whole project): a mask is float ``(B, 1, H, W)`` with values in ``{0, 1}`` and **1 = artifact**
(the region to regenerate), 0 = clean tissue to keep. The authors' mask files follow RePaint's ``gt_keep_mask``
convention instead (**255 = keep, 0 = artifact**); :func:`keep_to_artifact` / :func:`artifact_to_keep` convert at
that boundary only.

Morphology uses square structuring elements (Chebyshev distance) built from ``max_pool2d``: ``dilate`` treats
pixels outside the image as clean, ``erode`` treats them as artifact, so an artifact touching the tile border does
not get an artificial seam along the border.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

MaskMode = Literal["maxpool", "nearest"]


def check_mask(mask: Tensor, name: str = "mask", binary: bool = True) -> None:
    """Validate a mask tensor's layout (and optionally that it is binary).

    Args:
        mask: expected ``(B, 1, H, W)`` floating point tensor.
        name: name used in error messages.
        binary: also require every value to be exactly 0 or 1.

    Raises:
        ValueError: wrong type, rank, channel count or (when ``binary``) a value outside ``{0, 1}``.
    """
    if not isinstance(mask, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"{name} must have shape (B, 1, H, W), got {tuple(mask.shape)}")
    if binary:
        bad = mask[(mask != 0) & (mask != 1)]
        if bad.numel():
            raise ValueError(f"{name} must be binary {{0, 1}} (1 = artifact); found value {bad.flatten()[0].item()}")


def _check_radius(radius: int, name: str = "radius") -> int:
    if isinstance(radius, bool) or not isinstance(radius, int | np.integer) or radius < 0:
        raise ValueError(f"{name} must be a non-negative int, got {radius!r}")
    return int(radius)


def _max_filter(mask: Tensor, radius: int) -> Tensor:
    """Square max filter of half-width ``radius`` (zero padding, since the mask is >= 0); 0 returns a copy."""
    if radius == 0:
        return mask.clone()
    return F.max_pool2d(mask, kernel_size=2 * radius + 1, stride=1, padding=radius)


def keep_to_artifact(mask: Tensor | np.ndarray) -> Tensor | np.ndarray:
    """Convert a keep mask (RePaint / the authors' files: 255 or 1 = keep, 0 = artifact) to an artifact mask.

    Args:
        mask: keep mask of any shape. Integer masks are read on the 0..255 scale (keep if >= 128), floating point
            masks on the 0..1 scale (keep if >= 0.5).

    Returns:
        Same shape and container (torch or numpy) as the input, float32 with 1 = artifact, 0 = keep.
    """
    if isinstance(mask, np.ndarray):
        thr = 128 if not np.issubdtype(mask.dtype, np.floating) else 0.5
        return (mask < thr).astype(np.float32)
    thr = 0.5 if mask.is_floating_point() else 128
    return (mask < thr).to(torch.float32)


def artifact_to_keep(mask: Tensor | np.ndarray) -> Tensor | np.ndarray:
    """Convert an artifact mask (1 = artifact) to the authors' keep convention (255 = keep, 0 = artifact).

    Args:
        mask: artifact mask of any shape with values in ``[0, 1]`` (artifact where >= 0.5).

    Returns:
        Same shape and container as the input, uint8 with 255 = keep, 0 = artifact (ready for an 8-bit PNG).
    """
    if isinstance(mask, np.ndarray):
        return np.where(mask >= 0.5, 0, 255).astype(np.uint8)
    return torch.where(mask >= 0.5, 0, 255).to(torch.uint8)


def dilate(mask: Tensor, radius: int) -> Tensor:
    """Grow the artifact region by ``radius`` pixels (square structuring element of side ``2 * radius + 1``).

    Args:
        mask: ``(B, 1, H, W)`` float in ``[0, 1]`` (binary or soft; max filter either way).
        radius: non-negative int; 0 returns a copy.

    Returns:
        ``(B, 1, H, W)`` tensor, same dtype; pixels outside the image count as clean.
    """
    check_mask(mask, binary=False)
    return _max_filter(mask, _check_radius(radius))


def erode(mask: Tensor, radius: int) -> Tensor:
    """Shrink the artifact region by ``radius`` pixels (square structuring element).

    Args:
        mask: ``(B, 1, H, W)`` float in ``[0, 1]``.
        radius: non-negative int; 0 returns a copy.

    Returns:
        ``(B, 1, H, W)`` tensor, same dtype; pixels outside the image count as artifact (no border seam).
    """
    return 1 - dilate(1 - mask, radius)


def boundary_band(mask: Tensor, radius: int) -> Tensor:
    """Seam band around the artifact boundary: ``dilate(mask, r) - erode(mask, r)``.

    Args:
        mask: ``(B, 1, H, W)`` binary float, 1 = artifact.
        radius: band half-width in pixels (non-negative int; 0 gives an empty band).

    Returns:
        ``(B, 1, H, W)`` binary float, 1 on pixels within ``radius`` of the boundary on either side.
    """
    check_mask(mask)
    return dilate(mask, radius) - erode(mask, radius)


def feather(mask: Tensor, radius: int) -> Tensor:
    """Soft blending weight that ramps up INSIDE the artifact region only.

    The weight is ``min(d, radius + 1) / (radius + 1)`` where ``d`` is the Chebyshev distance (in pixels, >= 1 for
    artifact pixels) to the nearest clean pixel, computed exactly as the mean of ``radius + 1`` successive erosions.
    Clean pixels get exactly 0, so a composite with this weight never changes a pixel outside the mask; artifact
    pixels on the boundary get ``1 / (radius + 1)`` and pixels at least ``radius + 1`` deep get exactly 1.

    Args:
        mask: ``(B, 1, H, W)`` binary float, 1 = artifact.
        radius: seam width in pixels (non-negative int); 0 returns the hard mask.

    Returns:
        ``(B, 1, H, W)`` float in ``[0, 1]``, same dtype as ``mask``, zero outside the mask.
    """
    radius = _check_radius(radius)
    check_mask(mask)
    acc = mask.clone()
    current = mask
    for _ in range(radius):
        current = erode(current, 1)
        acc = acc + current
    return acc / (radius + 1)


def to_latent_mask(mask: Tensor, factor: int, mode: MaskMode = "maxpool", dilate: int = 0) -> Tensor:
    """Downsample a pixel artifact mask to the latent grid.

    Args:
        mask: ``(B, 1, H, W)`` binary float, 1 = artifact; ``H`` and ``W`` divisible by ``factor``.
        factor: spatial downsampling factor of the autoencoder (8 for SD's kl-f8; 1 for pixel space).
        mode: ``"maxpool"`` marks a latent cell if ANY pixel of its ``factor x factor`` block is artifact (textbook,
            nothing of the artifact is kept as "known"); ``"nearest"`` reproduces the authors' code: each cell copies
            the TOP-LEFT pixel of its block (what ``F.interpolate(mode="nearest")`` does), so thin artifact edges
            can be kept as "known".
        dilate: grow the latent mask by this many cells afterwards (non-negative int).

    Returns:
        ``(B, 1, H // factor, W // factor)`` binary float, same dtype as ``mask``.

    Raises:
        ValueError: bad mask, non-positive ``factor``, size not divisible by ``factor``, unknown ``mode`` or
            negative ``dilate``.
    """
    check_mask(mask)
    if isinstance(factor, bool) or not isinstance(factor, int | np.integer) or factor < 1:
        raise ValueError(f"factor must be a positive int, got {factor!r}")
    height, width = mask.shape[-2:]
    if height % factor or width % factor:
        raise ValueError(f"mask size {height}x{width} is not divisible by factor {factor}")
    if mode == "maxpool":
        out = F.max_pool2d(mask, kernel_size=factor, stride=factor) if factor > 1 else mask.clone()
    elif mode == "nearest":
        out = mask[:, :, ::factor, ::factor].clone()
    else:
        raise ValueError(f"unknown mask mode {mode!r}; expected 'maxpool' or 'nearest'")
    return _max_filter(out, _check_radius(dilate, "dilate"))
