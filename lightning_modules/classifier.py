"""Training recipe of the downstream tissue classifier (docs/METHOD.md section 8).

The network (normally ``components.classifiers.build_classifier``: Lab stain layer + timm backbone) is injected; this
module owns the loss (cross-entropy), the optimiser (AdamW lr 1e-3, weight decay 1e-5 by default), the cosine LR
schedule over all optimiser steps, and the metrics. Metrics are torchmetrics objects per stage, logged through
``self.log`` so Lightning syncs their states across devices: ``{stage}/acc`` (micro accuracy), ``{stage}/f1`` (macro
F1) and ``{stage}/loss``. Select checkpoints on ``val/acc`` or ``val/f1`` - never on test (the authors selected on
test, which overstates their numbers). The confusion matrix of each evaluation epoch is computed on every rank (a
collective) and kept in :attr:`TissueClassifierModule.confusion` as a CPU tensor.

Batches are ``{"image": (B, 3, H, W) in [-1, 1], "label": (B,) long, "meta": ...}``.
"""

import os
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix, MulticlassF1Score

STAGES = ("train", "val", "test")


class TissueClassifierModule(LightningModule):
    """Supervised tissue classification with per-stage accuracy, macro F1 and confusion matrix.

    Args:
        net: ``net(image (B, 3, H, W) in [-1, 1]) -> logits (B, num_classes)``.
        num_classes: Number of classes (must match the network's output).
        optimizer: Called with the network's parameters; ``None`` -> AdamW(lr=1e-3, weight_decay=1e-5) (the paper).
        lr_scheduler: Called with the optimiser, stepped every optimiser step; ``None`` with ``cosine=True`` ->
            cosine annealing to 0 over ``trainer.estimated_stepping_batches`` (the paper's schedule).
        cosine: Use the default cosine schedule when ``lr_scheduler`` is ``None`` (False: constant LR).
        class_names: Human-readable class names (stored in the checkpoint for reports); default ``class_i``.
        net_spec: Keyword arguments of ``build_classifier`` that rebuild ``net`` (stored so that scripts can reload a
            checkpoint with :meth:`load_for_eval`); ``None`` takes the ``spec`` a ``build_classifier`` network carries.
        label_smoothing: Cross-entropy label smoothing (0 in the paper).
    """

    def __init__(
        self,
        net: nn.Module,
        num_classes: int = 9,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        cosine: bool = True,
        class_names: list[str] | None = None,
        net_spec: dict[str, Any] | None = None,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["net", "optimizer", "lr_scheduler"])
        if net_spec is None and getattr(net, "spec", None) is not None:  # a build_classifier net (e.g. from a config)
            self.hparams["net_spec"] = {k: str(v) if isinstance(v, os.PathLike) else v for k, v in net.spec.items()}
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class_names given for num_classes={num_classes}: {class_names}")
        self.net = net
        self.class_names = list(class_names) if class_names else [f"class_{i}" for i in range(num_classes)]
        self._optimizer_factory = optimizer
        self._lr_scheduler_factory = lr_scheduler
        # ModuleDict keys may not shadow nn.Module attributes such as ``train``, hence the "_metrics" suffix.
        self.metrics = nn.ModuleDict(
            {
                f"{stage}_metrics": MetricCollection(
                    {
                        "acc": MulticlassAccuracy(num_classes, average="micro"),
                        "f1": MulticlassF1Score(num_classes, average="macro"),
                    },
                    prefix=f"{stage}/",
                )
                for stage in STAGES
            }
        )
        self.confusion_metrics = nn.ModuleDict(
            {f"{stage}_metrics": MulticlassConfusionMatrix(num_classes) for stage in ("val", "test")}
        )
        self.confusion: dict[str, Tensor] = {}

    def forward(self, image: Tensor) -> Tensor:
        """(B, 3, H, W) in [-1, 1] -> (B, num_classes) logits."""
        return self.net(image)

    def model_step(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Tensor]:
        """Loss, predictions (B,) and labels (B,) of one batch."""
        image, label = batch["image"], batch["label"]
        logits = self(image)
        if logits.shape[-1] != self.hparams.num_classes:
            raise ValueError(f"network returns {logits.shape[-1]} logits but num_classes={self.hparams.num_classes}")
        loss = F.cross_entropy(logits.float(), label, label_smoothing=self.hparams.label_smoothing)
        return loss, logits.argmax(dim=-1), label

    def _shared_step(self, batch: dict[str, Any], stage: str) -> Tensor:
        loss, pred, label = self.model_step(batch)
        metrics = self.metrics[f"{stage}_metrics"]
        metrics.update(pred, label)
        on_step = stage == "train"
        self.log(
            f"{stage}/loss",
            loss,
            on_step=on_step,
            on_epoch=True,
            sync_dist=not on_step,
            prog_bar=True,
            batch_size=label.shape[0],
        )
        self.log_dict(metrics, on_step=False, on_epoch=True, prog_bar=stage != "train", batch_size=label.shape[0])
        if f"{stage}_metrics" in self.confusion_metrics:
            self.confusion_metrics[f"{stage}_metrics"].update(pred, label)
        return loss

    def on_train_start(self) -> None:
        """Forget metric states left by the sanity-check validation."""
        self.metrics["val_metrics"].reset()
        self.confusion_metrics["val_metrics"].reset()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Cross-entropy step; logs ``train/loss``, ``train/acc``, ``train/f1``."""
        return self._shared_step(batch, "train")

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Logs ``val/loss``, ``val/acc``, ``val/f1`` (use these for checkpoint selection)."""
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Logs ``test/loss``, ``test/acc``, ``test/f1``."""
        self._shared_step(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """(B, num_classes) logits of ``batch["image"]``."""
        return self(batch["image"])

    def _store_confusion(self, stage: str) -> None:
        metric = self.confusion_metrics[f"{stage}_metrics"]
        if metric.update_called:
            self.confusion[stage] = metric.compute().cpu()  # all ranks call compute: it is a collective
        metric.reset()

    def on_validation_epoch_end(self) -> None:
        """Keep the validation confusion matrix (rows = true class, columns = predicted)."""
        self._store_confusion("val")

    def on_test_epoch_end(self) -> None:
        """Keep the test confusion matrix (rows = true class, columns = predicted)."""
        self._store_confusion("test")

    def configure_optimizers(self) -> Any:
        """AdamW (or the injected optimiser) on all parameters, including the learnable Lab targets."""
        params = self.net.parameters()
        if self._optimizer_factory is None:
            optimizer = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-5)
        else:
            optimizer = self._optimizer_factory(params)
        if self._lr_scheduler_factory is not None:
            scheduler = self._lr_scheduler_factory(optimizer)
        elif self.hparams.cosine:
            steps = max(1, int(self.trainer.estimated_stepping_batches))
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
        else:
            return optimizer
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    @classmethod
    def load_for_eval(cls, checkpoint: str, map_location: str | torch.device = "cpu") -> "TissueClassifierModule":
        """Load a checkpoint for evaluation, rebuilding the network from ``net_spec`` when the checkpoint has one.

        Args:
            checkpoint: Path of a ``.ckpt`` written by a Trainer fitting this module.
            map_location: Device to load onto.

        Returns:
            The module in eval mode.

        Raises:
            FileNotFoundError: Missing file.
            ValueError: A checkpoint without ``net_spec`` that Lightning cannot rebuild either.
        """
        from lightning_modules.components.classifiers import build_classifier

        ckpt = torch.load(checkpoint, map_location="cpu", weights_only=False)
        spec = ckpt.get("hyper_parameters", {}).get("net_spec")
        if spec:
            net = build_classifier(**{**spec, "pretrained": False})
            module = cls.load_from_checkpoint(checkpoint, map_location=map_location, net=net)
        else:
            try:
                module = cls.load_from_checkpoint(checkpoint, map_location=map_location)
            except TypeError as err:
                raise ValueError(
                    f"{checkpoint}: the checkpoint stores neither net_spec nor a LightningCLI config of the network; "
                    "rebuild the network yourself and call load_from_checkpoint(path, net=net)"
                ) from err
        return module.eval()
