"""Training recipe of the CycleGAN baseline (docs/METHOD.md section 6; Zhu et al. 2017, as used via Ke et al. TMI 2023).

Two generators, ``G``: artifact -> clean (the restorer) and ``F``: clean -> artifact, and two PatchGAN discriminators,
``D_clean`` and ``D_artifact``, trained with the least-squares GAN loss (Mao et al. 2017), an L1 cycle-consistency
loss (weight 10 each way), an optional L1 identity loss (weight ``lambda_identity`` x the cycle weight, 0.5 x 10 in
Zhu et al.'s code), an image pool of 50 generated images per discriminator, Adam 2e-4 with betas (0.5, 0.999), and a
learning rate held constant for the first half of the epochs and then decayed linearly to zero.

Unpaired training from paired batches: the restoration batches carry aligned ``clean``/``corrupted`` tiles, which a
CycleGAN must not see as pairs. The artifact domain is ``batch["corrupted"]``; the clean domain is
``batch["clean"]`` rolled by one along the batch axis, so sample ``i`` of one domain is never the clean version of
sample ``i`` of the other. With a batch of one, the clean domain is the previous batch's clean tile instead (and the
very first batch of such a run is skipped, as no unpaired clean tile exists yet). The clean tile travels with its
own artifact mask, which the mask-channel variant needs for the clean -> artifact -> clean cycle.

Mask channel (``mask_channel=True``): both generators take the artifact mask as a fourth input channel. ``G`` learns
to restore where the mask says, ``F`` to draw artifacts where the mask says, so the cycles and the identity terms stay
consistent. The mask is known at test time, like for every other method of this suite.

Optimisation is manual (``automatic_optimization=False``): one Adam over both generators and one over both
discriminators, stepped once each per batch, and two ``LambdaLR`` schedulers stepped at the end of every epoch. Hence
the trainer's ``gradient_clip_val`` must be ``None`` (the shipped configs set it). The image pools are not part of the
checkpoint: a resumed run refills them within 50 images.

Validation logs ``val/l1`` (G(corrupted) vs clean over the whole tile, on [-1, 1]), ``val/l1_artifact`` and
``val/l1_clean`` (inside and outside the mask: the latter measures the colour mistransfer in clean tissue).
:meth:`CycleGANModule.export` writes ``G`` as a folder read by the ``cyclegan`` restorer.
"""

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import OptimizerCallable
from torch import Tensor
from torch.nn.functional import l1_loss, mse_loss

from lightning_modules.components.gan_networks import ImagePool, PatchDiscriminator, ResnetGenerator

log = logging.getLogger(__name__)


def linear_decay_factor(epoch: int, n_constant: int, n_decay: int) -> float:
    """Learning-rate factor of Zhu et al. 2017: 1 for ``n_constant`` epochs, then linear to 0 over ``n_decay``.

    The factor used during epoch ``n_constant + k`` (0-based k) is ``1 - (k + 1) / (n_decay + 1)``, so every
    training epoch has a positive rate and the factor reaches 0 exactly after the last epoch.

    Args:
        epoch: 0-based epoch index.
        n_constant: Epochs at the initial rate.
        n_decay: Epochs of linear decay.

    Returns:
        The multiplier in [0, 1].
    """
    return max(0.0, 1.0 - max(0, epoch + 1 - n_constant) / (n_decay + 1))


def lsgan_loss(scores: Tensor, target_is_real: bool) -> Tensor:
    """Least-squares GAN loss (Mao et al. 2017): mean of ``(D(x) - 1)^2`` for real targets, ``D(x)^2`` for fake."""
    target = torch.ones_like(scores) if target_is_real else torch.zeros_like(scores)
    return mse_loss(scores.float(), target.float())


class CycleGANModule(LightningModule):
    """CycleGAN (Zhu et al. 2017) between the artifact and the clean domain, optionally mask-aware.

    Args:
        ngf: Generator width (64 in the paper's baseline).
        n_blocks: Residual blocks per generator (9 for 256x256 tiles).
        ndf: Discriminator width (64).
        n_layers: Discriminator stride-2 layers (3: 70x70 patches).
        mask_channel: Feed the artifact mask as a fourth generator input channel (artifact-aware variant).
        lambda_cycle: Weight of each cycle-consistency L1 term (10).
        lambda_identity: Identity L1 weight relative to ``lambda_cycle`` (0.5 in Zhu et al.'s code; 0 disables).
        pool_size: Image-pool capacity per discriminator (50; 0 disables).
        optimizer: Called once with the generators' and once with the discriminators' parameters; ``None`` gives
            ``Adam(lr=2e-4, betas=(0.5, 0.999))``.
        n_epochs_constant: Epochs at the initial learning rate; ``None``: half of ``trainer.max_epochs``.
        n_epochs_decay: Epochs of linear decay to 0; ``None``: the rest of ``trainer.max_epochs``.
        pool_seed: Seed of the image pools' random choices.

    Raises:
        ValueError: For negative loss weights.
    """

    def __init__(
        self,
        ngf: int = 64,
        n_blocks: int = 9,
        ndf: int = 64,
        n_layers: int = 3,
        mask_channel: bool = False,
        lambda_cycle: float = 10.0,
        lambda_identity: float = 0.5,
        pool_size: int = 50,
        optimizer: OptimizerCallable | None = None,
        n_epochs_constant: int | None = None,
        n_epochs_decay: int | None = None,
        pool_seed: int = 0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if lambda_cycle < 0 or lambda_identity < 0:
            raise ValueError(f"loss weights must be >= 0, got lambda_cycle={lambda_cycle}, identity={lambda_identity}")
        self.automatic_optimization = False
        in_channels = 4 if mask_channel else 3
        self.G = ResnetGenerator(in_channels, 3, ngf=ngf, n_blocks=n_blocks)  # artifact -> clean
        self.F = ResnetGenerator(in_channels, 3, ngf=ngf, n_blocks=n_blocks)  # clean -> artifact
        self.D_clean = PatchDiscriminator(3, ndf=ndf, n_layers=n_layers)
        self.D_artifact = PatchDiscriminator(3, ndf=ndf, n_layers=n_layers)
        self.pool_clean = ImagePool(pool_size)  # fakes of G
        self.pool_artifact = ImagePool(pool_size)  # fakes of F
        self.pool_generator = torch.Generator().manual_seed(pool_seed)
        self._optimizer_factory = optimizer
        self._previous: tuple[Tensor, Tensor] | None = None

    # ------------------------------------------------------------------------------------------------------ data

    def unpaired_batch(self, batch: dict[str, Any]) -> dict[str, Tensor] | None:
        """Split a restoration batch into an artifact-domain and an unaligned clean-domain batch (module docstring).

        Args:
            batch: ``clean`` and ``corrupted`` (B, 3, H, W) in [-1, 1], ``artifact_mask`` (B, 1, H, W) in {0, 1}.

        Returns:
            ``artifact`` / ``artifact_mask`` (the corrupted tiles and their masks) and ``clean`` / ``clean_mask`` (clean
            tiles of other samples and their own masks); ``None`` for the first batch of a batch-size-1 run.
        """
        corrupted, clean, mask = batch["corrupted"], batch["clean"], batch["artifact_mask"]
        if corrupted.shape[0] > 1:
            other_clean, other_mask = clean.roll(1, dims=0), mask.roll(1, dims=0)
        elif self._previous is not None and self._previous[0].shape == clean.shape:
            other_clean, other_mask = self._previous
        else:
            other_clean = other_mask = None
        self._previous = (clean.detach(), mask.detach())
        if other_clean is None:
            return None
        return {"artifact": corrupted, "artifact_mask": mask, "clean": other_clean, "clean_mask": other_mask}

    def _mask(self, mask: Tensor) -> Tensor | None:
        return mask if self.hparams.mask_channel else None

    # -------------------------------------------------------------------------------------------------- training

    def generator_losses(self, real_a: Tensor, mask_a: Tensor, real_b: Tensor, mask_b: Tensor) -> dict[str, Tensor]:
        """Generator objective; ``a`` = artifact domain, ``b`` = clean domain (all images (B, 3, H, W) in [-1, 1]).

        Returns:
            ``loss`` (total), ``gan``, ``cycle``, ``identity`` (scalars) and the fakes ``fake_b`` = G(a),
            ``fake_a`` = F(b) for the discriminator step.
        """
        h = self.hparams
        fake_b = self.G(real_a, self._mask(mask_a))
        fake_a = self.F(real_b, self._mask(mask_b))
        # Zhu et al. 2017 eq. 1 with the least-squares objective: G and F try to make D score their outputs as real.
        gan = lsgan_loss(self.D_clean(fake_b), True) + lsgan_loss(self.D_artifact(fake_a), True)
        # Cycle consistency (Zhu et al. 2017 eq. 2): F(G(a)) ~ a and G(F(b)) ~ b, L1.
        cycle = l1_loss(self.F(fake_b, self._mask(mask_a)), real_a) + l1_loss(
            self.G(fake_a, self._mask(mask_b)), real_b
        )
        loss = gan + h.lambda_cycle * cycle
        identity = torch.zeros((), device=real_a.device)
        if h.lambda_identity > 0:
            # Identity mapping (Zhu et al. 2017 section 5.2): a clean tile given to G stays as it is, and vice versa.
            identity = l1_loss(self.G(real_b, self._mask(mask_b)), real_b) + l1_loss(
                self.F(real_a, self._mask(mask_a)), real_a
            )
            loss = loss + h.lambda_cycle * h.lambda_identity * identity
        return {"loss": loss, "gan": gan, "cycle": cycle, "identity": identity, "fake_a": fake_a, "fake_b": fake_b}

    def discriminator_loss(self, real_a: Tensor, real_b: Tensor, fake_a: Tensor, fake_b: Tensor) -> Tensor:
        """LSGAN discriminator objective on real tiles and pooled fakes, halved as in Zhu et al. 2017 (section 4)."""
        fake_b = self.pool_clean.query(fake_b, self.pool_generator)
        fake_a = self.pool_artifact.query(fake_a, self.pool_generator)
        loss_clean = lsgan_loss(self.D_clean(real_b), True) + lsgan_loss(self.D_clean(fake_b), False)
        loss_artifact = lsgan_loss(self.D_artifact(real_a), True) + lsgan_loss(self.D_artifact(fake_a), False)
        return 0.5 * (loss_clean + loss_artifact)

    def setup(self, stage: str) -> None:
        """Refuse a DDP strategy that does not look for unused parameters (before any step fails deep in DDP).

        Raises:
            ValueError: DDP without ``find_unused_parameters``: the discriminator step leaves the generators unused.
        """
        from lightning.pytorch.strategies import DDPStrategy

        strategy = self.trainer.strategy if self._trainer is not None else None
        if isinstance(strategy, DDPStrategy) and not getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters"):
            raise ValueError(
                "CycleGAN alternates generator and discriminator steps, so under DDP each step leaves the "
                "other networks unused: use --trainer.strategy=ddp_find_unused_parameters_true (or "
                "--config experiments/configs/trainer/ddp_gan.yaml instead of trainer/ddp.yaml)"
            )

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """One generator step, then one discriminator step; logs ``train/loss_G``, ``train/loss_D`` etc. (unsynced)."""
        pair = self.unpaired_batch(batch)
        if pair is None:
            return
        opt_g, opt_d = self.optimizers()
        real_a, mask_a, real_b, mask_b = pair["artifact"], pair["artifact_mask"], pair["clean"], pair["clean_mask"]
        size = real_a.shape[0]

        self.toggle_optimizer(opt_g)  # discriminators frozen while the generators learn
        out = self.generator_losses(real_a, mask_a, real_b, mask_b)
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(out["loss"])
        opt_g.step()
        self.untoggle_optimizer(opt_g)

        self.toggle_optimizer(opt_d)
        loss_d = self.discriminator_loss(real_a, real_b, out["fake_a"].detach(), out["fake_b"].detach())
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(loss_d)
        opt_d.step()
        self.untoggle_optimizer(opt_d)

        logs = {
            "train/loss_G": out["loss"],
            "train/loss_D": loss_d,
            "train/gan": out["gan"],
            "train/cycle": out["cycle"],
            "train/identity": out["identity"],
        }
        self.log_dict({k: v.detach() for k, v in logs.items()}, on_step=True, on_epoch=True, batch_size=size)

    def on_train_epoch_end(self) -> None:
        """Step both learning-rate schedulers once per epoch (manual optimisation does not do it)."""
        for scheduler in self.lr_schedulers():
            scheduler.step()

    # ------------------------------------------------------------------------------------------------ evaluation

    @torch.no_grad()
    def restore(self, corrupted: Tensor, artifact_mask: Tensor) -> Tensor:
        """G applied to the whole tile: (B, 3, H, W) [-1, 1] and (B, 1, H, W) {0, 1} -> (B, 3, H, W) [-1, 1]."""
        return self.G(corrupted, self._mask(artifact_mask))

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Log ``val/l1`` (whole tile), ``val/l1_artifact`` and ``val/l1_clean`` (per region), DDP-synced."""
        restored = self.restore(batch["corrupted"], batch["artifact_mask"])
        err = (restored.float() - batch["clean"].float()).abs().mean(1, keepdim=True)  # (B, 1, H, W)
        mask = batch["artifact_mask"].float()
        size = restored.shape[0]
        self.log("val/l1", err.mean(), on_epoch=True, sync_dist=True, prog_bar=True, batch_size=size)
        # Region means over the whole batch's pixels; an empty region logs 0 rather than NaN.
        self.log("val/l1_artifact", (err * mask).sum() / mask.sum().clamp_min(1), sync_dist=True, batch_size=size)
        clean_l1 = (err * (1 - mask)).sum() / (1 - mask).sum().clamp_min(1)
        self.log("val/l1_clean", clean_l1, sync_dist=True, batch_size=size)

    def log_images(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The image-logger contract: ``clean``, ``corrupted``, ``artifact_mask`` and ``restored`` (G's output)."""
        restored = self.restore(batch["corrupted"], batch["artifact_mask"])
        return {k: batch[k] for k in ("clean", "corrupted", "artifact_mask")} | {"restored": restored}

    # ------------------------------------------------------------------------------------------------ optimisers

    def _schedule_lengths(self) -> tuple[int, int]:
        h = self.hparams
        max_epochs = self.trainer.max_epochs if self._trainer is not None else None
        if h.n_epochs_constant is not None and h.n_epochs_decay is not None:
            return h.n_epochs_constant, h.n_epochs_decay
        if max_epochs is None or max_epochs < 1:
            raise ValueError(
                "the CycleGAN schedule needs trainer.max_epochs >= 1 or both n_epochs_constant and n_epochs_decay, "
                f"got max_epochs={max_epochs}"
            )
        n_constant = h.n_epochs_constant if h.n_epochs_constant is not None else max_epochs // 2
        n_decay = h.n_epochs_decay if h.n_epochs_decay is not None else max(0, max_epochs - n_constant)
        return n_constant, n_decay

    def configure_optimizers(self) -> tuple[list, list]:
        """Adam over G+F and over D_clean+D_artifact, each with a per-epoch constant-then-linear ``LambdaLR``."""
        factory = self._optimizer_factory or (lambda params: torch.optim.Adam(params, lr=2e-4, betas=(0.5, 0.999)))
        opt_g = factory(list(self.G.parameters()) + list(self.F.parameters()))
        opt_d = factory(list(self.D_clean.parameters()) + list(self.D_artifact.parameters()))
        n_constant, n_decay = self._schedule_lengths()
        log.info("CycleGAN learning rate: constant for %d epochs, then linear decay over %d", n_constant, n_decay)

        def factor(epoch: int) -> float:
            return linear_decay_factor(epoch, n_constant, n_decay)

        schedulers = [torch.optim.lr_scheduler.LambdaLR(opt, factor) for opt in (opt_g, opt_d)]
        return [opt_g, opt_d], schedulers

    # ---------------------------------------------------------------------------------------------------- export

    def export(self, path: str | Path) -> Path:
        """Write generator ``G`` (artifact -> clean) as a ``ResnetGenerator.from_pretrained`` folder.

        Args:
            path: Target folder (created or overwritten); read it with ``build_restorer("cyclegan", model=path)``.

        Returns:
            The folder path.
        """
        path = Path(path)
        self.G.save_pretrained(path)
        log.info("exported CycleGAN generator G to %s", path)
        return path
