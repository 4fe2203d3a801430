"""Model components: UNet presets, autoencoder presets, loading, the frozen latent codec, EMA."""

import pytest
import torch

from lightning_modules.components.autoencoders import (
    LatentCodec,
    build_autoencoder,
    estimate_scaling_factor,
    load_autoencoder,
)
from lightning_modules.components.denoisers import build_unet
from lightning_modules.components.ema import DenoiserEMA
from tests.tiny_data import real_crops


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_paper_unet_matches_the_authors_network():
    unet = build_unet("paper")
    assert abs(_n_params(unet) - 113.7e6) < 0.5e6
    assert unet.config.block_out_channels == (128, 128, 256, 256, 512, 512)
    assert unet.config.layers_per_block == 2
    # Attention only at the 2x2 level (5th of 6 blocks at sample_size 32) plus the mid block.
    assert [b for b in unet.config.down_block_types].count("AttnDownBlock2D") == 1
    assert unet.config.down_block_types[4] == "AttnDownBlock2D"
    assert unet.config.up_block_types[1] == "AttnUpBlock2D"
    assert unet.config.sample_size == 32 and unet.config.in_channels == unet.config.out_channels == 4


def test_cpu_and_tiny_unets_denoise_latent_shapes():
    assert 2e6 < _n_params(build_unet("cpu")) < 10e6
    unet = build_unet("tiny", sample_size=8, out_channels=8)
    out = unet(torch.randn(2, 4, 8, 8), torch.tensor([1, 999])).sample
    assert out.shape == (2, 8, 8, 8)


def test_builders_reject_bad_values():
    with pytest.raises(ValueError, match="huge"):
        build_unet("huge")
    with pytest.raises(ValueError, match="sample_size 12"):
        build_unet("cpu", sample_size=12)
    with pytest.raises(ValueError, match="sd3"):
        build_autoencoder("sd3")


def test_klf8_preset_has_sd15_sizes():
    config = build_autoencoder("kl-f8").config
    assert config.block_out_channels == (128, 256, 512, 512)
    assert config.layers_per_block == 2 and config.latent_channels == 4
    assert config.scaling_factor == pytest.approx(0.18215)


def test_codec_shapes_scaling_and_freezing():
    torch.manual_seed(0)
    codec = LatentCodec(build_autoencoder("tiny"))
    x = real_crops(2)
    assert codec.factor == 8 and codec.latent_channels == 4
    z = codec.encode(x, sample=False)
    assert z.shape == (2, 4, 8, 8)
    raw = codec.vae.encode(x).latent_dist.mean
    torch.testing.assert_close(z, raw * 0.18215)
    mean, std = codec.encode_dist(x)
    torch.testing.assert_close(mean, z)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1, s2 = codec.encode(x, generator=g1), codec.encode(x, generator=g2)
    torch.testing.assert_close(s1, s2)
    assert not torch.allclose(s1, z)
    assert ((s1 - mean).abs() <= 6 * std).all()
    y = codec.decode(z)
    assert y.shape == x.shape and y.min() >= -1 and y.max() <= 1
    codec.train()
    assert not codec.training and not codec.vae.training
    assert all(not p.requires_grad for p in codec.parameters())
    with pytest.raises(ValueError, match=r"\(60, 64\)"):
        codec.encode(x[..., :60, :])
    with pytest.raises(ValueError, match="latents"):
        codec.decode(torch.zeros(1, 3, 8, 8))


def test_load_autoencoder_round_trip(tmp_path):
    vae = build_autoencoder("tiny", scaling_factor=0.5)
    vae.save_pretrained(tmp_path / "vae")
    loaded = load_autoencoder(tmp_path / "vae")
    assert loaded.config.scaling_factor == 0.5 and not loaded.training
    x = real_crops(1)
    torch.testing.assert_close(loaded.encode(x).latent_dist.mean, vae.encode(x).latent_dist.mean)
    nested = tmp_path / "pipeline"
    vae.save_pretrained(nested / "vae")
    assert tuple(load_autoencoder(nested, subfolder="vae").config.block_out_channels) == (8, 8, 8, 8)


def test_load_autoencoder_names_a_missing_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_autoencoder(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_autoencoder(tmp_path / "empty")


def test_estimate_scaling_factor_whitens_latents():
    torch.manual_seed(0)
    vae = build_autoencoder("tiny")
    x = real_crops(8)
    factor = estimate_scaling_factor(vae, x.split(4), sample=False)
    z = vae.encode(x).latent_dist.mean * factor
    assert z.std().item() == pytest.approx(1.0, rel=0.02)
    assert vae.training  # the caller's mode is restored


def test_ema_moves_towards_the_weights_and_counts_updates():
    model = torch.nn.Linear(3, 2)
    ema = DenoiserEMA(model, decay=0.5, warmup=False)
    assert ema.n_averaged == 0 and not any(p.requires_grad for p in ema.parameters())
    ema.update(model)  # first update copies
    torch.testing.assert_close(ema.module.weight, model.weight)
    before = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.module.weight, 0.5 * before + 0.5 * model.weight.detach())
    assert ema.n_averaged == 2
    restored = DenoiserEMA(torch.nn.Linear(3, 2), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.n_averaged == 2
    torch.testing.assert_close(restored(torch.ones(1, 3)), ema(torch.ones(1, 3)))
    with pytest.raises(ValueError, match="1.5"):
        DenoiserEMA(model, decay=1.5)


def test_ema_warmup_ramps_the_decay_so_early_weights_fade():
    from lightning_modules.components.ema import ema_decay_at

    assert ema_decay_at(0.999, 1) == pytest.approx(2 / 11)
    assert ema_decay_at(0.999, 10_000) == 0.999
    assert ema_decay_at(0.999, 1, warmup=False) == 0.999
    model = torch.nn.Linear(3, 2)
    ema = DenoiserEMA(model, decay=0.999)
    ema.update(model)
    before = ema.module.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # n_averaged was 1: decay 2/11, the average moves 9/11 of the way
    torch.testing.assert_close(ema.module.weight, (2 / 11) * before + (9 / 11) * model.weight.detach())


def test_ema_handles_integer_buffers():
    class WithIndex(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(2, 2)
            self.register_buffer("index", torch.arange(4))

    model = WithIndex()
    ema = DenoiserEMA(model, decay=0.9)
    for _ in range(3):
        with torch.no_grad():
            model.lin.weight.add_(1.0)
        ema.update(model)
    assert torch.equal(ema.module.index, model.index) and ema.n_averaged == 3
    assert not torch.equal(ema.module.lin.weight, model.lin.weight)


def test_ema_of_the_swin_unet_updates_twice():
    from lightning_modules.components.swin_unet import build_swin_unet

    net = build_swin_unet("tiny")
    ema = DenoiserEMA(net, decay=0.999)
    ema.update(net)
    ema.update(net)  # the second update averages; the Swin-UNet carries integer index buffers
    assert ema.n_averaged == 2
