"""Artifacts made of foreign material lying on the section: pen ink, threads/fibres, dust and debris.

All three absorb light on top of the tissue, so they are rendered in optical density (Beer-Lambert: absorbances
add): ``OD_out = OD_tissue + alpha * strength * OD_colour``. A colour is given by name (see the palettes) or as an
``(r, g, b)`` triple in 0..255: the colour the material shows at full strength on blank glass.
"""

import dataclasses
from typing import Any

import numpy as np

from datamodules.artifacts.base import ArtifactSpec, check_positive, check_unit, range_field
from datamodules.artifacts.optics import color_od, od_to_rgb, rgb_to_od
from datamodules.artifacts.shapes import (
    band_alpha,
    blob_polygon,
    centerline_distance,
    feather,
    fill_polygons,
    grain,
    random_curve,
    smooth_noise,
)

INK_COLORS = {"green": (30, 135, 75), "blue": (35, 65, 165), "black": (40, 40, 48), "red": (185, 35, 60)}
"""Marker-pen colours (RGB at full strength on glass); green, blue and black are the common slide-marking pens."""
THREAD_COLORS = {"purple": (85, 40, 105), "brown": (105, 70, 45), "black": (45, 38, 45), "pink": (190, 95, 150)}
"""Thread/fibre colours: fibres pick up haematoxylin (purple) or are naturally brown/black; eosin-soaked ones pink."""
DEBRIS_COLORS = {"black": (30, 28, 30), "brown": (85, 55, 35), "grey": (105, 105, 100)}
"""Dust and debris colours."""


def _check_colors(spec: ArtifactSpec, palette: dict[str, tuple[int, int, int]]) -> None:
    """Normalise ``spec.colors`` to a tuple of names/RGB tuples; raise ValueError naming a bad entry."""
    colors = spec.colors
    if isinstance(colors, str) or not isinstance(colors, (tuple, list)) or not colors:
        raise ValueError(f"{type(spec).__name__}.colors must be a non-empty list; got {colors!r}")
    normalised: list[Any] = []
    for color in colors:
        if isinstance(color, str) and color in palette:
            normalised.append(color)
        elif (
            isinstance(color, (tuple, list))
            and len(color) == 3
            and all(isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c <= 255 for c in color)
        ):
            normalised.append(tuple(float(c) for c in color))
        else:
            raise ValueError(
                f"{type(spec).__name__}.colors entry {color!r} is neither one of {sorted(palette)} "
                "nor an (r, g, b) triple in 0..255"
            )
    spec.colors = tuple(normalised)


def _pick_color(spec: ArtifactSpec, palette: dict[str, tuple[int, int, int]], rng: np.random.Generator) -> np.ndarray:
    """OD vector (float32 (3,)) of one colour drawn uniformly from ``spec.colors``."""
    color = spec.colors[int(rng.integers(len(spec.colors)))]
    return color_od(palette[color] if isinstance(color, str) else color)


def _absorb(image: np.ndarray, support: np.ndarray, density: np.ndarray, od: np.ndarray) -> np.ndarray:
    """Beer-Lambert overlay of a colour on the tile, computed on the support only.

    Args:
        image: uint8 (H, W, 3) tile.
        support: bool (H, W) pixels to compute.
        density: float32 (H, W) amount of the colour (0 = none, 1 = full strength).
        od: float32 (3,) colour optical density.

    Returns:
        float32 (H, W, 3) intensities, valid inside ``support`` (0 elsewhere).
    """
    out = np.zeros(image.shape, np.float32)
    out[support] = od_to_rgb(rgb_to_od(image[support]) + density[support][:, None] * od)
    return out


@dataclasses.dataclass
class InkSpec(ArtifactSpec):
    """Marker-pen ink: one to a few smooth strokes of one pen colour, absorbing on top of the tissue.

    Strokes are random cubic curves (mostly inside the tile; ``touch_border`` of them run off the edge), each with
    its own width, anti-aliased edges, and an opacity that varies smoothly along the stroke (``opacity_jitter``) with a
    fine grain, like a felt tip laying down uneven ink. Default coverage 0.2-30 % of a 256 px tile.

    Attributes:
        colors: pen colours to choose from (names in ``INK_COLORS`` or RGB triples); one per call.
        strokes: number of strokes.
        width: stroke width range, px.
        opacity: ink strength range (1 = the colour at full strength on glass).
        opacity_jitter: relative smooth variation of the opacity, 0..1.
        touch_border: probability that a stroke runs off the tile edge.
        edge_softness: edge ramp width, px.
    """

    name = "ink"
    layer = 2
    coverage = (0.002, 0.3)

    colors: tuple = ("green", "blue", "black", "red")
    strokes: tuple[int, int] = range_field((1, 3), 1, 16, integer=True)
    width: tuple[float, float] = range_field((4.0, 25.0), 1.0)
    opacity: tuple[float, float] = range_field((0.55, 1.0), 0.0, 3.0)
    opacity_jitter: float = 0.3
    touch_border: float = 0.3
    edge_softness: float = 1.5

    def validate(self) -> None:
        """Check and normalise the non-range parameters.

        Raises:
            ValueError: ``colors`` is empty or holds an entry that is neither in ``INK_COLORS`` nor an RGB triple in
                0..255, ``opacity_jitter`` or ``touch_border`` is outside [0, 1], or ``edge_softness`` is not > 0.
        """
        _check_colors(self, INK_COLORS)
        check_unit(self, "opacity_jitter", "touch_border")
        check_positive(self, "edge_softness")

    def render(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draw random pen strokes of one colour and add their ink absorbance to the tile.

        Args:
            image: uint8 (H, W, 3) RGB tile (not modified).
            rng: random generator, the only source of randomness.

        Returns:
            ``(out, support)``: float32 (H, W, 3) unrounded result in 0..255 (valid only inside the support, 0
            elsewhere) and bool (H, W) pixels under the (anti-aliased) strokes.
        """
        h, w = image.shape[:2]
        ink_od = _pick_color(self, INK_COLORS, rng)
        alpha = np.zeros((h, w), np.float32)
        for _ in range(self.draw(rng, "strokes")):
            curve = random_curve(rng, h, w, rng.random() < self.touch_border)
            dist, _ = centerline_distance(h, w, [curve])
            alpha = np.maximum(alpha, band_alpha(dist, 0.5 * self.draw(rng, "width"), self.edge_softness))
        uneven = 1.0 + self.opacity_jitter * smooth_noise(rng, h, w, 24.0) + 0.05 * grain(rng, h, w)
        density = alpha * self.draw(rng, "opacity") * np.clip(uneven, 0.2, None)
        support = alpha > 0
        return _absorb(image, support, density, ink_od), support


@dataclasses.dataclass
class ThreadSpec(ArtifactSpec):
    """Thread or fibre lying on the section: a dark curvilinear band that usually crosses the tile border.

    The absorbance across the band follows a cylinder's thickness profile (densest on the axis) plus a floor, with
    longitudinal fibre striations (a cosine of the distance to the axis) and a fine grain; widths follow the authors'
    example masks (10-25 px). Default coverage 0.5-30 % of a 256 px tile.

    Attributes:
        colors: fibre colours (names in ``THREAD_COLORS`` or RGB triples); one per thread.
        count: number of threads.
        width: thread width range, px.
        darkness: absorbance multiplier range on the axis (1 = the colour at full strength).
        texture: strength of striations and grain, 0..1.
        touch_border: probability that a thread crosses the tile border at both ends.
    """

    name = "thread"
    layer = 3
    coverage = (0.005, 0.3)

    colors: tuple = ("purple", "brown", "black")
    count: tuple[int, int] = range_field((1, 2), 1, 8, integer=True)
    width: tuple[float, float] = range_field((10.0, 25.0), 1.0)
    darkness: tuple[float, float] = range_field((0.6, 1.2), 0.0, 5.0)
    texture: float = 0.35
    touch_border: float = 0.85

    def validate(self) -> None:
        """Check and normalise the non-range parameters.

        Raises:
            ValueError: ``colors`` is empty or holds an entry that is neither in ``THREAD_COLORS`` nor an RGB triple
                in 0..255, or ``texture`` or ``touch_border`` is outside [0, 1].
        """
        _check_colors(self, THREAD_COLORS)
        check_unit(self, "texture", "touch_border")

    def render(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draw random threads (each its own colour) and add their striated absorbance to the tile.

        Args:
            image: uint8 (H, W, 3) RGB tile (not modified).
            rng: random generator, the only source of randomness.

        Returns:
            ``(out, support)``: float32 (H, W, 3) unrounded result in 0..255 (valid only inside the support, 0
            elsewhere) and bool (H, W) pixels covered by at least one thread.
        """
        h, w = image.shape[:2]
        support = np.zeros((h, w), bool)
        layers = []
        fibre_grain = grain(rng, h, w, 0.8)
        for _ in range(self.draw(rng, "count")):
            thread_od = _pick_color(self, THREAD_COLORS, rng)
            dist, _ = centerline_distance(h, w, [random_curve(rng, h, w, rng.random() < self.touch_border)])
            half = 0.5 * self.draw(rng, "width") * (1.0 + 0.15 * smooth_noise(rng, h, w, 40.0))
            alpha = band_alpha(dist, half, 1.5)
            cylinder = np.sqrt(np.clip(1.0 - (dist / half) ** 2, 0.0, 1.0))
            # Fibres run along the thread, so striations depend on the distance to its axis only.
            strands = np.cos(2.0 * np.pi * dist / rng.uniform(2.5, 5.0))
            texture = np.clip(1.0 + self.texture * (0.5 * strands + 0.5 * fibre_grain), 0.0, None)
            density = alpha * (0.35 + 0.65 * cylinder) * texture * self.draw(rng, "darkness")
            layers.append((density, thread_od))
            support |= alpha > 0
        od = rgb_to_od(image[support])
        for density, thread_od in layers:
            od += density[support][:, None] * thread_od
        out = np.zeros((h, w, 3), np.float32)
        out[support] = od_to_rgb(od)
        return out, support


@dataclasses.dataclass
class DebrisSpec(ArtifactSpec):
    """Dust and debris: several small dark irregular specks scattered over the tile.

    Each speck is an irregular, possibly elongated blob with its own opacity; edges are slightly soft (just out of
    focus). Default coverage 0.1-6 % of a 256 px tile (small by nature).

    Attributes:
        colors: debris colours (names in ``DEBRIS_COLORS`` or RGB triples); one per call.
        count: number of specks.
        radius: speck mean radius range, px.
        elongation: speck major/minor axis ratio range.
        irregularity: boundary wobble, 0 = ellipse.
        opacity: speck absorbance range (1 = the colour at full strength).
        edge_softness: edge blur (Gaussian sigma), px.
    """

    name = "debris"
    layer = 4
    coverage = (0.001, 0.06)

    colors: tuple = ("black", "brown", "grey")
    count: tuple[int, int] = range_field((3, 12), 1, 500, integer=True)
    radius: tuple[float, float] = range_field((1.5, 7.0), 0.5)
    elongation: tuple[float, float] = range_field((1.0, 3.0), 1.0, 20.0)
    irregularity: float = 0.5
    opacity: tuple[float, float] = range_field((0.6, 1.3), 0.0, 5.0)
    edge_softness: float = 0.8

    def validate(self) -> None:
        """Check and normalise the non-range parameters.

        Raises:
            ValueError: ``colors`` is empty or holds an entry that is neither in ``DEBRIS_COLORS`` nor an RGB triple
                in 0..255, ``irregularity`` is outside [0, 1], or ``edge_softness`` is not > 0.
        """
        _check_colors(self, DEBRIS_COLORS)
        check_unit(self, "irregularity")
        check_positive(self, "edge_softness")

    def render(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Scatter random specks of one colour over the tile and add their absorbance.

        Args:
            image: uint8 (H, W, 3) RGB tile (not modified).
            rng: random generator, the only source of randomness.

        Returns:
            ``(out, support)``: float32 (H, W, 3) unrounded result in 0..255 (valid only inside the support, 0
            elsewhere) and bool (H, W) pixels covered by the (feathered) specks.
        """
        h, w = image.shape[:2]
        debris_od = _pick_color(self, DEBRIS_COLORS, rng)
        polygons, opacities = [], []
        for _ in range(self.draw(rng, "count")):
            center = (rng.uniform(0, w - 1), rng.uniform(0, h - 1))
            radius, elongation = self.draw(rng, "radius"), self.draw(rng, "elongation")
            polygons.append(blob_polygon(rng, center, radius, self.irregularity, elongation, vertices=24))
            opacities.append(self.draw(rng, "opacity"))
        top = max(opacities)
        cover = fill_polygons(h, w, polygons, [o / top for o in opacities])
        alpha = feather(cover, self.edge_softness)
        density = alpha * top * np.clip(1.0 + 0.2 * grain(rng, h, w, 1.0), 0.3, None)
        support = alpha > 0
        return _absorb(image, support, density, debris_od), support
