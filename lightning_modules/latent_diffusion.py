"""Training recipe for the latent denoiser of LatentArtiFusion (arXiv 2407.20172).

The denoiser (any ``nn.Module`` called as ``denoiser(z_t, t)``, normally a diffusers ``UNet2DModel``) is injected; the
frozen autoencoder is loaded from the folder of an exported VAE at ``setup`` and never trained; the noise schedule is a
diffusers ``DDPMScheduler`` with the paper's settings by default (REFERENCE.md section 3). Sampling (regional
denoising) lives in ``lightning_modules/components/regional_sampler.py`` and takes :meth:`sampling_denoiser`.

Checkpoints hold ``denoiser.*`` and, when EMA is on, ``denoiser_ema.*`` (including the update counter). The autoencoder
is deliberately left out of the checkpoint: it is reloaded from the ``autoencoder`` path stored in the
hyper-parameters, so that folder must still exist when a checkpoint is resumed or used for restoration.
"""

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
_CODEC_PREFIX = "codec."



class LatentDiffusionModule(DiffusionEMAHooks, LightningModule):
    """Unconditional epsilon-prediction diffusion on autoencoder latents of artifact-free tiles.

    Args:
        denoiser: Network called as ``denoiser(z_t (B, C, h, w), t (B,) long)`` returning epsilon (a tensor or an
            object with ``.sample``) of the same shape as ``z_t``.
        autoencoder: Folder of a diffusers-format VAE (for example one written by ``AutoencoderModule.export``),
            loaded and frozen at ``setup``. ``None`` is allowed when every batch carries precomputed ``"latent"``.
        scheduler: ``DDPMScheduler`` keyword arguments overriding :data:`PAPER_SCHEDULER` (only the keys given).
        optimizer: Called with the denoiser's parameters (only those: the autoencoder is never optimised).
        lr_scheduler: Called with the optimizer; stepped every optimiser step (``interval: "step"``).
        ema_decay: Decay of the denoiser's weight EMA; ``None`` trains without EMA (the authors' setting).
        loss_weighting: ``"none"`` (plain MSE, the paper) or ``"min_snr"`` (Min-SNR-gamma weighting, Hang et al. 2023).
        min_snr_gamma: The gamma of ``"min_snr"``.

    Raises:
        ValueError: For an unknown ``loss_weighting``, a non-epsilon ``prediction_type`` or a bad ``min_snr_gamma``.
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
        if config["prediction_type"] != "epsilon":
            raise ValueError(f"only prediction_type 'epsilon' is supported, got {config['prediction_type']!r}")
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
        """Load (once) and return the frozen codec of ``autoencoder``; ``None`` when no path was given."""
        if self.codec is None and self.autoencoder_path is not None:
            self.codec = LatentCodec(load_autoencoder(self.autoencoder_path)).to(self.device)
        return self.codec

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
        if self.loss_weighting == "none":
            return torch.ones(t.shape, device=t.device)
        alphas_cumprod = self.noise_scheduler.alphas_cumprod.to(t.device)[t]
        snr = alphas_cumprod / (1.0 - alphas_cumprod)
        return snr.clamp(max=self.min_snr_gamma) / snr

    def model_step(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Noise the batch's latents at uniform random timesteps and score the denoiser's epsilon prediction.

        Args:
            batch: See :meth:`encode_batch`.
            generator: Makes latents, timesteps and noise reproducible (validation); ``None`` uses the global RNG.

        Returns:
            ``loss`` (scalar, weighted MSE), ``z_t`` (noised latents), ``t`` (``(B,)`` long), ``noise`` and ``weights``.
        """
        z = self.encode_batch(batch, generator)
        n = z.shape[0]
        t = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (n,), device=z.device, generator=generator
        )
        noise = torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=generator)
        z_t = self.noise_scheduler.add_noise(z, noise, t)
        weights = self._weights(t)
        loss = self._loss(predict(self.denoiser, z_t, t), noise, weights)
        return {"loss": loss, "z_t": z_t, "t": t, "noise": noise, "weights": weights}

    @staticmethod
    def _loss(pred: Tensor, noise: Tensor, weights: Tensor) -> Tensor:
        per_sample = F.mse_loss(pred.float(), noise.float(), reduction="none").flatten(1).mean(1)
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
            pred_ema = predict(self.denoiser_ema.module, out["z_t"], out["t"])
            loss_ema = self._loss(pred_ema, out["noise"], out["weights"])
        else:
            loss_ema = out["loss"]
        self.log("val/loss_ema", loss_ema, on_epoch=True, sync_dist=True, prog_bar=True, batch_size=size)


    # ----------------------------------------------------------------------------------------------- optimisers

    def configure_optimizers(self) -> Any:
        """Optimise the denoiser's parameters only; the LR scheduler (if any) steps every optimiser step."""
        return configure_step_optimizers(
            self.denoiser.parameters(), self._optimizer_factory, self._lr_scheduler_factory
        )
