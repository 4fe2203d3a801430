"""LatentDiffusionModule and AutoencoderModule: frozen codec, EMA timing, checkpoints, exact resume, export."""

import functools

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from lightning_modules.autoencoder_module import AutoencoderModule
from lightning_modules.components.autoencoders import build_autoencoder, load_autoencoder
from lightning_modules.components.denoisers import build_unet
from lightning_modules.latent_diffusion import LatentDiffusionModule
from tests.tiny_data import TinyLatentDataModule, TinyTileDataModule, real_crops

ADAMW = functools.partial(torch.optim.AdamW, lr=1e-3)


@pytest.fixture
def vae_dir(tmp_path):
    """A tiny diffusers VAE folder."""
    torch.manual_seed(0)
    build_autoencoder("tiny").save_pretrained(tmp_path / "vae")
    return str(tmp_path / "vae")


def _module(autoencoder=None, ema_decay=0.9, **kwargs) -> LatentDiffusionModule:
    torch.manual_seed(0)
    return LatentDiffusionModule(
        build_unet("tiny", sample_size=8), autoencoder=autoencoder, optimizer=ADAMW, ema_decay=ema_decay, **kwargs
    )


def _trainer(**kwargs) -> Trainer:
    defaults = {
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_checkpointing": False,
        "enable_model_summary": False,
        "limit_val_batches": 1,
    }
    return Trainer(**{**defaults, **kwargs})


def test_one_step_trains_the_denoiser_only_and_keeps_the_codec_frozen(vae_dir):
    module = _module(vae_dir)
    module.setup("fit")
    vae_before = {k: v.clone() for k, v in module.codec.state_dict().items()}
    unet_before = {k: v.clone() for k, v in module.denoiser.state_dict().items()}
    trainer = _trainer(max_epochs=1, limit_train_batches=1)
    trainer.fit(module, TinyTileDataModule())
    assert not module.codec.training and not module.codec.vae.training
    assert all(not p.requires_grad for p in module.codec.parameters())
    for key, value in module.codec.state_dict().items():
        torch.testing.assert_close(value, vae_before[key])
    assert any(not torch.equal(v, unet_before[k]) for k, v in module.denoiser.state_dict().items())
    optimised = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimised == {id(p) for p in module.denoiser.parameters()}
    assert not any(k.startswith("codec.") for k in module.state_dict())
    assert {"train/loss_step", "val/loss", "val/loss_ema"} <= set(trainer.callback_metrics)


def test_ema_updates_only_after_optimizer_steps():
    module = _module()
    trainer = _trainer(max_epochs=1, limit_train_batches=3, accumulate_grad_batches=2, limit_val_batches=0)
    trainer.fit(module, TinyLatentDataModule(batch_size=2))
    # 3 batches with accumulation 2: steps after batch 2 and after the last batch, never after batch 1.
    assert trainer.global_step == 2
    assert module.denoiser_ema.n_averaged == 2


def test_sampling_denoiser_uses_ema_weights():
    module = _module(ema_decay=0.5)
    _trainer(max_steps=3, limit_val_batches=0).fit(module, TinyLatentDataModule(batch_size=2))
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 500])
    eps = module.sampling_denoiser()(x, t)
    torch.testing.assert_close(eps, module.denoiser_ema.module(x, t).sample)
    assert not torch.allclose(eps, module.denoiser(x, t).sample)
    torch.testing.assert_close(module.sampling_denoiser()(x, 10), module.denoiser_ema.module(x, t[:1] * 0 + 10).sample)
    assert module.sampling_network is module.denoiser_ema.module
    raw = _module(ema_decay=None)
    assert raw.sampling_network is raw.denoiser
    torch.testing.assert_close(raw.sampling_denoiser()(x, t), raw.denoiser(x, t).sample)


def test_min_snr_weights_and_bad_arguments():
    module = _module(loss_weighting="min_snr", min_snr_gamma=5.0)
    t = torch.tensor([0, 500, 999])
    ac = module.noise_scheduler.alphas_cumprod[t]
    snr = ac / (1 - ac)
    torch.testing.assert_close(module._weights(t), torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert module.noise_scheduler.config.beta_schedule == "scaled_linear"
    with pytest.raises(ValueError, match="l1"):
        _module(loss_weighting="l1")
    with pytest.raises(ValueError, match="sample"):
        _module(scheduler={"prediction_type": "sample"})
    with pytest.raises(ValueError, match="autoencoder=None"):
        _module().model_step({"clean": real_crops(1)})


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, vae_dir):
    module = _module(vae_dir)
    trainer = _trainer(max_steps=2, default_root_dir=tmp_path, enable_checkpointing=True)
    trainer.fit(module, TinyTileDataModule())
    path = trainer.checkpoint_callback.best_model_path
    assert not any(k.startswith("codec.") for k in torch.load(path, weights_only=False)["state_dict"])
    loaded = LatentDiffusionModule.load_from_checkpoint(path, weights_only=False)
    assert loaded.codec is None and loaded.get_codec() is not None
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([3, 700])
    torch.testing.assert_close(loaded.sampling_denoiser()(x, t), module.sampling_denoiser()(x, t))
    torch.testing.assert_close(loaded.denoiser(x, t).sample, module.denoiser(x, t).sample)
    assert loaded.denoiser_ema.n_averaged == 2


def test_exact_resume_continues_steps_and_the_ema_counter(tmp_path, vae_dir):
    checkpoint = ModelCheckpoint(dirpath=tmp_path, save_last=True, save_top_k=0)
    first = _trainer(max_steps=2, callbacks=[checkpoint], enable_checkpointing=True, limit_val_batches=0)
    first.fit(_module(vae_dir), TinyTileDataModule(batch_size=2))
    resumed_module = _module(vae_dir)
    second = _trainer(max_steps=4, enable_checkpointing=False, limit_val_batches=0)
    second.fit(resumed_module, TinyTileDataModule(batch_size=2), ckpt_path=tmp_path / "last.ckpt", weights_only=False)
    assert second.global_step == 4
    assert resumed_module.denoiser_ema.n_averaged == 4  # 2 restored + 2 new; a fresh counter would read 2
    assert not resumed_module.codec.training


def test_autoencoder_module_step_export_and_reload(tmp_path):
    torch.manual_seed(0)
    module = AutoencoderModule(vae="tiny", optimizer=ADAMW, kl_weight=1e-6, ssim_weight=0.2)
    before = {k: v.clone() for k, v in module.vae.state_dict().items()}
    trainer = _trainer(max_epochs=1, limit_train_batches=1)
    trainer.fit(module, TinyTileDataModule())
    assert any(not torch.equal(v, before[k]) for k, v in module.vae.state_dict().items())
    assert {"train/loss_step", "train/rec", "train/kl", "val/loss", "val/psnr", "val/ssim"} <= set(
        trainer.callback_metrics
    )
    images = module.log_images({"clean": real_crops(2)})
    assert images["reconstruction"].shape == images["clean"].shape == (2, 3, 64, 64)
    assert images["reconstruction"].abs().max() <= 1
    module.export(tmp_path / "export", images=real_crops(8))
    loaded = load_autoencoder(tmp_path / "export")
    factor = loaded.config.scaling_factor
    assert factor != pytest.approx(0.18215)
    z = loaded.encode(real_crops(8)).latent_dist.sample() * factor
    assert 0.7 < z.std().item() < 1.3
    with pytest.raises(ValueError, match="kl_weight=-1"):
        AutoencoderModule(vae="tiny", kl_weight=-1)
