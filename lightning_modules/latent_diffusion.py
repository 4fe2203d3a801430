"""Training recipe for the latent denoiser of LatentArtiFusion (arXiv 2407.20172).

The denoiser (any ``nn.Module`` called as ``denoiser(z_t, t)``, normally a diffusers ``UNet2DModel``) is injected; the
frozen autoencoder is loaded from the folder of an exported VAE at ``setup`` and never trained; the noise schedule is a
diffusers ``DDPMScheduler`` with the paper's settings by default (docs/METHOD.md section 3). Sampling (regional
denoising) lives in ``lightning_modules/components/regional_sampler.py`` and takes :meth:`sampling_denoiser`.

Checkpoints hold ``denoiser.*`` and, when EMA is on, ``denoiser_ema.*`` (including the update counter). The autoencoder
is deliberately left out of the checkpoint: it is reloaded from the ``autoencoder`` path stored in the
hyper-parameters, so that folder must still exist when a checkpoint is resumed or used for restoration.
"""

import os
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_modules.components.autoencoders import LatentCodec, load_autoencoder
from lightning_modules.components.denoisers import predict
from lightning_modules.components.ema import DenoiserEMA
from lightning_modules.components.pipeline import save_pipeline
from lightning_modules.components.regional_sampler import SamplerConfig
from lightning_modules.ema_hooks import DiffusionEMAHooks
from lightning_modules.optim import configure_step_optimizers

PAPER_SCHEDULER: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "prediction_type": "epsilon",
    "variance_type": "fixed_small",
    "clip_sample": False,
}
PREDICTION_TYPES = ("epsilon", "v_prediction")
_CODEC_PREFIX = "codec."


class LatentDiffusionModule(DiffusionEMAHooks, LightningModule):
    """Unconditional diffusion on autoencoder latents of artifact-free tiles (the paper's denoiser).

    Args:
        denoiser: Network called as ``denoiser(z_t (B, C, h, w), t (B,) long)`` returning epsilon (a tensor or an
            object with ``.sample``) of the same shape as ``z_t``.
        autoencoder: Folder of a diffusers-format VAE (for example one written by ``AutoencoderModule.export``),
            loaded and frozen at ``setup``. ``None`` is allowed when every batch carries precomputed ``"latent"``.
        scheduler: ``DDPMScheduler`` keyword arguments overriding :data:`PAPER_SCHEDULER` (only the keys given);
            ``prediction_type`` may be ``"epsilon"`` (the paper) or ``"v_prediction"`` (Salimans & Ho 2022).
        optimizer: Called with the denoiser's parameters (only those: the autoencoder is never optimised).
        lr_scheduler: Called with the optimizer; stepped every optimiser step (``interval: "step"``).
        ema_decay: Decay of the denoiser's weight EMA; ``None`` trains without EMA (the authors' setting).
        loss_weighting: ``"none"`` (plain MSE, the paper) or ``"min_snr"`` (Min-SNR-gamma weighting, Hang et al. 2023).
        min_snr_gamma: The gamma of ``"min_snr"``.

    Raises:
        ValueError: For an unknown ``loss_weighting`` or ``prediction_type``, or a bad ``min_snr_gamma``.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        autoencoder: str | None = None,
        scheduler: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        ema_decay: float | None = 0.9999,
        loss_weighting: Literal["none", "min_snr"] = "none",
        min_snr_gamma: float = 5.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if loss_weighting not in ("none", "min_snr"):
            raise ValueError(f"loss_weighting must be 'none' or 'min_snr', got {loss_weighting!r}")
        if min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be positive, got {min_snr_gamma}")
        config = {**PAPER_SCHEDULER, **(scheduler or {})}
        if config["prediction_type"] not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {config['prediction_type']!r}")
        self.noise_scheduler = DDPMScheduler(**config)
        self.denoiser = denoiser
        self.denoiser_ema = DenoiserEMA(denoiser, ema_decay) if ema_decay is not None else None
        self.codec: LatentCodec | None = None
        self.autoencoder_path = autoencoder
        self.loss_weighting = loss_weighting
        self.min_snr_gamma = float(min_snr_gamma)
        self._optimizer_factory = optimizer
        self._lr_scheduler_factory = lr_scheduler
        self.register_load_state_dict_post_hook(self._ignore_codec_keys)

    # ----------------------------------------------------------------------------------------------------- codec

    def get_codec(self) -> LatentCodec | None:
        """Load (once) and return the frozen codec of ``autoencoder``; ``None`` when no path was given.

        Raises:
            ValueError: If the denoiser's input channels do not fit the autoencoder's latents.
        """
        if self.codec is None and self.autoencoder_path is not None:
            codec = LatentCodec(load_autoencoder(self.autoencoder_path))
            self.check_channels(codec.latent_channels)
            self.codec = codec.to(self.device)
        return self.codec

    def network_channels(self, latent_channels: int) -> int:
        """Input channels the denoiser needs for ``latent_channels``-channel latents (the latent itself here)."""
        return latent_channels

    def check_channels(self, latent_channels: int) -> None:
        """Fail early, with the fix, when the denoiser cannot take this autoencoder's latents."""
        config = getattr(self.denoiser, "config", None)
        have = getattr(config, "in_channels", None)
        want = self.network_channels(latent_channels)
        if have is not None and have != want:
            raise ValueError(
                f"the denoiser takes {have} input channels but the autoencoder {self.autoencoder_path} has "
                f"{latent_channels} latent channels, so {type(self).__name__} needs {want}: set "
                f"--model.init_args.denoiser.init_args.in_channels={want} and out_channels={latent_channels}"
            )

    def setup(self, stage: str) -> None:
        """Load the frozen autoencoder before the strategy moves the module to its device."""
        self.get_codec()

    def state_dict(self, *args, **kwargs) -> dict[str, Any]:
        """The module's state without the frozen codec, which is reloaded from its own folder."""
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        for key in [k for k in state if k.startswith(prefix + _CODEC_PREFIX)]:
            del state[key]
        return state

    @staticmethod
    def _ignore_codec_keys(module: nn.Module, incompatible_keys: Any) -> None:
        missing = incompatible_keys.missing_keys
        missing[:] = [k for k in missing if not k.startswith(_CODEC_PREFIX)]

    def encode_batch(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> Tensor:
        """Scaled latents of a batch: ``batch["latent"]`` if present, else the codec's posterior sample of ``clean``.

        Args:
            batch: ``{"latent": (B, C, h, w)}`` (already scaled) or ``{"clean": (B, 3, H, W) in [-1, 1]}``.
            generator: Generator for the posterior sample.

        Returns:
            Latents ``(B, C, h, w)``.

        Raises:
            ValueError: If the batch has neither key, or only ``clean`` and no autoencoder was configured.
        """
        if "latent" in batch:
            return batch["latent"]
        if "clean" not in batch:
            raise ValueError(f"batch needs a 'latent' or a 'clean' entry, got keys {sorted(batch)}")
        codec = self.get_codec()
        if codec is None:
            raise ValueError("batch has no 'latent' entry and the module has no autoencoder (autoencoder=None)")
        return codec.encode(batch["clean"], sample=True, generator=generator)

    # ---------------------------------------------------------------------------------------------------- losses

    def _weights(self, t: Tensor) -> Tensor:
        """Per-sample loss weights: 1, or Min-SNR-gamma (``min(snr, gamma) / snr``; ``/ (snr + 1)`` for v)."""
        if self.loss_weighting == "none":
            return torch.ones(t.shape, device=t.device)
        alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(t.device)[t]
        snr = alphas_cumprod / (1.0 - alphas_cumprod)
        denominator = snr + 1 if self.noise_scheduler.config.prediction_type == "v_prediction" else snr
        return snr.clamp(max=self.min_snr_gamma) / denominator

    def target(self, z: Tensor, noise: Tensor, t: Tensor) -> Tensor:
        """What the network regresses: the noise (epsilon) or the velocity ``sqrt(a) eps - sqrt(1 - a) z``."""
        if self.noise_scheduler.config.prediction_type == "v_prediction":
            return self.noise_scheduler.get_velocity(z, noise, t)
        return noise

    def encode_latents(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Everything :meth:`model_step` needs in latent space: ``{"latent": (B, C, h, w)}`` for this model."""
        return {"latent": self.encode_batch(batch, generator)}

    def network_input(self, z_t: Tensor, latents: dict[str, Tensor]) -> Tensor:
        """What the denoiser sees besides the timestep: ``z_t`` itself (the paper's model is unconditional)."""
        return z_t

    def loss_map(self, latents: dict[str, Tensor]) -> Tensor | None:
        """Per-element loss weights ``(B, 1, h, w)``, or None for a plain mean over every latent element."""
        return None

    def model_step(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Noise the batch's latents at uniform random timesteps and score the denoiser's prediction.

        Args:
            batch: See :meth:`encode_latents`.
            generator: Makes latents, timesteps and noise reproducible (validation); ``None`` uses the global RNG.

        Returns:
            ``loss`` (scalar, weighted MSE), ``input`` (what the denoiser saw), ``t`` (``(B,)`` long), ``target``,
            ``weights`` (per sample) and ``loss_map`` (per element, or None).
        """
        latents = self.encode_latents(batch, generator)
        z = latents["latent"]
        n = z.shape[0]
        t = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (n,), device=z.device, generator=generator
        )
        noise = torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=generator)
        z_t = self.noise_scheduler.add_noise(z, noise, t)
        net_input = self.network_input(z_t, latents)
        target, weights, loss_map = self.target(z, noise, t), self._weights(t), self.loss_map(latents)
        loss = self._loss(predict(self.denoiser, net_input, t), target, weights, loss_map)
        return {"loss": loss, "input": net_input, "t": t, "target": target, "weights": weights, "loss_map": loss_map}

    @staticmethod
    def _loss(pred: Tensor, target: Tensor, weights: Tensor, loss_map: Tensor | None = None) -> Tensor:
        """Weighted MSE: per sample the (``loss_map``-weighted) mean over latent elements, times ``weights``."""
        error = F.mse_loss(pred.float(), target.float(), reduction="none")
        if loss_map is None:
            per_sample = error.flatten(1).mean(1)
        else:
            w = loss_map.float().expand_as(error)
            per_sample = (error * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1e-8)
        return (per_sample * weights).mean()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """One denoising-loss step; logs ``train/loss`` per step and per epoch (unsynced)."""
        out = self.model_step(batch)
        self.log("train/loss", out["loss"], on_step=True, on_epoch=True, prog_bar=True, batch_size=len(out["t"]))
        return out["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Log ``val/loss`` (raw weights) and ``val/loss_ema`` (sampling weights) on the same noise, DDP-synced.

        The noise, timesteps and posterior samples are seeded by ``batch_idx``, so the values are comparable across
        epochs. Without EMA, ``val/loss_ema`` equals ``val/loss`` (the weights used for sampling are the raw ones),
        which keeps one checkpoint monitor valid for every configuration.
        """
        device = batch["latent" if "latent" in batch else "clean"].device
        generator = torch.Generator(device=device).manual_seed(batch_idx)
        out = self.model_step(batch, generator)
        size = len(out["t"])
        self.log("val/loss", out["loss"], on_epoch=True, sync_dist=True, batch_size=size)
        if self.denoiser_ema is not None:
            pred_ema = predict(self.denoiser_ema.module, out["input"], out["t"])
            loss_ema = self._loss(pred_ema, out["target"], out["weights"], out["loss_map"])
        else:
            loss_ema = out["loss"]
        self.log("val/loss_ema", loss_ema, on_epoch=True, sync_dist=True, prog_bar=True, batch_size=size)

    # --------------------------------------------------------------------------------------------------- export

    conditional = False
    residual = False

    @property
    def sampler_defaults(self) -> dict[str, Any]:
        """SamplerConfig fields implied by the training (none for the paper's model)."""
        return {}

    def export(
        self,
        directory: str | os.PathLike,
        *,
        sampler: SamplerConfig | None = None,
        image_size: int = 256,
        scheduler_name: str = "ddim",
        extra: dict | None = None,
    ) -> Path:
        """Write a restoration pipeline folder (``components/pipeline.py``) for ``experiments.restore --model``.

        The folder holds the sampling network (EMA weights when EMA is on), the training noise schedule, the frozen
        VAE this module was trained with and the sampler defaults (with :attr:`sampler_defaults` applied).

        Args:
            directory: Output folder (written atomically).
            sampler: Default sampler settings; None = the ``repaint`` preset.
            image_size: Tile edge in pixels.
            scheduler_name: Default sampling scheduler.
            extra: JSON facts stored under ``"extra"`` in ``pipeline.json``.

        Returns:
            The folder.

        Raises:
            ValueError: If the module has no autoencoder (a latent pipeline needs its VAE).
        """
        codec = self.get_codec()
        if codec is None:
            raise ValueError("this module was trained without an autoencoder path; a latent pipeline needs its VAE")
        sampler = replace(sampler or SamplerConfig(), **self.sampler_defaults)
        return save_pipeline(
            directory,
            unet=self.sampling_network,
            scheduler=self.noise_scheduler,
            sampler=sampler,
            vae=codec.vae,
            image_size=image_size,
            scheduler_name=scheduler_name,
            conditional=self.conditional,
            residual=self.residual,
            extra=extra,
        )

    # ----------------------------------------------------------------------------------------------- optimisers

    def configure_optimizers(self) -> Any:
        """Optimise the denoiser's parameters only; the LR scheduler (if any) steps every optimiser step."""
        return configure_step_optimizers(
            self.denoiser.parameters(), self._optimizer_factory, self._lr_scheduler_factory
        )
