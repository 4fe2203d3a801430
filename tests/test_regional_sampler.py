"""Regional sampler, paste-back, colour match and restore() (lightning_modules/components/regional_sampler.py)."""

import json

import pytest
import torch
import torch.nn.functional as F
from diffusers import RePaintScheduler

from lightning_modules.components.regional_sampler import (
    RegionalSampler,
    SamplerConfig,
    composite,
    match_color,
    resample_schedule,
    restore,
)
from lightning_modules.components.schedulers import build_scheduler

# The authors' training schedule (docs/METHOD.md section 3), with diffusers' DDPMScheduler defaults otherwise.
TRAIN = dict(
    num_train_timesteps=1000,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    clip_sample=False,
    prediction_type="epsilon",
)
SCHEDULERS = ["ddpm", "ddim", "dpmsolver++", "unipc"]


class Recorder:
    """Dummy epsilon model that records its inputs: eps = 0.1 * x_t + 0.01 * t (depends on both)."""

    def __init__(self, out_channels: int | None = None):
        self.inputs, self.ts = [], []
        self.out_channels = out_channels

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        self.inputs.append(x.clone())
        self.ts.append(int(t[0]))
        eps = 0.1 * x + 0.01 * t.view(-1, 1, 1, 1) / 1000
        if self.out_channels and self.out_channels != x.shape[1]:
            eps = torch.cat([eps, torch.tanh(x)], dim=1)  # learned-variance half in [-1, 1]
        return eps


def _latents(batch: int = 2, channels: int = 4, size: int = 8):
    g = torch.Generator().manual_seed(123)
    z = torch.randn(batch, channels, size, size, generator=g)
    mask = torch.zeros(batch, 1, size, size)
    mask[:, :, 2:5, 1:6] = 1
    mask[-1, :, 6:, 6:] = 1
    return z, mask


def _run(name="ddpm", seed=0, z=None, mask=None, denoiser=None, train=None, **cfg):
    sampler = RegionalSampler(build_scheduler(name, train or TRAIN), SamplerConfig(**cfg))
    if z is None:
        z, mask = _latents()
    out = sampler.sample(denoiser or Recorder(), z, mask, generator=torch.Generator().manual_seed(seed))
    return out, sampler


@pytest.mark.parametrize("name", SCHEDULERS)
def test_repaint_keeps_unmasked_latents_exactly(name):
    z, mask = _latents()
    out, sampler = _run(name, z=z, mask=mask, num_steps=4)
    keep = ~mask.bool().expand_as(z)
    assert torch.equal(out[keep], z[keep])
    assert not torch.allclose(out[~keep], z[~keep])
    assert sampler.nfe == 4 and out.shape == z.shape and torch.isfinite(out).all()


def test_reference_preset_timesteps_start_and_clean_known_region():
    z, mask = _latents()
    scheduler = build_scheduler("ddpm", TRAIN)  # steps_offset 0 here: the preset must set spacing/offset itself
    sampler = RegionalSampler(scheduler, SamplerConfig.from_preset("reference"))
    rec, seen = Recorder(), []
    keep = ~mask.bool().expand_as(z)

    def callback(step, t, x):
        seen.append(t)
        assert torch.equal(x[keep], z[keep])  # clean, un-noised z0 after every step

    sampler.sample(rec, z, mask, generator=torch.Generator().manual_seed(0), callback=callback)
    assert rec.ts == list(range(981, 0, -20)) == seen == sampler.timesteps()
    assert torch.equal(rec.inputs[0], z)  # x_T = z0, no noise
    assert sampler.nfe == 50
    assert scheduler.config.steps_offset == 0  # the caller's scheduler config is untouched


def test_same_generator_is_bitwise_identical_and_seeds_differ():
    z, mask = _latents()
    a, _ = _run(z=z, mask=mask, num_steps=5, seed=7)
    b, _ = _run(z=z, mask=mask, num_steps=5, seed=7)
    c, _ = _run(z=z, mask=mask, num_steps=5, seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_repaint_start_state_is_noise_inside_and_noised_z0_outside():
    z, mask = _latents()
    rec = Recorder()
    _, sampler = _run(z=z, mask=mask, denoiser=rec, num_steps=3)
    g = torch.Generator().manual_seed(0)  # replay the sampler's first two draws
    noise_in, noise_out = torch.randn(z.shape, generator=g), torch.randn(z.shape, generator=g)
    t0 = torch.full((z.shape[0],), sampler.timesteps()[0])
    expected = torch.where(mask.bool(), noise_in, build_scheduler("ddpm", TRAIN).add_noise(z, noise_out, t0))
    assert torch.equal(rec.inputs[0], expected)


@pytest.mark.parametrize("name", SCHEDULERS)
def test_strength_starts_at_t_start_from_noised_z0(name):
    z, mask = _latents()
    rec = Recorder()
    out, sampler = _run(name, z=z, mask=mask, denoiser=rec, num_steps=10, strength=0.5)
    full = [int(t) for t in sampler.make_scheduler().timesteps]
    assert rec.ts == full[5:] and sampler.nfe == 5
    g = torch.Generator().manual_seed(0)
    t_start = torch.full((z.shape[0],), full[5])
    expected = sampler.make_scheduler().add_noise(z, torch.randn(z.shape, generator=g), t_start)
    assert torch.equal(rec.inputs[0], expected)  # SDEdit: q(z0, t_start) everywhere
    keep = ~mask.bool().expand_as(z)
    assert torch.equal(out[keep], z[keep])


def test_resample_schedule_matches_repaint_jump_schedule():
    for n, j, r in [(250, 10, 10), (25, 10, 3), (7, 3, 4), (12, 1, 2)]:
        reference = RePaintScheduler(num_train_timesteps=1000)
        reference.set_timesteps(n, jump_length=j, jump_n_sample=r)
        ts = [int(t) for t in reference.timesteps]
        levels, prev = [0], ts[0] + 1  # decreasing entry = one model step, increasing = one undone step
        for t in ts:
            if t < prev:
                levels.append(levels[-1] + 1)
            elif levels[-1] < levels[-2]:
                levels[-1] -= 1  # extend the current forward jump
            else:
                levels.append(levels[-1] - 1)
            prev = t
        assert resample_schedule(n, j, r) == levels, (n, j, r)
    assert resample_schedule(4) == [0, 1, 2, 3, 4]


def test_nfe_2410_for_repaint_250_steps_jump_10_resample_10():
    calls = []
    sampler = RegionalSampler(
        build_scheduler("ddpm", num_train_timesteps=1000),
        SamplerConfig(num_steps=250, jump_length=10, jump_n_sample=10),
    )
    z = torch.zeros(1, 3, 2, 2)
    sampler.sample(lambda x, t: calls.append(int(t[0])) or torch.zeros_like(x), z, torch.ones(1, 1, 2, 2))
    assert len(calls) == sampler.nfe == sampler.expected_nfe() == 2410 == 250 + 24 * 9 * 10


@pytest.mark.parametrize("name", ["ddpm", "ddim"])
def test_jumps_revisit_timesteps_and_keep_known_region(name):
    z, mask = _latents()
    rec = Recorder()
    out, sampler = _run(name, z=z, mask=mask, denoiser=rec, num_steps=6, jump_length=2, jump_n_sample=2)
    ts = sampler.timesteps()
    levels = resample_schedule(6, 2, 2)
    assert rec.ts == [ts[a] for a, b in zip(levels, levels[1:], strict=False) if b == a + 1]
    assert sampler.nfe == 6 + 2 * 1 * 2  # jump levels 6 and 4
    keep = ~mask.bool().expand_as(z)
    assert torch.equal(out[keep], z[keep]) and torch.isfinite(out).all()


def test_forward_jump_follows_q_of_x_t_plus_j_given_x_t():
    # Everything known and held clean, so the sample before each jump is exactly z0 = 1 and the model input right
    # after a jump from level a to level b is sqrt(r) + sqrt(1 - r) * eps with r = alpha_bar(b) / alpha_bar(a).
    z, mask = torch.ones(1, 1, 128, 128), torch.zeros(1, 1, 128, 128)
    rec = Recorder()
    _, sampler = _run("ddpm", z=z, mask=mask, denoiser=rec, num_steps=6, jump_length=2, jump_n_sample=2, known="clean")
    assert resample_schedule(6, 2, 2) == [0, 1, 2, 3, 4, 2, 3, 4, 5, 6, 4, 5, 6]
    ts, abar = sampler.timesteps(), build_scheduler("ddpm", TRAIN).alphas_cumprod
    for call, ratio in ((4, abar[ts[2]] / abar[ts[4]]), (8, abar[ts[4]])):  # jumps 4 -> 2 and 6 (clean) -> 4
        x = rec.inputs[call]
        assert x.mean() == pytest.approx(ratio.sqrt().item(), abs=0.02)
        assert x.std() == pytest.approx((1 - ratio).sqrt().item(), abs=0.02)


def test_jumps_with_multistep_solver_raise():
    with pytest.raises(ValueError, match="DPMSolverMultistepScheduler"):
        RegionalSampler(build_scheduler("dpmsolver++", TRAIN), SamplerConfig(jump_length=2, jump_n_sample=2))


def test_multistep_state_does_not_leak_between_calls():
    z, mask = _latents()
    sampler = RegionalSampler(build_scheduler("dpmsolver++", TRAIN), SamplerConfig(num_steps=4))
    a = sampler.sample(Recorder(), z, mask, generator=torch.Generator().manual_seed(0))
    b = sampler.sample(Recorder(), z, mask, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_learned_variance_outputs():
    z, mask = _latents()
    plain, _ = _run("ddim", z=z, mask=mask, denoiser=Recorder(), num_steps=3)
    sliced, _ = _run("ddim", z=z, mask=mask, denoiser=Recorder(out_channels=8), num_steps=3)
    assert torch.equal(plain, sliced)  # DDIM: first C channels are the epsilon
    fixed, _ = _run("ddpm", z=z, mask=mask, denoiser=Recorder(out_channels=8), num_steps=3)
    learned, _ = _run(
        "ddpm",
        z=z,
        mask=mask,
        denoiser=Recorder(out_channels=8),
        num_steps=3,
        train={**TRAIN, "variance_type": "learned_range"},
    )
    assert not torch.equal(fixed, learned)  # DDPM with learned_range uses the variance half
    keep = ~mask.bool().expand_as(z)
    assert torch.equal(learned[keep], z[keep]) and torch.isfinite(learned).all()
    with pytest.raises(ValueError, match="denoiser returned 5 channels"):
        _run(z=z, mask=mask, denoiser=lambda x, t: torch.zeros(x.shape[0], 5, *x.shape[2:]), num_steps=2)


def test_pixel_space_restore_identity_codec():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 4:10, 3:12] = 1
    sampler = RegionalSampler(build_scheduler("ddim", TRAIN), SamplerConfig(num_steps=3, feather=2))
    out = restore(
        lambda v: v, lambda v: v, sampler, Recorder(), x, mask, factor=1, generator=torch.Generator().manual_seed(0)
    )
    keep = ~mask.bool().expand_as(x)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    assert torch.equal(out[keep], x[keep]) and not torch.equal(out[~keep], x[~keep])


def _fake_encode(x):
    """Factor-8 'VAE': 8x8 average pooling plus a 4th channel (the channel mean)."""
    pooled = F.avg_pool2d(x, 8)
    return torch.cat([pooled, pooled.mean(1, keepdim=True)], dim=1)


def _fake_decode(z):
    return F.interpolate(z[:, :3], scale_factor=8, mode="nearest")


def test_restore_latent_repaint_pastes_back_bit_exact():
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mask = torch.zeros(1, 1, 32, 32)
    mask[:, :, 10:13, :] = 1  # thin band; max-pooling marks latent row 1
    rec = Recorder()
    sampler = RegionalSampler(build_scheduler("ddpm", TRAIN), SamplerConfig(num_steps=2))
    out = restore(
        _fake_encode, _fake_decode, sampler, rec, x, mask, factor=8, generator=torch.Generator().manual_seed(0)
    )
    assert rec.inputs[0].shape == (1, 4, 4, 4)
    keep = ~mask.bool().expand_as(x)
    assert torch.equal(out[keep], x[keep]) and out.abs().max() <= 1


def test_restore_reference_preset_nearest_mask_and_color_match():
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(3)) * 2 - 1
    mask = torch.zeros(1, 1, 32, 32)
    mask[:, :, 10:13, :] = 1  # never on a block's top row -> the nearest latent mask is empty
    sampler = RegionalSampler(build_scheduler("ddpm", TRAIN), SamplerConfig.from_preset("reference", num_steps=2))
    out = restore(_fake_encode, _fake_decode, sampler, Recorder(), x, mask, factor=8)
    expected = match_color(_fake_decode(_fake_encode(x)), x, 1 - mask).clamp(-1, 1)
    assert torch.allclose(out, expected, atol=1e-6)  # no paste-back: the whole image is the reconstruction


def test_composite_feather_keeps_outside_bit_identical():
    g = torch.Generator().manual_seed(4)
    restored, original = torch.randn(2, 3, 16, 16, generator=g), torch.randn(2, 3, 16, 16, generator=g)
    mask = torch.zeros(2, 1, 16, 16)
    mask[:, :, 3:13, 2:14] = 1
    for feather in (0, 3):
        out = composite(restored, original, mask, feather=feather)
        keep = ~mask.bool().expand_as(original)
        assert torch.equal(out[keep], original[keep])
    assert torch.equal(out[:, :, 8, 8], restored[:, :, 8, 8])  # >= 4 px deep: fully restored
    assert torch.allclose(out[:, :, 3, 8], 0.25 * restored[:, :, 3, 8] + 0.75 * original[:, :, 3, 8])
    hard = composite(restored, original, mask)
    assert torch.equal(hard[~keep], restored[~keep])


def test_match_color_matches_known_region_statistics():
    g = torch.Generator().manual_seed(5)
    reference = torch.randn(2, 3, 16, 16, generator=g) * 0.3 + 0.2
    decoded = torch.randn(2, 3, 16, 16, generator=g) * 0.7 - 0.4
    known = torch.ones(2, 1, 16, 16)
    known[:, :, 4:9, :] = 0
    reference[:, :, 4:9, :] = 5.0  # artifact values must not influence the target statistics
    out = match_color(decoded, reference, known)
    sel = known.bool().expand_as(reference)
    for i in range(2):
        target = reference[i][sel[i]]
        assert out[i].mean() == pytest.approx(target.mean().item(), abs=1e-5)
        assert out[i].std(unbiased=False) == pytest.approx(target.std(unbiased=False).item(), abs=1e-5)
    assert torch.allclose(match_color(reference, reference, torch.ones_like(known)), reference, atol=1e-5)


def test_config_presets_and_json_round_trip():
    ref = SamplerConfig.from_preset("reference", num_steps=20)
    assert (ref.mask_mode, ref.known, ref.start, ref.paste_back, ref.color_match) == (
        "nearest",
        "clean",
        "z0",
        False,
        True,
    )
    assert SamplerConfig.from_preset("repaint") == SamplerConfig()
    assert SamplerConfig.from_dict(json.loads(json.dumps(ref.to_dict()))) == ref


@pytest.mark.parametrize(
    ("build", "match"),
    [
        (lambda: SamplerConfig(strength=0.0), "strength must be in \\(0, 1\\], got 0.0"),
        (lambda: SamplerConfig(strength=1.5), "got 1.5"),
        (lambda: SamplerConfig.from_preset("fancy"), "unknown preset 'fancy'"),
        (lambda: SamplerConfig(preset="fancy"), "'fancy'"),
        (lambda: SamplerConfig.from_dict({"num_stepz": 3}), "num_stepz"),
        (lambda: SamplerConfig(mask_mode="bilinear"), "'bilinear'"),
        (lambda: SamplerConfig(num_steps=0), "num_steps must be an int >= 1, got 0"),
    ],
)
def test_bad_config_raises(build, match):
    with pytest.raises(ValueError, match=match):
        build()


def test_bad_sample_inputs_raise():
    z, mask = _latents()
    with pytest.raises(ValueError, match=r"mask shape \(2, 1, 4, 4\)"):
        _run(z=z, mask=torch.zeros(2, 1, 4, 4), num_steps=2)
    with pytest.raises(ValueError, match="0.5"):
        _run(z=z, mask=mask * 0.5, num_steps=2)


def test_build_scheduler_from_existing_config_and_bad_override():
    ddpm = build_scheduler("ddpm", TRAIN, variance_type="learned_range")
    dpm = build_scheduler("dpmsolver++", ddpm.config)
    assert dpm.config.algorithm_type == "dpmsolver++" and dpm.config.variance_type is None
    assert dpm.config.beta_schedule == "scaled_linear" and ddpm.config.variance_type == "learned_range"
    with pytest.raises(ValueError, match="clip_sample"):
        build_scheduler("dpmsolver++", clip_sample=False)
    with pytest.raises(ValueError, match="'pndm'"):
        build_scheduler("pndm")
