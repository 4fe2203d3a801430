"""Evaluation regions derived from an artifact mask: whole image, artifact, clean complement and boundary band.

Convention (docs/ARCHITECTURE.md): ``artifact_mask`` is ``(B, 1, H, W)`` with 1 (or True) = artifact. Every region
comes back as a ``bool (B, 1, H, W)`` tensor, True = the pixel belongs to the region.

The boundary band is the morphological gradient of the mask with a square ``(2r+1) x (2r+1)`` structuring element
(Chebyshev radius ``r``): ``dilate(mask, r) - erode(mask, r)``, taken from
:func:`lightning_modules.components.masks.boundary_band` so that the sampler's seam and the metric's band are the same
pixels. Both operations are max-pools (batched, any device). At the image border dilation treats outside pixels as
clean and erosion treats them as artifact, so the tile edge itself is never an artifact boundary: an artifact touching
the border has a band only along its inner edge.
"""

from collections.abc import Sequence

import torch

from lightning_modules.components.masks import boundary_band

REGIONS: tuple[str, ...] = ("whole", "artifact", "clean", "boundary")


def validate_artifact_mask(artifact_mask: torch.Tensor) -> torch.Tensor:
    """Check an artifact mask and return it as ``bool (B, 1, H, W)``.

    Args:
        artifact_mask: ``(B, 1, H, W)`` bool, or float/int with values in ``{0, 1}``; 1 = artifact.

    Returns:
        The mask as a bool tensor of the same shape.

    Raises:
        ValueError: if the shape is not ``(B, 1, H, W)`` or a value is neither 0 nor 1.
    """
    if artifact_mask.ndim != 4 or artifact_mask.shape[1] != 1:
        raise ValueError(f"artifact_mask must have shape (B, 1, H, W), got {tuple(artifact_mask.shape)}")
    if artifact_mask.dtype == torch.bool:
        return artifact_mask
    bad = (artifact_mask != 0) & (artifact_mask != 1)
    if bool(bad.any()):
        raise ValueError(
            f"artifact_mask values must be 0 or 1 (1 = artifact), found {artifact_mask[bad].flatten()[0].item()!r}"
        )
    return artifact_mask != 0


def region_masks(
    artifact_mask: torch.Tensor,
    regions: Sequence[str] = REGIONS,
    boundary_radius: int = 3,
) -> dict[str, torch.Tensor]:
    """Pixel masks of the evaluation regions.

    Args:
        artifact_mask: ``(B, 1, H, W)`` bool or float in ``{0, 1}``, 1 = artifact.
        regions: any of ``"whole"`` (all pixels), ``"artifact"`` (the mask), ``"clean"`` (its complement) and
            ``"boundary"`` (``dilate(mask, r) - erode(mask, r)``, a band of width ``2r`` straddling the mask edge).
        boundary_radius: ``r`` in pixels for the boundary band, ``>= 1``.

    Returns:
        Region name -> ``bool (B, 1, H, W)``, in the order of ``regions``.

    Raises:
        ValueError: on an unknown region name, a bad radius or a bad mask (see :func:`validate_artifact_mask`).
    """
    unknown = [r for r in regions if r not in REGIONS]
    if unknown:
        raise ValueError(f"unknown region(s) {unknown}; choose from {REGIONS}")
    if isinstance(boundary_radius, bool) or not isinstance(boundary_radius, int) or boundary_radius < 1:
        raise ValueError(f"boundary_radius must be an int >= 1, got {boundary_radius!r}")
    mask = validate_artifact_mask(artifact_mask)
    out: dict[str, torch.Tensor] = {}
    for name in regions:
        if name == "whole":
            out[name] = torch.ones_like(mask)
        elif name == "artifact":
            out[name] = mask.clone()
        elif name == "clean":
            out[name] = ~mask
        else:
            out[name] = boundary_band(mask.to(torch.float32), boundary_radius) > 0.5
    return out
