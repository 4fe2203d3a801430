"""LightningDataModules for artifact restoration and for artifact-free (clean) tiles.

``ArtifactRestorationDataModule`` yields the suite's batch dict ``{"clean", "corrupted", "artifact_mask", "meta"}``:
the train split synthesises artifacts online (a new corruption every epoch, seeded by ``(seed, epoch, index)``);
val/test corruptions are fixed by the seed, so every ablation sees the same ones; splits are spatially disjoint (see
``datamodules/splits.py``). Any split can instead read a ready-made triplet folder (the ``datamodules.synthesize``
output or real artifact pairs). ``CleanTileDataModule`` reuses the same sources and splits and yields only
``{"clean", "meta"}`` for the autoencoder and the denoiser, which train on artifact-free tissue.

The batch size in the config is the GLOBAL batch; the per-device batch is derived in ``setup`` from the trainer's
world size, with an error when it does not divide.
"""

import logging
from collections.abc import Mapping, Sequence

import numpy as np
from torch.utils.data import DataLoader, Dataset

from datamodules.artifacts import ArtifactSynthesizer
from datamodules.base import SuiteDataModule
from datamodules.datasets import OnlineArtifactDataset, TileDataset, TripletFolderDataset
from datamodules.sources import TileSource, sources_from_spec
from datamodules.splits import tiles_for_split
from datamodules.transforms import clean_tile_augmentation

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


class CleanTileDataModule(SuiteDataModule):
    """Artifact-free tiles from real H&E sources, split spatially into train/val/test.

    Args:
        sources: ``"bundled"`` (the offline sample slides), a folder of tiles, a whole-slide file, or a list of these.
        tile_size: Tile edge in pixels (256 in the paper).
        stride: Tiling stride within a split's regions (default: ``tile_size``, no overlap).
        min_tissue: Minimum tissue fraction of a tile.
        split_fractions: Share of each source's area for train/val/test.
        seed: Base seed of splits, augmentation and synthesis.
        batch_size: GLOBAL batch size (split over devices).
        eval_batch_size: Global batch size for val/test (default: ``batch_size``).
        num_workers: DataLoader workers per device.
        augment: Flips/rot90 and mild colour jitter on train tiles.
        stain_jitter: Strength of the colour jitter (0 disables it).
        max_tiles: Optional cap per split, e.g. ``{"val": 8}`` (keeps the first tiles; handy on CPU).
    """

    def __init__(
        self,
        sources: str | Sequence[str] = "bundled",
        tile_size: int = 256,
        stride: int | None = 128,
        min_tissue: float = 0.5,
        split_fractions: Mapping[str, float] | None = None,
        seed: int = 0,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        augment: bool = True,
        stain_jitter: float = 1.0,
        max_tiles: Mapping[str, int] | None = None,
    ) -> None:
        super().__init__()
        # Plain attributes, not self.hparams: save_hyperparameters() reads the caller's frames and picks up the wrong
        # arguments when a DataModule is built inside another one (LatentCacheDataModule does).
        self.sources_spec = [sources] if isinstance(sources, str) else list(sources)
        self.tile_size, self.stride, self.min_tissue, self.seed = tile_size, stride, min_tissue, seed
        self.split_fractions = dict(split_fractions) if split_fractions else None
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.augment, self.stain_jitter = augment, stain_jitter
        self.max_tiles = dict(max_tiles or {})
        self.datasets: dict[str, Dataset] = {}
        self.sources: list[TileSource] = []
        self.batch_size_per_device = batch_size
        self.eval_batch_size_per_device = eval_batch_size or batch_size

    # -- building blocks -------------------------------------------------------------------------------------------
    def _load_sources(self) -> None:
        if not self.sources:
            for spec in self.sources_spec:
                self.sources.extend(sources_from_spec(spec))

    def tiles(self, split: str) -> list:
        """``(source index, TileRef)`` pairs of one split (spatially disjoint from the other splits)."""
        self._load_sources()
        kwargs = {"fractions": self.split_fractions} if self.split_fractions else {}
        tiles = tiles_for_split(
            self.sources,
            split,
            size=self.tile_size,
            stride=self.stride,
            min_tissue=self.min_tissue,
            seed=self.seed,
            **kwargs,
        )
        cap = self.max_tiles.get(split)
        if cap and cap < len(tiles):
            # a seeded subsample keeps every source represented (the first tiles all come from the first source)
            keep = np.sort(np.random.default_rng([self.seed, len(tiles)]).choice(len(tiles), cap, replace=False))
            tiles = [tiles[i] for i in keep]
        if not tiles:
            raise ValueError(
                f"split {split!r} has no tiles of {self.tile_size}px with >= {self.min_tissue:.0%} "
                f"tissue in {self.sources_spec}; lower tile_size/min_tissue or add images"
            )
        return tiles

    def make_dataset(self, split: str) -> Dataset:
        """The dataset of one split."""
        augment = None
        if split == "train" and self.augment:
            augment = clean_tile_augmentation(stain_strength=self.stain_jitter)
        return TileDataset(self.sources, self.tiles(split), split=split, seed=self.seed, augment=augment)

    # -- Lightning hooks -------------------------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        """Build the datasets and derive per-device batch sizes from the trainer's world size."""
        self.set_batch_sizes(self.batch_size, self.eval_batch_size)
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, SPLITS) if stage else SPLITS:
            if split not in self.datasets:
                self.datasets[split] = self.make_dataset(split)
                log.info("%s split: %d tiles", split, len(self.datasets[split]))

    def _loader(self, split: str, *, train: bool) -> DataLoader:
        if split not in self.datasets:
            self.setup(None if self.trainer is None else {"train": "fit", "val": "validate"}.get(split, "test"))
        return self.loader(self.datasets[split], train=train, seed=self.seed, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        """Shuffled train tiles, a new augmentation (and corruption) every epoch."""
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation tiles in a fixed order."""
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        """Test tiles in a fixed order."""
        return self._loader("test", train=False)


class ArtifactRestorationDataModule(CleanTileDataModule):
    """Clean tiles with synthetic artifacts (or ready-made triplet folders) as restoration batches.

    Args:
        artifacts: ``ArtifactSynthesizer.from_config`` dict (types, weights, counts, per-type params); default: every
            artifact type, 1-2 per tile.
        triplets: Optional ``{split: folder}`` of ready-made triplets (``clean/``, ``corrupted/``, ``masks/``) that
            replace the synthesised split, e.g. ``{"test": "data/real_pairs"}``.
        mask_convention: Mask files' convention for ``triplets``: ``"artifact"`` (nonzero = artifact) or ``"keep"``
            (the authors' 255 = keep files).
        Other arguments: as :class:`CleanTileDataModule`.
    """

    def __init__(
        self,
        sources: str | Sequence[str] = "bundled",
        tile_size: int = 256,
        stride: int | None = 128,
        min_tissue: float = 0.5,
        split_fractions: Mapping[str, float] | None = None,
        seed: int = 0,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        augment: bool = True,
        stain_jitter: float = 1.0,
        max_tiles: Mapping[str, int] | None = None,
        artifacts: Mapping | None = None,
        triplets: Mapping[str, str] | None = None,
        mask_convention: str = "artifact",
    ) -> None:
        super().__init__(
            sources=sources,
            tile_size=tile_size,
            stride=stride,
            min_tissue=min_tissue,
            split_fractions=split_fractions,
            seed=seed,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            augment=augment,
            stain_jitter=stain_jitter,
            max_tiles=max_tiles,
        )
        self.synthesizer = ArtifactSynthesizer.from_config(dict(artifacts)) if artifacts else ArtifactSynthesizer()
        self.triplets = dict(triplets or {})
        self.mask_convention = mask_convention
        unknown = set(self.triplets) - set(SPLITS)
        if unknown:
            raise ValueError(f"triplets keys must be among {SPLITS}, got {sorted(unknown)}")

    def make_dataset(self, split: str) -> Dataset:
        """Triplet folder if configured for this split, else clean tiles with online synthesis."""
        if split in self.triplets:
            return TripletFolderDataset(self.triplets[split], mask_convention=self.mask_convention)
        augment = None
        if split == "train" and self.augment:
            augment = clean_tile_augmentation(stain_strength=self.stain_jitter)
        return OnlineArtifactDataset(
            self.sources,
            self.tiles(split),
            synthesizer=self.synthesizer,
            split=split,
            seed=self.seed,
            augment=augment,
        )
