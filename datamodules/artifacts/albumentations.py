"""Albumentations wrapper: artifact synthesis as a step of an ``A.Compose`` pipeline.

Example::

    import albumentations as A
    pipeline = A.Compose([A.HorizontalFlip(), ArtifactTransform(ArtifactSynthesizer())], seed=0)
    out = pipeline(image=clean)            # out["image"]: corrupted uint8 (H, W, 3); out["mask"]: uint8 (H, W) 0/1

Place it after the geometric transforms (so the artifacts are not flipped or warped with the tissue) and keep the
clean image yourself (e.g. run the geometric part first, then this transform) when you need clean/corrupted pairs.
"""

from collections.abc import Mapping
from typing import Any

import albumentations as A
import numpy as np

from datamodules.artifacts.mixture import ArtifactSynthesizer


class ArtifactTransform(A.DualTransform):
    """Corrupt ``image`` with an :class:`ArtifactSynthesizer` and put the artifact mask in ``mask``.

    Unlike most albumentations transforms, ``mask`` is *replaced* (not transformed): it becomes the uint8 (H, W)
    artifact mask, 1 exactly where the output image differs from the input image. With probability ``1 - p`` the
    image is passed through and the mask is all zeros, so ``mask`` always means "artifact pixels". If the call has
    no ``mask`` key, one is added. ``bboxes`` and ``keypoints`` pass through unchanged (artifacts move nothing).

    Randomness comes from ``rng`` when given, otherwise from albumentations' own per-transform generator, which
    ``A.Compose(..., seed=...)`` seeds: the same seed gives byte-identical outputs.

    Args:
        synthesizer: the artifact mixture, or its ``to_config()`` dict.
        p: probability of adding artifacts.
        rng: optional generator that overrides albumentations' seeding.
    """

    def __init__(
        self,
        synthesizer: ArtifactSynthesizer | Mapping[str, Any],
        p: float = 1.0,
        rng: np.random.Generator | None = None,
    ) -> None:
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"ArtifactTransform p must be in [0, 1]; got {p!r}")
        super().__init__(p=p)
        if isinstance(synthesizer, Mapping):
            synthesizer = ArtifactSynthesizer.from_config(synthesizer)
        if not isinstance(synthesizer, ArtifactSynthesizer):
            raise ValueError(f"synthesizer must be an ArtifactSynthesizer or its config dict; got {synthesizer!r}")
        self.synthesizer = synthesizer
        self.rng = rng

    @property
    def targets(self) -> dict[str, Any]:
        """Keys this transform handles: the image is corrupted, the mask replaced, geometry passed through."""
        return {
            "image": self.apply,
            "mask": self.apply_to_mask,
            "bboxes": self.apply_to_bboxes,
            "keypoints": self.apply_to_keypoints,
        }

    def should_apply(self, force_apply: bool = False) -> bool:
        """Always run, so that ``mask`` is always written; the ``p`` draw happens in the parameters."""
        return True

    def get_params_dependent_on_data(self, params: dict[str, Any], data: dict[str, Any]) -> dict[str, Any]:
        """Synthesise the artifacts for this call's image (the whole work happens here, once per call)."""
        if "image" not in data:
            raise ValueError("ArtifactTransform needs an 'image' target (a single uint8 (H, W, 3) RGB tile)")
        image = data["image"]
        rng = self.rng if self.rng is not None else self.random_generator
        if rng.random() >= self.p:
            return {"corrupted": image, "artifact_mask": np.zeros(image.shape[:2], np.uint8), "types": []}
        result = self.synthesizer(image, rng)
        return {"corrupted": result.corrupted, "artifact_mask": result.mask.astype(np.uint8), "types": result.types}

    def apply(self, img: np.ndarray, corrupted: np.ndarray, **params: Any) -> np.ndarray:
        """The corrupted image, uint8 (H, W, 3)."""
        return corrupted

    def apply_to_mask(self, mask: np.ndarray, artifact_mask: np.ndarray, **params: Any) -> np.ndarray:
        """The artifact mask, uint8 (H, W) in {0, 1} (the incoming mask is discarded)."""
        return artifact_mask

    def apply_to_bboxes(self, bboxes: np.ndarray, **params: Any) -> np.ndarray:
        """Unchanged: artifacts do not move anything."""
        return bboxes

    def apply_to_keypoints(self, keypoints: np.ndarray, **params: Any) -> np.ndarray:
        """Unchanged: artifacts do not move anything."""
        return keypoints

    def apply_with_params(self, params: dict[str, Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Apply, adding a ``mask`` entry when the caller passed none."""
        result = super().apply_with_params(params, *args, **kwargs)
        if "mask" not in result and "artifact_mask" in params:
            result["mask"] = params["artifact_mask"]
        return result

    def get_transform_init_args(self) -> dict[str, Any]:
        """Serialisable init arguments: the synthesizer as its config dict."""
        return {"synthesizer": self.synthesizer.to_config()}
