"""Training recipe for ``latent-conditional``: a mask-conditioned latent restorer trained on synthesised artifacts.

The paper's denoiser learns an unconditional prior of clean latents and must invent the whole masked region. This
module trains the design card's "LightningModule [that] trains the latent denoiser with an artifact-synthesis
DataModule": the denoiser sees ``[z_t, latent_mask, z_corrupted]`` (``components/conditioning.py``) and learns to
produce the latent of the CLEAN tile, so tissue that stays visible under semi-transparent artifacts (ink, stain, blur,
bubbles) is kept instead of redrawn. Sampling is the same regional sampler as the paper method (known region held,
paste-back, any diffusers scheduler); only the denoiser's input differs (docs/METHOD.md section 9).

Batches come from either
- the restoration latent cache (``datamodules/restoration_latents.py``: ``latent``, ``latent_corrupted``,
  ``latent_mask``; each train tile encoded once under K synthesised corruptions), or
- pixel restoration batches (``clean``, ``corrupted``, ``artifact_mask`` from ``ArtifactRestorationDataModule``),
  encoded on the fly by the frozen autoencoder: fresh corruptions every step, 3-10x slower per image on a CPU.

Defaults: v-prediction (Salimans & Ho 2022). At few sampling steps the first step's clean-latent estimate is what
the result is made of; with epsilon prediction that estimate is ``(z_t - sqrt(1 - a) eps) / sqrt(a)``, whose error
is amplified by ``1 / sqrt(a)`` (about 15x at the first trailing step of the paper's schedule), while v-prediction
keeps the loss and the estimate well scaled at every noise level. The loss weights latent cells inside the mask by 1
and the rest by ``known_weight``: the sampler replaces the known region anyway, so capacity goes to the masked cells.
"""

from typing import Any, Literal

import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn

from lightning_modules.components.conditioning import conditional_channels, conditional_input
from lightning_modules.components.masks import dilate, to_latent_mask
from lightning_modules.latent_diffusion import LatentDiffusionModule

CONDITIONAL_SCHEDULER: dict[str, Any] = {"prediction_type": "v_prediction"}
CONDITIONAL_SAMPLER: dict[str, Any] = {"num_steps": 1, "decode": "adaptive", "crop_decode": True}
"""Sampler defaults of an exported conditional pipeline, chosen from measurements: one step and the adaptive decode
(docs/METHOD.md section 9), the decode crop (section 11: within 0.03 dB on three evaluation sets, 1.7x faster per
tile at the paper sizes)."""


class ConditionalLatentDiffusionModule(LatentDiffusionModule):
    """Mask-conditioned diffusion on autoencoder latents: regenerate the clean latent under the artifact mask.

    Args:
        denoiser: Network called as ``denoiser(input (B, 2C + 1, h, w), t (B,))`` returning ``(B, C, h, w)``
            (e.g. ``build_unet(size, in_channels=2C + 1, out_channels=C)``).
        autoencoder: Folder of the frozen diffusers VAE (needed for pixel batches, the restoration callback and
            export; a latent-cache batch alone does not need it).
        scheduler: ``DDPMScheduler`` keyword arguments over the paper's schedule; default v-prediction.
        optimizer: Called with the denoiser's parameters.
        lr_scheduler: Called with the optimizer; stepped every optimiser step.
        ema_decay: Decay of the denoiser's weight EMA (None = off).
        loss_weighting: ``"none"`` or ``"min_snr"`` (per timestep, as in :class:`LatentDiffusionModule`).
        min_snr_gamma: The gamma of ``"min_snr"``.
        known_weight: Loss weight of latent cells outside the mask (cells inside weigh 1), in ``[0, 1]``.
        mask_dilate: Grow the latent mask by this many cells, in training and (through the export) at sampling.
        target: What the diffusion generates: ``"clean"`` (the clean tile's latent) or ``"residual"`` (the change
            ``(z_clean - z_corrupted) * mask``, 0 outside the mask; restoration adds it to the input's latent), so
            that "no change" is the default an uncertain model falls back to (the default: it turned stain from a
            loss into a gain against the unrestored input, docs/METHOD.md section 9).

    Raises:
        ValueError: For a ``known_weight`` outside ``[0, 1]`` or a negative ``mask_dilate``.
    """

    def __init__(
        self,
        denoiser: nn.Module,
        autoencoder: str | None = None,
        scheduler: dict[str, Any] | None = None,
        optimizer: OptimizerCallable = torch.optim.AdamW,
        lr_scheduler: LRSchedulerCallable | None = None,
        ema_decay: float | None = 0.999,
        loss_weighting: Literal["none", "min_snr"] = "none",
        min_snr_gamma: float = 5.0,
        known_weight: float = 0.1,
        mask_dilate: int = 0,
        target: Literal["clean", "residual"] = "residual",
    ) -> None:
        if target not in ("clean", "residual"):
            raise ValueError(f"target must be 'clean' or 'residual', got {target!r}")
        if not 0.0 <= known_weight <= 1.0:
            raise ValueError(f"known_weight must be in [0, 1], got {known_weight}")
        if isinstance(mask_dilate, bool) or not isinstance(mask_dilate, int) or mask_dilate < 0:
            raise ValueError(f"mask_dilate must be an int >= 0, got {mask_dilate!r}")
        super().__init__(
            denoiser,
            autoencoder=autoencoder,
            scheduler={**CONDITIONAL_SCHEDULER, **(scheduler or {})},
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            ema_decay=ema_decay,
            loss_weighting=loss_weighting,
            min_snr_gamma=min_snr_gamma,
        )
        self.known_weight = float(known_weight)
        self.mask_dilate = mask_dilate
        self.residual = target == "residual"

    conditional = True

    @property
    def sampler_defaults(self) -> dict[str, Any]:
        """SamplerConfig fields this training implies (the export and the restoration callback apply them)."""
        return {"mask_dilate": self.mask_dilate}

    def network_channels(self, latent_channels: int) -> int:
        """``2C + 1``: noisy latent, mask and corrupted latent (``components/conditioning.py``)."""
        return conditional_channels(latent_channels)

    def encode_latents(self, batch: dict[str, Any], generator: torch.Generator | None = None) -> dict[str, Tensor]:
        """Clean latent, corrupted latent and latent mask of a batch.

        Args:
            batch: ``{"latent", "latent_corrupted", "latent_mask"}`` (a restoration latent cache; the mask is the
                max-pooled pixel mask) or ``{"clean", "corrupted", "artifact_mask"}`` (pixels in ``[-1, 1]``, mask
                ``(B, 1, H, W)`` in ``{0, 1}``), encoded here by the frozen codec with posterior samples.
            generator: Generator for the posterior samples.

        Returns:
            ``{"latent": (B, C, h, w), "latent_corrupted": (B, C, h, w), "latent_mask": (B, 1, h, w)}``, the mask
            dilated by ``mask_dilate`` cells; with ``target="residual"`` ``latent`` is the masked change.

        Raises:
            ValueError: If the batch has neither set of keys, or pixels but no autoencoder.
        """
        if {"latent", "latent_corrupted", "latent_mask"} <= set(batch):
            z, z_corrupted, mask = batch["latent"], batch["latent_corrupted"], batch["latent_mask"]
        elif {"clean", "corrupted", "artifact_mask"} <= set(batch):
            codec = self.get_codec()
            if codec is None:
                raise ValueError("pixel restoration batches need model.init_args.autoencoder (the frozen VAE folder)")
            z = codec.encode(batch["clean"], sample=True, generator=generator)
            z_corrupted = codec.encode(batch["corrupted"], sample=True, generator=generator)
            mask = to_latent_mask(batch["artifact_mask"], codec.factor, "maxpool")
        else:
            raise ValueError(
                "ConditionalLatentDiffusionModule needs restoration batches: latent/latent_corrupted/latent_mask "
                f"(a restoration latent cache) or clean/corrupted/artifact_mask; got keys {sorted(batch)}"
            )
        if self.mask_dilate:
            mask = dilate(mask, self.mask_dilate)
        mask = mask.to(z.dtype)
        if self.residual:
            z = (z - z_corrupted) * mask
        return {"latent": z, "latent_corrupted": z_corrupted, "latent_mask": mask}

    def network_input(self, z_t: Tensor, latents: dict[str, Tensor]) -> Tensor:
        """``[z_t, latent_mask, z_corrupted]``, ``(B, 2C + 1, h, w)`` (``components/conditioning.py``)."""
        return conditional_input(z_t, latents["latent_mask"], latents["latent_corrupted"])

    def loss_map(self, latents: dict[str, Tensor]) -> Tensor:
        """1 inside the latent mask, ``known_weight`` outside: ``(B, 1, h, w)``."""
        mask = latents["latent_mask"]
        return mask + self.known_weight * (1 - mask)
