r"""Training recipe of the pixel-space ArtiFusion baseline (MICCAI 2023, arXiv 2307.14262; docs/METHOD.md section 5).

An unconditional DDPM on clean RGB tiles (``batch["clean"]``, ``(B, 3, H, W)`` in ``[-1, 1]``) with a learned-range
variance and the hybrid loss of Nichol & Dhariwal 2021 (``lightning_modules/components/vlb.py``), 4000 linear training
steps (``components/artifusion.py``), AdamW and an EMA of the weights. The denoiser is injected (normally
``build_swin_unet``; ``build_pixel_unet`` is the convolutional ablation). Restoration uses the shared regional sampler
through :meth:`PixelDiffusionModule.export`, which writes a pixel pipeline loadable by the ``artifusion`` restorer.

Usage::

    python -m experiments.train fit --config experiments/configs/base.yaml \
        --config experiments/configs/model/artifusion_cpu.yaml --config experiments/configs/data/bundled.yaml
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_modules.components.artifusion import PAPER_SCHEDULER, paper_sampler_config
from lightning_modules.components.denoisers import predict
from lightning_modules.components.ema import DenoiserEMA
from lightning_modules.components.pipeline import save_pipeline
from lightning_modules.components.regional_sampler import RegionalSampler, SamplerConfig
from lightning_modules.components.vlb import hybrid_loss
from lightning_modules.ema_hooks import DiffusionEMAHooks
from lightning_modules.optim import configure_step_optimizers

log = logging.getLogger(__name__)

_LEARNED = ("learned_range",)
_FIXED = ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")


class PixelDiffusionModule(DiffusionEMAHooks, LightningModule):
    """Unconditional pixel-space DDPM with a learned variance and the hybrid loss (ArtiFusion's recipe).

    Args:
        denoiser: Network called as ``denoiser(x_t (B, 3, H, W), t (B,) long)`` returning a tensor or an object with
            ``.sample`` of shape ``(B, 6, H, W)`` (epsilon, then the variance interpolation ``v``) for a
            ``learned_range`` schedule, or ``(B, 3, H, W)`` (epsilon only) for a fixed-variance one.
        scheduler: ``DDPMScheduler`` keyword arguments overriding :data:`artifusion.PAPER_SCHEDULER` (4000 linear
            steps with betas scaled by 1000/T, learned-range variance). To change ``T``, also give the matching
            ``beta_start``/``beta_end`` (see ``artifusion_scheduler_config``).
        optimizer: Called with the denoiser's parameters (AdamW lr 1e-4 in the paper).
        lr_scheduler: Called with the optimizer; stepped every optimiser step.
        ema_decay: EMA decay of the denoiser's weights (0.9999 in the paper); ``None`` disables EMA.
        lambda_vlb: Weight of the VLB term (Nichol & Dhariwal 2021: 0.001); ignored for fixed variances.

    Raises:
        ValueError: Unsupported ``variance_type`` or ``prediction_type``, or a negative ``lambda_vlb``.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        scheduler: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        ema_decay: float | None = 0.9999,
        lambda_vlb: float = 1e-3,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        config = {**PAPER_SCHEDULER, **(scheduler or {})}
        if config["prediction_type"] != "epsilon":
            raise ValueError(f"only prediction_type 'epsilon' is supported, got {config['prediction_type']!r}")
        if config["variance_type"] not in _LEARNED + _FIXED:
            raise ValueError(f"variance_type must be one of {_LEARNED + _FIXED}, got {config['variance_type']!r}")
        if lambda_vlb < 0:
            raise ValueError(f"lambda_vlb must be >= 0, got {lambda_vlb}")
        self.noise_scheduler = DDPMScheduler(**config)
        self.learned_variance = config["variance_type"] in _LEARNED
        self.lambda_vlb = float(lambda_vlb)
        self.denoiser = denoiser
        self.denoiser_ema = DenoiserEMA(denoiser, ema_decay) if ema_decay is not None else None
        self._optimizer_factory = optimizer
        self._lr_scheduler_factory = lr_scheduler

    # ---------------------------------------------------------------------------------------------------- losses

    def _loss(self, output: Tensor, noise: Tensor, x0: Tensor, x_t: Tensor, t: Tensor) -> dict[str, Tensor]:
        channels = x0.shape[1]
        expected = 2 * channels if self.learned_variance else channels
        if output.shape != (x0.shape[0], expected, *x0.shape[2:]):
            raise ValueError(
                f"denoiser output {tuple(output.shape)} does not match {(x0.shape[0], expected, *x0.shape[2:])} "
                f"(variance_type {self.noise_scheduler.config.variance_type!r})"
            )
        if not self.learned_variance:
            mse = F.mse_loss(output.float(), noise.float())
            return {"loss": mse, "mse": mse, "vlb": torch.zeros_like(mse)}
        return hybrid_loss(output, noise, x0, x_t, t, self.noise_scheduler.alphas_cumprod, lambda_vlb=self.lambda_vlb)

    def model_step(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Noise the clean tiles at uniform random timesteps and score the denoiser.

        Args:
            batch: ``{"clean": (B, 3, H, W) in [-1, 1], ...}``.
            generator: Makes timesteps and noise reproducible (validation); ``None`` uses the global RNG.

        Returns:
            ``loss``, ``mse``, ``vlb`` (scalars; see :func:`vlb.hybrid_loss`), ``x0``, ``x_t``, ``t`` and ``noise``.

        Raises:
            ValueError: The batch has no ``clean`` entry or the denoiser output has the wrong shape.
        """
        if "clean" not in batch:
            raise ValueError(f"batch needs a 'clean' entry (B, 3, H, W), got keys {sorted(batch)}")
        x0 = batch["clean"]
        t = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (x0.shape[0],), device=x0.device, generator=generator
        )
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        x_t = self.noise_scheduler.add_noise(x0, noise, t)
        out = self._loss(predict(self.denoiser, x_t, t), noise, x0, x_t, t)
        return {**out, "x0": x0, "x_t": x_t, "t": t, "noise": noise}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Hybrid-loss step; logs ``train/loss``, ``train/mse`` and ``train/vlb`` (``L_t`` in bits/dim)."""
        out = self.model_step(batch)
        size = len(out["t"])
        self.log("train/loss", out["loss"], on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        self.log("train/mse", out["mse"], on_step=True, on_epoch=True, batch_size=size)
        self.log("train/vlb", out["vlb"], on_step=True, on_epoch=True, batch_size=size)
        return out["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Log ``val/loss``, ``val/mse``, ``val/vlb`` (raw weights) and ``val/loss_ema`` (sampling weights), synced.

        Noise and timesteps are seeded by ``batch_idx``, so values are comparable across epochs; without EMA
        ``val/loss_ema`` equals ``val/loss`` (the checkpoint monitor of base.yaml works either way).
        """
        generator = torch.Generator(device=batch["clean"].device).manual_seed(batch_idx)
        out = self.model_step(batch, generator)
        size = len(out["t"])
        for key in ("loss", "mse", "vlb"):
            self.log(f"val/{key}", out[key], on_epoch=True, sync_dist=True, batch_size=size)
        if self.denoiser_ema is not None:
            output = predict(self.denoiser_ema.module, out["x_t"], out["t"])
            loss_ema = self._loss(output, out["noise"], out["x0"], out["x_t"], out["t"])["loss"]
        else:
            loss_ema = out["loss"]
        self.log("val/loss_ema", loss_ema, on_epoch=True, sync_dist=True, prog_bar=True, batch_size=size)

    # ---------------------------------------------------------------------------------------------------- export

    def export(self, path: str | Path, sampler: SamplerConfig | None = None, image_size: int | None = None) -> Path:
        """Write a pixel restoration pipeline (EMA denoiser, training schedule, sampler) for ``artifusion``.

        Args:
            path: Output folder (replaced atomically).
            sampler: Default sampler settings; ``None`` = the paper's RePaint preset (250 steps, jump length 10,
                10 resamples: 2410 network evaluations), see :func:`artifusion.paper_sampler_config`.
            image_size: Tile side stored in ``pipeline.json``; default: the denoiser config's ``sample_size``.

        Returns:
            The pipeline folder.

        Raises:
            ValueError: The denoiser cannot be saved in diffusers format (no ``save_pretrained``).
        """
        net = self.sampling_network
        if not hasattr(net, "save_pretrained"):
            raise ValueError(f"{type(net).__name__} has no save_pretrained; export needs a diffusers ModelMixin")
        if image_size is None:
            image_size = int(getattr(getattr(net, "config", None), "sample_size", 256))
        sampler = sampler if sampler is not None else paper_sampler_config()
        out = save_pipeline(
            path,
            unet=net,
            scheduler=self.noise_scheduler,
            sampler=sampler,
            image_size=image_size,
            extra={"method": "artifusion", "global_step": int(self.global_step)},
        )
        log.info(
            "exported pixel pipeline to %s (%d network evaluations per tile)",
            out,
            RegionalSampler(self.noise_scheduler, sampler).expected_nfe(),
        )
        return out

    # ----------------------------------------------------------------------------------------------- optimisers

    def configure_optimizers(self) -> Any:
        """Optimise the denoiser's parameters only; the LR scheduler (if any) steps every optimiser step."""
        return configure_step_optimizers(
            self.denoiser.parameters(), self._optimizer_factory, self._lr_scheduler_factory
        )
