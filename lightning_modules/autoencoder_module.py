"""Training recipe for the latent autoencoder: train or fine-tune an ``AutoencoderKL`` on clean H&E tiles.

The authors use Stable Diffusion 1.5's VAE frozen; no such weights exist offline, so this project trains its own
(``vae="kl-f8"`` / ``"cpu"``) or fine-tunes a user's (``vae=<folder>``). Loss (per batch):
``L1(x_rec, x) + kl_weight * KL(q(z|x) || N(0, I)) + ssim_weight * (1 - SSIM(x_rec, x))``, with the KL summed over
latent elements and averaged over the batch as in ldm. There is no adversarial or LPIPS term (ldm's
``LPIPSWithDiscriminator``): reconstructions are therefore smoother than SD's.

After training, :meth:`AutoencoderModule.export` estimates the latent scaling factor once and writes a diffusers
folder that ``LatentDiffusionModule(autoencoder=<folder>)`` and ``load_autoencoder`` read.
"""

import os
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torchmetrics.functional.image import structural_similarity_index_measure
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure

from lightning_modules.components.autoencoders import (
    build_autoencoder,
    estimate_scaling_factor,
    load_autoencoder,
)
from lightning_modules.optim import configure_step_optimizers

_PRESETS = ("kl-f8", "cpu", "tiny")


def _to_unit(x: Tensor) -> Tensor:
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


class AutoencoderModule(LightningModule):
    """Train an ``AutoencoderKL`` to reconstruct clean tiles ``batch["clean"]``, ``(B, 3, H, W)`` in ``[-1, 1]``.

    The VAE is named by a string rather than injected as an ``nn.Module``: a preset (``"kl-f8"``, ``"cpu"``,
    ``"tiny"``, randomly initialised by ``build_autoencoder``) or the folder of a diffusers VAE to fine-tune. A string
    keeps the config short, validates in LightningCLI, and lets ``load_from_checkpoint`` rebuild the architecture
    before loading the trained weights (for a folder, the folder must still exist).

    Args:
        vae: Preset name or diffusers folder.
        optimizer: Called with the VAE's parameters.
        lr_scheduler: Called with the optimizer; stepped every optimiser step.
        kl_weight: Weight of the KL term (ldm's kl-f8 used 1e-6).
        ssim_weight: Weight of the structural term ``1 - SSIM`` (SSIM on ``[0, 1]`` images, 11x11 Gaussian window).

    Raises:
        ValueError: If a weight is negative.
    """

    def __init__(
        self,
        vae: str = "cpu",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        kl_weight: float = 1e-6,
        ssim_weight: float = 0.2,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if kl_weight < 0 or ssim_weight < 0:
            raise ValueError(f"loss weights must be >= 0, got kl_weight={kl_weight}, ssim_weight={ssim_weight}")
        self.vae = build_autoencoder(vae) if vae in _PRESETS else load_autoencoder(vae).train()
        self.kl_weight, self.ssim_weight = float(kl_weight), float(ssim_weight)
        self._optimizer_factory, self._lr_scheduler_factory = optimizer, lr_scheduler
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

    def _check(self, batch: dict[str, Any]) -> Tensor:
        if "clean" not in batch:
            raise ValueError(f"AutoencoderModule needs batch['clean'], got keys {sorted(batch)}")
        return batch["clean"]

    def model_step(self, x: Tensor, sample: bool = True) -> dict[str, Tensor]:
        """Encode, decode and score a batch.

        Args:
            x: Clean images ``(B, 3, H, W)`` in ``[-1, 1]``.
            sample: Decode a posterior sample (training) or the posterior mean (validation).

        Returns:
            ``loss``, ``rec`` (L1), ``kl`` (per image), ``ssim`` (scalars) and ``reconstruction`` ``(B, 3, H, W)``.
        """
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample() if sample else posterior.mean
        reconstruction = self.vae.decode(z).sample.float()
        rec = F.l1_loss(reconstruction, x.float())
        kl = posterior.kl().mean()
        ssim = structural_similarity_index_measure(_to_unit(reconstruction), _to_unit(x), data_range=1.0)
        loss = rec + self.kl_weight * kl + self.ssim_weight * (1.0 - ssim)
        return {"loss": loss, "rec": rec, "kl": kl, "ssim": ssim, "reconstruction": reconstruction}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Log ``train/loss`` (step and epoch), ``train/rec`` and ``train/kl``."""
        x = self._check(batch)
        out = self.model_step(x)
        size = x.shape[0]
        self.log("train/loss", out["loss"], on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        self.log_dict({"train/rec": out["rec"], "train/kl": out["kl"]}, on_step=True, on_epoch=False, batch_size=size)
        return out["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Log ``val/loss`` (DDP-synced) and ``val/psnr``, ``val/ssim`` (torchmetrics) on posterior-mean decodes."""
        x = self._check(batch)
        out = self.model_step(x, sample=False)
        self.log("val/loss", out["loss"], on_epoch=True, sync_dist=True, prog_bar=True, batch_size=x.shape[0])
        rec, target = _to_unit(out["reconstruction"]), _to_unit(x)
        self.val_psnr(rec, target)
        self.val_ssim(rec, target)
        self.log_dict({"val/psnr": self.val_psnr, "val/ssim": self.val_ssim}, on_epoch=True, batch_size=x.shape[0])

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Posterior-mean reconstructions for image logging.

        Returns:
            ``{"clean": (B, 3, H, W), "reconstruction": (B, 3, H, W)}``, both in ``[-1, 1]``.
        """
        x = self._check(batch)
        was_training = self.vae.training
        self.vae.eval()
        reconstruction = self.vae.decode(self.vae.encode(x).latent_dist.mean).sample.clamp(-1.0, 1.0)
        self.vae.train(was_training)
        return {"clean": x, "reconstruction": reconstruction}

    def export(self, directory: str | os.PathLike, images: Tensor | None = None) -> str:
        """Write the VAE as a diffusers folder, first re-estimating its scaling factor on ``images`` if given.

        Call it once, on one process, after training (e.g. from a script on the best checkpoint).

        Args:
            directory: Output folder (created).
            images: Clean tiles ``(N, 3, H, W)`` in ``[-1, 1]`` (a few hundred are plenty) for the scaling factor
                ``1 / std(z)``; ``None`` keeps the current ``vae.config.scaling_factor``.

        Returns:
            The folder path, loadable with ``load_autoencoder``.
        """
        directory = os.fspath(directory)
        if images is not None:
            batches = images.to(self.device).split(16)
            with torch.no_grad():
                factor = estimate_scaling_factor(self.vae, batches)
            self.vae.register_to_config(scaling_factor=factor)
            rank_zero_info(f"estimated latent scaling factor {factor:.5f} on {len(images)} images")
        self.vae.save_pretrained(directory)
        rank_zero_info(f"exported AutoencoderKL to {directory}")
        return directory

    def configure_optimizers(self) -> Any:
        """Optimise all VAE parameters; the LR scheduler (if any) steps every optimiser step."""
        return configure_step_optimizers(self.vae.parameters(), self._optimizer_factory, self._lr_scheduler_factory)
