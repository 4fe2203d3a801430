"""Realism of restored artifact regions: KID against clean tissue on EfficientNet-Lite0 features.

PSNR and SSIM reward the conditional mean: on a fully occluding artifact (a thread, a speck of debris) a blurry fill
scores better than any plausible tissue, so fidelity alone cannot compare a diffusion model with OpenCV's
inpainting. The Kernel Inception Distance (Binkowski et al. 2018) compares two sets of images through the unbiased
MMD of a cubic polynomial kernel on their features; here the sets are

- square patches of the restored tiles whose artifact share is at least ``min_fraction`` (what a method painted),
- the patches at the same positions of the clean tiles (what real tissue there looks like),

and the features are the pooled 1280-d pre-logits of the offline ImageNet EfficientNet-Lite0
(``components/features.py``), because no Inception weights exist offline. Lower is better; values are only
comparable within one evaluation (same tiles, patches, feature network). torchmetrics'
``KernelInceptionDistance`` does the maths (subset means and standard deviation).
"""

from collections.abc import Sequence

import torch
from torch import Tensor

PATCH_SIZE = 64
"""Side of the KID patches in pixels; smaller tiles are left out of the realism score."""

ARTIFACT_GROUPS: dict[str, tuple[str, ...]] = {
    "semi-transparent": ("ink", "stain", "blur", "bubble"),
    # a fold hides the tissue under a second tissue layer, so it is grouped with the occluding artifacts
    "occluding": ("thread", "debris", "fold"),
}


def artifact_group(types: Sequence[str]) -> str:
    """``"occluding"`` if any of a tile's artifact types hides the tissue, else ``"semi-transparent"``."""
    return "occluding" if any(t in ARTIFACT_GROUPS["occluding"] for t in types) else "semi-transparent"


def artifact_patches(
    images: Tensor, masks: Tensor, *, size: int = PATCH_SIZE, stride: int = 32, min_fraction: float = 0.25
) -> tuple[Tensor, Tensor]:
    """Square patches of ``images`` where the artifact covers at least ``min_fraction`` of the patch.

    Args:
        images: ``(B, 3, H, W)`` in ``[-1, 1]``.
        masks: ``(B, 1, H, W)`` in ``{0, 1}``, 1 = artifact.
        size: Patch side in pixels.
        stride: Grid step in pixels.
        min_fraction: Minimum artifact share of a patch.

    Returns:
        ``(patches (N, 3, size, size), index (N, 3) long)`` with ``index`` rows ``(image, y, x)``: the same index
        cuts the matching clean patches with :func:`patches_at`.
    """
    if images.shape[-1] < size or images.shape[-2] < size:
        raise ValueError(f"patch size {size} exceeds the image size {tuple(images.shape[-2:])}")
    share = torch.nn.functional.avg_pool2d(masks.float(), size, stride)
    b, y, x = torch.nonzero(share[:, 0] >= min_fraction, as_tuple=True)
    index = torch.stack([b, y * stride, x * stride], dim=1)
    return patches_at(images, index, size), index


def patches_at(images: Tensor, index: Tensor, size: int) -> Tensor:
    """Patches ``(N, 3, size, size)`` of ``images`` at ``index`` rows ``(image, y, x)``."""
    if index.numel() == 0:
        return images.new_zeros((0, images.shape[1], size, size))
    return torch.stack([images[b, :, y : y + size, x : x + size] for b, y, x in index.tolist()])


def kid(
    fake: Tensor, real: Tensor, *, feature: torch.nn.Module | None = None, subset_size: int = 50, subsets: int = 100
) -> dict[str, float]:
    """KID between two patch sets.

    Args:
        fake: Restored patches ``(N, 3, h, w)`` in ``[-1, 1]``.
        real: Clean patches ``(M, 3, h, w)`` in ``[-1, 1]``.
        feature: Feature network for torchmetrics (default: :class:`PooledFeatures` with the offline weights).
        subset_size: Patches per KID subset (capped at the smaller set).
        subsets: Number of random subsets.

    Returns:
        ``{"kid": mean, "kid_std": std over subsets, "patches": N}``; NaNs when either set has fewer than 2 patches.
    """
    from torchmetrics.image.kid import KernelInceptionDistance

    from lightning_modules.components.features import PooledFeatures

    n = min(len(fake), len(real))
    if n < 2:
        return {"kid": float("nan"), "kid_std": float("nan"), "patches": int(len(fake))}
    torch.manual_seed(0)  # torchmetrics draws its subsets from the global generator
    metric = KernelInceptionDistance(
        feature=feature or PooledFeatures(), subset_size=min(subset_size, n), subsets=subsets, normalize=True
    )
    for part in real.split(64):
        metric.update(((part.float() + 1) / 2).clamp(0, 1), real=True)
    for part in fake.split(64):
        metric.update(((part.float() + 1) / 2).clamp(0, 1), real=False)
    mean, std = metric.compute()
    return {"kid": float(mean), "kid_std": float(std), "patches": int(len(fake))}
