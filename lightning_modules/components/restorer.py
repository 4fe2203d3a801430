"""The restorer interface every method implements, and the small helpers its callers share.

A restorer maps a batch of corrupted tiles and artifact masks to restored tiles::

    restored = restorer.restore(corrupted, artifact_mask, generator=g)   # (B, 3, H, W) in [-1, 1]

with ``corrupted`` float (B, 3, H, W) in [-1, 1] and ``artifact_mask`` float (B, 1, H, W), 1 = artifact. ``nfe`` is
the number of network evaluations per tile (0 for classical methods), reported next to timings. A restorer with
``takes_sampler`` True also takes :class:`SamplerConfig` overrides as keyword arguments of ``restore`` and has
``make_sampler(**overrides)``; callers ask :func:`takes_sampler` rather than probing for methods.

Methods are named in the method table, ``lightning_modules/methods.py`` (``build_restorer``, ``available_restorers``,
``register_restorer``). This module imports no implementation.
"""

from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class Restorer(Protocol):
    """What every restoration method implements.

    Attributes:
        name: Method name used in reports.
        nfe: Network evaluations of the last ``restore`` per tile (0 for classical methods).
        takes_sampler: Whether ``restore`` accepts :class:`SamplerConfig` overrides (``num_steps=...``,
            ``preset=...``, ``scheduler=...``) and ``make_sampler(**overrides)`` returns the sampler they give
            (True for ``RestorationPipeline``; False for the classical methods and CycleGAN).
    """

    name: str
    nfe: int
    takes_sampler: bool

    def restore(
        self, corrupted: torch.Tensor, artifact_mask: torch.Tensor, *, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Restore a batch: (B, 3, H, W) in [-1, 1] and (B, 1, H, W) in {0, 1} -> (B, 3, H, W) in [-1, 1]."""
        ...


def takes_sampler(restorer: Any) -> bool:
    """Whether ``restorer`` takes sampler overrides (its ``takes_sampler``; False for objects without one)."""
    return bool(getattr(restorer, "takes_sampler", False))


def __getattr__(name: str) -> Any:
    """Keep ``from lightning_modules.components.restorer import register_restorer`` working for plugins."""
    if name in ("available_restorers", "build_restorer", "register_restorer"):
        import lightning_modules.methods

        return getattr(lightning_modules.methods, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def parse_method_specs(spec: str, default_model=None) -> dict:
    """``"identity,latent,artifusion=DIR"`` -> ``{name: model folder or default_model}``.

    A method listed as ``NAME=DIR`` gets its own model folder; a bare name gets ``default_model`` (the CLI's
    ``--model``), which only model-based methods use.
    """
    from pathlib import Path

    methods: dict = {}
    for item in (m.strip() for m in spec.split(",")):
        if not item:
            continue
        name, sep, folder = item.partition("=")
        if name in methods:
            raise ValueError(f"method {name!r} is listed twice in {spec!r}")
        methods[name] = Path(folder) if sep else default_model
    return methods


def check_batch(corrupted: torch.Tensor, artifact_mask: torch.Tensor) -> None:
    """Validate a restorer's inputs; raises ValueError naming the bad shape or range."""
    if corrupted.ndim != 4 or corrupted.shape[1] != 3:
        raise ValueError(f"corrupted must be (B, 3, H, W), got {tuple(corrupted.shape)}")
    if artifact_mask.shape != (corrupted.shape[0], 1, *corrupted.shape[2:]):
        raise ValueError(
            f"artifact_mask must be (B, 1, H, W) = {(corrupted.shape[0], 1, *corrupted.shape[2:])}, "
            f"got {tuple(artifact_mask.shape)}"
        )
