"""Base class of the artifact specs and the exact-mask guarantee they all share.

An artifact spec is a dataclass of *parameter ranges* (each a ``(low, high)`` pair sampled anew on every call) plus a
``render`` method that returns the artifact's unrounded result and its support (the pixels it is meant to touch).
:func:`commit_change` turns that into the public contract: the returned mask is True exactly on the changed pixels.
"""

import abc
import dataclasses
import math
from typing import Any, ClassVar

import numpy as np

MIN_SIZE = 16
"""Smallest accepted tile side in px (artifacts are tuned for 20x tiles of 64 px and more)."""
_MAX_TRIES = 8


def range_field(default: tuple[float, float], low: float, high: float = math.inf, integer: bool = False) -> Any:
    """Dataclass field for a sampled ``(low, high)`` parameter range with inclusive bounds ``[low, high]``."""
    return dataclasses.field(default=default, metadata={"bounds": (low, high), "integer": integer})


def check_image(image: Any) -> np.ndarray:
    """Validate a tile: uint8 (H, W, 3) RGB with H, W >= MIN_SIZE.

    Raises:
        ValueError: naming the offending dtype or shape.
    """
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        got = f"{image.dtype} {image.shape}" if isinstance(image, np.ndarray) else type(image).__name__
        raise ValueError(f"artifact synthesis needs a uint8 (H, W, 3) RGB image; got {got}")
    if min(image.shape[:2]) < MIN_SIZE:
        raise ValueError(f"artifact synthesis needs H, W >= {MIN_SIZE}; got {image.shape[:2]}")
    return image


def commit_change(image: np.ndarray, out: np.ndarray, support: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Write an artifact into a copy of ``image`` so that the mask equals the set of changed pixels.

    Inside ``support`` the rounded ``out`` is written; pixels whose rounded value equals the original in all three
    channels (faint soft edges, blur over flat areas) are nudged by one grey level in the artifact's local direction
    (the sign of ``out - image`` summed over channels, else the sign of the artifact's mean change, else darker;
    reversed where that would leave 0..255). Outside ``support`` the input is copied unchanged.

    Args:
        image: uint8 (H, W, 3) original.
        out: float32 (H, W, 3) unrounded artifact result (only read inside ``support``).
        support: bool (H, W) pixels the artifact covers.

    Returns:
        ``(corrupted, mask)``: uint8 (H, W, 3) and bool (H, W) with ``mask == (corrupted != image).any(-1)``.
    """
    corrupted = image.copy()
    original = image[support].astype(np.int16)
    target = out[support]
    values = np.clip(np.rint(target), 0, 255).astype(np.int16)
    same = (values == original).all(-1)
    if same.any():
        delta = (target - original).sum(-1)
        overall = np.sign(delta.sum()) or -1.0
        step = np.sign(delta[same])
        step[step == 0] = overall
        nudged = original[same] + step[:, None].astype(np.int16)
        outside = (nudged < 0) | (nudged > 255)
        nudged[outside] -= 2 * np.broadcast_to(step[:, None], nudged.shape)[outside].astype(np.int16)
        values[same] = nudged
    corrupted[support] = values.astype(np.uint8)
    return corrupted, support.copy()


@dataclasses.dataclass
class ArtifactSpec(abc.ABC):
    """One artifact type: validated parameter ranges and a seeded renderer.

    Subclasses declare ``name`` (the registry key), ``layer`` (physical stacking order used by the mixture: smaller
    is applied first), ``coverage`` and their parameters as :func:`range_field` pairs or plain fields, and implement
    ``render``.
    A scalar given for a range field means a fixed value; lists (from YAML) are turned into tuples.
    """

    name: ClassVar[str] = ""
    layer: ClassVar[int] = 0
    coverage: ClassVar[tuple[float, float]] = (0.0, 1.0)
    """Documented range of the mask's fraction of a 256 px tile with default parameters (tested)."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if "bounds" in f.metadata:
                setattr(self, f.name, self._checked_range(f.name, getattr(self, f.name), **f.metadata))
        self.validate()

    def _checked_range(self, name: str, value: Any, bounds: tuple[float, float], integer: bool) -> tuple:
        pair = (value, value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
        kind = "integers" if integer else "numbers"
        ok = isinstance(pair, (tuple, list)) and len(pair) == 2
        ok = ok and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in pair)
        ok = ok and (not integer or all(float(v).is_integer() for v in pair))
        ok = ok and bounds[0] <= pair[0] <= pair[1] <= bounds[1]
        if not ok:
            raise ValueError(
                f"{type(self).__name__}.{name} must be a number or a (low, high) pair of {kind} with "
                f"{bounds[0]} <= low <= high <= {bounds[1]}; got {value!r}"
            )
        cast = int if integer else float
        return (cast(pair[0]), cast(pair[1]))

    def validate(self) -> None:  # noqa: B027 - optional hook: the default accepts everything, so not abstract
        """Check the non-range parameters; raise ValueError naming the bad one. Subclasses override."""

    def draw(self, rng: np.random.Generator, name: str) -> float:
        """Sample one value of the range parameter ``name`` (uniform; integers inclusive of both ends)."""
        low, high = getattr(self, name)
        if isinstance(low, int):
            return int(rng.integers(low, high + 1))
        return float(rng.uniform(low, high)) if high > low else float(low)

    @abc.abstractmethod
    def render(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Draw one random instance of the artifact.

        Args:
            image: uint8 (H, W, 3) RGB tile (not modified).
            rng: random generator, the only source of randomness.

        Returns:
            ``(out, support)``: float32 (H, W, 3) unrounded result in 0..255 (read only inside the support) and
            bool (H, W) pixels the artifact covers.
        """

    def apply(self, image: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Corrupt a tile with one random instance of this artifact.

        Args:
            image: uint8 (H, W, 3) RGB tile; never modified.
            rng: ``np.random.Generator``; the same generator state gives byte-identical results.

        Returns:
            ``(corrupted, mask)``: uint8 (H, W, 3) and bool (H, W), True exactly where ``corrupted != image``.
            The mask is never empty.
        """
        image = check_image(image)
        for _ in range(_MAX_TRIES):
            out, support = self.render(image, rng)
            if support.any():
                return commit_change(image, out, support)
        raise RuntimeError(f"{type(self).__name__} produced an empty artifact {_MAX_TRIES} times on {image.shape}")

    def to_config(self) -> dict[str, Any]:
        """Plain-dict parameters (tuples as lists), accepted back by ``type(self)(**config)``."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def check_unit(spec: ArtifactSpec, *names: str) -> None:
    """Raise ValueError unless each named attribute is a number in [0, 1]."""
    for name in names:
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
            raise ValueError(f"{type(spec).__name__}.{name} must be a number in [0, 1]; got {value!r}")


def check_positive(spec: ArtifactSpec, *names: str) -> None:
    """Raise ValueError unless each named attribute is a number > 0."""
    for name in names:
        value = getattr(spec, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{type(spec).__name__}.{name} must be a number > 0; got {value!r}")


def check_choice(spec: ArtifactSpec, name: str, choices: tuple[str, ...]) -> None:
    """Raise ValueError unless the named attribute is one of ``choices``."""
    value = getattr(spec, name)
    if value not in choices:
        raise ValueError(f"{type(spec).__name__}.{name} must be one of {list(choices)}; got {value!r}")


def ensure_changed(original: np.ndarray, corrupted: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Nudge masked pixels that ended up equal to ``original`` (e.g. two artifacts cancelling) by one grey level.

    Args:
        original: uint8 (H, W, 3) clean tile.
        corrupted: uint8 (H, W, 3) composed result; modified in place and returned.
        mask: bool (H, W) union of the artifact masks.

    Returns:
        ``corrupted``, now differing from ``original`` on every pixel of ``mask``.
    """
    stale = mask & (corrupted == original).all(-1)
    if stale.any():
        values = original[stale].astype(np.int16) - 1  # one level darker, or lighter for black channels
        values[values < 0] = 1
        corrupted[stale] = values.astype(np.uint8)
    return corrupted
