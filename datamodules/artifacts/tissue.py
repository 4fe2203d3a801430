"""Artifacts that alter the tissue itself or its image: tissue folds, air bubbles, out-of-focus blur, stain blotches.

Sizes are in pixels of a 20x tile (about 0.5 um/px), the scale of the LatentArtiFusion data (256 px tiles).
"""

import dataclasses

import cv2
import numpy as np

from datamodules.artifacts.base import ArtifactSpec, check_choice, check_positive, check_unit, range_field
from datamodules.artifacts.optics import STAIN_MATRIX, UNMIX_MATRIX, od_to_rgb, rgb_to_od
from datamodules.artifacts.shapes import (
    band_alpha,
    blob_polygon,
    centerline_distance,
    feather,
    fill_polygons,
    pixel_grid,
    random_curve,
    smooth_noise,
)


def _blob_alpha(spec: ArtifactSpec, rng: np.random.Generator, height: int, width: int, softness: float) -> np.ndarray:
    """Feathered irregular blob centred inside the tile; uses the spec's radius/irregularity/elongation ranges."""
    center = (rng.uniform(0, width - 1), rng.uniform(0, height - 1))
    poly = blob_polygon(rng, center, spec.draw(rng, "radius"), spec.irregularity, spec.draw(rng, "elongation"))
    return feather(fill_polygons(height, width, [poly]), softness)


@dataclasses.dataclass
class FoldSpec(ArtifactSpec):
    """Tissue fold: a curved band where the section lies over itself.

    Inside the band a mirrored, shifted copy of the neighbouring tissue (reflected across the fold line, then moved by
    ``displacement`` px) is stacked on the original: optical densities add (Beer-Lambert), so the band is darker,
    denser and more saturated, with an extra pink-to-purple stain tint from the doubled section. The copy is slightly
    defocused and the band edges are ramped over ``edge_softness`` px. Default coverage 0.5-20 % of a 256 px tile.

    Attributes:
        width: band width range, px (the authors' example bands are 10-25 px).
        width_jitter: relative variation of the width along the band (0 = constant).
        count: number of bands.
        touch_border: probability that a band enters and leaves through the tile border.
        displacement: shift of the overlapping copy, px.
        density: fraction of the copy's optical density added (1 = a full second layer).
        tint: extra stain optical density of the doubled section (eosin to H&E mix).
        edge_softness: edge ramp width, px.
    """

    name = "fold"
    layer = 1
    coverage = (0.005, 0.2)

    width: tuple[float, float] = range_field((10.0, 25.0), 1.0)
    width_jitter: float = 0.3
    count: tuple[int, int] = range_field((1, 1), 1, 8, integer=True)
    touch_border: float = 0.9
    displacement: tuple[float, float] = range_field((4.0, 20.0), 0.0)
    density: tuple[float, float] = range_field((0.7, 1.1), 0.0, 3.0)
    tint: tuple[float, float] = range_field((0.1, 0.35), 0.0, 3.0)
    edge_softness: float = 3.0

    def validate(self) -> None:
        """Check the non-range parameters.

        Raises:
            ValueError: ``width_jitter`` or ``touch_border`` is outside [0, 1], or ``edge_softness`` is not > 0.
        """
        check_unit(self, "width_jitter", "touch_border")
        check_positive(self, "edge_softness")

    def render(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draw random fold bands and stack a shifted, mirrored, defocused copy of the tissue inside them.

        Args:
            image: uint8 (H, W, 3) RGB tile (not modified).
            rng: random generator, the only source of randomness.

        Returns:
            ``(out, support)``: float32 (H, W, 3) unrounded result in 0..255 (valid only inside the support, 0
            elsewhere) and bool (H, W) pixels inside the bands; all zeros and an empty support when no band lands on
            the tile (``apply`` then draws again).
        """
        h, w = image.shape[:2]
        curves = [random_curve(rng, h, w, rng.random() < self.touch_border) for _ in range(self.draw(rng, "count"))]
        dist, nearest = centerline_distance(h, w, curves, nearest=True)
        half = 0.5 * self.draw(rng, "width") * (1.0 + self.width_jitter * smooth_noise(rng, h, w, 48.0))
        alpha = band_alpha(dist, half, self.edge_softness)
        support = alpha > 0
        if nearest is None or not support.any():
            return np.zeros((h, w, 3), np.float32), np.zeros((h, w), bool)
        # The flap: reflect each pixel across its nearest fold-line point, then shift by the displacement; sampled
        # from a slightly defocused copy (the flap lies above the focal plane). Only band pixels are computed.
        angle = rng.uniform(0.0, 2.0 * np.pi)
        shift = self.draw(rng, "displacement") * np.array([np.cos(angle), np.sin(angle)], np.float32)
        xx, yy = pixel_grid(h, w)
        source = 2.0 * nearest[support] - np.stack([xx[support], yy[support]], axis=-1) + shift  # (N, 2)
        defocused = cv2.GaussianBlur(image, (0, 0), 1.0)
        flap = cv2.remap(
            defocused, source[:, None, 0], source[:, None, 1], cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101
        )[:, 0]
        mix = rng.uniform(0.0, 0.6)  # the doubled layer's own stain: eosin (pink) to H&E (purple)
        tint = self.draw(rng, "tint") * ((1.0 - mix) * STAIN_MATRIX[1] + mix * STAIN_MATRIX[0])
        added = self.draw(rng, "density") * rgb_to_od(flap) + tint
        out = np.zeros((h, w, 3), np.float32)
        out[support] = od_to_rgb(rgb_to_od(image[support]) + alpha[support][:, None] * added)
        return out, support


@dataclasses.dataclass
class BubbleSpec(ArtifactSpec):
    """Air bubble trapped under the coverslip: an ellipse with a dark refractive rim and a bright, magnified interior.

    Inside, the tissue is magnified by ``magnification`` about the bubble centre (the bubble acts as a weak lens) and
    washed out towards white by ``brightness``; the rim (total internal reflection) darkens the image towards dark
    grey with a Gaussian profile ``rim_width`` px wide. The centre lies inside the tile; the bubble may be cut by the
    border. Default coverage 1-30 % of a 256 px tile (a large bubble can fill a small tile).

    Attributes:
        radius: semi-major axis range, px.
        aspect: minor/major axis ratio range, in (0, 1].
        rim_width: rim width range, px.
        rim_darkness: rim opacity range, 0..1.
        brightness: interior wash-out towards white, 0..1.
        magnification: interior magnification factor range, >= 1.
    """

    name = "bubble"
    layer = 5
    coverage = (0.01, 0.3)

    radius: tuple[float, float] = range_field((25.0, 70.0), 2.0)
    aspect: tuple[float, float] = range_field((0.7, 1.0), 0.05, 1.0)
    rim_width: tuple[float, float] = range_field((2.0, 5.0), 0.5)
    rim_darkness: tuple[float, float] = range_field((0.5, 0.85), 0.0, 1.0)
    brightness: tuple[float, float] = range_field((0.25, 0.5), 0.0, 1.0)
    magnification: tuple[float, float] = range_field((1.03, 1.12), 1.0, 4.0)

    def render(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draw one bubble: a magnified, washed-out interior inside a dark refractive rim.

        Args:
            image: uint8 (H, W, 3) RGB tile (not modified).
            rng: random generator, the only source of randomness.

        Returns:
            ``(out, support)``: float32 (H, W, 3) unrounded result in 0..255 (valid only inside the support, 0
            elsewhere) and bool (H, W) pixels of the bubble and its rim (the ellipse grown by one rim width).
        """
        h, w = image.shape[:2]
        major = self.draw(rng, "radius")
        minor = major * self.draw(rng, "aspect")
        cx, cy, theta = rng.uniform(0, w - 1), rng.uniform(0, h - 1), rng.uniform(0.0, np.pi)
        rim_width = self.draw(rng, "rim_width")
        mag, brightness = self.draw(rng, "magnification"), self.draw(rng, "brightness")
        darkness = self.draw(rng, "rim_darkness")
        # Work in the bubble's bounding box only.
        reach = major + 2.0 * rim_width + 2.0
        y0, y1 = max(0, int(cy - reach)), min(h, int(cy + reach) + 1)
        x0, x1 = max(0, int(cx - reach)), min(w, int(cx + reach) + 1)
        xx, yy = pixel_grid(h, w)
        dx, dy = xx[y0:y1, x0:x1] - cx, yy[y0:y1, x0:x1] - cy
        u = (dx * np.cos(theta) + dy * np.sin(theta)) / major
        v = (-dx * np.sin(theta) + dy * np.cos(theta)) / minor
        signed = (np.sqrt(u * u + v * v) - 1.0) * np.sqrt(major * minor)  # ~ signed distance to the outline, px
        inner = signed < rim_width
        inside = np.clip(0.5 - signed, 0.0, 1.0)[..., None]
        # Rim: Gaussian centred half a rim width inside the outline, sigma = rim_width / 2 (~1 % at the support edge).
        rim = np.exp(-0.5 * ((signed + 0.5 * rim_width) / (0.5 * rim_width)) ** 2)[..., None]
        # Interior: the bubble acts as a weak lens (magnified about its centre) and washes the tissue out.
        lens = cv2.remap(image, cx + dx / mag, cy + dy / mag, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT_101)
        washed = lens.astype(np.float32) * (1.0 - brightness) + 255.0 * brightness
        roi = inside * washed + (1.0 - inside) * image[y0:y1, x0:x1]
        shade = darkness * rim
        out = np.zeros((h, w, 3), np.float32)
        support = np.zeros((h, w), bool)
        out[y0:y1, x0:x1] = roi * (1.0 - shade) + 45.0 * shade
        support[y0:y1, x0:x1] = inner
        return out, support


@dataclasses.dataclass
class BlurSpec(ArtifactSpec):
    """Out-of-focus region: a smooth irregular blob where the tile is Gaussian-blurred.

    Models local focus loss (uneven section thickness, a tilted slide). The blurred image is blended in with a
    feathered blob mask; flat areas that blurring cannot change get the one-grey-level nudge, so the mask stays the
    whole blob. Default coverage 2-45 % of a 256 px tile.

    Attributes:
        radius: blob mean radius range, px.
        elongation: blob major/minor axis ratio range.
        irregularity: boundary wobble, 0 = ellipse.
        sigma: Gaussian blur standard deviation range, px (the main strength knob).
        edge_softness: feather of the blob edge (Gaussian sigma), px.
    """

    name = "blur"
    layer = 6
    coverage = (0.02, 0.45)

    radius: tuple[float, float] = range_field((25.0, 70.0), 2.0)
    elongation: tuple[float, float] = range_field((1.0, 2.0), 1.0, 10.0)
    irregularity: float = 0.3
    sigma: tuple[float, float] = range_field((1.5, 4.0), 0.3, 50.0)
    edge_softness: float = 6.0

    def validate(self) -> None:
        """Check the non-range parameters.

        Raises:
            ValueError: ``irregularity`` is outside [0, 1] or ``edge_softness`` is not > 0.
        """
        check_unit(self, "irregularity")
        check_positive(self, "edge_softness")

    def render(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draw one feathered blob and blend a Gaussian-blurred copy of the tile into it.

        Args:
            image: uint8 (H, W, 3) RGB tile (not modified).
            rng: random generator, the only source of randomness.

        Returns:
            ``(out, support)``: float32 (H, W, 3) unrounded result in 0..255 (valid only inside the support, 0
            elsewhere) and bool (H, W) pixels inside the feathered blob.
        """
        h, w = image.shape[:2]
        alpha = _blob_alpha(self, rng, h, w, self.edge_softness)
        support = alpha > 0
        sigma = self.draw(rng, "sigma")
        out = np.zeros((h, w, 3), np.float32)
        if not support.any():
            return out, support
        # Blur only the blob's bounding box plus the kernel radius (OpenCV uses 4 sigma for float images), which
        # gives the same values as blurring the whole tile.
        rows, cols = np.nonzero(support.any(1))[0], np.nonzero(support.any(0))[0]
        pad = int(np.ceil(4.0 * sigma)) + 1
        y0, y1 = max(0, rows[0] - pad), min(h, rows[-1] + 1 + pad)
        x0, x1 = max(0, cols[0] - pad), min(w, cols[-1] + 1 + pad)
        source = image[y0:y1, x0:x1].astype(np.float32)
        blurred = cv2.GaussianBlur(source, (0, 0), sigma, borderType=cv2.BORDER_REFLECT_101)
        out[y0:y1, x0:x1] = source + alpha[y0:y1, x0:x1, None] * (blurred - source)
        return out, support


STAIN_MODES = ("over", "under", "random")
STAIN_TARGETS = ("both", "hematoxylin", "eosin", "random")


@dataclasses.dataclass
class StainSpec(ArtifactSpec):
    """Over- or under-staining blotch: a soft-edged region where the H&E stain amounts are scaled.

    Colour deconvolution (Ruifrok-Johnston vectors) splits each pixel's optical density into haematoxylin, eosin and
    residual concentrations; inside the blotch the chosen stain concentrations are multiplied by a factor that ramps
    from 1 at the edge to ``over_factor`` or ``under_factor`` in the core, then recombined (Beer-Lambert). Blank glass
    has no stain to scale, so it only receives the one-grey-level nudge. Default coverage 2-50 % of a 256 px tile.

    Attributes:
        radius: blotch mean radius range, px.
        elongation: blotch major/minor axis ratio range.
        irregularity: boundary wobble, 0 = ellipse.
        mode: "over", "under" or "random" (each call picks one).
        target: stain(s) affected: "both", "hematoxylin", "eosin" or "random".
        over_factor: concentration multiplier range for over-staining, >= 1.
        under_factor: concentration multiplier range for under-staining, in [0, 1].
        edge_softness: feather of the blotch edge (Gaussian sigma), px.
    """

    name = "stain"
    layer = 0
    coverage = (0.02, 0.5)

    radius: tuple[float, float] = range_field((25.0, 70.0), 2.0)
    elongation: tuple[float, float] = range_field((1.0, 2.0), 1.0, 10.0)
    irregularity: float = 0.35
    mode: str = "random"
    target: str = "random"
    over_factor: tuple[float, float] = range_field((1.5, 2.5), 1.0, 10.0)
    under_factor: tuple[float, float] = range_field((0.2, 0.6), 0.0, 1.0)
    edge_softness: float = 10.0

    def validate(self) -> None:
        """Check the non-range parameters.

        Raises:
            ValueError: ``irregularity`` is outside [0, 1], ``edge_softness`` is not > 0, or ``mode`` / ``target``
                is not one of ``STAIN_MODES`` / ``STAIN_TARGETS``.
        """
        check_unit(self, "irregularity")
        check_positive(self, "edge_softness")
        check_choice(self, "mode", STAIN_MODES)
        check_choice(self, "target", STAIN_TARGETS)

    def render(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draw one feathered blotch and scale the chosen stain concentrations inside it (colour deconvolution).

        Args:
            image: uint8 (H, W, 3) RGB tile (not modified).
            rng: random generator, the only source of randomness.

        Returns:
            ``(out, support)``: float32 (H, W, 3) unrounded result in 0..255 (valid only inside the support, 0
            elsewhere) and bool (H, W) pixels inside the feathered blotch.
        """
        h, w = image.shape[:2]
        alpha = _blob_alpha(self, rng, h, w, self.edge_softness)
        support = alpha > 0
        mode = self.mode if self.mode != "random" else ("over", "under")[int(rng.integers(2))]
        target = self.target if self.target != "random" else STAIN_TARGETS[int(rng.integers(3))]
        factor = self.draw(rng, "over_factor" if mode == "over" else "under_factor")
        stains = {"both": [0, 1, 2], "hematoxylin": [0], "eosin": [1]}[target]
        concentrations = rgb_to_od(image[support]) @ UNMIX_MATRIX  # (N, 3): H, E, residual
        gain = 1.0 + alpha[support][:, None] * (factor - 1.0)
        concentrations[:, stains] *= gain
        out = np.zeros((h, w, 3), np.float32)
        out[support] = od_to_rgb(np.maximum(concentrations @ STAIN_MATRIX, 0.0))
        return out, support
