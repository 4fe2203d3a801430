"""`experiments.export`: CLI checkpoints -> folders the restore/evaluate commands load."""

import pytest
import torch

from experiments import export
from experiments.train import cli_main
from lightning_modules.components.autoencoders import build_autoencoder, load_autoencoder
from lightning_modules.components.pipeline import RestorationPipeline

CONFIGS = "experiments/configs"


def _fit(tmp_path, *args):
    cli = cli_main(
        [
            "fit",
            "--config",
            f"{CONFIGS}/base.yaml",
            *args,
            "--data.class_path",
            "tests.tiny_data.TinyTileDataModule",
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=1",
            "--trainer.precision=32-true",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "wandb"),
        ]
    )
    return cli.trainer.checkpoint_callback.last_model_path


def test_export_vae_then_latent_pipeline(tmp_path):
    ckpt = _fit(
        tmp_path / "vae_run",
        "--config",
        f"{CONFIGS}/model/vae_cpu.yaml",
        "--model.init_args.vae",
        "tiny",
        "--model.init_args.latent_channels",
        "4",
    )
    vae_dir = export.export(
        export.parse_args(
            ["vae", "--ckpt", ckpt, "--out", str(tmp_path / "vae"), "--image-size", "64", "--scale-tiles", "4"]
        )
    )
    vae = load_autoencoder(vae_dir)
    assert list(vae.config.block_out_channels) == [8, 8, 8, 8]
    assert vae.config.scaling_factor != pytest.approx(0.18215), "scaling factor re-estimated on real tiles"

    ckpt = _fit(
        tmp_path / "latent_run",
        "--config",
        f"{CONFIGS}/model/latent_tiny.yaml",
        "--model.init_args.autoencoder",
        str(vae_dir),
    )
    out = export.export(
        export.parse_args(
            ["latent", "--ckpt", ckpt, "--out", str(tmp_path / "pipe"), "--steps", "3", "--image-size", "64"]
        )
    )
    pipe = RestorationPipeline.from_pretrained(out)
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    m = torch.zeros(1, 1, 64, 64)
    m[..., 10:30, 10:40] = 1
    y = pipe.restore(x, m, generator=torch.Generator().manual_seed(0))
    assert torch.equal(y[m.expand_as(x) == 0], x[m.expand_as(x) == 0]) and pipe.nfe == 3


def test_export_latent_without_autoencoder_is_a_clear_error(tmp_path):
    torch.manual_seed(0)
    build_autoencoder("tiny").save_pretrained(tmp_path / "vae")
    cli = cli_main(
        [
            "fit",
            "--config",
            f"{CONFIGS}/base.yaml",
            "--config",
            f"{CONFIGS}/model/latent_tiny.yaml",
            "--data.class_path",
            "tests.tiny_data.TinyLatentDataModule",
            "--trainer.max_steps=1",
            "--trainer.limit_val_batches=1",
            "--trainer.precision=32-true",
            "--trainer.default_root_dir",
            str(tmp_path),
            "--trainer.logger.init_args.save_dir",
            str(tmp_path / "wandb"),
        ]
    )
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    with pytest.raises(SystemExit, match="without an autoencoder"):
        export.export(export.parse_args(["latent", "--ckpt", ckpt, "--out", str(tmp_path / "p")]))
    with pytest.raises(SystemExit, match="is not a file"):
        export.export(export.parse_args(["latent", "--ckpt", str(tmp_path / "nope.ckpt"), "--out", "x"]))
