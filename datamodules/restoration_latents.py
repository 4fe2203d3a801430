"""Restoration latent cache: clean and corrupted latents of K synthesised variants per tile, encoded once.

The conditional latent restorer (``lightning_modules/conditional_latent.py``) learns ``z_clean`` from
``(z_corrupted, latent_mask)``. Encoding both tiles with the frozen VAE at every step costs two encoder passes per
sample; this cache pays them once. Variant ``k`` of train tile ``i`` is the tile under dihedral transform ``k % 8``
and a mild stain jitter, corrupted by the artifact mixture with the generator ``sample_rng(seed, "train", i, k)``;
the cache stores the scaled posterior mean and standard deviation of the clean and the corrupted variant and the
max-pooled latent mask (any artifact pixel marks its cell, as at sampling). A sample draws fresh posterior noise
for both latents every epoch. ``K`` is the trade-off: more variants = more distinct corruptions seen, a longer build.

Validation uses one fixed corruption per val tile (no transform) and posterior means, so ``val/loss`` is comparable
across epochs. Invalidation, atomic writes and the manifest follow ``datamodules/latents.py``: the fingerprint
covers the VAE weights, the tile list, K, the seed and the full synthesizer configuration.
"""

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from datamodules.artifacts import ArtifactSynthesizer
from datamodules.datasets import sample_rng, to_mask_tensor, to_tensor
from datamodules.latents import LatentCacheDataModule, cache_is_valid, fingerprint_module, fingerprint_tiles
from datamodules.transforms import clean_tile_augmentation
from lightning_modules.components.hardware import native_bf16

log = logging.getLogger(__name__)

CACHE_VERSION = 1


def variant_tile(tile: np.ndarray, k: int) -> np.ndarray:
    """Dihedral variant ``k % 8`` of a uint8 ``(H, W, 3)`` tile: ``k % 4`` quarter turns, then a horizontal flip."""
    out = np.rot90(tile, k % 4)
    return np.ascontiguousarray(out[:, ::-1] if k % 8 >= 4 else out)


def corrupted_variants(
    tile: np.ndarray,
    index: int,
    variants: int,
    synthesizer: ArtifactSynthesizer,
    *,
    split: str,
    seed: int,
    stain_strength: float = 1.0,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]]:
    """The ``variants`` (clean, corrupted, mask, types) quadruples of one tile, as the cache stores them.

    Args:
        tile: uint8 ``(H, W, 3)`` clean tile.
        index: Its index in the split (part of every variant's seed).
        variants: K; on splits other than ``"train"`` variant 0 keeps the tile untransformed.
        synthesizer: The artifact mixture.
        split: Split name (part of the seed).
        seed: Base seed.
        stain_strength: Mild colour jitter of the clean tile before synthesis (train only; 0 disables it).

    Returns:
        One ``(clean uint8 (H, W, 3), corrupted uint8 (H, W, 3), mask bool (H, W), types)`` per variant.
    """
    jitter = clean_tile_augmentation(geometric=False, stain_strength=stain_strength) if stain_strength else None
    out = []
    for k in range(variants):
        rng = sample_rng(seed, split, index, k)
        clean = variant_tile(tile, k) if split == "train" else tile
        if jitter is not None and split == "train":
            jitter.set_random_seed(int(rng.integers(2**31)))
            clean = jitter(image=clean)["image"]
        result = synthesizer(clean, rng)
        out.append((clean, result.corrupted, result.mask, result.types))
    return out


def fingerprint_synthesis(synthesizer: ArtifactSynthesizer, variants: int, seed: int, stain_strength: float) -> str:
    """SHA-256 over the synthesizer's full configuration, K, the seed and the jitter strength."""
    payload = json.dumps(
        [CACHE_VERSION, synthesizer.to_config(), variants, seed, stain_strength], sort_keys=True, default=str
    )
    return hashlib.sha256(payload.encode()).hexdigest()


@torch.no_grad()
def build_restoration_cache(
    codec,
    dataset,
    path: str | Path,
    *,
    synthesizer: ArtifactSynthesizer,
    variants: int = 8,
    split: str = "train",
    seed: int = 0,
    stain_strength: float = 1.0,
    batch_size: int = 16,
    device: str | torch.device = "cpu",
    autocast_dtype: torch.dtype | None = torch.bfloat16,
    progress: bool = True,
) -> Path:
    """Encode K corrupted variants of every tile of ``dataset`` (and their clean versions) into ``path``.

    Args:
        codec: A ``LatentCodec`` (frozen VAE) with ``encode_dist`` and ``factor``.
        dataset: Clean tiles (a ``TileDataset`` without augmentation).
        path: Cache folder (``latents.pt`` + ``manifest.json``).
        synthesizer: Artifact mixture.
        variants: K variants per tile (>= 1).
        split: Split name the seeds derive from.
        seed: Base seed.
        stain_strength: Colour jitter before synthesis on the train split.
        batch_size: Encoder batch size.
        device: Where to encode.
        autocast_dtype: Encoder autocast dtype (None = fp32).
        progress: Show a progress bar.

    Returns:
        The cache folder; an existing cache whose manifest matches is reused.
    """
    if variants < 1:
        raise ValueError(f"variants must be >= 1, got {variants}")
    path = Path(path)
    manifest = {
        "version": CACHE_VERSION,
        "kind": "restoration",
        "vae": fingerprint_module(codec.vae),
        "tiles": fingerprint_tiles(dataset, variants),
        "synthesis": fingerprint_synthesis(synthesizer, variants, seed, stain_strength),
        "split": split,
        "variants": variants,
        "count": len(dataset),
    }
    if cache_is_valid(path, manifest):
        log.info("restoration latent cache %s is up to date (%d tiles x %d variants)", path, len(dataset), variants)
        return path
    path.mkdir(parents=True, exist_ok=True)
    codec = codec.to(device)
    factor = codec.factor
    fields: dict[str, list[torch.Tensor]] = {k: [] for k in ("mean", "std", "mean_corrupted", "std_corrupted", "mask")}
    names, types = [], []
    bar = tqdm(
        total=len(dataset) * variants, desc=f"encoding restoration cache ({split})", unit="tile", disable=not progress
    )
    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []

    if autocast_dtype == torch.bfloat16 and not native_bf16(device):
        autocast_dtype = None  # emulated bf16 (no AVX-512 BF16 / AMX) is ~20x slower: components/hardware.py

    def flush() -> None:
        clean = torch.stack([to_tensor(c) for c, _, _ in pending]).to(device)
        corrupted = torch.stack([to_tensor(x) for _, x, _ in pending]).to(device)
        masks = torch.stack([to_mask_tensor(m) for _, _, m in pending])
        with torch.autocast(torch.device(device).type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
            mean, std = codec.encode_dist(torch.cat([clean, corrupted]))
        mean, std = mean.float().cpu().half(), std.float().cpu().half()
        n = len(pending)
        fields["mean"].append(mean[:n])
        fields["std"].append(std[:n])
        fields["mean_corrupted"].append(mean[n:])
        fields["std_corrupted"].append(std[n:])
        fields["mask"].append(torch.nn.functional.max_pool2d(masks, factor, factor).bool())
        bar.update(n)
        pending.clear()

    for index in range(len(dataset)):
        tile = ((dataset[index]["clean"].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        for clean, corrupted, mask, kinds in corrupted_variants(
            tile, index, variants, synthesizer, split=split, seed=seed, stain_strength=stain_strength
        ):
            pending.append((clean, corrupted, mask))
            types.append(",".join(kinds))
            if len(pending) == batch_size:
                flush()
        names.append(
            dataset.sources[dataset.tiles[index][0]].name + f":{dataset.tiles[index][1].x}:{dataset.tiles[index][1].y}"
        )
    if pending:
        flush()
    bar.close()
    payload = {k: torch.cat(v).unflatten(0, (len(dataset), variants)) for k, v in fields.items()}
    payload.update({"names": names, "types": types})
    tmp = path / "latents.pt.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path / "latents.pt")
    tmp_manifest = path / "manifest.json.tmp"
    tmp_manifest.write_text(json.dumps(manifest, indent=2))
    os.replace(tmp_manifest, path / "manifest.json")
    log.info("wrote restoration latent cache %s: %s", path, tuple(payload["mean"].shape))
    return path


class RestorationLatentDataset(Dataset):
    """Samples from a restoration cache; returns ``{"latent", "latent_corrupted", "latent_mask", "meta"}``.

    Args:
        path: Cache folder written by :func:`build_restoration_cache`.
        split: Split name (part of the posterior-noise seed).
        seed: Base seed.
        sample: Draw posterior samples (fresh each epoch) for both latents; False returns the means.
    """

    def __init__(self, path: str | Path, *, split: str = "train", seed: int = 0, sample: bool = True) -> None:
        payload = torch.load(Path(path) / "latents.pt", map_location="cpu")
        self.n_tiles, self.n_variants = payload["mean"].shape[:2]
        self.fields = {k: payload[k].flatten(0, 1) for k in ("mean", "std", "mean_corrupted", "std_corrupted", "mask")}
        self.names, self.types = payload["names"], payload["types"]
        self.split, self.seed, self.sample = split, seed, sample

    def __len__(self) -> int:
        return self.fields["mean"].shape[0]

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        epoch, index = item if isinstance(item, tuple) else (0, item)
        f = {k: v[int(index)] for k, v in self.fields.items()}
        z, z_corrupted = f["mean"].float(), f["mean_corrupted"].float()
        if self.sample:
            rng = sample_rng(self.seed, self.split, int(index), int(epoch))
            noise = torch.from_numpy(rng.standard_normal((2, *z.shape), dtype=np.float32))
            z = z + f["std"].float() * noise[0]
            z_corrupted = z_corrupted + f["std_corrupted"].float() * noise[1]
        tile, variant = divmod(int(index), self.n_variants)
        return {
            "latent": z,
            "latent_corrupted": z_corrupted,
            "latent_mask": f["mask"].float(),
            "meta": {"name": self.names[tile], "variant": variant, "index": int(index), "types": self.types[index]},
        }


class RestorationLatentCacheDataModule(LatentCacheDataModule):
    """Training data of the conditional latent restorer: a restoration latent cache built once with a frozen VAE.

    Args:
        autoencoder: Folder of an exported diffusers ``AutoencoderKL``.
        cache_dir: Where the caches live (one subfolder per split).
        sources: As :class:`~datamodules.restoration.CleanTileDataModule`.
        tile_size: Tile edge in pixels.
        stride: Tiling stride.
        min_tissue: Minimum tissue fraction.
        seed: Base seed (splits, corruptions, posterior samples).
        variants: K synthesised variants per train tile (val uses 1).
        artifacts: ``ArtifactSynthesizer.from_config`` dict; default every artifact type, 1-2 per tile.
        stain_jitter: Colour jitter of the clean train tiles before synthesis (0 disables it).
        batch_size: GLOBAL batch size.
        num_workers: DataLoader workers per device.
        encode_batch_size: Batch size while building the cache.
        max_tiles: Optional cap per split.
    """

    def __init__(
        self,
        autoencoder: str,
        cache_dir: str = "outputs/restoration_cache",
        sources: str | Sequence[str] = "bundled",
        tile_size: int = 256,
        stride: int | None = 128,
        min_tissue: float = 0.5,
        seed: int = 0,
        variants: int = 8,
        artifacts: Mapping | None = None,
        stain_jitter: float = 1.0,
        batch_size: int = 16,
        num_workers: int = 0,
        encode_batch_size: int = 16,
        max_tiles: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__(
            autoencoder=autoencoder,
            cache_dir=cache_dir,
            sources=sources,
            tile_size=tile_size,
            stride=stride,
            min_tissue=min_tissue,
            seed=seed,
            variants=1,
            batch_size=batch_size,
            num_workers=num_workers,
            encode_batch_size=encode_batch_size,
            max_tiles=max_tiles,
        )
        if variants < 1:
            raise ValueError(f"variants must be >= 1, got {variants}")
        self.variants, self.stain_jitter = variants, stain_jitter
        self.synthesizer = ArtifactSynthesizer.from_config(dict(artifacts)) if artifacts else ArtifactSynthesizer()

    def prepare_data(self) -> None:
        """Build (or validate) the train cache (K variants) and the val cache (one fixed corruption per tile)."""
        from lightning_modules.components.autoencoders import LatentCodec, load_autoencoder

        codec = LatentCodec(load_autoencoder(self.hparams.autoencoder))
        for split, variants in (("train", self.variants), ("val", 1)):
            build_restoration_cache(
                codec,
                self.tiles_dm.make_dataset(split),
                self.cache_path(split),
                synthesizer=self.synthesizer,
                variants=variants,
                split=split,
                seed=self.hparams.seed,
                stain_strength=self.stain_jitter,
                batch_size=self.hparams.encode_batch_size,
            )

    def make_cache_dataset(self, split: str) -> RestorationLatentDataset:
        """The dataset of one split's cache (posterior samples on train, means on val)."""
        return RestorationLatentDataset(
            self.cache_path(split), split=split, seed=self.hparams.seed, sample=split == "train"
        )
