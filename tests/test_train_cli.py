"""The LightningCLI entry point with the shipped configs, run on the tiny test datamodules."""

import pytest
import torch
import yaml

from experiments.train import cli_main
from lightning_modules.components.autoencoders import build_autoencoder
from lightning_modules.latent_diffusion import LatentDiffusionModule

CONFIGS = "experiments/configs"
BASE = ["--config", f"{CONFIGS}/base.yaml"]
TINY_LATENT = ["--config", f"{CONFIGS}/model/latent_tiny.yaml"]


@pytest.fixture
def vae_dir(tmp_path):
    """A tiny diffusers VAE folder."""
    torch.manual_seed(0)
    build_autoencoder("tiny").save_pretrained(tmp_path / "vae")
    return str(tmp_path / "vae")


def test_print_config_lists_dotted_optimizer_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli_main(
            ["fit", *BASE, *TINY_LATENT, "--data.class_path", "tests.tiny_data.TinyLatentDataModule", "--print_config"]
        )
    assert exit_info.value.code == 0
    config = yaml.safe_load(capsys.readouterr().out)
    init_args = config["model"]["init_args"]
    assert init_args["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert init_args["optimizer"]["init_args"]["lr"] == 1e-3
    assert init_args["denoiser"]["init_args"]["size"] == "tiny"
    assert config["trainer"]["gradient_clip_val"] == 1.0 and config["trainer"]["precision"] == "bf16-mixed"


def test_fast_dev_run_on_clean_tiles_with_an_exported_vae(tmp_path, vae_dir):
    cli = cli_main(
        [
            "fit", *BASE, *TINY_LATENT,
            "--data.class_path", "tests.tiny_data.TinyTileDataModule",
            "--model.init_args.autoencoder", vae_dir,
            "--trainer.fast_dev_run=1",
            "--trainer.default_root_dir", str(tmp_path),
        ]
    )  # fmt: skip
    assert cli.trainer.global_step == 1
    assert cli.model.codec is not None and not cli.model.codec.training
    assert cli.model.denoiser_ema.n_averaged == 1


def test_paper_and_cpu_configs_parse_with_an_override(tmp_path):
    for name, size in (("latent_paper", "paper"), ("latent_cpu", "cpu")):
        cli = cli_main(
            [*BASE, "--config", f"{CONFIGS}/model/{name}.yaml", "--config", f"{CONFIGS}/ablations/no_ema.yaml",
             "--data.class_path", "tests.tiny_data.TinyTileDataModule", "--trainer.logger=false",
             "--trainer.default_root_dir", str(tmp_path)],
            run=False,
        )  # fmt: skip
        assert cli.config["model"]["init_args"]["denoiser"]["init_args"]["size"] == size
        assert cli.model.denoiser_ema is None
    assert cli.model.noise_scheduler.config.beta_end == 0.012


def test_cli_checkpoint_reloads_and_resumes_without_pickles_and_logs_config_to_wandb(tmp_path):
    cli = cli_main(
        [
            "fit", *BASE, *TINY_LATENT,
            "--data.class_path", "tests.tiny_data.TinyLatentDataModule",
            "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.precision=32-true",
            "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "wandb"),
        ]
    )  # fmt: skip
    assert cli.trainer.logger.experiment.config["model"]["init_args"]["ema_decay"] == 0.9
    path = cli.trainer.checkpoint_callback.last_model_path
    hparams = torch.load(path, weights_only=True)["hyper_parameters"]
    assert hparams["denoiser"]["class_path"] == "lightning_modules.components.denoisers.build_unet"
    loaded = LatentDiffusionModule.load_from_checkpoint(path)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([5, 900])
    torch.testing.assert_close(loaded.sampling_denoiser()(x, t), cli.model.sampling_denoiser()(x, t))
    assert loaded.denoiser_ema.n_averaged == 2
    resumed = cli_main(
        [
            "fit", *BASE, *TINY_LATENT,
            "--data.class_path", "tests.tiny_data.TinyLatentDataModule",
            "--trainer.max_steps=3", "--trainer.limit_val_batches=1", "--trainer.precision=32-true",
            "--trainer.default_root_dir", str(tmp_path), "--ckpt_path", path,
            "--trainer.logger.init_args.save_dir", str(tmp_path / "wandb"),
        ]
    )  # fmt: skip
    assert resumed.trainer.global_step == 3 and resumed.model.denoiser_ema.n_averaged == 3


def test_autoencoder_config_fast_dev_run(tmp_path):
    cli = cli_main(
        [
            "fit", *BASE, "--config", f"{CONFIGS}/model/vae_cpu.yaml",
            "--model.init_args.vae", "tiny",
            "--data.class_path", "tests.tiny_data.TinyTileDataModule",
            "--trainer.fast_dev_run=1",
            "--trainer.default_root_dir", str(tmp_path),
        ]
    )  # fmt: skip
    assert cli.trainer.global_step == 1
    assert cli.model.vae.config.block_out_channels == (8, 8, 8, 8)


def test_bundled_data_config_matches_the_datamodule_signature(tmp_path):
    pytest.importorskip("datamodules.restoration")
    cli = cli_main(
        [*BASE, "--config", f"{CONFIGS}/model/latent_cpu.yaml", "--config", f"{CONFIGS}/data/bundled.yaml",
         "--config", f"{CONFIGS}/trainer/ddp.yaml", "--trainer.accelerator=cpu", "--trainer.devices=1",
         "--trainer.logger=false", "--trainer.default_root_dir", str(tmp_path)],
        run=False,
    )  # fmt: skip
    assert cli.config["data"]["init_args"]["batch_size"] == 16
    assert cli.config["trainer"]["precision"] == "16-mixed" and cli.config["trainer"]["strategy"] == "ddp"
    assert type(cli.datamodule).__name__ == "CleanTileDataModule"
