"""Training recipe of the tiny autoencoder: distil a TAESD-style ``AutoencoderTiny`` from the suite's VAE.

The teacher (a diffusers ``AutoencoderKL`` folder, e.g. ``outputs/demo/vae`` or a pipeline's ``vae/``) is frozen.
Per batch of clean tiles ``x`` (as TAESD is trained, docs/TINY_VAE.md):

    z_mu, z_sd = teacher posterior (scaled latents);  z = z_mu + z_sd * eps  (what the pipeline encodes)
    L = encoder_weight * MSE(E_tiny(x), z_mu) + L1(D_tiny(z), x) + ssim_weight * (1 - SSIM(D_tiny(z), x))

The encoder regresses the teacher's posterior mean, so a denoiser trained on the teacher's latents reads its
output; the decoder learns to render the teacher's latents as the *image* (not as the teacher's reconstruction), so
it is not bound to copy the teacher's errors. Validation logs the student's reconstruction quality and its distance
to the teacher's decode (``val/psnr_vs_teacher``): the quality cost of swapping it into a pipeline.

Export with :meth:`TinyAutoencoderModule.export` (or ``python -m experiments.export tiny-vae``), which records the
teacher's fingerprint: a pipeline refuses a student distilled from another VAE.
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

from lightning_modules.components.autoencoders import LatentCodec, load_autoencoder
from lightning_modules.components.tiny_autoencoder import (
    TinyCodec,
    TinySize,
    build_tiny_autoencoder,
    save_tiny_autoencoder,
    teacher_fingerprint,
)
from lightning_modules.optim import configure_step_optimizers


def _to_unit(x: Tensor) -> Tensor:
    return ((x.float() + 1.0) / 2.0).clamp(0.0, 1.0)


class TinyAutoencoderModule(LightningModule):
    """Distil ``AutoencoderTiny`` from a frozen ``AutoencoderKL`` on clean tiles ``batch["clean"]`` in ``[-1, 1]``.

    Args:
        teacher: Folder of the diffusers VAE to distil (its latent channels fix the student's).
        size: Student preset (``components/tiny_autoencoder.py``): ``"taesd"``, ``"cpu"`` or ``"tiny"``.
        optimizer: Called with the student's parameters.
        lr_scheduler: Called with the optimiser; stepped every optimiser step.
        encoder_weight: Weight of the encoder's latent regression.
        ssim_weight: Weight of ``1 - SSIM`` of the decoder's image (the L1 term has weight 1).

    Raises:
        ValueError: A negative weight.
        FileNotFoundError: No VAE folder at ``teacher``.
    """

    def __init__(
        self,
        teacher: str,
        size: TinySize = "cpu",
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        encoder_weight: float = 1.0,
        ssim_weight: float = 0.2,
    ) -> None:
        super().__init__()
        if encoder_weight < 0 or ssim_weight < 0:
            raise ValueError(f"weights must be >= 0, got encoder_weight={encoder_weight}, ssim_weight={ssim_weight}")
        self.save_hyperparameters()
        self.teacher = LatentCodec(load_autoencoder(teacher))
        self.student = build_tiny_autoencoder(size, latent_channels=self.teacher.latent_channels)
        self.encoder_weight, self.ssim_weight = float(encoder_weight), float(ssim_weight)
        self._optimizer_factory, self._lr_scheduler_factory = optimizer, lr_scheduler
        self.val_psnr = PeakSignalNoiseRatio(data_range=1.0)
        self.val_ssim = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.val_psnr_teacher = PeakSignalNoiseRatio(data_range=1.0)

    def state_dict(self, *args, **kwargs) -> dict[str, Any]:
        """The student's state only: the frozen teacher is reloaded from its folder."""
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        return {k: v for k, v in state.items() if not k.startswith(prefix + "teacher.")}

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, **kwargs) -> Any:
        """Load a checkpoint that lacks the (frozen, reloaded) teacher."""
        teacher = {f"teacher.{k}": v for k, v in self.teacher.state_dict().items()}
        return super().load_state_dict({**state_dict, **teacher}, strict=strict, **kwargs)

    def _check(self, batch: dict[str, Any]) -> Tensor:
        if "clean" not in batch:
            raise ValueError(f"TinyAutoencoderModule needs batch['clean'], got keys {sorted(batch)}")
        return batch["clean"]

    def model_step(self, x: Tensor, sample: bool = True) -> dict[str, Tensor]:
        """Distillation losses of a batch ``x`` ``(B, 3, H, W)`` in ``[-1, 1]``.

        Args:
            x: Clean tiles.
            sample: Decode a teacher posterior sample (training) or the posterior mean (validation).

        Returns:
            ``loss``, ``latent_mse``, ``rec`` (L1), ``ssim`` (scalars), ``reconstruction`` ``(B, 3, H, W)`` and the
            teacher latents ``z`` ``(B, C, H/8, W/8)``.
        """
        mean, std = self.teacher.encode_dist(x)
        z = mean + std * torch.randn_like(std) if sample else mean
        latent_mse = F.mse_loss(self.student.encode(x).latents.float(), mean.float())
        reconstruction = self.student.decode(z).sample.float()
        rec = F.l1_loss(reconstruction, x.float())
        ssim = structural_similarity_index_measure(_to_unit(reconstruction), _to_unit(x), data_range=1.0)
        loss = self.encoder_weight * latent_mse + rec + self.ssim_weight * (1.0 - ssim)
        return {
            "loss": loss,
            "latent_mse": latent_mse,
            "rec": rec,
            "ssim": ssim,
            "reconstruction": reconstruction,
            "z": z,
        }

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        """Log ``train/loss`` (step and epoch), ``train/latent_mse`` and ``train/rec``."""
        x = self._check(batch)
        out = self.model_step(x)
        self.log("train/loss", out["loss"], on_step=True, on_epoch=True, prog_bar=True, batch_size=x.shape[0])
        self.log_dict({"train/latent_mse": out["latent_mse"], "train/rec": out["rec"]}, batch_size=x.shape[0])
        return out["loss"]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Log ``val/loss``, ``val/latent_mse`` (synced) and ``val/psnr``, ``val/ssim``, ``val/psnr_vs_teacher``.

        The decoder renders the teacher's posterior mean; ``val/psnr_vs_teacher`` compares it with the teacher's own
        decode of the same latents.
        """
        x = self._check(batch)
        out = self.model_step(x, sample=False)
        size = x.shape[0]
        self.log("val/loss", out["loss"], sync_dist=True, prog_bar=True, batch_size=size)
        self.log("val/latent_mse", out["latent_mse"], sync_dist=True, batch_size=size)
        rec = _to_unit(out["reconstruction"])
        self.val_psnr(rec, _to_unit(x))
        self.val_ssim(rec, _to_unit(x))
        self.val_psnr_teacher(rec, _to_unit(self.teacher.decode(out["z"])))
        self.log_dict(
            {"val/psnr": self.val_psnr, "val/ssim": self.val_ssim, "val/psnr_vs_teacher": self.val_psnr_teacher},
            batch_size=size,
        )

    @torch.no_grad()
    def log_images(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Clean tiles, the teacher's and the student's round trips, all ``(B, 3, H, W)`` in ``[-1, 1]``."""
        x = self._check(batch)
        student = TinyCodec(self.student)
        return {
            "clean": x,
            "teacher": self.teacher.decode(self.teacher.encode(x, sample=False)),
            "reconstruction": student.decode(student.encode(x)),
        }

    def export(self, directory: str | os.PathLike, extra: dict | None = None) -> str:
        """Write the student as a diffusers folder with ``distillation.json`` (teacher path and fingerprint).

        Returns:
            The folder, loadable with ``load_tiny_autoencoder`` and attachable to the teacher's pipeline.
        """
        facts = {
            "teacher": str(self.hparams.teacher),
            "teacher_fingerprint": teacher_fingerprint(self.teacher.vae),
            "size": self.hparams.size,
            "steps": int(self.global_step),
            **(extra or {}),
        }
        self.student.eval()
        save_tiny_autoencoder(self.student, directory, facts)
        rank_zero_info(f"exported the tiny autoencoder to {directory}")
        return os.fspath(directory)

    def configure_optimizers(self) -> Any:
        """The student's optimiser (the teacher is frozen), the LR scheduler stepped every step."""
        return configure_step_optimizers(self.student.parameters(), self._optimizer_factory, self._lr_scheduler_factory)
