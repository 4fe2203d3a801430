"""torchmetrics wrapper around :func:`~lightning_modules.metrics.functional.per_image_metrics`.

States are sums (``dist_reduce_fx="sum"``), so the result is exact under DDP whatever the split of images across
ranks, provided every image is seen exactly once (use an unrepeated sampler for test sets; see STYLE.md 1.4).
"""

from collections.abc import Sequence

import torch
from torchmetrics import Metric

from lightning_modules.metrics.functional import (
    HIGHER_IS_BETTER,
    METRICS,
    Mode,
    _check_choices,
    metric_key,
    per_image_metrics,
)
from lightning_modules.metrics.regions import REGIONS


class RegionMetrics(Metric):
    """Mean over images of region-wise L2 / MSE / PSNR / SSIM / FSIM, with empty regions excluded and counted.

    For every key ``"region/metric"`` the metric keeps the sum of the per-image values and the number of images that
    contributed a finite value; for every region the number of images in which it was empty. ``compute()`` returns a
    flat dict of scalar float64 tensors, ready for ``self.log_dict``:

    - ``f"{prefix}{region}/{metric}"`` (``paper_{metric}`` in paper mode): mean over images with a finite value;
      NaN when no image contributed.
    - ``f"{prefix}{region}/n_empty"``: number of images whose region had no pixels.

    Direction: ``HIGHER_IS_BETTER`` = ``{"l2": False, "mse": False, "psnr": True, "ssim": True, "fsim": True}``. The
    class attribute ``higher_is_better`` is None because the outputs mix directions.

    Args:
        regions: subset of ``("whole", "artifact", "clean", "boundary")``.
        metrics: subset of ``("l2", "mse", "psnr", "ssim", "fsim")``.
        mode: ``"standard"`` or ``"paper"`` (authors' data ranges; see :mod:`.functional`).
        boundary_radius: half-width of the boundary band in pixels.
        prefix: prepended to every output key (e.g. ``"test/"``).
        **kwargs: passed to :class:`torchmetrics.Metric` (e.g. ``sync_on_compute``).

    Example:
        >>> metric = RegionMetrics(regions=("artifact",), metrics=("psnr",))
        >>> metric.update(restored, clean, artifact_mask)  # (B, 3, H, W) in [-1, 1]; (B, 1, H, W), 1 = artifact
        >>> metric.compute()["artifact/psnr"]
    """

    is_differentiable = False
    higher_is_better = None
    full_state_update = False

    def __init__(
        self,
        regions: Sequence[str] = REGIONS,
        metrics: Sequence[str] = METRICS,
        mode: Mode = "standard",
        boundary_radius: int = 3,
        prefix: str = "",
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        _check_choices(regions, metrics, mode, boundary_radius)
        if not isinstance(prefix, str):
            raise ValueError(f"prefix must be a string, got {prefix!r}")
        self.regions = tuple(regions)
        self.metrics = tuple(metrics)
        self.mode = mode
        self.boundary_radius = boundary_radius
        self.prefix = prefix
        for region in self.regions:
            self.add_state(f"n_empty_{region}", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
            for metric in self.metrics:
                self.add_state(f"sum_{region}_{metric}", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
                self.add_state(f"count_{region}_{metric}", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: torch.Tensor, target: torch.Tensor, artifact_mask: torch.Tensor) -> None:
        """Add a batch.

        Args:
            preds: ``(B, 3, H, W)`` float restored images in ``[-1, 1]``.
            target: ``(B, 3, H, W)`` float clean references in ``[-1, 1]``.
            artifact_mask: ``(B, 1, H, W)`` bool or float in ``{0, 1}``, 1 = artifact.
        """
        values = per_image_metrics(
            preds,
            target,
            artifact_mask,
            regions=self.regions,
            metrics=self.metrics,
            mode=self.mode,
            boundary_radius=self.boundary_radius,
        )
        for region in self.regions:
            for metric in self.metrics:
                v = values[metric_key(region, metric, self.mode)]
                # NaN (empty region, or rarely a region inside SSIM's border crop / with PC_m = 0) is excluded.
                finite = torch.isfinite(v)
                setattr(self, f"sum_{region}_{metric}", getattr(self, f"sum_{region}_{metric}") + v[finite].sum())
                setattr(self, f"count_{region}_{metric}", getattr(self, f"count_{region}_{metric}") + finite.sum())
            n_empty = self._count_empty(artifact_mask, region)
            setattr(self, f"n_empty_{region}", getattr(self, f"n_empty_{region}") + n_empty)

    def _count_empty(self, artifact_mask: torch.Tensor, region: str) -> torch.Tensor:
        """Number of images whose ``region`` has no pixels (float64 scalar)."""
        mask = artifact_mask.flatten(1) != 0
        if region == "whole":
            n = torch.zeros((), device=mask.device)
        elif region == "artifact":
            n = (~mask.any(dim=1)).sum()
        elif region == "clean":
            n = mask.all(dim=1).sum()
        else:
            # The boundary band is empty exactly when the mask is all 0 or all 1 (it has no edge inside the tile).
            n = (~mask.any(dim=1) | mask.all(dim=1)).sum()
        return n.to(torch.float64)

    def compute(self) -> dict[str, torch.Tensor]:
        """Flat dict of scalar float64 tensors: means over images with a finite value, and ``n_empty`` per region."""
        out: dict[str, torch.Tensor] = {}
        for region in self.regions:
            for metric in self.metrics:
                total = getattr(self, f"sum_{region}_{metric}")
                count = getattr(self, f"count_{region}_{metric}")
                mean = torch.where(count > 0, total / count.clamp_min(1), torch.nan)
                out[self.prefix + metric_key(region, metric, self.mode)] = mean
            out[f"{self.prefix}{region}/n_empty"] = getattr(self, f"n_empty_{region}").clone()
        return out

    @staticmethod
    def higher_is_better_for(key: str) -> bool | None:
        """Direction of an output key (``"test/artifact/paper_psnr"`` -> True); None for ``n_empty``."""
        name = key.rsplit("/", 1)[-1].removeprefix("paper_")
        return HIGHER_IS_BETTER.get(name)
