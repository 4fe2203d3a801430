"""Registry of artifact types: name -> spec class."""

from datamodules.artifacts.base import ArtifactSpec
from datamodules.artifacts.foreign import DebrisSpec, InkSpec, ThreadSpec
from datamodules.artifacts.real_shapes import PenMarkSpec
from datamodules.artifacts.tissue import BlurSpec, BubbleSpec, FoldSpec, StainSpec

ARTIFACT_TYPES: dict[str, type[ArtifactSpec]] = {
    spec.name: spec
    for spec in (FoldSpec, InkSpec, BubbleSpec, BlurSpec, ThreadSpec, DebrisSpec, StainSpec, PenMarkSpec)
}
"""Every artifact type by name: fold, ink, bubble, blur, thread, debris, stain, pen."""

DEFAULT_TYPES: tuple[str, ...] = ("fold", "ink", "bubble", "blur", "thread", "debris", "stain")
"""The synthetic types every mixture and evaluation set uses by default. ``pen`` (real HistoQC outlines) is left out
so that models never train on it and it stays a held-out check of unseen artifact shapes."""


def spec_class(name: str) -> type[ArtifactSpec]:
    """Look up an artifact type by name.

    Raises:
        ValueError: for an unknown name, listing the valid ones.
    """
    if name not in ARTIFACT_TYPES:
        raise ValueError(f"unknown artifact type {name!r}; valid types: {sorted(ARTIFACT_TYPES)}")
    return ARTIFACT_TYPES[name]
