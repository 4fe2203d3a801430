"""Region-wise restoration metrics, per image, in pure torch (no Lightning).

Scale: images arrive in the suite's convention, float ``(B, 3, H, W)`` in ``[-1, 1]``, and are mapped to ONE scale,
float64 ``[0, 255]`` via ``(x + 1) * 127.5`` (no rounding). An 8-bit image saved as PNG and reloaded with
``u / 127.5 - 1`` therefore maps back to its integer values up to float error, so every number here equals the
same metric computed on the uint8 arrays (scikit-image, piq) with ``data_range=255``.

Metrics, for a region ``R`` with ``n`` pixels (3 channels each):

- ``l2``: per-image SUM of squared errors over the region's pixels and channels (0-255 scale). This is the L2 the
  authors meant; their script computed it in wrapping uint8 (docs/METHOD.md section 7). Lower is better.
- ``mse``: ``l2 / (3 n)``. Lower is better.
- ``psnr``: ``10 log10(255^2 / mse)`` per image (dB); higher is better. Identical images would give ``+inf``; the MSE
  is clamped at ``PSNR_MSE_FLOOR = 1e-10`` (0-255 scale) so a perfect region scores a finite
  ``10 log10(255^2 / 1e-10) = 148.13 dB``. No real 8-bit difference gets near it: one grey level off in one channel
  of one pixel of a 256x256 tile is still ``mse = 1 / 196608``, i.e. 101.1 dB. A mean containing 148.13 dB entries
  therefore signals bit-exact regions (e.g. the clean region after paste-back); read ``mse`` alongside.
- ``ssim``: Wang et al. (2004) SSIM map (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03, data range 255, population
  moments), averaged over channels, then averaged over the region's pixels inside the valid window (the map and the
  region mask are both cropped by 5 px per side, as scikit-image does). Higher is better.
- ``fsim``: FSIMc (Zhang et al. 2011) as ``piq.fsim(chromatic=True)`` computes it, including its average-pooling of
  images whose shorter side exceeds 256 px. Region FSIM = ``sum(S_L S_C^lambda PC_m w) / sum(PC_m w)`` with ``w`` the
  region mask (average-pooled to FSIM's resolution, so fractional at pooled edges). Higher is better.

Empty regions: a region with no pixels in an image gives NaN for every metric of that image (also ``l2``, never a
silent 0). NaN also arises, rarely, where a region lies entirely inside SSIM's 5 px border crop or has ``PC_m = 0``
everywhere (perfectly flat). :class:`~lightning_modules.metrics.masked.RegionMetrics` excludes NaNs from its means.

``mode="paper"`` reproduces the authors' data-range choices (docs/METHOD.md section 7) so magnitudes can be compared
with the published tables, and prefixes every key with ``paper_`` (``whole/paper_psnr``) so it is never mistaken for a
standard value:

- ``paper_psnr`` and ``paper_ssim`` use data range 4095 on the 8-bit values: PSNR is exactly
  ``20 log10(4095 / 255) = 24.11 dB`` above the standard value; SSIM's constants grow 256-fold, pushing it towards 1.
- ``paper_fsim`` is grey FSIM computed on each of R, G, B separately and averaged over the three channels (our reading
  of their per-channel grey variant; their script's exact details are not public, so treat it as approximate).
- ``paper_l2`` / ``paper_mse`` equal the standard values: their uint8 wrap-around and "last image / N" reporting are
  bugs with no well-defined per-image counterpart, so they are not reproduced.
"""

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

from lightning_modules.metrics.maps import fsim_downsample_factor, fsim_maps, ssim_map
from lightning_modules.metrics.regions import REGIONS, region_masks

Mode = Literal["standard", "paper"]
METRICS: tuple[str, ...] = ("l2", "mse", "psnr", "ssim", "fsim")
MODES: tuple[str, ...] = ("standard", "paper")
HIGHER_IS_BETTER: dict[str, bool] = {"l2": False, "mse": False, "psnr": True, "ssim": True, "fsim": True}
DATA_RANGE = 255.0
PAPER_DATA_RANGE = 4095.0
PSNR_MSE_FLOOR = 1e-10
SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
_RANGE_TOLERANCE = 1e-4


def metric_key(region: str, metric: str, mode: Mode = "standard") -> str:
    """Name of a metric: ``"artifact/psnr"``, or ``"artifact/paper_psnr"`` in paper mode."""
    return f"{region}/{'paper_' if mode == 'paper' else ''}{metric}"


def to_uint8_scale(x: torch.Tensor) -> torch.Tensor:
    """Map ``[-1, 1]`` images to float64 ``[0, 255]`` with ``(x + 1) * 127.5`` (no rounding, no clamping)."""
    return (x.to(torch.float64) + 1.0) * 127.5


def _validate_images(preds: torch.Tensor, target: torch.Tensor) -> None:
    """Raise ValueError unless both are float ``(B, 3, H, W)`` of equal shape with finite values in ``[-1, 1]``."""
    for name, t in (("preds", preds), ("target", target)):
        if t.ndim != 4 or t.shape[1] != 3:
            raise ValueError(f"{name} must have shape (B, 3, H, W), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a float tensor in [-1, 1], got dtype {t.dtype}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf")
        lo, hi = t.min().item(), t.max().item()
        if lo < -1 - _RANGE_TOLERANCE or hi > 1 + _RANGE_TOLERANCE:
            raise ValueError(f"{name} must lie in [-1, 1] (clamp model outputs first), got range [{lo:.4g}, {hi:.4g}]")
    if preds.shape != target.shape:
        raise ValueError(f"preds and target shapes differ: {tuple(preds.shape)} vs {tuple(target.shape)}")


def masked_mean(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Weighted spatial mean per image; NaN where the weight sums to zero.

    Args:
        values: ``(B, 1, h, w)`` per-pixel values.
        weight: ``(B, 1, h, w)`` non-negative weights (a region mask as 0/1 or fractional).

    Returns:
        ``(B,)`` float64.
    """
    values, weight = values.to(torch.float64), weight.to(torch.float64)
    den = weight.sum(dim=(1, 2, 3))
    num = (values * weight).sum(dim=(1, 2, 3))
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float64).tiny), torch.nan)


def _check_choices(regions: Sequence[str], metrics: Sequence[str], mode: str, boundary_radius: int) -> None:
    """Raise ValueError naming any unknown region, metric or mode."""
    if isinstance(regions, str) or isinstance(metrics, str):
        raise ValueError(f"regions and metrics must be sequences of names, got {regions!r} and {metrics!r}")
    if not regions or not metrics:
        raise ValueError(f"need at least one region and one metric, got regions={regions!r}, metrics={metrics!r}")
    bad_regions = [r for r in regions if r not in REGIONS]
    if bad_regions:
        raise ValueError(f"unknown region(s) {bad_regions}; choose from {REGIONS}")
    bad_metrics = [m for m in metrics if m not in METRICS]
    if bad_metrics:
        raise ValueError(f"unknown metric(s) {bad_metrics}; choose from {METRICS}")
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if isinstance(boundary_radius, bool) or not isinstance(boundary_radius, int) or boundary_radius < 1:
        raise ValueError(f"boundary_radius must be an int >= 1, got {boundary_radius!r}")


def _fsim_values(
    x: torch.Tensor, y: torch.Tensor, masks: dict[str, torch.Tensor], mode: Mode
) -> dict[str, torch.Tensor]:
    """Region FSIM per image: FSIMc (standard) or the mean of per-channel grey FSIM (paper). Returns ``(B,)`` each."""
    b, c, h, w = x.shape
    factor = fsim_downsample_factor(h, w)
    # float32 maps, as piq computes them; pooling sums are float64 in masked_mean.
    x32, y32 = x.to(torch.float32), y.to(torch.float32)
    if mode == "paper":
        similarity, pc_max = fsim_maps(x32.reshape(b * c, 1, h, w), y32.reshape(b * c, 1, h, w), chromatic=False)
    else:
        similarity, pc_max = fsim_maps(x32, y32, chromatic=True)
    out = {}
    for region, mask in masks.items():
        weight = mask.to(torch.float32)
        if factor > 1:
            weight = F.avg_pool2d(weight, factor)
        if mode == "paper":
            weight = weight.repeat_interleave(c, dim=0)
        # Zhang et al. 2011 eq. 8 pooled under the region: sum(S * PC_m * w) / sum(PC_m * w).
        value = masked_mean(similarity, pc_max * weight)
        out[region] = value.view(b, c).mean(dim=1) if mode == "paper" else value
    return out


def per_image_metrics(
    preds: torch.Tensor,
    target: torch.Tensor,
    artifact_mask: torch.Tensor,
    *,
    regions: Sequence[str] = REGIONS,
    metrics: Sequence[str] = METRICS,
    mode: Mode = "standard",
    boundary_radius: int = 3,
) -> dict[str, torch.Tensor]:
    """Every requested metric over every requested region, one value per image.

    Args:
        preds: ``(B, 3, H, W)`` float restored images in ``[-1, 1]``; ``H, W >= 11``.
        target: ``(B, 3, H, W)`` float clean reference images in ``[-1, 1]``.
        artifact_mask: ``(B, 1, H, W)`` bool or float in ``{0, 1}``, 1 = artifact.
        regions: subset of ``("whole", "artifact", "clean", "boundary")``; see :mod:`.regions`.
        metrics: subset of ``("l2", "mse", "psnr", "ssim", "fsim")``; see the module docstring.
        mode: ``"standard"`` or ``"paper"`` (authors' data ranges, keys prefixed ``paper_``).
        boundary_radius: half-width ``r`` of the boundary band in pixels.

    Returns:
        ``metric_key(region, metric, mode)`` (e.g. ``"artifact/psnr"``) -> ``(B,)`` float64 on the input's device,
        NaN for images whose region is empty.

    Raises:
        ValueError: on bad shapes, dtypes, value ranges, mask values or unknown names.
    """
    _check_choices(regions, metrics, mode, boundary_radius)
    _validate_images(preds, target)
    if artifact_mask.shape[0] != preds.shape[0] or artifact_mask.shape[-2:] != preds.shape[-2:]:
        raise ValueError(f"artifact_mask shape {tuple(artifact_mask.shape)} does not match images {tuple(preds.shape)}")
    masks = region_masks(artifact_mask, regions, boundary_radius)
    x, y = to_uint8_scale(preds), to_uint8_scale(target)
    data_range = PAPER_DATA_RANGE if mode == "paper" else DATA_RANGE
    out: dict[str, torch.Tensor] = {}

    if {"l2", "mse", "psnr"} & set(metrics):
        squared_error = ((x - y) ** 2).sum(dim=1, keepdim=True)  # (B, 1, H, W), summed over channels
        for region, mask in masks.items():
            n_pixels = mask.sum(dim=(1, 2, 3)).to(torch.float64)
            l2 = torch.where(n_pixels > 0, (squared_error * mask).sum(dim=(1, 2, 3)), torch.nan)
            mse = l2 / (x.shape[1] * n_pixels)  # NaN stays NaN
            values = {"l2": l2, "mse": mse, "psnr": 10 * torch.log10(data_range**2 / mse.clamp_min(PSNR_MSE_FLOOR))}
            for metric in ("l2", "mse", "psnr"):
                if metric in metrics:
                    out[metric_key(region, metric, mode)] = values[metric]

    if "ssim" in metrics:
        # Wang et al. 2004: per-channel map, channel mean, then the mean over the valid window under the region.
        smap = ssim_map(x, y, data_range, SSIM_WINDOW, SSIM_SIGMA, SSIM_K1, SSIM_K2).mean(dim=1, keepdim=True)
        pad = (SSIM_WINDOW - 1) // 2
        for region, mask in masks.items():
            out[metric_key(region, "ssim", mode)] = masked_mean(smap, mask[..., pad:-pad, pad:-pad])

    if "fsim" in metrics:
        for region, value in _fsim_values(x, y, masks, mode).items():
            out[metric_key(region, "fsim", mode)] = value

    return {metric_key(r, m, mode): out[metric_key(r, m, mode)] for r in regions for m in metrics}
