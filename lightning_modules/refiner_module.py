"""Training recipe of the pixel refiner, the full-resolution last stage of ``latent-conditional``.

Batches come from ``datamodules/refiner_pool.py``: ``{"clean", "corrupted", "coarse": (B, 3, H, W) in [-1, 1],
"artifact_mask": (B, 1, H, W) in {0, 1}}``, ``coarse`` being the latent stage's restoration. The loss is computed
inside the mask only (outside it the pipeline pastes the input back), per tile:

    loss = mean_tiles( L1_in_mask + log_weight * ln(MSE_in_mask + eps) + gate_weight * CE_in_mask(logits, best) )

``best`` is, per pixel, the candidate closest to the clean tile (mean absolute error over the channels, averaged over a
``gate_window`` px box so that a pixel's choice follows its neighbourhood): the cross-entropy teaches the blend
*which* source to trust where (the input under a blur or a light stain, the latent stage or the fill elsewhere)
directly, instead of only through the gradient of the blended output, which is small wherever the candidates agree
and which the residual head otherwise absorbs first (docs/METHOD.md section 10).

The log term is the tile's PSNR up to sign and scale (``PSNR = 10 log10(4 / MSE)`` in [-1, 1] units), so it weighs
every tile's relative error alike: without it the large, badly wrong regions of occluding artifacts dominate and the
network learns nothing about light stains and blurs, whose errors are small in absolute terms but decide whether
restoring beats leaving the tile alone (docs/METHOD.md section 10). Metrics (torchmetrics ``MeanMetric``, reduced
across devices): ``{stage}/loss``, ``{stage}/artifact_psnr`` (the refined tile) and ``{stage}/artifact_psnr_gain``
(refined minus coarse, paired per tile): the number to watch.
"""

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MeanMetric

from lightning_modules.components.refiner import PixelRefiner, RefinerConfig, save_refiner

STAGES = ("train", "val", "test")


def masked_errors(output: Tensor, target: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-tile L1 and MSE inside the mask (B,), images (B, 3, H, W), mask (B, 1, H, W); empty masks give 0."""
    area = 3 * mask.sum((1, 2, 3)).clamp_min(1)
    diff = (output.float() - target.float()) * mask
    return diff.abs().sum((1, 2, 3)) / area, (diff**2).sum((1, 2, 3)) / area


def best_candidate(candidates: list[Tensor], clean: Tensor, window: int) -> Tensor:
    """Index (B, H, W) of the candidate with the lowest ``window``-px box-averaged absolute error to ``clean``."""
    errors = torch.stack([(c.float() - clean.float()).abs().mean(1) for c in candidates], 1)
    if window > 1:
        errors = F.avg_pool2d(errors, window, stride=1, padding=window // 2, count_include_pad=False)
    return errors.argmin(1)


def gate_cross_entropy(logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Per-tile mean cross-entropy (B,) of the candidate logits (B, n, H, W) against ``target`` inside the mask."""
    ce = F.cross_entropy(logits.float(), target, reduction="none")
    m = mask[:, 0].float()
    return (ce * m).sum((1, 2)) / m.sum((1, 2)).clamp_min(1)


def artifact_psnr(mse: Tensor) -> Tensor:
    """PSNR (dB) of a per-tile MSE on the [-1, 1] scale (data range 2), floored at 1e-10."""
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


class RefinerModule(LightningModule):
    """Train a :class:`PixelRefiner` on (corrupted, coarse, mask) -> clean inside the mask.

    Args:
        net: The refiner (``build_refiner``).
        optimizer: Called with the parameters; ``None`` -> AdamW(lr=1e-3, weight_decay=1e-2).
        lr_scheduler: Called with the optimizer and stepped every optimiser step (e.g. ``WarmupCosine``).
        log_weight: Weight of the per-tile log-MSE term.
        eps: Floor inside the log ([-1, 1] units; 1e-4 = 46 dB, where gains stop mattering).
        gate_weight: Weight of the cross-entropy that supervises the candidate choice (0 = off).
        gate_window: Box (px, odd) over which a pixel's candidate errors are averaged before choosing the best.
        net_config: Ignored on input; the network's architecture is stored under this name in the checkpoint.
    """

    def __init__(
        self,
        net: PixelRefiner,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        log_weight: float = 1.0,
        eps: float = 1e-4,
        gate_weight: float = 0.0,
        gate_window: int = 5,
        net_config: dict | None = None,
    ) -> None:
        super().__init__()
        if log_weight < 0 or eps <= 0:
            raise ValueError(f"log_weight must be >= 0 and eps > 0, got {log_weight}, {eps}")
        if gate_weight < 0 or gate_window < 1 or gate_window % 2 == 0:
            raise ValueError(
                f"gate_weight must be >= 0 and gate_window an odd number >= 1, got {gate_weight}, {gate_window}"
            )
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"])
        self.hparams["net_config"] = asdict(net.config)
        self.net = net
        self._optimizer_factory, self._scheduler_factory = optimizer, lr_scheduler
        self.metrics = nn.ModuleDict({f"{stage}_{name}": MeanMetric() for stage in STAGES for name in ("psnr", "gain")})

    def forward(self, corrupted: Tensor, coarse: Tensor, mask: Tensor) -> Tensor:
        """Refined tiles (B, 3, H, W), not clamped."""
        return self.net(corrupted, coarse, mask)

    def loss(self, refined: Tensor, clean: Tensor, mask: Tensor) -> Tensor:
        """Mean over tiles of ``L1 + log_weight * ln(MSE + eps)`` inside the mask."""
        l1, mse = masked_errors(refined, clean, mask)
        return (l1 + self.hparams.log_weight * torch.log(mse + self.hparams.eps)).mean()

    def _step(self, batch: dict[str, Any], stage: str) -> Tensor:
        clean, corrupted, coarse = batch["clean"], batch["corrupted"], batch["coarse"]
        mask = batch["artifact_mask"].to(clean.dtype)
        refined, logits, candidates = self.net.parts(corrupted, coarse, mask)
        loss = self.loss(refined, clean, mask)
        n = clean.shape[0]
        if self.hparams.gate_weight > 0:
            target = best_candidate(candidates, clean, self.hparams.gate_window)
            gate = gate_cross_entropy(logits, target, mask).mean()
            loss = loss + self.hparams.gate_weight * gate
            self.log(
                f"{stage}/gate_ce",
                gate,
                on_step=stage == "train",
                on_epoch=True,
                sync_dist=stage != "train",
                batch_size=n,
            )
        with torch.no_grad():
            has = mask.flatten(1).amax(1) > 0
            psnr = artifact_psnr(masked_errors(refined.clamp(-1, 1), clean, mask)[1])[has]
            coarse_psnr = artifact_psnr(masked_errors(coarse, clean, mask)[1])[has]
            if has.any():
                self.metrics[f"{stage}_psnr"].update(psnr)
                self.metrics[f"{stage}_gain"].update(psnr - coarse_psnr)
        self.log(
            f"{stage}/loss",
            loss,
            on_step=stage == "train",
            on_epoch=True,
            sync_dist=stage != "train",
            prog_bar=True,
            batch_size=n,
        )
        self.log(
            f"{stage}/artifact_psnr",
            self.metrics[f"{stage}_psnr"],
            on_step=False,
            on_epoch=True,
            prog_bar=stage == "val",
        )
        self.log(
            f"{stage}/artifact_psnr_gain",
            self.metrics[f"{stage}_gain"],
            on_step=False,
            on_epoch=True,
            prog_bar=stage == "val",
        )
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Logs ``train/loss``, ``train/artifact_psnr``, ``train/artifact_psnr_gain``."""
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Logs ``val/loss``, ``val/artifact_psnr`` and ``val/artifact_psnr_gain`` (whole val tiles)."""
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Logs ``test/loss``, ``test/artifact_psnr``, ``test/artifact_psnr_gain``."""
        self._step(batch, "test")

    def configure_optimizers(self) -> Any:
        """AdamW (or the injected optimiser) and the injected per-step LR schedule."""
        params = self.net.parameters()
        opt = (
            torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2)
            if self._optimizer_factory is None
            else self._optimizer_factory(params)
        )
        if self._scheduler_factory is None:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": self._scheduler_factory(opt), "interval": "step"}}

    def export(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write the network to a refiner folder (``load_refiner``; see ``attach_refiner`` for a pipeline)."""
        facts = {
            "log_weight": self.hparams.log_weight,
            "gate_weight": self.hparams.gate_weight,
            "global_step": int(self.global_step),
            **(extra or {}),
        }
        return save_refiner(self.net, path, facts)

    @classmethod
    def load_for_export(cls, ckpt: str | Path) -> "RefinerModule":
        """Load a training checkpoint without its config: the architecture comes from the stored ``net_config``."""
        hp = torch.load(ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]
        c = hp["net_config"]
        if "candidates" not in c:
            raise ValueError(
                f"{ckpt} is a refiner checkpoint from before the candidate blend (format 1); retrain "
                "the refiner (`make demo` reruns that stage)"
            )
        return cls.load_from_checkpoint(
            ckpt, map_location="cpu", net=PixelRefiner(RefinerConfig.from_dict(c)), weights_only=False
        )
