"""Labelled H&E tiles for the downstream tissue-classifier study: ImageFolder datasets and an offline proxy task.

Batches are ``{"image": float32 (B, 3, S, S) in [-1, 1], "label": long (B,), "meta": {"name", "source", "index",
"class_name"}}`` with ``S = image_size``. Training images get random horizontal/vertical flips (the paper's
augmentation), seeded per sample by ``(seed, split, epoch, index)`` as in ``datamodules.datasets``. ``batch_size`` is
the GLOBAL batch; the per-device batch is derived in ``setup``.

Two data modules:

- :class:`ImageFolderClassificationDataModule`: the paper's layout, one sub-folder per class (NCT-CRC-HE-100K for
  training, CRC-VAL-HE-7K for testing, each with ``ADI/ BACK/ DEB/ LYM/ MUC/ MUS/ NORM/ STR/ TUM/``).
- :class:`BundledTissueDataModule`: an honest offline PROXY task on the real H&E shipped in packages (see its
  docstring and :data:`BUNDLED_LABELS`); it is not a CRC tissue-type task.
"""

import logging
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from datamodules.base import SuiteDataModule
from datamodules.datasets import sample_rng, to_tensor
from datamodules.imageio import ImageReadError, list_images, read_image
from datamodules.sources import TileSource, bundled_sources
from datamodules.splits import tiles_for_split
from datamodules.tiling import TileRef

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
BUNDLED_CLASSES = ("cmu1-skin", "template1", "template2", "template3", "template4")
BUNDLED_LABELS = (
    "Proxy labels, NOT tissue types: the class of a tile is the real H&E image it was cut from. "
    "cmu1-skin = OpenSlide CMU-1-Small-Region (skin, Aperio SVS, 20x, 0.499 um/px); "
    "template1..template4 = the four 500x500 HistoQC H&E templates (breast-like tissue, one class per image). "
    "Each image is split into spatially disjoint train/val/test regions (datamodules.splits), so the task is "
    "recognising tissue morphology and staining of unseen regions of each image; it stands in for the paper's "
    "9 NCT-CRC-HE tissue classes, which cannot be obtained offline."
)


def resize_square(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 (H, W, 3) -> uint8 (size, size, 3); area interpolation when shrinking, bilinear when enlarging."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    shrink = image.shape[0] > size or image.shape[1] > size
    return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


class _ClassificationDataset(Dataset):
    """Shared logic: read item ``i`` as uint8, resize, flip on train, return the batch dict."""

    def __init__(
        self,
        labels: Sequence[int],
        class_names: Sequence[str],
        *,
        image_size: int,
        split: str,
        seed: int,
        augment: bool,
    ) -> None:
        self.labels = [int(v) for v in labels]
        self.class_names = list(class_names)
        self.image_size, self.split, self.seed, self.augment = image_size, split, seed, augment

    def __len__(self) -> int:
        return len(self.labels)

    def _load(self, index: int) -> tuple[np.ndarray, dict]:
        raise NotImplementedError

    def read(self, index: int) -> tuple[np.ndarray, int, dict]:
        """Item ``index`` without augmentation: uint8 (S, S, 3) RGB, label, meta."""
        image, meta = self._load(index)
        label = self.labels[index]
        meta = {**meta, "index": index, "class_name": self.class_names[label]}
        return resize_square(image, self.image_size), label, meta

    def __getitem__(self, item: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = (item[0], int(item[1])) if isinstance(item, tuple) else (0, int(item))
        image, label, meta = self.read(index)
        if self.augment:
            rng = sample_rng(self.seed, self.split, index, epoch)
            flip_h, flip_v = rng.random(2) < 0.5
            if flip_h:
                image = image[:, ::-1]
            if flip_v:
                image = image[::-1]
        return {"image": to_tensor(image), "label": label, "meta": meta}


class ImageFileDataset(_ClassificationDataset):
    """Labelled image files.

    Args:
        paths: Image files.
        labels: Class index per file.
        class_names: Name per class index.
        image_size: Output side S (images of another size are resized).
        split: Split name (part of the augmentation seed).
        seed: Base seed.
        augment: Random flips.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        class_names: Sequence[str],
        *,
        image_size: int,
        split: str = "train",
        seed: int = 0,
        augment: bool = False,
    ) -> None:
        super().__init__(labels, class_names, image_size=image_size, split=split, seed=seed, augment=augment)
        if len(paths) != len(self.labels):
            raise ValueError(f"{len(paths)} paths but {len(self.labels)} labels")
        self.paths = [Path(p) for p in paths]

    def _load(self, index: int) -> tuple[np.ndarray, dict]:
        path = self.paths[index]
        return read_image(path), {"name": path.stem, "source": str(path.parent)}


class TileClassificationDataset(_ClassificationDataset):
    """Labelled tiles of image sources.

    Args:
        sources: The sources the tiles point into.
        tiles: ``(source index, TileRef)`` pairs.
        labels: Class index per tile.
        class_names: Name per class index.
        image_size: Output side S.
        split: Split name (part of the augmentation seed).
        seed: Base seed.
        augment: Random flips.
    """

    def __init__(
        self,
        sources: Sequence[TileSource],
        tiles: Sequence[tuple[int, TileRef]],
        labels: Sequence[int],
        class_names: Sequence[str],
        *,
        image_size: int,
        split: str = "train",
        seed: int = 0,
        augment: bool = False,
    ) -> None:
        super().__init__(labels, class_names, image_size=image_size, split=split, seed=seed, augment=augment)
        if len(tiles) != len(self.labels):
            raise ValueError(f"{len(tiles)} tiles but {len(self.labels)} labels")
        self.sources, self.tiles = list(sources), list(tiles)

    def _load(self, index: int) -> tuple[np.ndarray, dict]:
        src_idx, ref = self.tiles[index]
        source = self.sources[src_idx]
        tile = source.read_region(ref.x, ref.y, ref.size, ref.size)
        return tile, {"name": f"{Path(source.name).stem}_x{ref.x:05d}_y{ref.y:05d}", "source": source.name}


def scan_class_folders(
    root: str | os.PathLike, *, known_classes: Sequence[str] | None = None, validate: bool = True
) -> tuple[list[Path], list[int], list[str], list[tuple[Path, str]], Counter]:
    """Find the labelled images of an ImageFolder-style root (one sub-folder per class, images anywhere below).

    Args:
        root: Folder whose immediate, non-hidden sub-folders are the classes.
        known_classes: The classes the classifier was trained on; a sub-folder outside this list is an error. The
            label indices then follow this list. ``None``: the classes are the sorted sub-folder names.
        validate: Decode every image once (catches truncated files; about 1-2 ms per 224 px tile). False only opens
            the headers (catches empty, missing and non-image files).

    Returns:
        ``(paths, labels, class_names, skipped, sizes)``: readable images, their class indices, the class list,
        ``(path, reason)`` of unreadable files, and a counter of (width, height) sizes.

    Raises:
        FileNotFoundError: ``root`` does not exist.
        ValueError: No class sub-folders; class folders without any readable image (all named); a class unknown to
            ``known_classes`` (named, with the known list).
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"class folder root {root} does not exist or is not a folder")
    folders = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise ValueError(f"{root} has no class sub-folders; expected one folder of images per class (e.g. ADI/, TUM/)")
    if known_classes is not None:
        unknown = [f for f in folders if f not in known_classes]
        if unknown:
            raise ValueError(
                f"{root}: class folder(s) {unknown} are unknown to the classifier, which was trained on "
                f"{list(known_classes)}; rename or remove them"
            )
    class_names = list(known_classes) if known_classes is not None else folders
    paths, labels, skipped, sizes, empty = [], [], [], Counter(), []
    for name in folders:
        files = list_images(root / name)
        good = 0
        for path in files:
            try:
                size = _image_size(path, validate)
            except ImageReadError as err:
                skipped.append((path, str(err)))
                continue
            paths.append(path)
            labels.append(class_names.index(name))
            sizes[size] += 1
            good += 1
        if good == 0:
            empty.append(f"{name}/ ({len(files)} files, none readable)" if files else f"{name}/")
    for path, why in skipped:
        log.warning("skipping unreadable image %s", why if str(path) in why else f"{path}: {why}")
    if empty:
        raise ValueError(
            f"{root}: class folder(s) without usable images: {', '.join(empty)}; add images or remove the folder"
        )
    return paths, labels, class_names, skipped, sizes


def _image_size(path: Path, validate: bool) -> tuple[int, int]:
    if validate:
        image = read_image(path)
        return image.shape[1], image.shape[0]
    try:
        if path.stat().st_size == 0:
            raise ImageReadError(f"{path}: empty file (0 bytes)")
        with Image.open(path) as im:
            return im.size
    except ImageReadError:
        raise
    except Exception as err:  # Pillow raises several types for non-images
        raise ImageReadError(f"{path}: not a readable image ({err})") from err


class _ClassificationDataModule(SuiteDataModule):
    """Loaders, per-device batch size and class bookkeeping shared by the classification data modules."""

    def __init__(
        self,
        *,
        image_size: int,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        augment: bool,
        seed: int,
    ) -> None:
        super().__init__()
        if image_size < 16:
            raise ValueError(f"image_size must be >= 16, got {image_size}")
        self.image_size, self.batch_size, self.eval_batch_size = image_size, batch_size, eval_batch_size
        self.num_workers, self.augment, self.seed = num_workers, augment, seed
        self.datasets: dict[str, _ClassificationDataset] = {}
        self.class_names: list[str] = []
        self.labels_description = ""

    @property
    def num_classes(self) -> int:
        """Number of classes (known after ``setup``)."""
        return len(self.class_names)

    def build(self) -> None:
        """Fill ``self.datasets`` (all splits) and ``self.class_names``."""
        raise NotImplementedError

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets once and derive per-device batch sizes from the trainer's world size."""
        self.set_batch_sizes(self.batch_size, self.eval_batch_size)
        if not self.datasets:
            self.build()
            for split, ds in self.datasets.items():
                counts = Counter(ds.labels)
                log.info(
                    "%s: %d images, per class %s",
                    split,
                    len(ds),
                    {self.class_names[k]: counts[k] for k in sorted(counts)},
                )

    def _loader(self, split: str, train: bool) -> DataLoader:
        if not self.datasets:
            self.setup()
        if split not in self.datasets:
            raise ValueError(f"this data module has no {split!r} split (give its folder)")
        return self.loader(self.datasets[split], train=train, seed=self.seed, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        """Shuffled, flipped training images."""
        return self._loader("train", True)

    def val_dataloader(self) -> DataLoader:
        """Validation images in a fixed order."""
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        """Test images in a fixed order."""
        return self._loader("test", False)


class ImageFolderClassificationDataModule(_ClassificationDataModule):
    """Class-per-folder datasets: NCT-CRC-HE-100K (train) and CRC-VAL-HE-7K (test) in the paper.

    Classes are the sorted sub-folder names of ``root_train``; ``root_val`` / ``root_test`` must use a subset of
    them (an unknown class folder is an error; a missing one is logged). Without ``root_val`` a stratified, seeded
    ``val_fraction`` of the training images becomes the validation split. Caution: NCT-CRC-HE-100K file names carry
    no slide id, so this split is per patch, not per patient, and validation accuracy is optimistic; CRC-VAL-HE-7K
    comes from other patients and is the honest test. Unreadable files are skipped and listed in ``skipped``;
    images of a size other than ``image_size`` are resized (one warning when sizes are mixed).

    Args:
        root_train: Training root (one folder per class).
        root_val: Optional validation root.
        root_test: Optional test root.
        val_fraction: Share of each training class held out for validation when ``root_val`` is not given.
        image_size: Side S of the (square) network input; 224 in the paper.
        batch_size: GLOBAL training batch size (16 in the paper).
        eval_batch_size: GLOBAL evaluation batch size (default ``batch_size``).
        num_workers: DataLoader workers per device.
        augment: Random flips on training images.
        seed: Seed of the validation split and augmentation.
        validate: Decode every file once at setup (see :func:`scan_class_folders`).
    """

    def __init__(
        self,
        root_train: str,
        root_val: str | None = None,
        root_test: str | None = None,
        val_fraction: float = 0.1,
        image_size: int = 224,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 2,
        augment: bool = True,
        seed: int = 0,
        validate: bool = True,
    ) -> None:
        super().__init__(
            image_size=image_size,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            augment=augment,
            seed=seed,
        )
        self.save_hyperparameters()
        if root_val is None and not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1) when root_val is not given, got {val_fraction}")
        self.roots = {"train": root_train, "val": root_val, "test": root_test}
        self.skipped: list[tuple[Path, str]] = []
        self.labels_description = "tissue classes = the class sub-folder names of " + str(root_train)

    def build(self) -> None:
        """Scan the roots; split validation off the training images when no ``root_val`` is given."""
        paths, labels, classes, skipped, sizes = scan_class_folders(self.roots["train"], validate=self.hparams.validate)
        self.class_names, self.skipped = classes, list(skipped)
        per_split = {}
        if self.roots["val"] is None:
            train_idx, val_idx = _stratified_split(labels, self.hparams.val_fraction, self.seed)
            per_split["train"] = ([paths[i] for i in train_idx], [labels[i] for i in train_idx])
            per_split["val"] = ([paths[i] for i in val_idx], [labels[i] for i in val_idx])
        else:
            per_split["train"] = (paths, labels)
        for split in ("val", "test"):
            if self.roots[split] is None:
                continue
            p, lab, _, sk, sz = scan_class_folders(
                self.roots[split], known_classes=classes, validate=self.hparams.validate
            )
            missing = sorted(set(classes) - {classes[k] for k in lab})
            if missing:
                log.warning("%s split (%s) has no images of class(es) %s", split, self.roots[split], missing)
            per_split[split] = (p, lab)
            self.skipped += sk
            sizes.update(sz)
        if len(sizes) > 1:
            log.warning(
                "images have mixed sizes %s; all are resized to %dx%d",
                dict(sizes.most_common(5)),
                self.image_size,
                self.image_size,
            )
        for split, (p, lab) in per_split.items():
            self.datasets[split] = ImageFileDataset(
                p,
                lab,
                classes,
                image_size=self.image_size,
                split=split,
                seed=self.seed,
                augment=self.augment and split == "train",
            )


def _stratified_split(labels: Sequence[int], fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices (train, val): ``round(n * fraction)`` (at least 1 when n >= 2) of each class go to val, seeded."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    train, val = [], []
    for k in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == k))
        n_val = min(len(idx) - 1, max(1, round(len(idx) * fraction))) if len(idx) >= 2 else 0
        val += idx[:n_val].tolist()
        train += idx[n_val:].tolist()
    return sorted(train), sorted(val)


class BundledTissueDataModule(_ClassificationDataModule):
    """Offline proxy classification task on the bundled real H&E (5 classes; see :data:`BUNDLED_LABELS`).

    Label definition: class 0 ``cmu1-skin`` = tiles of the CMU-1-Small-Region slide (skin, 20x); classes 1-4
    ``template1``..``template4`` = tiles of HistoQC template image 1..4 (breast-like H&E). The label says which image
    a tile comes from - a mix of tissue morphology and staining batch. It is a stand-in for the paper's CRC tissue
    types (no tissue-class labels ship offline), not a clinical task. Each image is split on its own with
    ``datamodules.splits.tiles_for_split`` (the slide into tissue-balanced blocks, each 500x500 template into
    strips), so no pixel of a test tile was seen in training or validation. Validation and test tiles do not overlap
    each other; training tiles may overlap other training tiles (``train_stride``). Each class in each split is
    capped to ``max_per_class`` tiles (a seeded subset) to keep the classes balanced.

    Args:
        tile_size: Tile side in source pixels (64: a template strip of 100 px holds one column of tiles).
        image_size: Network input side S (tiles are resized; 128 by default).
        train_stride: Grid step of training tiles (val/test always use ``tile_size``).
        min_tissue: Minimum tissue fraction of a tile.
        split_fractions: Share of each image per split.
        max_per_class: Cap per class and split (int for every split, or ``{"train": n, ...}``; None = no cap).
        batch_size: GLOBAL training batch size.
        eval_batch_size: GLOBAL evaluation batch size (default ``batch_size``).
        num_workers: DataLoader workers per device.
        augment: Random flips on training tiles.
        seed: Seed of the split assignment, the caps and augmentation.
    """

    def __init__(
        self,
        tile_size: int = 64,
        image_size: int = 128,
        train_stride: int = 32,
        min_tissue: float = 0.5,
        split_fractions: Mapping[str, float] | None = None,
        max_per_class: int | Mapping[str, int] | None = None,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        augment: bool = True,
        seed: int = 0,
    ) -> None:
        super().__init__(
            image_size=image_size,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            num_workers=num_workers,
            augment=augment,
            seed=seed,
        )
        self.save_hyperparameters()
        self.fractions = dict(split_fractions or {"train": 0.6, "val": 0.2, "test": 0.2})
        if set(self.fractions) != set(SPLITS):
            raise ValueError(f"split_fractions needs exactly the keys {SPLITS}, got {sorted(self.fractions)}")
        caps = {"train": 120, "val": 24, "test": 24} if max_per_class is None else max_per_class
        self.caps = dict(caps) if isinstance(caps, Mapping) else dict.fromkeys(SPLITS, int(caps))
        self.class_names = list(BUNDLED_CLASSES)
        self.labels_description = BUNDLED_LABELS

    def split_tiles(self, sources: Sequence[TileSource]) -> dict[str, list[tuple[int, TileRef]]]:
        """Tiles per split over all sources (source index = class index), before the per-class cap."""
        if len(sources) != len(BUNDLED_CLASSES):
            raise ValueError(f"expected {len(BUNDLED_CLASSES)} bundled sources, got {[s.name for s in sources]}")
        out: dict[str, list[tuple[int, TileRef]]] = {}
        hp = self.hparams
        for split in SPLITS:
            stride = hp.train_stride if split == "train" else hp.tile_size
            tiles = []
            for cls, src in enumerate(sources):
                found = tiles_for_split(
                    [src],
                    split,
                    size=hp.tile_size,
                    stride=stride,
                    min_tissue=hp.min_tissue,
                    seed=self.seed,
                    fractions=self.fractions,
                )
                if not found:
                    raise ValueError(
                        f"{src.name} ({BUNDLED_CLASSES[cls]}) has no {split} tile of {hp.tile_size} px; "
                        "lower tile_size or min_tissue"
                    )
                tiles += [(cls, ref) for _, ref in found]
            out[split] = tiles
        return out

    def build(self) -> None:
        """Tile every bundled image, split it spatially, cap each class, and make the datasets."""
        sources = bundled_sources()
        for split, tiles in self.split_tiles(sources).items():
            cap = self.caps.get(split)
            rng = np.random.default_rng([self.seed, SPLITS.index(split)])
            kept = []
            for cls in range(len(BUNDLED_CLASSES)):
                idx = [i for i, (c, _) in enumerate(tiles) if c == cls]
                if cap is not None and len(idx) > cap:
                    idx = sorted(rng.choice(idx, size=cap, replace=False).tolist())
                kept += [tiles[i] for i in idx]
            self.datasets[split] = TileClassificationDataset(
                sources,
                kept,
                [c for c, _ in kept],
                self.class_names,
                image_size=self.image_size,
                split=split,
                seed=self.seed,
                augment=self.augment and split == "train",
            )
