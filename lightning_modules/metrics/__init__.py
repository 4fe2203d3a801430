"""Region-wise restoration metrics (L2, MSE, PSNR, SSIM, FSIMc) over whole / artifact / clean / boundary regions.

``functional`` and ``regions`` are pure torch; ``masked.RegionMetrics`` is the torchmetrics ``Metric`` for logging.
"""

from lightning_modules.metrics.functional import HIGHER_IS_BETTER, METRICS, metric_key, per_image_metrics
from lightning_modules.metrics.masked import RegionMetrics
from lightning_modules.metrics.regions import REGIONS, region_masks

__all__ = [
    "HIGHER_IS_BETTER",
    "METRICS",
    "REGIONS",
    "RegionMetrics",
    "metric_key",
    "per_image_metrics",
    "region_masks",
]
