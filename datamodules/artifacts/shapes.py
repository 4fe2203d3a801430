"""Geometry helpers for artifact synthesis: smooth curves, bands around them, irregular blobs, soft edges, noise.

All functions are vectorised (NumPy/OpenCV); coordinates are ``(x, y)`` pixel positions, float32, with the pixel
centre at integer values. Every random choice takes an explicit ``np.random.Generator``.
"""

import functools

import cv2
import numpy as np

_SHIFT = 4  # OpenCV fixed-point bits for sub-pixel polylines/fillPoly
_SCALE = float(1 << _SHIFT)
CURVE_POINTS = 64  # samples along each Bezier curve


@functools.lru_cache(maxsize=16)
def pixel_grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates of an image, cached and read-only.

    Args:
        height: image height H.
        width: image width W.

    Returns:
        ``(xx, yy)``, two float32 (H, W) arrays.
    """
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    xx.flags.writeable = False
    yy.flags.writeable = False
    return xx, yy


def smooth_noise(rng: np.random.Generator, height: int, width: int, scale: float) -> np.ndarray:
    """Band-limited value noise: uniform random values on a coarse grid, bicubically upsampled.

    Args:
        rng: random generator.
        height: output height H.
        width: output width W.
        scale: feature size in pixels (grid spacing), > 0.

    Returns:
        float32 (H, W), roughly in [-1, 1] (bicubic overshoot can exceed it slightly).
    """
    gh = max(2, int(np.ceil(height / scale)) + 1)
    gw = max(2, int(np.ceil(width / scale)) + 1)
    grid = rng.uniform(-1.0, 1.0, size=(gh, gw)).astype(np.float32)
    return cv2.resize(grid, (width, height), interpolation=cv2.INTER_CUBIC)


def grain(rng: np.random.Generator, height: int, width: int, sigma: float = 1.0) -> np.ndarray:
    """Fine texture: white Gaussian noise blurred by ``sigma`` and rescaled to unit standard deviation.

    Returns:
        float32 (H, W), mean ~0, std ~1.
    """
    noise = rng.standard_normal((height, width)).astype(np.float32)
    noise = cv2.GaussianBlur(noise, (0, 0), sigma)
    return noise / max(float(noise.std()), 1e-6)


def _border_point(rng: np.random.Generator, height: int, width: int, side: int, overshoot: float) -> np.ndarray:
    """A random point ``overshoot`` pixels beyond one side (0 top, 1 right, 2 bottom, 3 left) of the tile."""
    u = rng.uniform(0.1, 0.9)
    points = (
        (u * (width - 1), -overshoot),
        (width - 1 + overshoot, u * (height - 1)),
        (u * (width - 1), height - 1 + overshoot),
        (-overshoot, u * (height - 1)),
    )
    return np.array(points[side], dtype=np.float64)


def random_curve(
    rng: np.random.Generator, height: int, width: int, touch_border: bool, overshoot: float = 16.0
) -> np.ndarray:
    """A smooth random curve (cubic Bezier) through the tile.

    Args:
        rng: random generator.
        height: tile height H.
        width: tile width W.
        touch_border: if True the curve enters and leaves through two different sides of the tile (its ends lie
            ``overshoot`` px outside so a band drawn around it is cut by the border, not capped); otherwise it
            starts inside the tile and spans 30-80 % of the shorter side.
        overshoot: how far outside the tile border-touching ends lie, in px.

    Returns:
        float32 (CURVE_POINTS, 2) ``(x, y)`` points.
    """
    size = np.array([width - 1, height - 1], dtype=np.float64)
    if touch_border:
        side_a = int(rng.integers(4))
        side_b = (side_a + int(rng.integers(1, 4))) % 4
        p0 = _border_point(rng, height, width, side_a, overshoot)
        p3 = _border_point(rng, height, width, side_b, overshoot)
        p1, p2 = rng.uniform(0.15, 0.85, size=(2, 2)) * size
    else:
        p0 = rng.uniform(0.1, 0.9, size=2) * size
        length = rng.uniform(0.3, 0.8) * min(height, width)
        angle = rng.uniform(0.0, 2.0 * np.pi)
        direction = np.array([np.cos(angle), np.sin(angle)])
        normal = np.array([-direction[1], direction[0]])
        p3 = p0 + length * direction
        offsets = rng.normal(0.0, 0.25 * length, size=2)
        p1 = p0 + length / 3 * direction + offsets[0] * normal
        p2 = p0 + 2 * length / 3 * direction + offsets[1] * normal
    t = np.linspace(0.0, 1.0, CURVE_POINTS)[:, None]
    curve = (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * p1 + 3 * (1 - t) * t**2 * p2 + t**3 * p3
    return curve.astype(np.float32)


def centerline_distance(
    height: int, width: int, curves: list[np.ndarray], nearest: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Euclidean distance of every pixel to the nearest curve (OpenCV distance transform of the rasterised curves).

    Args:
        height: tile height H.
        width: tile width W.
        curves: list of float (N, 2) ``(x, y)`` polylines; parts outside the tile are clipped.
        nearest: also return, for every pixel, the coordinates of its nearest curve pixel (to mirror across a fold).

    Returns:
        ``(dist, nearest_xy)``: dist float32 (H, W) in px (very large if no curve pixel lies in the tile);
        nearest_xy float32 (H, W, 2) ``(x, y)``, or None when not asked for or no curve pixel lies in the tile.
    """
    canvas = np.full((height, width), 255, dtype=np.uint8)
    polylines = [np.round(c * _SCALE).astype(np.int32) for c in curves]
    cv2.polylines(canvas, polylines, isClosed=False, color=0, thickness=1, lineType=cv2.LINE_8, shift=_SHIFT)
    if not nearest:
        return cv2.distanceTransform(canvas, cv2.DIST_L2, cv2.DIST_MASK_5), None
    dist, labels = cv2.distanceTransformWithLabels(canvas, cv2.DIST_L2, cv2.DIST_MASK_5, labelType=cv2.DIST_LABEL_PIXEL)
    # With DIST_LABEL_PIXEL, OpenCV numbers the zero pixels 1..K in raster order, i.e. in np.nonzero order.
    ys, xs = np.nonzero(canvas == 0)
    if ys.size == 0:
        return dist, None
    points = np.stack([xs, ys], axis=-1).astype(np.float32)
    return dist, points[np.maximum(labels - 1, 0)]


def smoothstep(x: np.ndarray) -> np.ndarray:
    """Hermite smoothstep of ``x`` clipped to [0, 1]: 0 below 0, 1 above 1, C1-continuous in between."""
    x = np.clip(x, 0.0, 1.0)
    return x * x * (3.0 - 2.0 * x)


def band_alpha(dist: np.ndarray, half_width: np.ndarray | float, softness: float) -> np.ndarray:
    """Soft-edged band opacity from a distance map.

    Args:
        dist: float32 (H, W) distance to the band's centre line, px.
        half_width: float or float32 (H, W) half width of the band, px.
        softness: width of the edge ramp, px (> 0).

    Returns:
        float32 (H, W) in [0, 1]: 1 inside, smoothstep ramp of ``softness`` px centred on the nominal edge, 0 beyond.
    """
    return smoothstep((half_width + 0.5 * softness - dist) / softness).astype(np.float32)


def blob_polygon(
    rng: np.random.Generator,
    center: tuple[float, float],
    radius: float,
    irregularity: float,
    elongation: float = 1.0,
    vertices: int = 48,
) -> np.ndarray:
    """An irregular closed blob: an ellipse whose radius is modulated by a few random low harmonics.

    Args:
        rng: random generator.
        center: ``(x, y)`` centre, px.
        radius: mean radius, px (the minor semi-axis times sqrt of elongation).
        irregularity: relative amplitude of the boundary wobble, 0 = smooth ellipse, ~0.5 = ragged.
        elongation: ratio of major to minor axis, >= 1.
        vertices: polygon vertices.

    Returns:
        float32 (vertices, 2) ``(x, y)`` boundary points.
    """
    theta = np.linspace(0.0, 2.0 * np.pi, vertices, endpoint=False)
    harmonics = np.arange(2, 6)[:, None]
    amps = rng.normal(0.0, irregularity / 2.0, size=(4, 1)) / harmonics * 2.0
    phases = rng.uniform(0.0, 2.0 * np.pi, size=(4, 1))
    r = radius * np.clip(1.0 + (amps * np.cos(harmonics * theta + phases)).sum(0), 0.3, None)
    a, b = np.sqrt(elongation), 1.0 / np.sqrt(elongation)
    rot = rng.uniform(0.0, np.pi)
    x, y = r * a * np.cos(theta), r * b * np.sin(theta)
    xr = center[0] + x * np.cos(rot) - y * np.sin(rot)
    yr = center[1] + x * np.sin(rot) + y * np.cos(rot)
    return np.stack([xr, yr], axis=-1).astype(np.float32)


def fill_polygons(height: int, width: int, polygons: list[np.ndarray], values: list[float] | None = None) -> np.ndarray:
    """Rasterise filled polygons (sub-pixel vertices, anti-aliased edges).

    Args:
        height: canvas height H.
        width: canvas width W.
        polygons: list of float (N, 2) ``(x, y)`` outlines.
        values: fill value in [0, 1] per polygon (default 1); later polygons overwrite earlier ones.

    Returns:
        float32 (H, W) coverage in [0, 1].
    """
    canvas = np.zeros((height, width), dtype=np.uint8)
    values = [1.0] * len(polygons) if values is None else values
    for poly, value in zip(polygons, values, strict=False):
        pts = np.round(poly * _SCALE).astype(np.int32)
        cv2.fillPoly(canvas, [pts], color=int(round(255 * value)), lineType=cv2.LINE_AA, shift=_SHIFT)
    return canvas.astype(np.float32) / 255.0


def feather(coverage: np.ndarray, sigma: float, floor: float = 0.02) -> np.ndarray:
    """Soften a coverage map by a Gaussian blur and cut its faint tails so the support stays a clean shape.

    ``alpha = clip((blur(coverage) - floor) / (1 - floor), 0, 1)``: continuous, exactly 0 where the blurred value is
    below ``floor``.

    Args:
        coverage: float32 (H, W) in [0, 1].
        sigma: blur standard deviation, px (0 = no blur).
        floor: tail cut-off.

    Returns:
        float32 (H, W) in [0, 1].
    """
    if sigma > 0:
        coverage = cv2.GaussianBlur(coverage, (0, 0), sigma)
    return np.clip((coverage - floor) / (1.0 - floor), 0.0, 1.0).astype(np.float32)
