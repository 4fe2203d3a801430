"""Wrong artifact masks on purpose: pure functions that perturb a true mask by a graded amount.

The robustness ablation (``python -m experiments.ablate --suite robustness``) restores with a perturbed mask and
scores against the true one, so these functions model the mistakes a segmenter or an annotator makes:

- ``erode`` / ``dilate``: the outline drawn ``severity`` px too tight or too loose (disk structuring element);
- ``shift``: the whole mask displaced by ``severity`` px in one direction (registration error);
- ``miss``: a fraction ``severity`` of every connected artifact cut away by a half-plane (part of it missed);
- ``blobs``: ``severity`` false-positive disks of radius ``radius`` px added on clean tissue.

Masks are numpy ``bool (H, W)``, True = artifact (the suite's convention). Every function returns a new array of the
same shape and leaves its input alone; severity 0 returns an unchanged copy. Random choices (the shift direction, the
cut's direction, the blob centres) come from the ``np.random.Generator`` passed in, drawn in the same order at every
severity, so one generator seed gives nested perturbations: the same direction with a growing magnitude, the first
blob of three is the one blob of one. No torch, no Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
from scipy import ndimage

BLOB_RADIUS = 10
KINDS: tuple[str, ...] = ("none", "erode", "dilate", "shift", "miss", "blobs")


def _check(mask: np.ndarray) -> np.ndarray:
    """Validate a 2-D mask and return it as bool (nonzero = artifact)."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    return mask.astype(bool)


def _disk(radius: int) -> np.ndarray:
    """Bool disk footprint of the given radius, shape ``(2r + 1, 2r + 1)``."""
    yy, xx = np.mgrid[-radius : radius + 1, -radius : radius + 1]
    return xx**2 + yy**2 <= radius**2


def _check_pixels(severity: float, name: str) -> int:
    if isinstance(severity, bool) or severity < 0 or float(severity) != int(severity):
        raise ValueError(f"{name} severity must be a non-negative whole number of pixels, got {severity!r}")
    return int(severity)


def _direction(rng: np.random.Generator | None) -> float:
    """An angle in radians from ``rng`` (always one draw), 45 degrees when no generator is given."""
    return float(rng.uniform(0.0, 2 * math.pi)) if rng is not None else math.pi / 4


def dilate(mask: np.ndarray, severity: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """Grow the artifact region by ``severity`` px (disk footprint); pixels outside the image count as clean.

    Args:
        mask: bool ``(H, W)``, True = artifact.
        severity: radius in pixels, a whole number >= 0.
        rng: unused (uniform signature).

    Returns:
        bool ``(H, W)``, a superset of ``mask``.
    """
    mask, radius = _check(mask), _check_pixels(severity, "dilate")
    if radius == 0 or not mask.any():
        return mask.copy()
    return ndimage.binary_dilation(mask, structure=_disk(radius))


def erode(mask: np.ndarray, severity: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """Shrink the artifact region by ``severity`` px (disk footprint); pixels outside the image count as artifact.

    Args:
        mask: bool ``(H, W)``, True = artifact.
        severity: radius in pixels, a whole number >= 0.
        rng: unused (uniform signature).

    Returns:
        bool ``(H, W)``, a subset of ``mask`` (artifacts thinner than ``2 * severity + 1`` px vanish).
    """
    mask, radius = _check(mask), _check_pixels(severity, "erode")
    if radius == 0:
        return mask.copy()
    return ndimage.binary_erosion(mask, structure=_disk(radius), border_value=1)


def shift(mask: np.ndarray, severity: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """Displace the mask by ``severity`` px in a direction drawn from ``rng``; what leaves the tile is lost.

    Args:
        mask: bool ``(H, W)``, True = artifact.
        severity: displacement length in pixels (rounded per axis), >= 0.
        rng: draws the direction (one uniform angle); None = 45 degrees (down and right).

    Returns:
        bool ``(H, W)``; the vacated pixels are clean.
    """
    mask = _check(mask)
    if severity < 0:
        raise ValueError(f"shift severity must be >= 0 px, got {severity!r}")
    angle = _direction(rng)
    dy, dx = round(severity * math.sin(angle)), round(severity * math.cos(angle))
    out = np.zeros_like(mask)
    h, w = mask.shape
    if abs(dy) >= h or abs(dx) >= w:
        return out
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = mask[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def miss(mask: np.ndarray, severity: float, rng: np.random.Generator | None = None) -> np.ndarray:
    """Cut a fraction ``severity`` of every connected artifact away with a half-plane (one direction for all).

    Each 8-connected component's pixels are projected on the direction drawn from ``rng``; the ``severity``
    share lying furthest along it is dropped, so the kept part is the component on one side of a straight cut.

    Args:
        mask: bool ``(H, W)``, True = artifact.
        severity: fraction in ``[0, 1]`` of each component's area to drop (ties at the cut may drop a few more).
        rng: draws the cut's direction (one uniform angle); None = 45 degrees.

    Returns:
        bool ``(H, W)``, a subset of ``mask``.
    """
    mask = _check(mask)
    if not 0.0 <= severity <= 1.0:
        raise ValueError(f"miss severity must be a fraction in [0, 1], got {severity!r}")
    angle = _direction(rng)
    if severity == 0 or not mask.any():
        return mask.copy()
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    yy, xx = np.nonzero(mask)
    along = xx * math.cos(angle) + yy * math.sin(angle)
    keep = np.zeros(yy.shape, bool)
    for component in range(1, count + 1):
        members = np.flatnonzero(labels[yy, xx] == component)
        n_keep = members.size - round(severity * members.size)
        keep[members[np.argsort(along[members], kind="stable")[:n_keep]]] = True
    out = np.zeros_like(mask)
    out[yy[keep], xx[keep]] = True
    return out


def blobs(
    mask: np.ndarray,
    severity: float,
    rng: np.random.Generator | None = None,
    *,
    radius: int = BLOB_RADIUS,
    allowed: np.ndarray | None = None,
    gap: int = 2,
) -> np.ndarray:
    """Add ``severity`` false-positive disks of ``radius`` px on clean tissue, away from the true artifacts.

    Centres are drawn from ``rng`` one after another among the pixels at least ``radius + gap`` px from every
    artifact and from earlier blobs, at least ``radius`` px inside the tile, and inside ``allowed`` (e.g. the
    tile's tissue mask) when given. When no such pixel is left, fewer blobs are added.

    Args:
        mask: bool ``(H, W)``, True = artifact.
        severity: number of blobs, a whole number >= 0.
        rng: draws the centres; None = ``np.random.default_rng(0)``.
        radius: blob radius in pixels (>= 1).
        allowed: optional bool ``(H, W)``, where blobs may be centred (True = clean tissue).
        gap: extra clean margin in pixels between a blob and any artifact.

    Returns:
        bool ``(H, W)``, a superset of ``mask`` (exactly ``mask`` where no blob lands).
    """
    mask, count = _check(mask), _check_pixels(severity, "blobs")
    if radius < 1:
        raise ValueError(f"blob radius must be >= 1 px, got {radius!r}")
    rng = rng if rng is not None else np.random.default_rng(0)
    out = mask.copy()
    h, w = mask.shape
    free = np.zeros_like(mask)
    free[radius : h - radius, radius : w - radius] = True
    if allowed is not None:
        free &= _check(allowed)
    disk = _disk(radius)
    for _ in range(count):
        candidates = free & ~ndimage.binary_dilation(out, structure=_disk(radius + gap)) if out.any() else free
        ys, xs = np.nonzero(candidates)
        if ys.size == 0:
            break
        pick = int(rng.integers(ys.size))
        cy, cx = int(ys[pick]), int(xs[pick])
        out[cy - radius : cy + radius + 1, cx - radius : cx + radius + 1] |= disk
    return out


def identity(mask: np.ndarray, severity: float = 0, rng: np.random.Generator | None = None) -> np.ndarray:
    """The true mask, unchanged (a copy): the reference of every perturbation."""
    return _check(mask).copy()


PERTURBATIONS: dict[str, Callable[..., np.ndarray]] = {
    "none": identity,
    "erode": erode,
    "dilate": dilate,
    "shift": shift,
    "miss": miss,
    "blobs": blobs,
}


def perturb(
    mask: np.ndarray, kind: str, severity: float, rng: np.random.Generator | None = None, **kwargs
) -> np.ndarray:
    """Apply the perturbation named ``kind`` (one of :data:`KINDS`) at ``severity``.

    Args:
        mask: bool ``(H, W)``, True = artifact.
        kind: ``"none"``, ``"erode"``, ``"dilate"``, ``"shift"``, ``"miss"`` or ``"blobs"``.
        severity: pixels (erode, dilate, shift), a fraction (miss) or a count (blobs).
        rng: the generator behind the random choices (see the module docstring).
        **kwargs: extra keywords of ``blobs`` (``radius``, ``allowed``, ``gap``).

    Returns:
        bool ``(H, W)``.

    Raises:
        ValueError: unknown kind, bad severity or a keyword the kind does not take.
    """
    if kind not in PERTURBATIONS:
        raise ValueError(f"unknown mask perturbation {kind!r}; expected one of {KINDS}")
    if kwargs and kind != "blobs":
        raise ValueError(f"mask perturbation {kind!r} takes no keyword(s) {sorted(kwargs)}")
    return PERTURBATIONS[kind](mask, severity, rng, **kwargs)
