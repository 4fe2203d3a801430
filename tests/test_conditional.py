"""latent-conditional: input contract, the conditioning is used, decode modes, cache, training, resume, export, CLI."""

import functools

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ModelCheckpoint

from datamodules.imageio import read_image, read_mask, write_image_atomic, write_mask_atomic
from datamodules.restoration_latents import RestorationLatentCacheDataModule, RestorationLatentDataset
from lightning_modules.components.autoencoders import LatentCodec, build_autoencoder
from lightning_modules.components.conditioning import condition_denoiser, conditional_channels, conditional_input
from lightning_modules.components.denoisers import build_unet, predict
from lightning_modules.components.pipeline import RestorationPipeline
from lightning_modules.components.regional_sampler import (
    RegionalSampler,
    SamplerConfig,
    decode_latents,
    restore,
    transmission,
)
from lightning_modules.components.schedulers import build_scheduler
from lightning_modules.conditional_latent import ConditionalLatentDiffusionModule
from lightning_modules.latent_diffusion import LatentDiffusionModule
from lightning_modules.methods import build_restorer
from tests.tiny_data import real_crops

ADAMW = functools.partial(torch.optim.AdamW, lr=1e-3)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A tiny 4-channel diffusers VAE folder."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("vae") / "vae"
    build_autoencoder("tiny").save_pretrained(path)
    return str(path)


def _conditional(autoencoder=None, **kwargs) -> ConditionalLatentDiffusionModule:
    torch.manual_seed(0)
    net = build_unet("tiny", sample_size=8, in_channels=9, out_channels=4)
    kwargs = {"ema_decay": 0.9, **kwargs}
    return ConditionalLatentDiffusionModule(net, autoencoder=autoencoder, optimizer=ADAMW, **kwargs)


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


def _cache_dm(vae_dir, tmp_path, **kwargs) -> RestorationLatentCacheDataModule:
    args = {
        "autoencoder": vae_dir,
        "cache_dir": str(tmp_path / "cache"),
        "tile_size": 64,
        "stride": 256,
        "variants": 2,
        "batch_size": 4,
        "max_tiles": {"train": 6, "val": 4},
    }
    return RestorationLatentCacheDataModule(**{**args, **kwargs})


# ------------------------------------------------------------------------------------------------- input contract


def test_input_is_noisy_latent_then_mask_then_corrupted_latent():
    z_t, z_c = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    mask = (torch.rand(2, 1, 8, 8) > 0.5).float()
    x = conditional_input(z_t, mask, z_c)
    assert x.shape == (2, conditional_channels(4), 8, 8) == (2, 9, 8, 8)
    assert torch.equal(x[:, :4], z_t) and torch.equal(x[:, 4:5], mask) and torch.equal(x[:, 5:], z_c)
    assert conditional_input(z_t, mask[:1], z_c)[:, 4:5].shape == (2, 1, 8, 8)  # one mask broadcast to the batch
    with pytest.raises(ValueError, match="z_corrupted"):
        conditional_input(z_t, mask, z_c[:, :3])
    with pytest.raises(ValueError, match="latent_mask"):
        conditional_input(z_t, mask.expand(-1, 2, -1, -1), z_c)
    seen = {}
    fn = condition_denoiser(lambda inp, t: seen.setdefault("x", inp)[:, :4], mask, z_c)
    fn(z_t, torch.tensor([5, 5]))
    assert torch.equal(seen["x"], x)


def test_denoiser_channels_are_checked_against_the_autoencoder(vae_dir):
    wrong = ConditionalLatentDiffusionModule(build_unet("tiny", sample_size=8, in_channels=4), autoencoder=vae_dir)
    with pytest.raises(ValueError, match="in_channels=9"):
        wrong.get_codec()
    unconditional = LatentDiffusionModule(build_unet("tiny", sample_size=8, in_channels=9), autoencoder=vae_dir)
    with pytest.raises(ValueError, match="in_channels=4"):
        unconditional.get_codec()
    assert _conditional(vae_dir).get_codec().latent_channels == 4


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="known_weight"):
        _conditional(known_weight=1.5)
    with pytest.raises(ValueError, match="mask_dilate"):
        _conditional(mask_dilate=-1)
    with pytest.raises(ValueError, match="restoration batches"):
        _conditional().model_step({"latent": torch.randn(1, 4, 8, 8)})
    with pytest.raises(ValueError, match="autoencoder"):
        _conditional().model_step(
            {"clean": real_crops(1), "corrupted": real_crops(1), "artifact_mask": torch.ones(1, 1, 64, 64)}
        )
    assert _conditional().noise_scheduler.config.prediction_type == "v_prediction"


# ------------------------------------------------------------------------------------------ decode and sampling


def test_decode_modes_keep_the_input_where_nothing_changes():
    codec = LatentCodec(build_autoencoder("tiny"))
    x = real_crops(2)
    z0 = codec.encode(x, sample=False)
    assert torch.equal(decode_latents(codec.decode, z0, z0, x, "full"), codec.decode(z0))
    torch.testing.assert_close(decode_latents(codec.decode, z0, z0, x, "delta"), x)
    torch.testing.assert_close(decode_latents(codec.decode, z0, z0, x, "od-delta"), x, atol=1e-4, rtol=0)
    torch.testing.assert_close(decode_latents(codec.decode, z0, z0, x, "adaptive"), x)
    z = z0 + 0.5
    delta = decode_latents(codec.decode, z, z0, x, "delta")
    torch.testing.assert_close(delta, (x + codec.decode(z) - codec.decode(z0)).clamp(-1, 1))
    with pytest.raises(ValueError, match="decode mode"):
        decode_latents(codec.decode, z, z0, x, "median")


def test_adaptive_decode_follows_the_estimated_transmission():
    """With decode = identity the 'latents' are images: D(z) = restored tissue, D(z0) = what the input shows."""
    identity = lambda t: t  # noqa: E731
    restored = torch.zeros(1, 3, 32, 32)  # mid grey tissue
    grain = 0.05 * torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    dark = torch.full((1, 3, 32, 32), -0.8)  # under an absorbing layer: about 20 % of the light gets through
    assert transmission(dark, restored).max() == pytest.approx((0.2 * 127.5 + 1) / (127.5 + 1))
    assert transmission(restored, restored).min() == pytest.approx(1.0)
    opaque = decode_latents(identity, restored, dark, dark + grain, "adaptive")
    torch.testing.assert_close(opaque, restored, msg="opaque layer: the full decode, none of its grain")
    tinted = restored - 0.02  # a faint cast: transmission about 0.98
    clear = decode_latents(identity, restored, tinted, tinted + grain, "adaptive")
    torch.testing.assert_close(
        clear,
        decode_latents(identity, restored, tinted, tinted + grain, "delta"),
        msg="transparent layer: the delta, the input's texture kept",
    )


def _pairs(n: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n real 64 px tiles, a dark band across their middle, its mask."""
    clean = real_crops(n)
    mask = torch.zeros(n, 1, 64, 64)
    mask[:, :, 24:40] = 1
    corrupted = torch.where(mask.bool(), clean * 0.4 - 0.5, clean)
    return clean, corrupted, mask


@pytest.mark.parametrize("decode", ["full", "delta"])
def test_restore_keeps_clean_pixels_bit_exact(decode):
    torch.manual_seed(0)
    codec = LatentCodec(build_autoencoder("tiny"))
    net = build_unet("tiny", sample_size=8, in_channels=9, out_channels=4).eval()
    _, corrupted, mask = _pairs(2)
    sampler = RegionalSampler(
        build_scheduler("ddim", prediction_type="v_prediction"), SamplerConfig(num_steps=3, decode=decode, feather=2)
    )
    out = restore(
        lambda x: codec.encode(x, sample=False),
        codec.decode,
        sampler,
        lambda x, t: predict(net, x, t),
        corrupted,
        mask,
        factor=8,
        generator=torch.Generator().manual_seed(0),
        conditional=True,
    )
    keep = (mask == 0).expand_as(corrupted)
    assert torch.equal(out[keep], corrupted[keep])
    assert not torch.equal(out[~keep], corrupted[~keep])
    assert sampler.nfe == 3


def _overfit(module, batch: dict, steps: int) -> None:
    opt = torch.optim.AdamW(module.denoiser.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        loss = module.model_step(batch, generator)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_conditioning_is_used_a_conditional_model_beats_an_unconditional_one_of_the_same_size():
    """Four latents equal outside the mask and different under it; the corrupted latent still carries the content
    under the mask (a semi-transparent artifact: a fixed offset). Only a model that reads it can tell them apart."""
    g = torch.Generator().manual_seed(0)
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., 2:6, 2:6] = 1
    outside = torch.randn(1, 4, 8, 8, generator=g)
    inside = torch.randn(4, 4, 8, 8, generator=g)
    z_clean = torch.where(mask.bool(), inside, outside)
    z_corrupted = torch.where(mask.bool(), z_clean + 1.5, z_clean)
    batch = {"latent": z_clean, "latent_corrupted": z_corrupted, "latent_mask": mask.expand(4, -1, -1, -1)}
    conditional = _conditional(ema_decay=None, known_weight=1.0, target="clean")  # sampled directly below
    torch.manual_seed(0)
    unconditional = LatentDiffusionModule(
        build_unet("tiny", sample_size=8, in_channels=4), ema_decay=None, scheduler={"prediction_type": "v_prediction"}
    )
    _overfit(conditional, batch, steps=300)
    _overfit(unconditional, {"latent": z_clean}, steps=300)
    errors = {}
    for name, module in (("conditional", conditional), ("unconditional", unconditional)):
        sampler = RegionalSampler(
            build_scheduler("ddim", dict(module.noise_scheduler.config)), SamplerConfig(num_steps=4)
        )
        denoiser = module.sampling_denoiser()
        if name == "conditional":
            denoiser = condition_denoiser(denoiser, mask, z_corrupted)
        z = sampler.sample(denoiser, z_corrupted, mask, generator=torch.Generator().manual_seed(0))
        assert torch.equal(z[~mask.bool().expand_as(z)], z_corrupted[~mask.bool().expand_as(z)])
        errors[name] = float(((z - z_clean) ** 2 * mask).sum() / (mask.sum() * 4 * 4))
    spread = float(inside.var(0).mean())  # error of the best unconditional guess, the mean of the four
    assert errors["conditional"] < 0.25 * errors["unconditional"] and errors["conditional"] < 0.25 * spread, errors


# ---------------------------------------------------------------------------------------- cache and training


def test_restoration_cache_is_deterministic_and_rebuilt_when_the_synthesis_changes(vae_dir, tmp_path):
    dm = _cache_dm(vae_dir, tmp_path)
    dm.prepare_data()
    path = dm.cache_path("train")
    first = (path / "latents.pt").read_bytes()
    stamp = (path / "latents.pt").stat().st_mtime_ns
    dm.prepare_data()
    assert (path / "latents.pt").stat().st_mtime_ns == stamp, "a valid cache is reused"
    ds = RestorationLatentDataset(path, split="train")
    assert len(ds) == 6 * 2
    sample = ds[(0, 3)]
    assert sample["latent"].shape == sample["latent_corrupted"].shape == (4, 8, 8)
    assert sample["latent_mask"].shape == (1, 8, 8) and set(sample["latent_mask"].unique().tolist()) <= {0.0, 1.0}
    assert sample["meta"]["types"]
    assert torch.equal(ds[(0, 3)]["latent"], sample["latent"]) and not torch.equal(
        ds[(1, 3)]["latent"], sample["latent"]
    )
    other = tmp_path / "again"
    _cache_dm(vae_dir, tmp_path, cache_dir=str(other)).prepare_data()
    assert (other / "train" / "latents.pt").read_bytes() == first, "same settings, same bytes"
    _cache_dm(vae_dir, tmp_path, artifacts={"types": ["ink"]}).prepare_data()
    assert (path / "latents.pt").stat().st_mtime_ns != stamp, "another synthesis rebuilds the cache"


def test_training_on_the_cache_and_on_pixels(vae_dir, tmp_path):
    module = _conditional(vae_dir)
    trainer = _trainer(max_steps=3)
    trainer.fit(module, _cache_dm(vae_dir, tmp_path))
    assert {"train/loss", "val/loss", "val/loss_ema"} <= set(trainer.callback_metrics)
    assert module.denoiser_ema.n_averaged == 3
    clean, corrupted, mask = _pairs(2)
    out = module.model_step({"clean": clean, "corrupted": corrupted, "artifact_mask": mask})
    assert out["input"].shape == (2, 9, 8, 8) and out["loss_map"].shape == (2, 1, 8, 8)
    assert torch.isfinite(out["loss"])


def test_exact_resume_continues_steps_and_the_ema_counter(vae_dir, tmp_path):
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)
    first = _trainer(max_steps=2, callbacks=[checkpoint], enable_checkpointing=True, limit_val_batches=0)
    first.fit(_conditional(vae_dir), _cache_dm(vae_dir, tmp_path))
    resumed = _conditional(vae_dir)
    second = _trainer(max_steps=4, limit_val_batches=0)
    second.fit(resumed, _cache_dm(vae_dir, tmp_path), ckpt_path=tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert second.global_step == 4 and resumed.denoiser_ema.n_averaged == 4
    loaded = ConditionalLatentDiffusionModule.load_from_checkpoint(tmp_path / "ckpt" / "last.ckpt", weights_only=False)
    assert loaded.conditional and loaded.known_weight == 0.1


# -------------------------------------------------------------------------------------------- export and CLI


@pytest.fixture(scope="module")
def exported(vae_dir, tmp_path_factory):
    module = _conditional(vae_dir, mask_dilate=1)
    module.get_codec()
    path = tmp_path_factory.mktemp("export") / "pipeline_conditional"
    module.export(path, sampler=SamplerConfig(num_steps=3, decode="delta"), image_size=64)
    return module, path


def test_export_round_trip_restores_like_the_module(exported):
    module, path = exported
    pipe = RestorationPipeline.from_pretrained(path)
    assert pipe.conditional and pipe.residual and pipe.name == "latent-conditional"
    assert pipe.sampler_config.decode == "delta" and pipe.sampler_config.mask_dilate == 1
    _, corrupted, mask = _pairs(2)
    out = pipe.restore(corrupted, mask, generator=torch.Generator().manual_seed(0))
    codec = module.get_codec()
    sampler = RegionalSampler(build_scheduler("ddim", dict(module.noise_scheduler.config)), pipe.sampler_config)
    generator = torch.Generator().manual_seed(0)
    expected = restore(
        lambda x: codec.encode(x, generator=generator),
        codec.decode,
        sampler,
        module.sampling_denoiser(),
        corrupted,
        mask,
        factor=8,
        generator=generator,
        conditional=True,
        residual=module.residual,
    )
    torch.testing.assert_close(out, expected)
    assert build_restorer("latent", model=path).conditional
    assert build_restorer("latent-conditional", model=path).name == "latent-conditional"


def test_latent_conditional_refuses_an_unconditional_pipeline(tmp_path, vae_dir):
    module = LatentDiffusionModule(build_unet("tiny", sample_size=8), autoencoder=vae_dir)
    module.export(tmp_path / "paper", sampler=SamplerConfig(num_steps=2), image_size=64)
    with pytest.raises(ValueError, match="unconditional"):
        build_restorer("latent-conditional", model=tmp_path / "paper")


def test_restore_command_on_a_conditional_pipeline(exported, tmp_path, he_tiles):
    from experiments import restore as restore_cli

    _, path = exported
    for i, tile in enumerate(he_tiles[:2]):
        mask = np.zeros((64, 64), bool)
        mask[10:30, 5 + 10 * i : 40 + 10 * i] = True
        corrupted = tile[:64, :64].copy()
        corrupted[mask] = 20
        write_image_atomic(tmp_path / "img" / f"t{i}.png", corrupted)
        write_mask_atomic(tmp_path / "msk" / f"t{i}.png", mask)
    assert (
        restore_cli.main(
            [
                "--model",
                str(path),
                "--images",
                str(tmp_path / "img"),
                "--masks",
                str(tmp_path / "msk"),
                "--out",
                str(tmp_path / "out"),
                "--device",
                "cpu",
            ]
        )
        == 0
    )
    for i in range(2):
        out, inp = read_image(tmp_path / "out" / f"t{i}.png"), read_image(tmp_path / "img" / f"t{i}.png")
        mask = read_mask(tmp_path / "msk" / f"t{i}.png")
        assert np.array_equal(out[~mask], inp[~mask]), "clean pixels are identical"
        assert not np.array_equal(out[mask], inp[mask])


def test_sampler_defaults_reach_the_training_time_check(vae_dir):
    from lightning_modules.callbacks.restoration_eval import RestorationEvalCallback

    module = _conditional(vae_dir, mask_dilate=1)
    callback = RestorationEvalCallback(
        tile_size=64, num_tiles=2, num_steps=2, baselines=[], sampler={"decode": "delta"}
    )
    restored = callback.restore_batch(module)
    batch = callback._fixed_batch()
    keep = (batch["artifact_mask"] == 0).expand_as(batch["corrupted"])
    assert torch.equal(restored[keep], batch["corrupted"][keep])
    with pytest.raises(ValueError, match="decode"):
        RestorationEvalCallback(sampler={"decode": "nope"})


def test_residual_target_trains_on_the_masked_change_and_a_no_change_model_returns_the_input(vae_dir):
    module = _conditional(vae_dir, target="residual")
    clean, corrupted, mask = _pairs(2)
    latents = module.encode_latents({"clean": clean, "corrupted": corrupted, "artifact_mask": mask})
    outside = latents["latent_mask"] == 0
    assert torch.all(latents["latent"][outside.expand_as(latents["latent"])] == 0), "no change outside the mask"
    assert latents["latent"].abs().sum() > 0
    # a denoiser that always predicts "no change" (x0 = 0) in v-parameterisation: v = sqrt(a / (1 - a)) x_t
    scheduler = build_scheduler("ddim", dict(module.noise_scheduler.config))
    alphas = module.noise_scheduler.alphas_cumprod

    def no_change(net_input, t):
        a = alphas[t].view(-1, 1, 1, 1).to(net_input.dtype)
        return (a / (1 - a)).sqrt() * net_input[:, :4]

    codec = module.get_codec()
    sampler = RegionalSampler(scheduler, SamplerConfig(num_steps=3, decode="delta"))
    out = restore(
        lambda x: codec.encode(x, sample=False),
        codec.decode,
        sampler,
        no_change,
        corrupted,
        mask,
        factor=8,
        generator=torch.Generator().manual_seed(0),
        conditional=True,
        residual=True,
    )
    torch.testing.assert_close(out, corrupted, atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="conditional"):
        restore(
            lambda x: codec.encode(x, sample=False),
            codec.decode,
            sampler,
            no_change,
            corrupted,
            mask,
            factor=8,
            residual=True,
        )
    path = module.export(vae_dir + "_residual_pipe", sampler=SamplerConfig(num_steps=2), image_size=64)
    assert RestorationPipeline.from_pretrained(path).residual
    with pytest.raises(ValueError, match="target"):
        _conditional(target="noise")
