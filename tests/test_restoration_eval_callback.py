"""RestorationEvalCallback in a real (tiny) fit: logged keys, baselines, the paste-back cap, grids, sanity checks."""

import csv
import functools
import math

import cv2
import pytest
import torch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger

from datamodules.restoration import CleanTileDataModule
from lightning_modules.callbacks.restoration_eval import RestorationEvalCallback
from lightning_modules.components.autoencoders import build_autoencoder
from lightning_modules.components.denoisers import build_unet
from lightning_modules.latent_diffusion import LatentDiffusionModule
from lightning_modules.metrics.functional import DATA_RANGE, PSNR_MSE_FLOOR

PSNR_CAP = 10 * math.log10(DATA_RANGE**2 / PSNR_MSE_FLOOR)  # 148.13 dB: a bit-exact region
REGIONS = ("whole", "artifact", "clean", "boundary")
METRICS = ("psnr", "ssim", "mse")


class _SanityProbe(Callback):
    """Records what exists right after the sanity check, before any training epoch."""

    def __init__(self, grid_dir) -> None:
        self.grid_dir = grid_dir
        self.keys_after_sanity: list[str] | None = None
        self.grids_after_sanity: list | None = None

    def on_sanity_check_end(self, trainer, pl_module) -> None:
        self.keys_after_sanity = list(trainer.callback_metrics)
        self.grids_after_sanity = sorted(self.grid_dir.glob("*.png")) if self.grid_dir.exists() else []


@pytest.fixture(scope="module")
def fitted(tmp_path_factory):
    """Two tiny epochs with the callback every epoch; returns (trainer, callback, probe, log dir)."""
    root = tmp_path_factory.mktemp("restore_eval")
    torch.manual_seed(0)
    build_autoencoder("tiny").save_pretrained(root / "vae")
    module = LatentDiffusionModule(
        build_unet("tiny", sample_size=8), autoencoder=str(root / "vae"), ema_decay=0.9,
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
    )  # fmt: skip
    data = CleanTileDataModule(
        tile_size=64, stride=64, max_tiles={"train": 8, "val": 4}, num_workers=0, batch_size=4, augment=False
    )
    callback = RestorationEvalCallback(
        tile_size=64, num_tiles=2, every_n_epochs=1, num_steps=2, baselines=["identity"], metrics=list(METRICS)
    )
    logger = CSVLogger(root, name="csv", version=0)
    probe = _SanityProbe(root / "csv" / "version_0" / "restore_grids")
    trainer = Trainer(
        accelerator="cpu", max_epochs=2, limit_train_batches=1, limit_val_batches=1, num_sanity_val_steps=1,
        logger=logger, callbacks=[callback, probe], enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, default_root_dir=root,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    return trainer, callback, probe, root / "csv" / "version_0"


def test_logs_finite_region_metrics_for_the_model_and_the_baseline(fitted):
    trainer, _, _, _ = fitted
    metrics = trainer.callback_metrics
    for prefix in ("val_restore", "val_restore_identity"):
        for region in REGIONS:
            for metric in METRICS:
                key = f"{prefix}/{region}_{metric}"
                assert key in metrics, f"missing {key}; logged: {sorted(metrics)}"
                assert torch.isfinite(metrics[key]), key
    assert not any(k.startswith("val_restore_telea") or k.endswith("_fsim") for k in metrics)


def test_identity_and_paste_back_keep_clean_tissue_bit_exact(fitted):
    trainer, callback, _, _ = fitted
    assert callback.baseline_scores["identity"]["clean_psnr"] == PSNR_CAP
    assert callback.baseline_scores["identity"]["clean_mse"] == 0.0
    logged = trainer.callback_metrics
    assert logged["val_restore_identity/clean_psnr"].item() == torch.tensor(PSNR_CAP).item()
    # the repaint preset pastes the decoded result back only inside the artifact mask
    assert logged["val_restore/clean_psnr"].item() == torch.tensor(PSNR_CAP).item()
    assert logged["val_restore_identity/artifact_psnr"] < 60.0  # the artifacts really corrupt the tiles


def test_restored_tiles_use_the_ema_denoiser_and_differ_from_the_corrupted_input(fitted):
    trainer, callback, _, _ = fitted
    module = trainer.lightning_module
    batch = callback._fixed_batch()
    assert batch["corrupted"].shape == (2, 3, 64, 64)
    restored = callback.restore_batch(module)
    assert restored.shape == batch["corrupted"].shape and restored.min() >= -1 and restored.max() <= 1
    outside = batch["artifact_mask"].expand_as(restored) == 0
    assert torch.equal(restored[outside], batch["corrupted"][outside])
    assert not torch.equal(restored[~outside], batch["corrupted"][~outside])
    assert torch.equal(callback.restore_batch(module), restored)  # fixed seed: same tiles, same noise
    raw, ema = module.denoiser.conv_out.bias, module.denoiser_ema.module.conv_out.bias
    with torch.no_grad():
        raw.add_(1.0)
        assert torch.equal(callback.restore_batch(module), restored), "the raw weights must not be used"
        raw.sub_(1.0)
        ema.add_(1.0)
        changed = callback.restore_batch(module)
        ema.sub_(1.0)
    assert not torch.equal(changed, restored), "the EMA weights must be used"


def test_every_epoch_goes_to_the_csv_and_writes_a_grid_png(fitted):
    _, _, _, log_dir = fitted
    with open(log_dir / "metrics.csv") as handle:
        rows = [r for r in csv.DictReader(handle) if r.get("val_restore/artifact_psnr")]
    assert [int(r["epoch"]) for r in rows] == [0, 1]
    grids = sorted(p.name for p in (log_dir / "restore_grids").glob("*.png"))
    assert grids == ["epoch0000.png", "epoch0001.png"]
    image = cv2.imread(str(log_dir / "restore_grids" / "epoch0001.png"))
    assert image.shape == (2 * 64, 4 * 64, 3)  # rows: tiles; columns: corrupted | mask | restored | clean


def test_sanity_check_runs_before_any_restoration(fitted):
    _, _, probe, _ = fitted
    assert probe.keys_after_sanity is not None, "the sanity check did not run"
    assert not any(k.startswith("val_restore") for k in probe.keys_after_sanity)
    assert probe.grids_after_sanity == []


def test_grid_path_is_resolved_with_the_same_collectives_on_every_rank(fitted, tmp_path, monkeypatch):
    """``trainer.log_dir`` broadcasts; a rank-0-only call would hang DDP. Simulate rank 0 and rank 1."""
    trainer, callback, _, _ = fitted
    module = trainer.lightning_module
    logged: dict[str, float] = {}
    monkeypatch.setattr(module, "log", lambda name, value, **_: logged.__setitem__(name, value))
    calls = []

    def broadcast(obj, src=0):
        calls.append(obj)
        return str(tmp_path)  # every rank receives rank 0's directory

    monkeypatch.setattr(trainer.strategy, "broadcast", broadcast)
    per_rank = {}
    for is_zero in (False, True):
        monkeypatch.setattr(type(trainer), "is_global_zero", property(lambda self, z=is_zero: z))
        calls.clear()
        callback.on_train_epoch_end(trainer, module)
        per_rank[is_zero] = (len(calls), sorted(p.name for p in (tmp_path / "restore_grids").glob("*.png")))
    assert per_rank[False][0] == per_rank[True][0] == 1
    assert per_rank[False][1] == [] and per_rank[True][1] == [f"epoch{trainer.current_epoch:04d}.png"]
    assert logged["val_restore_identity/clean_psnr"] == PSNR_CAP and math.isfinite(logged["val_restore/whole_ssim"])


def test_rejects_a_module_without_an_autoencoder_before_training():
    module = LatentDiffusionModule(build_unet("tiny", sample_size=8), autoencoder=None, ema_decay=None)
    callback = RestorationEvalCallback(tile_size=64, num_tiles=1, num_steps=1, baselines=[])
    with pytest.raises(ValueError, match="autoencoder"):
        callback.on_fit_start(None, module)
    with pytest.raises(ValueError, match="autoencoder"):
        callback.restore_batch(module)


@pytest.mark.parametrize("name", ["num_tiles", "every_n_epochs", "num_steps"])
def test_rejects_non_positive_counts(name):
    with pytest.raises(ValueError, match=name):
        RestorationEvalCallback(**{name: 0})


def test_grid_goes_to_wandb_instead_of_png_when_a_wandb_logger_is_present(fitted, tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    trainer, callback, _, _ = fitted
    module = trainer.lightning_module
    monkeypatch.setattr(module, "log", lambda *args, **kwargs: None)
    wandb_logger = WandbLogger(save_dir=str(tmp_path), mode="disabled")
    images = []
    monkeypatch.setattr(wandb_logger, "log_image", lambda key, imgs, **kw: images.append((key, imgs, kw)))
    monkeypatch.setattr(type(trainer), "loggers", property(lambda self: [wandb_logger]))
    monkeypatch.setattr(type(trainer), "default_root_dir", property(lambda self: str(tmp_path)))
    callback.on_train_epoch_end(trainer, module)
    [(key, imgs, kwargs)] = images
    assert key == "val_restore/grid" and imgs[0].shape == (2 * 64, 4 * 64, 3) and imgs[0].dtype.name == "uint8"
    assert kwargs["step"] == trainer.global_step
    assert not list(tmp_path.rglob("*.png"))


@pytest.mark.parametrize(("model", "extra", "every_n"), [("latent_cpu", [], 5), ("latent_paper", ["trainer/ddp"], 50)])
def test_model_configs_append_the_callback_to_the_base_list(model, extra, every_n, tmp_path):
    from experiments.train import cli_main

    configs = ["base", f"model/{model}", "ablations/no_ema", *extra]
    cli = cli_main(
        [*(a for c in configs for a in ("--config", f"experiments/configs/{c}.yaml")),
         "--data.class_path", "tests.tiny_data.TinyTileDataModule", "--trainer.accelerator=cpu",
         "--trainer.devices=1", "--trainer.logger=false", "--trainer.default_root_dir", str(tmp_path)],
        run=False,
    )  # fmt: skip
    names = [type(c).__name__ for c in cli.trainer.callbacks]
    assert names.count("ModelCheckpoint") == 1 and names.count("LearningRateMonitor") == 1
    [callback] = [c for c in cli.trainer.callbacks if isinstance(c, RestorationEvalCallback)]
    assert callback.every_n_epochs == every_n and callback.baselines == ["identity", "telea"]
    assert cli.trainer.checkpoint_callback.monitor == "val/loss_ema"
