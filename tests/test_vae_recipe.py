"""The autoencoder recipe's levers (latent channels, init, perceptual and adversarial terms, LR schedule), the
EfficientNet-Lite0 feature losses, the VAE study command and the VAE ceilings."""

import functools
import json
import math

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

from datamodules.imageio import write_image_atomic, write_mask_atomic
from lightning_modules.autoencoder_module import AutoencoderModule
from lightning_modules.components.autoencoders import build_autoencoder
from lightning_modules.components.features import PerceptualLoss, PooledFeatures
from lightning_modules.optim import WarmupCosine
from tests.tiny_data import TinyTileDataModule, real_crops

ADAMW = functools.partial(torch.optim.AdamW, lr=1e-3)


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


def test_build_options_latent_channels_attention_and_logvar_init():
    vae = build_autoencoder("tiny", latent_channels=8, mid_block_attention=False, logvar_init=-8.0)
    assert vae.config.latent_channels == 8 and not vae.config.mid_block_add_attention
    assert torch.all(vae.quant_conv.bias[8:] == -8.0)
    posterior = vae.encode(real_crops(1)).latent_dist
    assert posterior.mean.shape == (1, 8, 8, 8) and posterior.std.max() < 0.05
    assert build_autoencoder("tiny").encode(real_crops(1)).latent_dist.std.min() > 0.3, "diffusers' default init"
    with pytest.raises(ValueError, match="latent_channels"):
        build_autoencoder("tiny", latent_channels=0)


def test_warmup_cosine_schedule():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    schedule = WarmupCosine(opt, total_steps=100, warmup_steps=10, final_fraction=0.1)
    factors = [schedule.factor(s) for s in (0, 9, 10, 50, 100, 200)]
    assert factors[0] == pytest.approx(0.1) and factors[1] == pytest.approx(0.1 + 0.45 * (1 + math.cos(0.09 * math.pi)))
    assert factors[3] == pytest.approx(0.55) and factors[4] == pytest.approx(0.1) == factors[5]
    with pytest.raises(ValueError, match="total_steps"):
        WarmupCosine(opt, total_steps=0)


def test_perceptual_loss_and_pooled_features():
    loss = PerceptualLoss(pretrained=True)
    x = real_crops(2)
    assert loss(x, x).item() == pytest.approx(0.0, abs=1e-6)
    blurred = torch.nn.functional.avg_pool2d(x, 5, 1, 2)
    assert loss(blurred, x).item() > loss(x + 0.01 * torch.randn_like(x), x).item() > 0
    assert not any(p.requires_grad for p in loss.parameters())
    loss.train()
    assert not loss.network.training, "the frozen network stays in eval mode"
    feats = PooledFeatures()((x + 1) / 2)
    assert feats.shape == (2, 1280) and feats.dtype == torch.float64
    with pytest.raises(ValueError, match="stages"):
        PerceptualLoss(stages=(7,), pretrained=False)


def test_autoencoder_with_perceptual_and_adversarial_terms_trains_and_reloads(tmp_path):
    module = AutoencoderModule(
        vae="tiny",
        optimizer=ADAMW,
        latent_channels=8,
        mid_block_attention=False,
        logvar_init=-8.0,
        perceptual_weight=0.5,
        disc_weight=0.5,
        disc_start=1,
    )
    assert not module.automatic_optimization
    trainer = _trainer(max_steps=5, gradient_clip_val=None)
    trainer.fit(module, TinyTileDataModule())
    assert int(module.vae_steps) == 3, "5 optimiser steps = 1 VAE step, then 2 x (VAE + discriminator)"
    assert {"train/perceptual", "train/g_loss", "train/d_loss", "train/disc_adaptive_weight"} <= set(
        trainer.callback_metrics
    )
    state = module.state_dict()
    assert not any(k.startswith("perceptual.") for k in state), "the frozen feature network is not checkpointed"
    again = AutoencoderModule(
        vae="tiny", latent_channels=8, mid_block_attention=False, perceptual_weight=0.5, disc_weight=0.5
    )
    again.load_state_dict(state)
    assert int(again.vae_steps) == 3
    with pytest.raises(Exception, match="gradient_clip_val"):  # Lightning refuses clipping under manual optimisation
        _trainer(max_steps=1, gradient_clip_val=1.0).fit(
            AutoencoderModule(vae="tiny", optimizer=ADAMW, disc_weight=0.5), TinyTileDataModule()
        )


def test_vae_study_trains_scores_and_reuses_rows(tmp_path, capsys):
    from experiments import vae_study

    rows = vae_study.load_rows()
    assert {"previous-demo", "fast-c4", "fast-c8", "fast-c16", "c16-perceptual", "c16-gan"} <= set(rows)
    out = tmp_path / "study"
    assert vae_study.main(["--rows", "fast-c8", "--scale", "0.004", "--out", str(out)]) == 0
    record = json.loads((out / "fast-c8" / "record.json").read_text())
    assert record["steps"] == 8 and record["latent_channels"] == 8
    for tissue in ("seen", "unseen"):
        assert {"psnr", "ssim", "fsim"} <= set(record["scores"][tissue]) and record["scores"][tissue]["n"] >= 4
    table = (out / "vae_study.md").read_text()
    assert "| fast-c8 |" in table and "unseen PSNR" in table
    assert vae_study.main(["--rows", "fast-c8", "--scale", "0.004", "--out", str(out)]) == 0
    assert "reusing" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="unknown row"):
        vae_study.main(["--rows", "nope", "--out", str(out)])


def test_ceilings_rank_the_oracles_above_a_corrupted_input(tmp_path, he_tiles):
    from experiments import ceilings

    torch.manual_seed(0)
    build_autoencoder("tiny").save_pretrained(tmp_path / "vae")
    for i, tile in enumerate(he_tiles[:3]):
        clean = tile[:64, :64]
        mask = np.zeros((64, 64), bool)
        mask[20:40] = True
        corrupted = clean.copy()
        corrupted[mask] = 0
        write_image_atomic(tmp_path / "set" / "clean" / f"t{i}.png", clean)
        write_image_atomic(tmp_path / "set" / "corrupted" / f"t{i}.png", corrupted)
        write_mask_atomic(tmp_path / "set" / "masks" / f"t{i}.png", mask)
    values = ceilings.vae_ceilings(tmp_path / "vae", tmp_path / "set")
    assert set(values) == {"input", "oracle-full", "oracle-delta", "oracle-od-delta", "oracle-adaptive"}
    assert len(values["input"]["psnr"]) == 3
    assert np.mean(values["oracle-full"]["psnr"]) > np.mean(values["input"]["psnr"])
    assert (
        ceilings.main(
            ["--vae", str(tmp_path / "vae"), "--data", str(tmp_path / "set"), "--out", str(tmp_path / "c.md")]
        )
        == 0
    )
    assert "oracle-delta" in (tmp_path / "c.md").read_text()
    with pytest.raises(SystemExit, match="not a folder"):
        ceilings.main(["--vae", str(tmp_path / "nope"), "--data", str(tmp_path / "set")])
