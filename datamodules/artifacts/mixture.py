"""Mixture of artifact types: draws how many and which artifacts to stack on a tile, composes them, unions masks."""

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from datamodules.artifacts.base import ArtifactSpec, check_image, ensure_changed
from datamodules.artifacts.registry import ARTIFACT_TYPES, DEFAULT_TYPES, spec_class

_CONFIG_KEYS = ("types", "weights", "min_artifacts", "max_artifacts", "params")


@dataclasses.dataclass
class SynthesisResult:
    """Output of :class:`ArtifactSynthesizer`.

    Attributes:
        corrupted: uint8 (H, W, 3) RGB tile with the artifacts.
        mask: bool (H, W), True exactly where ``corrupted`` differs from the clean input (union of all artifacts).
        types: names of the artifacts applied, in the order they were composed.
        masks: bool (H, W) mask of each applied artifact, aligned with ``types`` (they may overlap).
    """

    corrupted: np.ndarray
    mask: np.ndarray
    types: list[str]
    masks: list[np.ndarray]


class ArtifactSynthesizer:
    """Seeded random mixture of artifact types.

    Each call draws ``n`` uniformly in ``[min_artifacts, max_artifacts]``, then ``n`` types with replacement
    according to ``weights``, and composes them in physical stacking order (stain, fold, ink, thread, debris, bubble,
    blur: staining happens in the tissue, foreign matter lies on it, a bubble sits under the coverslip and focus loss
    affects everything), each on the output of the previous one.

    Args:
        types: artifact type names to draw from (keys of ``ARTIFACT_TYPES``), no duplicates; default
            ``DEFAULT_TYPES`` (every synthetic type; the real-outline ``pen`` type is held out).
        weights: relative probability of each type (aligned with ``types``); None = uniform.
        min_artifacts: fewest artifacts per tile (0 allows clean tiles).
        max_artifacts: most artifacts per tile.
        params: per-type parameter overrides, e.g. ``{"fold": {"width": [10, 25]}}``; unspecified parameters keep
            the spec defaults.

    Raises:
        ValueError: for an unknown type (listing the valid ones), bad weights or counts, or bad parameters.
    """

    def __init__(
        self,
        types: Sequence[str] = DEFAULT_TYPES,
        weights: Sequence[float] | None = None,
        min_artifacts: int = 1,
        max_artifacts: int = 2,
        params: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> None:
        if isinstance(types, str) or not types:
            raise ValueError(f"types must be a non-empty list of artifact names from {sorted(ARTIFACT_TYPES)}")
        types = tuple(types)
        for name in types:
            spec_class(name)
        if len(set(types)) != len(types):
            raise ValueError(f"types must not repeat a name (use weights instead); got {list(types)}")
        if weights is not None:
            weights = tuple(float(w) for w in weights)
            if len(weights) != len(types) or min(weights) < 0 or sum(weights) <= 0:
                raise ValueError(
                    f"weights must be {len(types)} non-negative numbers (one per type in {list(types)}) with a "
                    f"positive sum; got {list(weights)}"
                )
        counts_are_ints = all(isinstance(n, int) and not isinstance(n, bool) for n in (min_artifacts, max_artifacts))
        if not (counts_are_ints and 0 <= min_artifacts <= max_artifacts and max_artifacts >= 1):
            raise ValueError(
                f"need integers 0 <= min_artifacts <= max_artifacts, max_artifacts >= 1; got "
                f"min_artifacts={min_artifacts!r}, max_artifacts={max_artifacts!r}"
            )
        params = dict(params or {})
        for name in params:
            spec_class(name)
            if name not in types:
                raise ValueError(f"params given for artifact type {name!r}, which is not in types {list(types)}")
        self.types = types
        self.weights = weights
        self.min_artifacts = min_artifacts
        self.max_artifacts = max_artifacts
        self.specs: dict[str, ArtifactSpec] = {name: _build_spec(name, params.get(name) or {}) for name in types}
        total = np.asarray(weights if weights is not None else [1.0] * len(types), dtype=np.float64)
        self._probabilities = total / total.sum()

    def sample_types(self, rng: np.random.Generator) -> list[str]:
        """Draw the artifact names for one tile, sorted into physical stacking order."""
        count = int(rng.integers(self.min_artifacts, self.max_artifacts + 1))
        picks = rng.choice(len(self.types), size=count, replace=True, p=self._probabilities)
        return sorted((self.types[i] for i in picks), key=lambda name: self.specs[name].layer)

    def __call__(self, image: np.ndarray, rng: np.random.Generator | int) -> SynthesisResult:
        """Corrupt a clean tile with a random mixture of artifacts.

        Args:
            image: uint8 (H, W, 3) RGB clean tile; never modified.
            rng: ``np.random.Generator`` (or an int seed); the same state gives byte-identical results.

        Returns:
            :class:`SynthesisResult` whose ``mask`` is True exactly where ``corrupted != image``.
        """
        image = check_image(image)
        rng = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
        names = self.sample_types(rng)
        corrupted, union, masks = image.copy(), np.zeros(image.shape[:2], bool), []
        for name in names:
            corrupted, mask = self.specs[name].apply(corrupted, rng)
            masks.append(mask)
            union |= mask
        # A later artifact can return a pixel to its clean value: restore the "mask == changed" guarantee.
        corrupted = ensure_changed(image, corrupted, union)
        return SynthesisResult(corrupted=corrupted, mask=union, types=names, masks=masks)

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> "ArtifactSynthesizer":
        """Build from a plain dict (e.g. a YAML section).

        Args:
            config: keys ``types``, ``weights``, ``min_artifacts``, ``max_artifacts``, ``params`` (all optional).

        Raises:
            ValueError: for an unknown key, listing the valid ones.
        """
        unknown = sorted(set(config) - set(_CONFIG_KEYS))
        if unknown:
            raise ValueError(f"unknown artifact synthesizer config key(s) {unknown}; valid keys: {list(_CONFIG_KEYS)}")
        return cls(**dict(config))

    def to_config(self) -> dict[str, Any]:
        """Plain-dict description (lists, numbers, strings) with every parameter spelled out.

        ``from_config`` of it rebuilds an identical synthesizer.
        """
        return {
            "types": list(self.types),
            "weights": None if self.weights is None else list(self.weights),
            "min_artifacts": self.min_artifacts,
            "max_artifacts": self.max_artifacts,
            "params": {name: spec.to_config() for name, spec in self.specs.items()},
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(types={list(self.types)}, weights={self.weights}, "
            f"min_artifacts={self.min_artifacts}, max_artifacts={self.max_artifacts})"
        )


def _build_spec(name: str, params: Mapping[str, Any]) -> ArtifactSpec:
    """Instantiate the spec of type ``name`` with ``params``; unknown parameter names give a ValueError."""
    cls = spec_class(name)
    valid = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(valid))
    if unknown:
        raise ValueError(f"unknown parameter(s) {unknown} for artifact type {name!r}; valid parameters: {valid}")
    return cls(**params)
