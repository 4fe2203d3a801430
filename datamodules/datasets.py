"""Torch datasets that turn tiles from image sources into the suite's batch dicts.

Every dataset returns a dict with float32 images in [-1, 1] (C, H, W) and a flat ``meta`` dict of strings and ints
(so the default collate works). Randomness is explicit: a per-sample ``np.random.Generator`` is derived from
``(seed, split, epoch, index)`` with ``np.random.SeedSequence``, so a sample is reproducible whatever the worker count,
worker order or device count.
"""

import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from datamodules.artifacts import ArtifactSynthesizer
from datamodules.imageio import ImageReadError, list_images, read_image, read_mask
from datamodules.sources import TileSource
from datamodules.tiling import TileRef

log = logging.getLogger(__name__)

SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "predict": 3}


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) RGB -> float32 (3, H, W) in [-1, 1]."""
    return torch.from_numpy(np.array(rgb, dtype=np.uint8, order="C")).permute(2, 0, 1).float().div_(127.5).sub_(1.0)


def to_mask_tensor(mask: np.ndarray) -> torch.Tensor:
    """Bool (H, W) -> float32 (1, H, W) in {0, 1}, 1 = artifact."""
    return torch.from_numpy(np.array(mask, dtype=bool, order="C")).to(torch.float32).unsqueeze(0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """Float (B, 3, H, W) or (3, H, W) in [-1, 1] -> uint8 (B, H, W, 3) or (H, W, 3), rounded to nearest."""
    x = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()
    return x.permute(0, 2, 3, 1).numpy() if x.ndim == 4 else x.permute(1, 2, 0).numpy()


def sample_rng(seed: int, split: str, index: int, epoch: int = 0) -> np.random.Generator:
    """The generator for one sample: independent streams for every (seed, split, epoch, index)."""
    return np.random.default_rng(np.random.SeedSequence([seed, SPLIT_IDS[split], epoch, index]))


class EpochIndexSampler(Sampler):
    """Yields ``(epoch, index)`` pairs so datasets can seed each sample by epoch without shared state in workers.

    Lightning calls ``set_epoch`` before every training epoch (also after a resume); when nothing calls it (for
    example inside Lightning's distributed sampler wrapper), every new iteration advances the epoch by one.

    Args:
        length: Number of samples in the dataset.
        seed: Seed of the per-epoch permutation.
        shuffle: Permute the indices each epoch.
    """

    def __init__(self, length: int, *, seed: int = 0, shuffle: bool = True) -> None:
        self.length, self.seed, self.shuffle = length, seed, shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the epoch of the next iteration."""
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch = self.epoch
        self.epoch += 1
        order = np.arange(self.length)
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(self.length)
        return iter([(epoch, int(i)) for i in order])


class TileDataset(Dataset):
    """Tiles read from image sources, optionally augmented; returns ``{"clean", "meta"}``.

    Args:
        sources: The image sources the tile references point into.
        tiles: ``(source index, TileRef)`` pairs, e.g. from ``splits.tiles_for_split``.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"predict"`` (part of every sample's seed).
        seed: Base seed.
        augment: An albumentations transform for the clean tile (train only), reseeded per sample.
    """

    def __init__(
        self,
        sources: Sequence[TileSource],
        tiles: Sequence[tuple[int, TileRef]],
        *,
        split: str = "train",
        seed: int = 0,
        augment=None,
    ) -> None:
        if split not in SPLIT_IDS:
            raise ValueError(f"split must be one of {sorted(SPLIT_IDS)}, got {split!r}")
        self.sources, self.tiles, self.split, self.seed, self.augment = list(sources), list(tiles), split, seed, augment

    def __len__(self) -> int:
        return len(self.tiles)

    def _unpack(self, item: int | tuple[int, int]) -> tuple[int, int]:
        return (item[0], int(item[1])) if isinstance(item, tuple) else (0, int(item))

    def read_clean(self, index: int, epoch: int) -> tuple[np.ndarray, dict, np.random.Generator]:
        """Read (and augment) tile ``index``; returns the uint8 tile, its meta and the sample's generator."""
        src_idx, ref = self.tiles[index]
        source = self.sources[src_idx]
        tile = source.read_region(ref.x, ref.y, ref.size, ref.size)
        rng = sample_rng(self.seed, self.split, index, epoch)
        if self.augment is not None:
            self.augment.set_random_seed(int(rng.integers(2**31)))
            tile = self.augment(image=tile)["image"]
        meta = {"source": source.name, "x": ref.x, "y": ref.y, "index": index, "name": _tile_name(source.name, ref)}
        return tile, meta, rng

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        epoch, index = self._unpack(item)
        tile, meta, _ = self.read_clean(index, epoch)
        return {"clean": to_tensor(tile), "meta": meta}


class OnlineArtifactDataset(TileDataset):
    """Clean tiles plus artifacts synthesised on the fly; returns the full restoration batch dict.

    On the train split the corruption changes every epoch (seeded by ``(seed, epoch, index)``); on val/test the epoch
    is ignored (always 0) so every evaluation sees the same corruptions.

    Args:
        synthesizer: The artifact mixture applied to each (augmented) clean tile.
        **kwargs: As :class:`TileDataset`.
    """

    def __init__(self, sources, tiles, *, synthesizer: ArtifactSynthesizer, **kwargs) -> None:
        super().__init__(sources, tiles, **kwargs)
        self.synthesizer = synthesizer

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        epoch, index = self._unpack(item)
        if self.split != "train":
            epoch = 0
        tile, meta, rng = self.read_clean(index, epoch)
        res = self.synthesizer(tile, rng)
        meta["types"] = ",".join(res.types)
        return {
            "clean": to_tensor(tile),
            "corrupted": to_tensor(res.corrupted),
            "artifact_mask": to_mask_tensor(res.mask),
            "meta": meta,
        }


def _tile_name(source: str, ref: TileRef) -> str:
    stem = Path(source).stem or "tile"
    return f"{stem}_x{ref.x:05d}_y{ref.y:05d}"


class TripletFolderDataset(Dataset):
    """Ready-made restoration triplets: ``root/clean``, ``root/corrupted`` and ``root/masks`` with the same file names.

    This reads the output of ``python -m datamodules.synthesize`` or real artifact pairs. ``clean`` is optional (real
    artifact images often have no ground truth; then ``clean`` is absent from the returned dict). Files that cannot be
    read or do not match are reported once and skipped (``self.skipped``), so one bad file never stops a run.

    Args:
        root: Folder holding the subfolders.
        mask_convention: ``"artifact"`` (nonzero = artifact, this suite's files) or ``"keep"`` (the authors' files,
            255 = keep).
        require_clean: Raise if ``root/clean`` is missing.
        validate: Read every triplet once at construction and move unreadable or mismatched ones to ``skipped``
            (needed before a DataLoader sees the set; batch CLIs that handle errors per item can pass False).
    """

    def __init__(
        self,
        root: str | Path,
        *,
        mask_convention: str = "artifact",
        require_clean: bool = True,
        validate: bool = True,
    ) -> None:
        self.root = Path(root)
        self.mask_convention = mask_convention
        for sub in ("corrupted", "masks"):
            if not (self.root / sub).is_dir():
                raise FileNotFoundError(
                    f"{self.root / sub} does not exist: a triplet folder needs corrupted/ and masks/ (and clean/); "
                    "build one with `python -m datamodules.synthesize --out DIR`"
                )
        self.has_clean = (self.root / "clean").is_dir()
        if require_clean and not self.has_clean:
            raise FileNotFoundError(f"{self.root / 'clean'} does not exist (pass require_clean=False for real pairs)")
        self.skipped: list[tuple[str, str]] = []
        masks = {p.stem: p for p in list_images(self.root / "masks")}
        clean = {p.stem: p for p in list_images(self.root / "clean")} if self.has_clean else {}
        self.items: list[tuple[Path, Path, Path | None]] = []
        for p in list_images(self.root / "corrupted"):
            if p.stem not in masks:
                self.skipped.append((str(p), "no mask with the same name in masks/"))
            elif self.has_clean and p.stem not in clean:
                self.skipped.append((str(p), "no clean image with the same name in clean/"))
            else:
                self.items.append((p, masks[p.stem], clean.get(p.stem)))
        for stem in sorted(set(masks) - {p.stem for p, _, _ in self.items} - {Path(s).stem for s, _ in self.skipped}):
            self.skipped.append((str(masks[stem]), "mask without a corrupted image of the same name"))
        if validate:
            good = []
            for i, item in enumerate(self.items):
                try:
                    self.load(i)
                    good.append(item)
                except ImageReadError as err:
                    self.skipped.append((str(item[0]), str(err)))
            self.items = good
        for path, why in self.skipped:
            log.warning("skipping %s: %s", path, why)
        if not self.items:
            raise ValueError(f"no usable triplets under {self.root} ({len(self.skipped)} skipped)")

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> dict:
        """Read triplet ``index`` as numpy arrays; raises ``ImageReadError`` for a bad file or size mismatch."""
        corrupted_path, mask_path, clean_path = self.items[index]
        corrupted = read_image(corrupted_path)
        mask = read_mask(mask_path, convention=self.mask_convention, shape=corrupted.shape[:2])
        out = {"corrupted": corrupted, "artifact_mask": mask, "name": corrupted_path.stem}
        if clean_path is not None:
            clean = read_image(clean_path)
            if clean.shape != corrupted.shape:
                raise ImageReadError(
                    f"{clean_path}: size {clean.shape[1]}x{clean.shape[0]} differs from the corrupted image "
                    f"{corrupted_path} ({corrupted.shape[1]}x{corrupted.shape[0]}); re-export them at one size"
                )
            out["clean"] = clean
        return out

    def __getitem__(self, index: int) -> dict:
        arrays = self.load(index)
        sample = {
            "corrupted": to_tensor(arrays["corrupted"]),
            "artifact_mask": to_mask_tensor(arrays["artifact_mask"]),
            "meta": {"name": arrays["name"], "source": str(self.root), "x": 0, "y": 0, "index": index, "types": ""},
        }
        if "clean" in arrays:
            sample["clean"] = to_tensor(arrays["clean"])
        return sample
