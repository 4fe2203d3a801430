"""Training recipe of the artifact segmenter (issue 12): predict ``artifact_mask`` from ``corrupted``.

Batches are the restoration batches of ``ArtifactRestorationDataModule`` (``{"corrupted": (B, 3, H, W) in [-1, 1],
"artifact_mask": (B, 1, H, W) in {0, 1}, "meta": {"types": ["ink,fold", ...]}}``). Loss: BCE with logits (optional
``pos_weight``) + soft Dice. Metrics (torchmetrics, synced across devices by Lightning / their own states):
``{stage}/dice`` (pixel F1 over the epoch), ``{stage}/iou``, and ``{stage}/dice_{type}`` for every artifact type,
computed on the tiles that carry that type (NaN when none did). Select checkpoints on ``val/dice``.
"""

from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.classification import BinaryF1Score, BinaryJaccardIndex

from datamodules.artifacts import ARTIFACT_TYPES
from lightning_modules.components.segmenters import ArtifactSegmenter, SegmenterConfig, save_segmenter

STAGES = ("train", "val", "test")


class DicePerType(Metric):
    """Pixel Dice of thresholded predictions, accumulated separately for each artifact type.

    A tile counts for every type in its ``types`` string; the Dice of a type is ``2 |P & T| / (|P| + |T|)`` over
    all its tiles' pixels (NaN for a type no tile carried). States are sums, so DDP reduces them exactly.

    Args:
        types: Artifact type names.
        threshold: Probability threshold.
    """

    full_state_update = False

    def __init__(self, types: tuple[str, ...] = tuple(ARTIFACT_TYPES), threshold: float = 0.5) -> None:
        super().__init__()
        self.types, self.threshold = tuple(types), threshold
        for name in ("inter", "pred", "target", "tiles"):
            self.add_state(name, default=torch.zeros(len(self.types), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, probs: Tensor, target: Tensor, types: list[str]) -> None:
        """Accumulate one batch: probabilities and targets (B, 1, H, W), ``types[i]`` tile i's comma-separated types."""
        pred, tgt = (probs > self.threshold).flatten(1).double(), (target > 0.5).flatten(1).double()
        inter, psum, tsum = (pred * tgt).sum(1), pred.sum(1), tgt.sum(1)
        for i, tile_types in enumerate(types):
            for t in filter(None, str(tile_types).split(",")):
                if t in self.types:
                    k = self.types.index(t)
                    self.inter[k] += inter[i]
                    self.pred[k] += psum[i]
                    self.target[k] += tsum[i]
                    self.tiles[k] += 1

    def compute(self) -> dict[str, Tensor]:
        """``{type: Dice}`` (NaN where no tile had the type)."""
        denom = self.pred + self.target
        dice = torch.where(denom > 0, 2 * self.inter / denom.clamp_min(1e-12), torch.ones_like(denom))
        dice = torch.where(self.tiles > 0, dice, torch.full_like(dice, float("nan")))
        return {t: dice[k].float() for k, t in enumerate(self.types)}


class ArtifactSegmenterModule(LightningModule):
    """Binary artifact segmentation with Dice / IoU overall and per artifact type.

    Args:
        net: The segmenter (``build_segmenter``), (B, 3, H, W) [-1, 1] -> (B, 1, H, W) logits.
        optimizer: Called with the parameters; ``None`` -> AdamW(lr=1e-3, weight_decay=1e-4).
        pos_weight: BCE weight of artifact pixels (artifacts are a minority of pixels).
        dice_weight: Weight of the soft-Dice term.
        threshold: Probability threshold of the metrics (stored with the export).
        cosine: Cosine LR decay to 0 over all optimiser steps.
        net_config: Ignored on input; the network's architecture is stored under this name in the checkpoint.
    """

    def __init__(
        self,
        net: ArtifactSegmenter,
        optimizer: OptimizerCallable | None = None,
        pos_weight: float = 2.0,
        dice_weight: float = 1.0,
        threshold: float = 0.5,
        cosine: bool = True,
        net_config: dict | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer"])
        self.hparams["net_config"] = asdict(net.config)  # rebuilds the architecture in load_for_export
        self.net = net
        self._optimizer_factory = optimizer
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_metrics": MetricCollection(
                    {"dice": BinaryF1Score(threshold=threshold), "iou": BinaryJaccardIndex(threshold=threshold)},
                    prefix=f"{stage}/",
                )
                for stage in STAGES
            }
        )
        self.per_type = nn.ModuleDict({f"{s}_metrics": DicePerType(threshold=threshold) for s in ("val", "test")})

    def forward(self, image: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, 1, H, W) logits."""
        return self.net(image)

    def loss(self, logits: Tensor, target: Tensor) -> Tensor:
        """BCE (with ``pos_weight``) + ``dice_weight`` x soft Dice loss."""
        logits, target = logits.float(), target.float()
        pos = torch.tensor(self.hparams.pos_weight, device=logits.device)
        bce = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos)
        p = torch.sigmoid(logits)
        dice = 1 - (2 * (p * target).sum((1, 2, 3)) + 1) / (p.sum((1, 2, 3)) + target.sum((1, 2, 3)) + 1)
        return bce + self.hparams.dice_weight * dice.mean()

    def _step(self, batch: dict[str, Any], stage: str) -> Tensor:
        image, target = batch["corrupted"], batch["artifact_mask"]
        logits = self(image)
        loss = self.loss(logits, target)
        probs = torch.sigmoid(logits.float())
        metrics = self.metrics[f"{stage}_metrics"]
        metrics.update(probs, target.long())
        n = image.shape[0]
        self.log(
            f"{stage}/loss",
            loss,
            on_step=stage == "train",
            on_epoch=True,
            sync_dist=stage != "train",
            prog_bar=True,
            batch_size=n,
        )
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage == "val", batch_size=n)
        if f"{stage}_metrics" in self.per_type:
            types = batch.get("meta", {}).get("types", [""] * n)
            self.per_type[f"{stage}_metrics"].update(probs, target, list(types))
        return loss

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Logs ``train/loss``, ``train/dice``, ``train/iou``."""
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Logs ``val/loss``, ``val/dice``, ``val/iou`` (select checkpoints on ``val/dice``)."""
        self._step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Logs ``test/loss``, ``test/dice``, ``test/iou``."""
        self._step(batch, "test")

    def _log_per_type(self, stage: str) -> None:
        metric = self.per_type[f"{stage}_metrics"]
        for t, value in metric.compute().items():  # every rank computes: the sync is a collective
            if not torch.isnan(value):
                self.log(f"{stage}/dice_{t}", value, sync_dist=False)
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        """Log the per-type validation Dice."""
        self._log_per_type("val")

    def on_test_epoch_end(self) -> None:
        """Log the per-type test Dice."""
        self._log_per_type("test")

    def configure_optimizers(self) -> Any:
        """AdamW (or the injected optimiser), cosine decay per step when ``cosine``."""
        params = self.net.parameters()
        opt = (
            torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-4)
            if self._optimizer_factory is None
            else self._optimizer_factory(params)
        )
        if not self.hparams.cosine:
            return opt
        steps = max(1, int(self.trainer.estimated_stepping_batches))
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def export(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write the network to an export folder (``load_segmenter`` / ``restore_slide --mask-model``)."""
        self.net.config.threshold = float(self.hparams.threshold)
        return save_segmenter(self.net, path, extra)

    @classmethod
    def load_for_export(cls, ckpt: str | Path) -> "ArtifactSegmenterModule":
        """Load a training checkpoint without its config: the architecture comes from the stored ``net_config``."""
        hp = torch.load(ckpt, map_location="cpu", weights_only=False)["hyper_parameters"]
        c = hp["net_config"]
        config = SegmenterConfig(
            c["encoder"],
            tuple(c["out_indices"]),
            tuple(c["decoder_channels"]),
            float(c["threshold"]),
            c.get("extra", {}),
        )
        return cls.load_from_checkpoint(ckpt, map_location="cpu", net=ArtifactSegmenter(config), weights_only=False)
