"""TimedSnapshots (the learning curve's exports at training wall-clock budgets) and the learning-curve command."""

import functools
import json

import pytest
import torch
from lightning.pytorch import Trainer

from lightning_modules.callbacks.snapshots import TimedSnapshots
from lightning_modules.components.autoencoders import build_autoencoder
from lightning_modules.components.denoisers import build_unet
from lightning_modules.components.pipeline import RestorationPipeline
from lightning_modules.latent_diffusion import LatentDiffusionModule
from tests.tiny_data import TinyTileDataModule


def test_snapshots_are_exported_at_the_budgets_then_training_stops(tmp_path):
    torch.manual_seed(0)
    build_autoencoder("tiny").save_pretrained(tmp_path / "vae")
    module = LatentDiffusionModule(
        build_unet("tiny", sample_size=8),
        autoencoder=str(tmp_path / "vae"),
        optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        ema_decay=0.9,
    )
    snapshots = TimedSnapshots(
        budgets=[1e-6, 0.05], out=str(tmp_path / "snaps"), sampler={"num_steps": 2}, image_size=64
    )
    trainer = Trainer(
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        max_steps=10_000,
        callbacks=[snapshots],
    )
    trainer.fit(module, TinyTileDataModule(batch_size=2))
    done = json.loads((tmp_path / "snaps" / "snapshots.json").read_text())
    assert [d["budget_s"] for d in done] == [1e-6, 0.05]
    assert done[0]["global_step"] == 1 and done[1]["trained_s"] >= 0.05
    assert trainer.global_step == done[1]["global_step"] < 10_000, "training stops after the last budget"
    pipe = RestorationPipeline.from_pretrained(tmp_path / "snaps" / "t00000s")
    assert pipe.sampler_config.num_steps == 2 and pipe.image_size == 64
    with pytest.raises(ValueError, match="increasing"):
        TimedSnapshots(budgets=[5, 1], out=str(tmp_path))


def test_learning_curve_refuses_missing_inputs(tmp_path):
    from experiments import learning_curve

    with pytest.raises(SystemExit, match="make demo"):
        learning_curve.main(["--demo", str(tmp_path), "--out", str(tmp_path / "lc")])
    with pytest.raises(SystemExit, match="increasing"):
        learning_curve.main(["--budgets", "20,10", "--demo", str(tmp_path), "--out", str(tmp_path / "lc")])
    with pytest.raises(SystemExit, match="unknown method"):
        learning_curve.main(["--methods", "gan", "--demo", str(tmp_path), "--out", str(tmp_path / "lc")])
