"""Restore benchmarks of the four methods with random weights: what one tile costs in seconds and FLOPs.

A method is split into the parts a restore is made of, each timed on its own:

- ``encode`` / ``decode``: the VAE (latent method only); ``paste``: the pixel paste-back (diffusion methods);
- ``eval``: one network evaluation on the whole batch (UNet, Swin-UNet or CycleGAN generator);
- ``step``: the sampler's own work per network evaluation (scheduler step, re-noising the known region), timed by
  running the real sampler with a free stand-in denoiser.

The model of a restore is ``fixed + NFE x (eval + step)`` with ``fixed = encode + decode + paste``. When that estimate
fits the time budget the full restore (``RestorationPipeline.restore`` / ``CycleGANRestorer.restore``) is run and
timed ("measured"); otherwise the estimate is reported ("extrapolated"). FLOPs follow the same split, counted once at
batch 1 (they scale linearly with the batch and do not depend on the autocast dtype).

The pixel ArtiFusion and CycleGAN networks are imported lazily: a method whose module is missing is skipped with a
message by :func:`available_methods`.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from experiments.benchmarking.timing import autocast, count_flops, measure
from lightning_modules.methods import METHODS as METHOD_TABLE
from lightning_modules.methods import resolve

log = logging.getLogger(__name__)

# the methods with a bench, in table order: latent, latent-conditional, artifusion, cyclegan
METHODS = tuple(name for name, spec in METHOD_TABLE.items() if spec.benchmark)
LATENT_STEPS = 50
STEP_PROBE = 10

# Modules each method needs (checked lazily, so a baseline still being written does not break the latent bench).
_REQUIRES: dict[str, tuple[str, ...]] = {
    "latent": ("lightning_modules.components.pipeline", "lightning_modules.components.denoisers"),
    "latent-conditional": ("lightning_modules.components.pipeline", "lightning_modules.conditional_latent"),
    "artifusion": ("lightning_modules.components.swin_unet", "lightning_modules.components.artifusion"),
    "cyclegan": ("lightning_modules.components.gan_networks", "lightning_modules.baselines.cyclegan"),
}


@dataclass(frozen=True)
class Geometry:
    """Model sizes and tile size of one ``--config``.

    Attributes:
        image_size: Tile side in pixels.
        unet: ``build_unet`` preset of the latent denoiser.
        vae: ``build_autoencoder`` preset.
        swin: ``build_swin_unet`` preset of the pixel ArtiFusion denoiser.
        gan_ngf: Filters of the CycleGAN generator's first layer.
        gan_blocks: Residual blocks of the CycleGAN generator.
        tiny_vae: ``build_tiny_autoencoder`` preset of the optional distilled autoencoder.
    """

    image_size: int
    unet: str
    vae: str
    swin: str
    gan_ngf: int
    gan_blocks: int
    tiny_vae: str = "cpu"


CONFIGS: dict[str, Geometry] = {
    # The papers' networks: 113.7 M UNet on 4x32x32 + kl-f8 VAE (83.7 M); Swin-UNet 29.7 M; ResNet-9 ngf 64.
    "paper": Geometry(
        image_size=256, unet="paper", vae="kl-f8", swin="paper", gan_ngf=64, gan_blocks=9, tiny_vae="taesd"
    ),
    # The CPU-trainable configs of experiments/configs/model/*_cpu.yaml.
    "cpu": Geometry(image_size=256, unet="cpu", vae="cpu", swin="cpu", gan_ngf=16, gan_blocks=6),
    # Tests and smoke runs on 64x64 tiles.
    "tiny": Geometry(image_size=64, unet="tiny", vae="tiny", swin="tiny", gan_ngf=8, gan_blocks=2, tiny_vae="tiny"),
}


def missing_modules(method: str) -> list[str]:
    """Modules ``method`` needs that cannot be imported (empty when it can run)."""
    missing = []
    for name in _REQUIRES[method]:
        try:
            importlib.import_module(name)
        except ImportError as err:
            missing.append(f"{name} ({err})")
    return missing


def available_methods(requested: list[str] | None = None) -> tuple[list[str], dict[str, str]]:
    """Split the requested methods (default: all) into runnable ones and skipped ones with the reason.

    Raises:
        ValueError: For a method name that is not one of :data:`METHODS`.
    """
    requested = list(METHODS) if not requested else requested
    unknown = sorted(set(requested) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; expected some of {METHODS}")
    runnable, skipped = [], {}
    for method in requested:
        missing = missing_modules(method)
        if missing:
            skipped[method] = "missing module " + "; ".join(missing)
            log.warning("skipping method %s: %s", method, skipped[method])
        else:
            runnable.append(method)
    return runnable, skipped


def example_batch(batch_size: int, image_size: int, device: torch.device, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Random tiles in ``[-1, 1]`` and a fold-like diagonal band mask covering about 10 % of each tile.

    Returns:
        ``corrupted (B, 3, S, S)`` and ``artifact_mask (B, 1, S, S)`` in ``{0, 1}`` (1 = artifact).
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch_size, 3, image_size, image_size, generator=g) * 2 - 1
    ys, xs = torch.meshgrid(torch.arange(image_size), torch.arange(image_size), indexing="ij")
    band = ((xs - ys).abs() < image_size * 0.05).float()
    mask = band.expand(batch_size, 1, image_size, image_size).contiguous()
    return x.to(device), mask.to(device)


class MethodBench:
    """One method with random weights on one device: component closures, FLOP counts and the full restore.

    Subclasses set :attr:`name`, :attr:`nfe` (network evaluations per restore), :attr:`network` (the evaluated net)
    and :attr:`vae` (or None), and implement :meth:`eval_fn` and :meth:`restore_fn`; diffusion methods also provide
    the VAE, paste-back and sampler-step parts. Each ``*_fn`` returns a zero-argument closure over prepared inputs.

    Args:
        geometry: Model sizes and tile size.
        device: Where the method runs.
    """

    name: str = ""
    nfe: int = 1
    network: torch.nn.Module
    vae: torch.nn.Module | None = None

    def __init__(self, geometry: Geometry, device: torch.device) -> None:
        self.geometry = geometry
        self.device = device

    def eval_fn(self, x: Tensor, mask: Tensor) -> Callable[[], Any]:
        """One network evaluation on the batch."""
        raise NotImplementedError

    def encode_fn(self, x: Tensor) -> Callable[[], Any] | None:
        """VAE encode of the batch (None when the method has no VAE)."""
        return None

    def decode_fn(self, x: Tensor) -> Callable[[], Any] | None:
        """VAE decode of the batch's latents (None when the method has no VAE)."""
        return None

    def paste_fn(self, x: Tensor, mask: Tensor) -> Callable[[], Any] | None:
        """Pixel paste-back of the batch (None when the method does not paste back)."""
        return None

    def step_fn(self, x: Tensor, mask: Tensor) -> tuple[Callable[[], Any], int] | None:
        """Sampler work without the network over a few steps, and how many steps that is (None: no sampler)."""
        return None

    def restore_fn(self, x: Tensor, mask: Tensor, precision: str, seed: int = 0) -> Callable[[], Any]:
        """The full restore of the batch."""
        raise NotImplementedError

    def count_flops(self) -> dict[str, int]:
        """FLOPs per tile (batch 1, fp32) of one network evaluation and of the VAE encode/decode.

        Returns:
            ``{"eval": ..., "encode": ..., "decode": ...}`` (VAE entries 0 without a VAE).
        """
        x, mask = example_batch(1, self.geometry.image_size, self.device)
        enc, dec = self.encode_fn(x), self.decode_fn(x)
        return {
            "eval": count_flops(self.eval_fn(x, mask)),
            "encode": count_flops(enc) if enc is not None else 0,
            "decode": count_flops(dec) if dec is not None else 0,
        }

    def time_parts(self, x: Tensor, mask: Tensor, precision: str, *, max_seconds: float, warmup: int) -> dict:
        """Median seconds per batch of every part (``None`` for parts the method lacks) and repetition counts."""
        parts: dict[str, float | None] = {}
        reps: dict[str, int] = {}
        step = self.step_fn(x, mask)
        closures = {
            "encode": self.encode_fn(x),
            "decode": self.decode_fn(x),
            "paste": self.paste_fn(x, mask),
            "eval": self.eval_fn(x, mask),
            "step": step[0] if step is not None else None,
        }
        with autocast(self.device, precision):
            for key, fn in closures.items():
                if fn is None:
                    parts[key] = None
                    continue
                timing = measure(fn, self.device, max_seconds=max_seconds, warmup=warmup)
                parts[key], reps[key] = timing.median, timing.reps
        if step is not None:
            parts["step"] /= step[1]
        return {"seconds": parts, "reps": reps}


class _DiffusionBench(MethodBench):
    """A :class:`RestorationPipeline` (latent or pixel) with random weights."""

    def __init__(self, geometry: Geometry, device: torch.device, pipeline: Any) -> None:
        super().__init__(geometry, device)
        self.pipeline = pipeline.to(device)
        self.network = self.pipeline.unet
        self.vae = self.pipeline.codec.vae if self.pipeline.codec is not None else None
        self.nfe = self.pipeline.make_sampler().expected_nfe()
        self._out_channels: int | None = None

    def _latent(self, x: Tensor) -> Tensor:
        if self.pipeline.codec is None:
            return x
        f = self.pipeline.factor
        b, _, h, w = x.shape
        g = torch.Generator(device=x.device).manual_seed(0)
        return torch.randn(b, self.pipeline.codec.latent_channels, h // f, w // f, generator=g, device=x.device)

    def eval_fn(self, x: Tensor, mask: Tensor) -> Callable[[], Any]:
        """One denoiser call at a mid-chain timestep on the batch's (latent) shape."""
        from lightning_modules.components.pipeline import unet_callable

        z = self._latent(x)
        t = torch.full(
            (z.shape[0],),
            self.pipeline.noise_scheduler.config.num_train_timesteps // 2,
            dtype=torch.long,
            device=z.device,
        )
        denoiser = unet_callable(self.network)

        def run() -> Tensor:
            with torch.no_grad():
                out = denoiser(z, t)
            self._out_channels = out.shape[1]
            return out

        return run

    def encode_fn(self, x: Tensor) -> Callable[[], Any] | None:
        """VAE encode with a posterior sample, as the pipeline does."""
        codec = self.pipeline.codec
        if codec is None:
            return None
        g = torch.Generator(device=x.device).manual_seed(0)
        return lambda: codec.encode(x, generator=g)

    def decode_fn(self, x: Tensor) -> Callable[[], Any] | None:
        """VAE decode of latents of the batch's shape (twice as many when the decode mode decodes the change)."""
        codec = self.pipeline.codec
        if codec is None:
            return None
        z = self._latent(x)
        if self.pipeline.sampler_config.decode != "full":
            z = torch.cat([z, z])  # decode_latents decodes the restored and the input latents in one call
        return lambda: codec.decode(z)

    def paste_fn(self, x: Tensor, mask: Tensor) -> Callable[[], Any] | None:
        """The sampler preset's paste-back (composite inside the pixel mask)."""
        from lightning_modules.components.regional_sampler import composite

        cfg = self.pipeline.sampler_config
        if not cfg.paste_back:
            return None
        restored = x.flip(-1)
        return lambda: composite(restored, x, mask, cfg.feather)

    def step_fn(self, x: Tensor, mask: Tensor) -> tuple[Callable[[], Any], int]:
        """The real sampler for :data:`STEP_PROBE` steps (no jumps) with a denoiser that returns zeros at once."""
        from lightning_modules.components.masks import to_latent_mask

        if self._out_channels is None:
            self.eval_fn(x[:1], mask[:1])()
        sampler = self.pipeline.make_sampler(num_steps=STEP_PROBE, jump_length=0, jump_n_sample=1)
        z = self._latent(x)
        latent_mask = to_latent_mask(mask, self.pipeline.factor, sampler.config.mask_mode).to(z.dtype)
        channels = self._out_channels

        def free_denoiser(x_t: Tensor, t: Tensor) -> Tensor:
            return x_t.new_zeros(x_t.shape[0], channels, *x_t.shape[2:])

        g = torch.Generator(device=x.device).manual_seed(0)
        return (lambda: sampler.sample(free_denoiser, z, latent_mask, generator=g)), STEP_PROBE

    def restore_fn(self, x: Tensor, mask: Tensor, precision: str, seed: int = 0) -> Callable[[], Any]:
        """``RestorationPipeline.restore`` with the method's sampler and autocast precision."""
        g = torch.Generator(device=x.device)

        def run() -> Tensor:
            self.pipeline.precision = precision
            out = self.pipeline.restore(x, mask, generator=g.manual_seed(seed))
            if self.pipeline.nfe != self.nfe:
                raise RuntimeError(f"{self.name}: restore ran {self.pipeline.nfe} NFE, expected {self.nfe}")
            return out

        return run


class LatentBench(_DiffusionBench):
    """LatentArtiFusion: VAE encode, ``repaint`` preset with ``num_steps`` DDPM steps in latent space, decode, paste."""

    name = "latent"

    def __init__(self, geometry: Geometry, device: torch.device, num_steps: int = LATENT_STEPS) -> None:
        from diffusers import DDPMScheduler

        from lightning_modules.components.autoencoders import build_autoencoder
        from lightning_modules.components.denoisers import build_unet
        from lightning_modules.components.pipeline import RestorationPipeline
        from lightning_modules.components.regional_sampler import SamplerConfig
        from lightning_modules.latent_diffusion import PAPER_SCHEDULER

        vae = build_autoencoder(geometry.vae)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        unet = build_unet(geometry.unet, sample_size=geometry.image_size // factor)
        pipeline = RestorationPipeline(
            unet,
            DDPMScheduler(**PAPER_SCHEDULER),
            SamplerConfig.from_preset("repaint", num_steps=num_steps),
            vae,
            name="latent",
            image_size=geometry.image_size,
        )
        super().__init__(geometry, device, pipeline)


class ConditionalBench(_DiffusionBench):
    """latent-conditional: as :class:`LatentBench` with the ``2C + 1``-channel input.

    The sampler defaults are the conditional's (``CONDITIONAL_SAMPLER``: one step, adaptive decode, which costs
    one more VAE decode for the corrupted tile's reconstruction, and the decode crop, which shrinks both decodes to
    a window around the mask; the benchmark's band masks span the tile, so here it decodes the whole tile).
    """

    name = "latent-conditional"

    def __init__(self, geometry: Geometry, device: torch.device) -> None:
        from diffusers import DDPMScheduler

        from lightning_modules.components.autoencoders import build_autoencoder
        from lightning_modules.components.conditioning import conditional_channels
        from lightning_modules.components.denoisers import build_unet
        from lightning_modules.components.pipeline import RestorationPipeline
        from lightning_modules.components.regional_sampler import SamplerConfig
        from lightning_modules.conditional_latent import CONDITIONAL_SAMPLER, CONDITIONAL_SCHEDULER
        from lightning_modules.latent_diffusion import PAPER_SCHEDULER

        vae = build_autoencoder(geometry.vae)
        factor = 2 ** (len(vae.config.block_out_channels) - 1)
        channels = vae.config.latent_channels
        unet = build_unet(
            geometry.unet,
            sample_size=geometry.image_size // factor,
            in_channels=conditional_channels(channels),
            out_channels=channels,
        )
        pipeline = RestorationPipeline(
            unet,
            DDPMScheduler(**{**PAPER_SCHEDULER, **CONDITIONAL_SCHEDULER}),
            SamplerConfig.from_preset("repaint", **CONDITIONAL_SAMPLER),
            vae,
            name="latent-conditional",
            image_size=geometry.image_size,
            conditional=True,
        )
        super().__init__(geometry, device, pipeline)

    def eval_fn(self, x: Tensor, mask: Tensor) -> Callable[[], Any]:
        """One denoiser call on ``[z_t, mask, z_corrupted]`` at a mid-chain timestep."""
        from lightning_modules.components.conditioning import condition_denoiser
        from lightning_modules.components.masks import to_latent_mask
        from lightning_modules.components.pipeline import unet_callable

        z = self._latent(x)
        latent_mask = to_latent_mask(mask, self.pipeline.factor).to(z.dtype)
        t = torch.full(
            (z.shape[0],),
            self.pipeline.noise_scheduler.config.num_train_timesteps // 2,
            dtype=torch.long,
            device=z.device,
        )
        denoiser = condition_denoiser(unet_callable(self.network), latent_mask, z)

        def run() -> Tensor:
            with torch.no_grad():
                out = denoiser(z, t)
            self._out_channels = out.shape[1]
            return out

        return run


class ArtiFusionBench(_DiffusionBench):
    """Pixel ArtiFusion: Swin-UNet in pixel space, RePaint 250 steps, j = 10, r = 10 (2410 NFE), paste-back."""

    name = "artifusion"

    def __init__(self, geometry: Geometry, device: torch.device) -> None:
        from diffusers import DDPMScheduler

        from lightning_modules.components.artifusion import PAPER_SCHEDULER, paper_sampler_config
        from lightning_modules.components.pipeline import RestorationPipeline
        from lightning_modules.components.swin_unet import build_swin_unet

        swin = build_swin_unet(geometry.swin, sample_size=geometry.image_size)
        pipeline = RestorationPipeline(
            swin,
            DDPMScheduler(**PAPER_SCHEDULER),
            paper_sampler_config(),
            None,
            name="artifusion",
            image_size=geometry.image_size,
        )
        super().__init__(geometry, device, pipeline)


class CycleGANBench(MethodBench):
    """CycleGAN: one pass of the artifact -> clean ResNet generator over the whole tile."""

    name = "cyclegan"
    nfe = 1

    def __init__(self, geometry: Geometry, device: torch.device) -> None:
        from lightning_modules.baselines.cyclegan import CycleGANRestorer
        from lightning_modules.components.gan_networks import ResnetGenerator

        super().__init__(geometry, device)
        generator = ResnetGenerator(ngf=geometry.gan_ngf, n_blocks=geometry.gan_blocks).to(device)
        self.restorer = CycleGANRestorer(generator)
        self.network = self.restorer.generator

    def eval_fn(self, x: Tensor, mask: Tensor) -> Callable[[], Any]:
        """One generator pass."""

        def run() -> Tensor:
            with torch.no_grad():
                return self.network(x, mask)

        return run

    def restore_fn(self, x: Tensor, mask: Tensor, precision: str, seed: int = 0) -> Callable[[], Any]:
        """``CycleGANRestorer.restore`` at the given precision."""

        def run() -> Tensor:
            self.restorer.precision = precision
            return self.restorer.restore(x, mask)

        return run


def build_bench(method: str, geometry: Geometry, device: torch.device) -> MethodBench:
    """Build a method's bench (its ``benchmark`` in the method table) with random weights on ``device``.

    The bench is in eval mode, without gradients.

    Raises:
        ValueError: For a method without a bench.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    bench = resolve(METHOD_TABLE[method].benchmark)(geometry, device)
    bench.network.eval().requires_grad_(False)
    return bench
