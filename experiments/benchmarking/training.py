"""Denoiser training throughput with and without the latent cache (random weights, random tiles).

One step is what ``LatentDiffusionModule.training_step`` does plus the optimiser: ``model_step`` (encode when the
batch has no ``latent``, noise at random timesteps, predict epsilon, MSE), backward, gradient clipping at 1.0 (the
paper's recipe) and an AdamW step, under the chosen autocast precision.

- **with cache**: batches come from a real :class:`datamodules.latents.LatentCacheDataset` (posterior mean and std
  stored per tile; every sample draws ``mean + std * eps``) through a ``DataLoader``, as in training.
- **without cache**: batches of clean tiles, which ``model_step`` encodes with the frozen VAE every step. Reading
  and augmenting the tiles is not included (the tiles are random tensors already in memory), so the difference of the
  two rows is the VAE encode cost plus the cache's sampling cost.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from experiments.benchmarking.methods import Geometry
from experiments.benchmarking.timing import autocast, count_flops, measure

log = logging.getLogger(__name__)


def _cache_batches(path: Path, batch_size: int) -> Iterator[dict]:
    """Endless shuffled batches of a latent cache folder."""
    from datamodules.latents import LatentCacheDataset

    dataset = LatentCacheDataset(path, split="train", seed=0)
    while True:
        yield from DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0)


def _write_cache(path: Path, n_tiles: int, latent_shape: tuple[int, int, int]) -> None:
    """A random latent cache in :func:`datamodules.latents.build_latent_cache`'s payload format (one variant)."""
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(n_tiles, 1, *latent_shape, generator=g).half()
    std = (torch.rand(n_tiles, 1, *latent_shape, generator=g) * 0.1).half()
    torch.save({"mean": mean, "std": std, "names": [f"random:{i}:0" for i in range(n_tiles)]}, path / "latents.pt")


def training_records(
    geometry: Geometry,
    device: torch.device,
    *,
    config: str,
    precisions: list[str],
    batch_size: int,
    max_seconds: float,
    warmup: int,
) -> list[dict]:
    """Images per second of denoiser training steps, with and without the latent cache, per precision.

    Args:
        geometry: Model sizes (``unet`` and ``vae`` presets, tile size).
        device: Where to train.
        config: ``--config`` name (for the records).
        precisions: Autocast precisions to measure.
        batch_size: Tiles per step.
        max_seconds: Budget per measurement.
        warmup: Untimed steps before each measurement.

    Returns:
        One ``"training"`` record per (precision, cache) pair (utilisation is added by ``records.add_utilisation``).
    """
    from lightning_modules.components.autoencoders import LatentCodec, build_autoencoder
    from lightning_modules.components.denoisers import build_unet
    from lightning_modules.latent_diffusion import LatentDiffusionModule

    codec = LatentCodec(build_autoencoder(geometry.vae))
    latent_size = geometry.image_size // codec.factor
    with warnings.catch_warnings():
        # save_hyperparameters() notes that the injected denoiser is an nn.Module; irrelevant here (no checkpoint).
        warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
        module = LatentDiffusionModule(
            build_unet(geometry.unet, sample_size=latent_size), autoencoder=None, ema_decay=None
        )
    module.codec = codec
    module = module.to(device).train()
    optimizer = torch.optim.AdamW(module.denoiser.parameters(), lr=1e-4, weight_decay=1e-2)
    g = torch.Generator().manual_seed(0)
    clean = (torch.rand(batch_size, 3, geometry.image_size, geometry.image_size, generator=g) * 2 - 1).to(device)

    records = []
    with tempfile.TemporaryDirectory(prefix="bench_latent_cache_") as tmp:
        _write_cache(Path(tmp), 4 * batch_size, (codec.latent_channels, latent_size, latent_size))
        cached = _cache_batches(Path(tmp), batch_size)
        for precision in precisions:
            for use_cache in (True, False):

                def batch(use_cache: bool = use_cache) -> dict:
                    return {"latent": next(cached)["latent"].to(device)} if use_cache else {"clean": clean}

                records.append(
                    _training_record(
                        module,
                        optimizer,
                        batch,
                        method="latent",
                        config=config,
                        precision=precision,
                        batch_size=batch_size,
                        use_cache=use_cache,
                        device=device,
                        max_seconds=max_seconds,
                        warmup=warmup,
                    )
                )
    _add_cache_speedups(records)
    return records


def _training_record(
    module,
    optimizer,
    next_batch,
    *,
    method: str,
    config: str,
    precision: str,
    batch_size: int,
    use_cache: bool,
    device: torch.device,
    max_seconds: float,
    warmup: int,
    extra: dict | None = None,
) -> dict:
    """Time one optimiser step of ``module`` on ``next_batch()`` (FLOPs counted once) and return its record."""

    def step() -> torch.Tensor:
        batch = next_batch()
        optimizer.zero_grad(set_to_none=True)
        with autocast(device, precision):
            loss = module.model_step(batch)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.denoiser.parameters(), 1.0)
        optimizer.step()
        return loss

    log.info("training %s: %s batch %d, latent cache %s", method, precision, batch_size, "on" if use_cache else "off")
    with autocast(device, precision):
        flops = count_flops(step)
    timing = measure(step, device, max_seconds=max_seconds, warmup=warmup)
    return {
        "record": "training",
        "method": method,
        "config": config,
        "precision": precision,
        "batch_size": batch_size,
        "latent_cache": use_cache,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "seconds_per_step": timing.median,
        "steps": timing.reps,
        "images_per_second": batch_size / timing.median,
        "flops_per_step": flops,
        "achieved_flops_per_second": flops / timing.median,
        **(extra or {}),
    }


def _add_cache_speedups(records: list[dict]) -> None:
    """``cache_speedup`` = images/s with the cache over images/s without it, at the same precision."""
    for r in records:
        twin = next(o for o in records if o["precision"] == r["precision"] and o["latent_cache"] != r["latent_cache"])
        r["cache_speedup"] = (r["images_per_second"] / twin["images_per_second"]) if r["latent_cache"] else 1.0


def conditional_training_records(
    geometry: Geometry,
    device: torch.device,
    *,
    config: str,
    precisions: list[str],
    batch_size: int,
    max_seconds: float,
    warmup: int,
    variants: int = 8,
) -> list[dict]:
    """Images per second of ``latent-conditional`` training: restoration latent cache vs encoding on the fly.

    - **with cache**: batches of a real restoration cache (``datamodules/restoration_latents.py``) built first from
      real bundled train tiles with ``variants`` synthesised corruptions each; its build rate (synthesis + two
      encodes per variant) is reported as ``cache_build_images_per_second``.
    - **without cache**: real bundled tiles corrupted on the fly by the artifact mixture (``OnlineArtifactDataset``,
      synthesis included in the timing), then clean and corrupted tiles encoded by the frozen VAE in every step.

    Returns:
        One ``"training"`` record per (precision, cache) pair, ``method = "latent-conditional"``.
    """
    import time

    from datamodules.artifacts import ArtifactSynthesizer
    from datamodules.datasets import OnlineArtifactDataset, TileDataset
    from datamodules.restoration_latents import RestorationLatentDataset, build_restoration_cache
    from datamodules.sources import bundled_sources
    from datamodules.splits import tiles_for_split
    from lightning_modules.components.autoencoders import LatentCodec, build_autoencoder
    from lightning_modules.components.conditioning import conditional_channels
    from lightning_modules.components.denoisers import build_unet
    from lightning_modules.conditional_latent import ConditionalLatentDiffusionModule

    codec = LatentCodec(build_autoencoder(geometry.vae))
    latent_size = geometry.image_size // codec.factor
    channels = codec.latent_channels
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is an instance of `nn.Module`.*")
        module = ConditionalLatentDiffusionModule(
            build_unet(
                geometry.unet,
                sample_size=latent_size,
                in_channels=conditional_channels(channels),
                out_channels=channels,
            ),
            autoencoder=None,
            ema_decay=None,
        )
    module.codec = codec
    module = module.to(device).train()
    optimizer = torch.optim.AdamW(module.denoiser.parameters(), lr=1e-4, weight_decay=1e-2)
    sources = bundled_sources()
    tiles = tiles_for_split(sources, "train", size=geometry.image_size, stride=geometry.image_size)[: 2 * batch_size]
    synthesizer = ArtifactSynthesizer()
    online = OnlineArtifactDataset(sources, tiles, synthesizer=synthesizer, split="train")

    def pixel_batches() -> Iterator[dict]:
        epoch = 0
        while True:
            yield from DataLoader(
                [(epoch, i) for i in range(len(online))],
                batch_size=batch_size,
                shuffle=False,
                collate_fn=lambda items: torch.utils.data.default_collate([online[i] for i in items]),
            )
            epoch += 1

    records = []
    with tempfile.TemporaryDirectory(prefix="bench_restoration_cache_") as tmp:
        start = time.perf_counter()
        build_restoration_cache(
            codec,
            TileDataset(sources, tiles, split="train"),
            Path(tmp),
            synthesizer=synthesizer,
            variants=variants,
            device=device,
            progress=False,
        )
        build_rate = len(tiles) * variants / (time.perf_counter() - start)
        dataset = RestorationLatentDataset(Path(tmp), split="train")

        def cache_batches() -> Iterator[dict]:
            while True:
                yield from DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, num_workers=0)

        sources_of = {True: cache_batches(), False: pixel_batches()}
        keys = {True: ("latent", "latent_corrupted", "latent_mask"), False: ("clean", "corrupted", "artifact_mask")}
        for precision in precisions:
            for use_cache in (True, False):

                def batch(use_cache: bool = use_cache) -> dict:
                    raw = next(sources_of[use_cache])
                    return {k: raw[k].to(device) for k in keys[use_cache]}

                records.append(
                    _training_record(
                        module,
                        optimizer,
                        batch,
                        method="latent-conditional",
                        config=config,
                        precision=precision,
                        batch_size=batch_size,
                        use_cache=use_cache,
                        device=device,
                        max_seconds=max_seconds,
                        warmup=warmup,
                        extra={"cache_variants": variants, "cache_build_images_per_second": build_rate},
                    )
                )
    _add_cache_speedups(records)
    return records
