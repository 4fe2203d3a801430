"""Training recipe for the latent autoencoder: train or fine-tune an ``AutoencoderKL`` on clean H&E tiles.

The authors use Stable Diffusion 1.5's VAE frozen; no such weights exist offline, so this project trains its own
(``vae="kl-f8"`` / ``"cpu"``) or fine-tunes a user's (``vae=<folder>``). Loss per batch, as in ldm's
``LPIPSWithDiscriminator`` with the offline parts this suite has:

    L1(x_rec, x) + ssim_weight * (1 - SSIM) + kl_weight * KL(q(z|x) || N(0, I))
        + perceptual_weight * P(x_rec, x) + [step >= disc_start] * disc_weight * lambda * (-D(x_rec))

with the KL summed over latent elements and averaged over the batch, ``P`` the LPIPS-style distance on the
features of the offline ImageNet EfficientNet-Lite0 (``components/features.py``), ``D`` a PatchGAN trained with the
hinge loss, and ``lambda`` ldm's adaptive weight ``|grad L_rec| / |grad L_adv|`` at the decoder's last layer. Which
of these terms pay off at CPU scale is measured in docs/VAE.md (``python -m experiments.vae_study``).

With the adversarial term the module optimises manually (two optimisers; the trainer's ``gradient_clip_val`` must
be None, Lightning refuses it otherwise, and ``grad_clip`` clips instead). Lightning then counts both optimisers'
steps in ``global_step`` (and so in ``max_steps``): two per batch once the discriminator is on. ``disc_start``
counts VAE steps (a buffer that survives resume). Without it Lightning's automatic optimisation runs as usual.

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
from lightning_modules.components.gan_networks import PatchDiscriminator
from lightning_modules.optim import configure_step_optimizers

_PRESETS = ("kl-f8", "cpu", "cpu-wide", "tiny")


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
        optimizer: Called with the VAE's parameters (and, with the adversarial term, with the discriminator's).
        lr_scheduler: Called with the VAE optimiser; stepped every optimiser step.
        kl_weight: Weight of the KL term (ldm's kl-f8 used 1e-6).
        ssim_weight: Weight of the structural term ``1 - SSIM`` (SSIM on ``[0, 1]`` images, 11x11 Gaussian window).
        perceptual_weight: Weight of the EfficientNet-Lite0 feature distance (0 = off; ldm uses 1 with LPIPS).
        disc_weight: Weight of the PatchGAN term (0 = off; ldm uses 0.5).
        disc_start: Optimiser step from which the adversarial term is on (ldm warms up without it).
        disc_ndf: Filters of the discriminator's first layer.
        grad_clip: Gradient-norm clip of both optimisers under manual optimisation (None = off).
        latent_channels: Latent channels of a preset (ignored for a folder, which fixes its own).
        mid_block_attention: Middle-block self-attention of a preset.
        logvar_init: Initial posterior log-variance of a preset (``build_autoencoder``).

    Raises:
        ValueError: If a weight is negative or ``disc_start`` is negative.
    """

    def __init__(
        self,
        vae: str = "cpu",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        kl_weight: float = 1e-6,
        ssim_weight: float = 0.2,
        perceptual_weight: float = 0.0,
        disc_weight: float = 0.0,
        disc_start: int = 0,
        disc_ndf: int = 32,
        grad_clip: float | None = 1.0,
        latent_channels: int = 4,
        mid_block_attention: bool = True,
        logvar_init: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        weights = {
            "kl_weight": kl_weight,
            "ssim_weight": ssim_weight,
            "perceptual_weight": perceptual_weight,
            "disc_weight": disc_weight,
            "disc_start": disc_start,
        }
        bad = {k: v for k, v in weights.items() if v < 0}
        if bad:
            listed = ", ".join(f"{k}={v}" for k, v in bad.items())
            raise ValueError(f"loss weights and disc_start must be >= 0, got {listed}")
        if vae in _PRESETS:
            self.vae = build_autoencoder(
                vae, latent_channels=latent_channels, mid_block_attention=mid_block_attention, logvar_init=logvar_init
            )
        else:
            self.vae = load_autoencoder(vae).train()
        self.kl_weight, self.ssim_weight = float(kl_weight), float(ssim_weight)
        self.perceptual_weight, self.disc_weight = float(perceptual_weight), float(disc_weight)
        self.disc_start = disc_start
        self.grad_clip = grad_clip
        self.perceptual = None
        if perceptual_weight > 0:
            from lightning_modules.components.features import PerceptualLoss

            self.perceptual = PerceptualLoss()
        self.discriminator = PatchDiscriminator(3, ndf=disc_ndf, n_layers=3) if disc_weight > 0 else None
        self.automatic_optimization = self.discriminator is None
        self.register_buffer("vae_steps", torch.zeros((), dtype=torch.long))
        self._optimizer_factory, self._lr_scheduler_factory = optimizer, lr_scheduler
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)

    def _check(self, batch: dict[str, Any]) -> Tensor:
        if "clean" not in batch:
            raise ValueError(f"AutoencoderModule needs batch['clean'], got keys {sorted(batch)}")
        return batch["clean"]

    def state_dict(self, *args, **kwargs) -> dict[str, Any]:
        """The module's state without the frozen perceptual network (rebuilt from the offline weights)."""
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        for key in [k for k in state if k.startswith(prefix + "perceptual.")]:
            del state[key]
        return state

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, **kwargs) -> Any:
        """Load a checkpoint that lacks the (frozen, rebuilt) perceptual network."""
        if self.perceptual is not None:
            state_dict = {**state_dict, **{f"perceptual.{k}": v for k, v in self.perceptual.state_dict().items()}}
        return super().load_state_dict(state_dict, strict=strict, **kwargs)

    def model_step(self, x: Tensor, sample: bool = True) -> dict[str, Tensor]:
        """Encode, decode and score a batch (reconstruction terms only).

        Args:
            x: Clean images ``(B, 3, H, W)`` in ``[-1, 1]``.
            sample: Decode a posterior sample (training) or the posterior mean (validation).

        Returns:
            ``loss``, ``rec`` (L1), ``kl`` (per image), ``ssim``, ``perceptual`` (scalars) and ``reconstruction``
            ``(B, 3, H, W)``.
        """
        posterior = self.vae.encode(x).latent_dist
        z = posterior.sample() if sample else posterior.mean
        reconstruction = self.vae.decode(z).sample.float()
        rec = F.l1_loss(reconstruction, x.float())
        kl = posterior.kl().mean()
        ssim = structural_similarity_index_measure(_to_unit(reconstruction), _to_unit(x), data_range=1.0)
        loss = rec + self.kl_weight * kl + self.ssim_weight * (1.0 - ssim)
        perceptual = self.perceptual(reconstruction, x.float()) if self.perceptual is not None else rec.new_zeros(())
        loss = loss + self.perceptual_weight * perceptual
        return {
            "loss": loss,
            "rec": rec,
            "kl": kl,
            "ssim": ssim,
            "perceptual": perceptual,
            "reconstruction": reconstruction,
        }

    def _adaptive_weight(self, rec_loss: Tensor, adv_loss: Tensor) -> Tensor:
        """Ldm's balance ``|d rec / d w_last| / |d adv / d w_last|`` at the decoder's output convolution."""
        last = self.vae.decoder.conv_out.weight
        g_rec = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
        g_adv = torch.autograd.grad(adv_loss, last, retain_graph=True)[0]
        return (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0.0, 1e4).detach()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Log ``train/loss`` (step and epoch), ``train/rec``, ``train/kl`` (and the adversarial terms)."""
        x = self._check(batch)
        out = self.model_step(x)
        size = x.shape[0]
        self.log("train/loss", out["loss"], on_step=True, on_epoch=True, prog_bar=True, batch_size=size)
        logs = {"train/rec": out["rec"], "train/kl": out["kl"]}
        if self.perceptual is not None:
            logs["train/perceptual"] = out["perceptual"]
        self.log_dict(logs, on_step=True, on_epoch=False, batch_size=size)
        if self.automatic_optimization:
            return out["loss"]
        return self._adversarial_step(x, out)

    def _adversarial_step(self, x: Tensor, out: dict[str, Tensor]) -> Tensor:
        """Manual optimisation: one VAE step (reconstruction + adversarial term), then one hinge step of ``D``."""
        opt_vae, opt_disc = self.optimizers()
        loss = out["loss"]
        active = int(self.vae_steps) >= self.disc_start
        if active:
            g_loss = -self.discriminator(out["reconstruction"]).mean()
            weight = self._adaptive_weight(loss, g_loss) * self.disc_weight
            loss = loss + weight * g_loss
            self.log_dict({"train/g_loss": g_loss, "train/disc_adaptive_weight": weight}, batch_size=x.shape[0])
        opt_vae.zero_grad()
        self.manual_backward(loss)
        self._clip(opt_vae)
        opt_vae.step()
        self.vae_steps += 1
        scheduler = self.lr_schedulers()
        if scheduler is not None:
            (scheduler[0] if isinstance(scheduler, list) else scheduler).step()
        if active:
            real = self.discriminator(x.float())
            fake = self.discriminator(out["reconstruction"].detach())
            d_loss = 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean())
            opt_disc.zero_grad()
            self.manual_backward(d_loss)
            self._clip(opt_disc)
            opt_disc.step()
            self.log("train/d_loss", d_loss, batch_size=x.shape[0])
        return loss.detach()

    def _clip(self, optimizer) -> None:
        if self.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.grad_clip, gradient_clip_algorithm="norm")

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
        """The VAE's optimiser (LR scheduler stepped every optimiser step); plus the discriminator's when on."""
        vae_opt = configure_step_optimizers(self.vae.parameters(), self._optimizer_factory, self._lr_scheduler_factory)
        if self.discriminator is None:
            return vae_opt
        disc_opt = self._optimizer_factory(self.discriminator.parameters())
        if isinstance(vae_opt, dict):
            return [vae_opt["optimizer"], disc_opt], [vae_opt["lr_scheduler"]]
        return [vae_opt, disc_opt]
