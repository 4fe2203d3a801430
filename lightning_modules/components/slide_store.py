"""Resumable store of restored slide tiles: a folder with one lossless PNG per tile and a manifest of the settings.

Layout::

    OUT.tiles/
      manifest.json       # slide / model / mask fingerprints and every setting that changes a tile's pixels
      tiles/0000123.png   # restored tile 123 of the grid (its window of the working grid, uint8 RGB)

Each tile is written atomically, so a killed run leaves only whole tiles and a rerun restores just the missing ones.
A manifest that differs from the current settings means the stored tiles belong to another run: that is an error
unless ``force`` clears the store. Several processes (DDP ranks) may write different tiles at the same time.
"""

import json
import os
import secrets
import shutil
from pathlib import Path

import numpy as np

from datamodules.imageio import read_image, write_image_atomic
from datamodules.slides import SlideInputError


def write_json_atomic(path: str | Path, obj) -> None:
    """Write ``obj`` as indented, key-sorted JSON via a temporary file and ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


class TileStore:
    """One folder of restored tiles for one (slide, mask, model, settings) combination.

    Args:
        root: The store folder (``OUT.tiles``).
        manifest: JSON-serialisable settings; equal manifests mean interchangeable tiles.
    """

    def __init__(self, root: str | Path, manifest: dict) -> None:
        self.root = Path(root)
        self.manifest = json.loads(json.dumps(manifest, sort_keys=True))
        self.tiles_dir = self.root / "tiles"

    @property
    def manifest_path(self) -> Path:
        """``root / manifest.json``."""
        return self.root / "manifest.json"

    def mismatch(self) -> list[str]:
        """Settings whose stored value differs from the current one (empty when none is stored or all agree)."""
        if not self.manifest_path.is_file():
            return []
        try:
            stored = json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            return ["manifest.json (unreadable)"]
        keys = sorted(set(stored) | set(self.manifest))
        return [
            f"{k}: stored {stored.get(k)!r}, now {self.manifest.get(k)!r}"
            for k in keys
            if stored.get(k) != self.manifest.get(k)
        ]

    def check(self, *, force: bool) -> None:
        """Raise when the folder holds tiles of other settings and ``force`` is off (read-only, safe on every rank).

        Raises:
            SlideInputError: Naming the differing settings and the two ways out.
        """
        diff = self.mismatch()
        if diff and not force:
            raise SlideInputError(
                f"tile store {self.root} was made with other settings ({'; '.join(diff[:4])}); pass --force to "
                "discard its tiles, or choose another --out"
            )

    def prepare(self, *, force: bool) -> None:
        """Create the store (clearing it when ``force`` is set and it differs) and write the manifest."""
        self.check(force=force)
        if self.mismatch():
            shutil.rmtree(self.tiles_dir, ignore_errors=True)
            self.manifest_path.unlink(missing_ok=True)
        self.tiles_dir.mkdir(parents=True, exist_ok=True)
        if not self.manifest_path.is_file():
            write_json_atomic(self.manifest_path, self.manifest)

    def path(self, index: int) -> Path:
        """File of tile ``index``."""
        return self.tiles_dir / f"{index:07d}.png"

    def has(self, index: int) -> bool:
        """Whether tile ``index`` is stored."""
        return self.path(index).is_file()

    def done(self) -> set[int]:
        """Indices of every stored tile."""
        if not self.tiles_dir.is_dir():
            return set()
        return {int(p.stem) for p in self.tiles_dir.glob("*.png") if p.stem.isdigit()}

    def write(self, index: int, rgb: np.ndarray) -> None:
        """Store tile ``index``: uint8 (h, w, 3) RGB, atomically."""
        write_image_atomic(self.path(index), rgb)

    def read(self, index: int) -> np.ndarray:
        """uint8 (h, w, 3) RGB of stored tile ``index``."""
        return read_image(self.path(index))
