"""Training-time restoration check: every N epochs, restore a fixed validation set with the current (EMA) denoiser.

The callback synthesises a small, fixed set of corrupted validation tiles once (the DataModule's val split, so it is
spatially disjoint from training), then every ``every_n_epochs`` restores it with the module's sampling denoiser
through the same regional sampler and restorer code the exported pipeline uses, and logs the region metrics
(``val_restore/<region>_<metric>``) and a grid (corrupted | mask | restored | clean). Configured baseline restorers
(``identity``, ``telea``, ...) are scored once on the same tiles and logged as ``val_restore_<name>/...`` at every
check, so the curves show the model against the baselines.

DDP: every rank restores the same tiles with the same seed (identical results), scalars are logged without
``sync_dist`` (identical on every rank) and images are written only by rank 0. The one collective involved,
``trainer.log_dir`` (a broadcast), is evaluated on every rank before the rank-0 branch.

Compose it into a training run by appending to the callback list of ``base.yaml`` from a later config file (the
``callbacks+:`` key; ``model/latent_cpu.yaml`` and ``model/latent_paper.yaml`` do this). Restoration runs in fp32
whatever the trainer's precision, so the numbers do not depend on the mixed-precision setting.
"""

import logging
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import WandbLogger

from datamodules.datasets import to_uint8
from datamodules.imageio import write_image_atomic
from datamodules.restoration import ArtifactRestorationDataModule
from lightning_modules.components.autoencoders import LatentCodec
from lightning_modules.components.regional_sampler import RegionalSampler, SamplerConfig, restore
from lightning_modules.components.schedulers import build_scheduler
from lightning_modules.methods import build_restorer
from lightning_modules.metrics.functional import per_image_metrics

log = logging.getLogger(__name__)

REGIONS = ("whole", "artifact", "clean", "boundary")
METRICS = ("psnr", "ssim", "fsim", "mse")


class RestorationEvalCallback(Callback):
    """Restore a fixed validation set during training and log region metrics next to baselines.

    Args:
        sources: Image sources of the validation tiles (as the DataModules take them).
        tile_size: Tile edge in pixels.
        num_tiles: How many validation tiles to restore (keep it small: this runs the full sampler).
        every_n_epochs: Run at the end of every N-th training epoch.
        num_steps: Sampler steps.
        preset: Sampler preset (``"repaint"`` or ``"reference"``).
        scheduler: Sampling scheduler name.
        baselines: Registered restorers scored once on the same tiles (e.g. ``["identity", "telea"]``).
        seed: Seed of the corruptions and of the sampler noise.
        metrics: Metric names (FSIM is the slowest).
        sampler: Extra ``SamplerConfig`` fields (e.g. ``{"decode": "delta"}``); they win over the module's own
            ``sampler_defaults`` (the conditional restorer's mask dilation).

    Raises:
        ValueError: If ``num_tiles``, ``every_n_epochs`` or ``num_steps`` is below 1.
    """

    def __init__(
        self,
        sources: str = "bundled",
        tile_size: int = 256,
        num_tiles: int = 4,
        every_n_epochs: int = 5,
        num_steps: int = 20,
        preset: str = "repaint",
        scheduler: str = "ddim",
        baselines: list[str] | None = None,
        seed: int = 0,
        metrics: list[str] | None = None,
        sampler: dict | None = None,
    ) -> None:
        super().__init__()
        for name, value in (("num_tiles", num_tiles), ("every_n_epochs", every_n_epochs), ("num_steps", num_steps)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.sources, self.tile_size, self.num_tiles = sources, tile_size, num_tiles
        self.every_n_epochs, self.num_steps, self.preset, self.scheduler = every_n_epochs, num_steps, preset, scheduler
        self.baselines = list(baselines if baselines is not None else ["identity", "telea"])
        self.seed = seed
        self.metrics = tuple(metrics or METRICS)
        self.sampler_overrides = dict(sampler or {})
        SamplerConfig.from_preset(preset, num_steps=num_steps, **self.sampler_overrides)  # fail at config time
        self.batch: dict | None = None
        self.baseline_scores: dict[str, dict[str, float]] = {}

    def _fixed_batch(self) -> dict:
        if self.batch is None:
            dm = ArtifactRestorationDataModule(
                sources=self.sources,
                tile_size=self.tile_size,
                stride=self.tile_size,
                seed=self.seed,
                num_workers=0,
                max_tiles={"val": self.num_tiles},
                batch_size=self.num_tiles,
            )
            dm.setup("validate")
            self.batch = next(iter(dm.val_dataloader()))
        return self.batch

    def _scores(self, restored: torch.Tensor, batch: dict) -> dict[str, float]:
        # the metrics reject values outside [-1, 1]; a restorer's float round-off must not abort training
        values = per_image_metrics(
            restored.float().cpu().clamp(-1, 1),
            batch["clean"],
            batch["artifact_mask"],
            regions=REGIONS,
            metrics=self.metrics,
        )
        out = {}
        for key, vals in values.items():
            finite = vals[torch.isfinite(vals)]
            if finite.numel():
                out[key.replace("/", "_")] = float(finite.mean())
        return out

    @staticmethod
    def _codec(pl_module: LightningModule) -> LatentCodec:
        get_codec = getattr(pl_module, "get_codec", None)
        codec = get_codec() if get_codec is not None else None
        if codec is None:
            raise ValueError(
                "RestorationEvalCallback needs a latent module with an autoencoder (LatentDiffusionModule with "
                f"model.init_args.autoencoder set); got {type(pl_module).__name__} without one"
            )
        return codec

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Check the module can be restored with (before any training), build the fixed set, score the baselines."""
        self._codec(pl_module)
        batch = self._fixed_batch()
        for name in self.baselines:
            restorer = build_restorer(name)
            restored = restorer.restore(batch["corrupted"], batch["artifact_mask"])
            self.baseline_scores[name] = self._scores(restored, batch)
        log.info(
            "restoration check: %d fixed val tiles every %d epochs; baselines %s",
            len(batch["clean"]),
            self.every_n_epochs,
            self.baselines,
        )

    @torch.no_grad()
    def restore_batch(self, pl_module: LightningModule) -> torch.Tensor:
        """Restore the fixed set with the module's (EMA) denoiser; (N, 3, H, W) in [-1, 1]."""
        codec = self._codec(pl_module)
        batch = self._fixed_batch()
        device = pl_module.device
        overrides = {**getattr(pl_module, "sampler_defaults", {}), **self.sampler_overrides}
        config = SamplerConfig.from_preset(self.preset, num_steps=self.num_steps, **overrides)
        sched = build_scheduler(
            self.scheduler if self.preset == "repaint" else "ddpm", dict(pl_module.noise_scheduler.config)
        )
        sampler = RegionalSampler(sched, config)
        generator = torch.Generator(device="cpu").manual_seed(self.seed)
        denoiser = pl_module.sampling_denoiser()
        return restore(
            lambda x: codec.encode(x, generator=generator),
            codec.decode,
            sampler,
            denoiser,
            batch["corrupted"].to(device),
            batch["artifact_mask"].to(device),
            factor=codec.factor,
            generator=generator,
            conditional=getattr(pl_module, "conditional", False),
            residual=getattr(pl_module, "residual", False),
        )

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Every N epochs: restore, log metrics for the model and the baselines, log a grid."""
        if (trainer.current_epoch + 1) % self.every_n_epochs or trainer.sanity_checking:
            return
        was_training = pl_module.training
        pl_module.eval()
        try:
            restored = self.restore_batch(pl_module)
        finally:
            pl_module.train(was_training)
        batch = self._fixed_batch()
        for key, value in self._scores(restored, batch).items():
            pl_module.log(f"val_restore/{key}", value, on_epoch=True, sync_dist=False)
        for name, scores in self.baseline_scores.items():
            for key, value in scores.items():
                pl_module.log(f"val_restore_{name}/{key}", value, on_epoch=True, sync_dist=False)
        wandb_logger = next((lg for lg in trainer.loggers if isinstance(lg, WandbLogger)), None)
        # trainer.log_dir broadcasts: evaluate it on every rank, never inside the rank-0 branch below
        grid_dir = None if wandb_logger is not None else Path(trainer.log_dir or trainer.default_root_dir)
        if trainer.is_global_zero:
            image = self._grid(batch, restored)
            if wandb_logger is not None:
                wandb_logger.log_image(
                    "val_restore/grid",
                    [image],
                    step=trainer.global_step,
                    caption=["corrupted | mask | restored | clean"],
                )
            else:
                write_image_atomic(grid_dir / "restore_grids" / f"epoch{trainer.current_epoch:04d}.png", image)

    @staticmethod
    def _grid(batch: dict, restored: torch.Tensor) -> np.ndarray:
        """uint8 ``(N*H, 4*W, 3)``: one row per tile, columns corrupted | mask | restored | clean."""
        mask_rgb = batch["artifact_mask"].expand(-1, 3, -1, -1) * 2 - 1
        cols = [batch["corrupted"], mask_rgb, restored.float().cpu().clamp(-1, 1), batch["clean"]]
        return to_uint8(torch.cat([torch.cat(list(c), dim=-2) for c in cols], dim=-1))
