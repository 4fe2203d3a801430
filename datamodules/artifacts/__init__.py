"""Artifact synthesis for H&E tiles: seeded, typed artifact specs with exact masks, a mixture, an albumentations step.

Pure NumPy/OpenCV (no torch, no Lightning). Images are uint8 (H, W, 3) RGB, masks bool (H, W) with True = artifact,
and ``mask`` is always exactly the set of pixels that differ from the clean input. See ``docs/ARTIFACTS.md``.

``ArtifactTransform`` is imported lazily (albumentations pulls in torch), so the synthesis core stays light.

Example::

    import numpy as np
    from datamodules.artifacts import ARTIFACT_TYPES, ArtifactSynthesizer

    corrupted, mask = ARTIFACT_TYPES["fold"](width=(10, 25)).apply(tile, np.random.default_rng(0))
    result = ArtifactSynthesizer(types=("fold", "ink", "thread"), max_artifacts=2)(tile, np.random.default_rng(0))
"""

from datamodules.artifacts.base import ArtifactSpec
from datamodules.artifacts.foreign import DebrisSpec, InkSpec, ThreadSpec
from datamodules.artifacts.mixture import ArtifactSynthesizer, SynthesisResult
from datamodules.artifacts.real_shapes import PenMarkSpec
from datamodules.artifacts.registry import ARTIFACT_TYPES, DEFAULT_TYPES
from datamodules.artifacts.tissue import BlurSpec, BubbleSpec, FoldSpec, StainSpec

__all__ = [
    "ARTIFACT_TYPES",
    "DEFAULT_TYPES",
    "ArtifactSpec",
    "ArtifactSynthesizer",
    "ArtifactTransform",
    "BlurSpec",
    "BubbleSpec",
    "DebrisSpec",
    "FoldSpec",
    "InkSpec",
    "PenMarkSpec",
    "StainSpec",
    "SynthesisResult",
    "ThreadSpec",
]


def __getattr__(name: str):
    """Lazy import of :class:`ArtifactTransform` (PEP 562)."""
    if name == "ArtifactTransform":
        from datamodules.artifacts.albumentations import ArtifactTransform

        return ArtifactTransform
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
