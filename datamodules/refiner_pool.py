"""Training data of the pixel refiner: what the latent stage makes of synthesised artifacts, computed once.

The refiner (``lightning_modules/components/refiner.py``) learns ``clean`` from ``(corrupted, coarse, mask)``,
where ``coarse`` is the exported ``latent-conditional`` pipeline's own restoration (refiner switched off). Running
the pipeline costs a VAE encode and decode per tile, so the pool pays it once: every tile of a split is corrupted
under K synthesised variants exactly as the restoration latent cache does (``corrupted_variants``: dihedral
transform, mild stain jitter, the artifact mixture, seeded per tile and variant) and restored with the pipeline; the
pool stores the uint8 clean, corrupted and coarse tiles, the mask and the artifact types.

The refiner must learn how the latent stage errs on tissue it has NOT memorised, so the pool's variants use a seed
stream of their own (``seed + POOL_SEED_OFFSET``): the corruptions differ from those the latent stage trained on.

Training samples are ``crop``-pixel windows centred near a random artifact pixel (jittered by a quarter crop) under
a random dihedral transform, drawn afresh every epoch from ``(seed, epoch, index)``; validation uses whole tiles of
the val split, one fixed corruption each. Invalidation and atomic writes follow ``datamodules/latents.py``: the
manifest covers the pipeline's weights and settings, the tile list, K, the seed and the synthesizer configuration.
"""

import hashlib
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from datamodules.artifacts import ArtifactSynthesizer
from datamodules.base import SuiteDataModule
from datamodules.datasets import sample_rng, to_mask_tensor, to_tensor
from datamodules.latents import cache_is_valid, fingerprint_module, fingerprint_tiles
from datamodules.restoration import CleanTileDataModule
from datamodules.restoration_latents import corrupted_variants, fingerprint_synthesis

log = logging.getLogger(__name__)

POOL_VERSION = 1
POOL_FILE = "pool.pt"
POOL_SEED_OFFSET = 7919
"""Added to the seed of the pool's corruptions, so they differ from the latent stage's training corruptions."""


def fingerprint_pipeline(pipe) -> str:
    """SHA-256 over a pipeline's denoiser and VAE weights and its stored sampler settings."""
    parts = [
        fingerprint_module(pipe.unet),
        fingerprint_module(pipe.codec.vae) if pipe.codec is not None else "",
        json.dumps(pipe.sampler_config.to_dict(), sort_keys=True),
        pipe.scheduler_name,
        str(pipe.residual),
    ]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W, 3) uint8."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()


@torch.no_grad()
def build_refiner_pool(
    pipe,
    dataset,
    path: str | Path,
    *,
    synthesizer: ArtifactSynthesizer,
    variants: int = 2,
    split: str = "train",
    seed: int = 0,
    stain_strength: float = 1.0,
    batch_size: int = 8,
    progress: bool = True,
) -> Path:
    """Corrupt every tile of ``dataset`` K times, restore each with ``pipe`` (no refiner) and store the quadruples.

    Args:
        pipe: A latent :class:`~lightning_modules.components.pipeline.RestorationPipeline`.
        dataset: Clean tiles (a ``TileDataset`` without augmentation).
        path: Pool folder (``pool.pt`` + ``manifest.json``).
        synthesizer: Artifact mixture.
        variants: K variants per tile (>= 1; 1 on the val split).
        split: Split name the seeds derive from.
        seed: Base seed (the corruptions use ``seed + POOL_SEED_OFFSET``; the pipeline's noise ``seed`` and the batch).
        stain_strength: Colour jitter before synthesis on the train split.
        batch_size: Tiles per pipeline call.
        progress: Show a progress bar.

    Returns:
        The pool folder; an existing pool whose manifest matches is reused.
    """
    if variants < 1:
        raise ValueError(f"variants must be >= 1, got {variants}")
    path = Path(path)
    manifest = {
        "version": POOL_VERSION,
        "pipeline": fingerprint_pipeline(pipe),
        "tiles": fingerprint_tiles(dataset, variants),
        "synthesis": fingerprint_synthesis(synthesizer, variants, seed, stain_strength),
        "split": split,
        "variants": variants,
        "count": len(dataset),
    }
    if cache_is_valid(path, manifest, POOL_FILE):
        log.info("refiner pool %s is up to date (%d tiles x %d variants)", path, len(dataset), variants)
        return path
    path.mkdir(parents=True, exist_ok=True)
    fields: dict[str, list[torch.Tensor]] = {k: [] for k in ("clean", "corrupted", "coarse", "mask")}
    types: list[str] = []
    pending: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
    bar = tqdm(total=len(dataset) * variants, desc=f"refiner pool ({split})", unit="tile", disable=not progress)

    def flush() -> None:
        corrupted = torch.stack([to_tensor(x) for _, x, _ in pending])
        masks = torch.stack([to_mask_tensor(m) for _, _, m in pending])
        generator = torch.Generator().manual_seed(seed * 1_000_003 + len(types))
        coarse = pipe.restore(corrupted, masks, generator=generator, refine=False).cpu()
        fields["clean"].append(torch.from_numpy(np.stack([c for c, _, _ in pending])))
        fields["corrupted"].append(torch.from_numpy(np.stack([x for _, x, _ in pending])))
        fields["coarse"].append(_to_uint8(coarse))
        fields["mask"].append(masks[:, 0].bool())
        bar.update(len(pending))
        pending.clear()

    for index in range(len(dataset)):
        tile = ((dataset[index]["clean"].permute(1, 2, 0) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).numpy()
        for clean, corrupted, mask, kinds in corrupted_variants(
            tile,
            index,
            variants,
            synthesizer,
            split=split,
            seed=seed + POOL_SEED_OFFSET,
            stain_strength=stain_strength,
        ):
            if len(pending) == batch_size:
                flush()
            pending.append((clean, corrupted, mask))
            types.append(",".join(kinds))
    if pending:
        flush()
    bar.close()
    payload = {k: torch.cat(v) for k, v in fields.items()}
    payload["types"] = types
    tmp = path / (POOL_FILE + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, path / POOL_FILE)
    (path / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return path


def _dihedral(images: list[torch.Tensor], k: int) -> list[torch.Tensor]:
    """The same dihedral transform ``k % 8`` of (H, W, ...) tensors: ``k % 4`` quarter turns, then a flip."""
    out = [torch.rot90(x, k % 4, (0, 1)) for x in images]
    return [x.flip(1) for x in out] if k % 8 >= 4 else out


class RefinerPoolDataset(Dataset):
    """Samples of a refiner pool as restoration batches with the latent stage's output.

    Items: ``{"clean", "corrupted", "coarse": (3, S, S) in [-1, 1], "artifact_mask": (1, S, S) in {0, 1},
    "meta": {"index", "types"}}`` with ``S = crop`` on train (random window and dihedral transform per epoch) and the
    whole tile otherwise.

    Args:
        path: Pool folder.
        split: ``"train"`` (random crops) or another split (whole tiles, fixed).
        crop: Crop edge in pixels on train (a multiple of the refiner's stride; at most the tile size).
        seed: Base seed of the crops.
    """

    def __init__(self, path: str | Path, *, split: str = "train", crop: int = 128, seed: int = 0) -> None:
        payload = torch.load(Path(path) / POOL_FILE, map_location="cpu")
        self.images = {k: payload[k] for k in ("clean", "corrupted", "coarse")}
        self.masks, self.types = payload["mask"], payload["types"]
        size = self.masks.shape[-1]
        if split == "train" and not 0 < crop <= size:
            raise ValueError(f"crop must be in [1, {size}] px for this pool, got {crop}")
        self.split, self.crop, self.seed = split, crop, seed

    def __len__(self) -> int:
        return self.masks.shape[0]

    def _window(self, mask: torch.Tensor, rng: np.random.Generator) -> tuple[int, int]:
        """Top-left corner of a crop centred near a random artifact pixel (the tile centre for an empty mask)."""
        size, crop = mask.shape[-1], self.crop
        ys, xs = torch.nonzero(mask, as_tuple=True)
        if len(ys):
            j = int(rng.integers(len(ys)))
            cy, cx = int(ys[j]), int(xs[j])
        else:
            cy = cx = size // 2
        jitter = rng.integers(-(crop // 4), crop // 4 + 1, size=2)
        y0 = int(np.clip(cy - crop // 2 + jitter[0], 0, size - crop))
        x0 = int(np.clip(cx - crop // 2 + jitter[1], 0, size - crop))
        return y0, x0

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        epoch, index = item if isinstance(item, tuple) else (0, item)
        index = int(index)
        parts = [self.images[k][index] for k in ("clean", "corrupted", "coarse")] + [self.masks[index]]
        if self.split == "train":
            rng = sample_rng(self.seed, "train", index, int(epoch))
            y0, x0 = self._window(self.masks[index], rng)
            parts = [p[y0 : y0 + self.crop, x0 : x0 + self.crop] for p in parts]
            parts = _dihedral(parts, int(rng.integers(8)))
        clean, corrupted, coarse = (to_tensor(np.ascontiguousarray(p.numpy())) for p in parts[:3])
        return {
            "clean": clean,
            "corrupted": corrupted,
            "coarse": coarse,
            "artifact_mask": to_mask_tensor(np.ascontiguousarray(parts[3].numpy())),
            "meta": {"index": index, "types": self.types[index]},
        }


class RefinerPoolDataModule(SuiteDataModule):
    """Refiner training data: pools of an exported ``latent-conditional`` pipeline's restorations, built once.

    Args:
        pipeline: Folder of the exported latent-conditional pipeline (its own refiner, if any, is not used).
        cache_dir: Where the pools live (one subfolder per split).
        sources: As :class:`~datamodules.restoration.CleanTileDataModule`.
        tile_size: Tile edge in pixels.
        stride: Tiling stride.
        min_tissue: Minimum tissue fraction.
        seed: Base seed (splits, corruptions, crops).
        variants: K synthesised variants per train tile (val uses 1).
        artifacts: ``ArtifactSynthesizer.from_config`` dict; default every artifact type, 1-2 per tile.
        stain_jitter: Colour jitter of the clean train tiles before synthesis (0 disables it).
        crop: Train crop edge in pixels.
        batch_size: GLOBAL batch size.
        num_workers: DataLoader workers per device.
        pool_batch_size: Tiles per pipeline call while building the pool.
        precision: Autocast precision of the pipeline while building (``"bf16"``, ``"fp32"`` or ``"auto"``: bf16
            where the CPU computes it natively).
        max_tiles: Optional cap per split.
    """

    def __init__(
        self,
        pipeline: str,
        cache_dir: str = "outputs/refiner_pool",
        sources: str | Sequence[str] = "bundled",
        tile_size: int = 256,
        stride: int | None = 128,
        min_tissue: float = 0.5,
        seed: int = 0,
        variants: int = 2,
        artifacts: Mapping | None = None,
        stain_jitter: float = 1.0,
        crop: int = 128,
        batch_size: int = 8,
        num_workers: int = 0,
        pool_batch_size: int = 8,
        precision: str = "auto",
        max_tiles: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        if variants < 1:
            raise ValueError(f"variants must be >= 1, got {variants}")
        self.tiles_dm = CleanTileDataModule(
            sources=sources,
            tile_size=tile_size,
            stride=stride,
            min_tissue=min_tissue,
            seed=seed,
            augment=False,
            max_tiles=max_tiles,
        )
        self.synthesizer = ArtifactSynthesizer.from_config(dict(artifacts)) if artifacts else ArtifactSynthesizer()
        self.datasets: dict[str, RefinerPoolDataset] = {}
        self.batch_size_per_device = self.eval_batch_size_per_device = batch_size

    def pool_path(self, split: str) -> Path:
        """Pool folder of one split."""
        return Path(self.hparams.cache_dir) / split

    def prepare_data(self) -> None:
        """Build (or validate) the train pool (K variants) and the val pool (one fixed corruption per tile)."""
        from lightning_modules.components.pipeline import RestorationPipeline

        pipe = RestorationPipeline.from_pretrained(self.hparams.pipeline, precision=self.hparams.precision)
        if pipe.codec is None or not pipe.conditional:
            raise ValueError(
                f"{self.hparams.pipeline} is not a latent-conditional pipeline; the refiner refines "
                "one (export it with `python -m experiments.export conditional`)"
            )
        for split, variants in (("train", self.hparams.variants), ("val", 1)):
            build_refiner_pool(
                pipe,
                self.tiles_dm.make_dataset(split),
                self.pool_path(split),
                synthesizer=self.synthesizer,
                variants=variants,
                split=split,
                seed=self.hparams.seed,
                stain_strength=self.hparams.stain_jitter,
                batch_size=self.hparams.pool_batch_size,
            )

    def setup(self, stage: str | None = None) -> None:
        """Load the pools and derive the per-device batch size."""
        self.set_batch_sizes(self.hparams.batch_size)
        for split in ("train", "val"):
            if split not in self.datasets:
                self.datasets[split] = RefinerPoolDataset(
                    self.pool_path(split), split=split, crop=self.hparams.crop, seed=self.hparams.seed
                )

    def train_dataloader(self) -> DataLoader:
        """Shuffled pool items, fresh crops every epoch."""
        return self.loader(
            self.datasets["train"], train=True, seed=self.hparams.seed, num_workers=self.hparams.num_workers
        )

    def val_dataloader(self) -> DataLoader:
        """Whole val tiles, fixed order."""
        return self.loader(
            self.datasets["val"], train=False, seed=self.hparams.seed, num_workers=self.hparams.num_workers
        )
