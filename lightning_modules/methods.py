"""The method table: every restoration method by name, what it needs and where its code lives.

:data:`METHODS` maps each command-line method name to a :class:`MethodSpec`. Factories are named by a dotted path
(``"package.module:function"``) and imported only when the method is built, so reading the table (``--help``,
argument checks, :func:`available_restorers`) imports no implementation. Build a method with
``build_restorer("name", model=..., device=..., precision=...)``; factories ignore keyword arguments they do not use,
so one call site can build every method.

Third-party methods are added with ``@register_restorer("name")`` on a factory ``f(**kwargs) -> Restorer``, which
writes to the same table. This module imports nothing of the suite at import time.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from lightning_modules.components.restorer import Restorer


@dataclass(frozen=True)
class MethodSpec:
    """One restoration method.

    Attributes:
        factory: ``"module:function"`` building the restorer (imported when the method is built), or the factory
            itself for methods added with :func:`register_restorer`.
        needs_model: The method loads a model folder (``--model``).
        takes_sampler: Its restorer accepts ``SamplerConfig`` overrides (``--sampler`` files, ``--steps``, ...).
        export: The ``experiments.export`` kind that writes its model folder, or None.
        benchmark: ``"module:Class"`` of its bench in ``experiments/benchmarking/methods.py``, or None.
        summary: One line describing the method.
    """

    factory: str | Callable[..., Restorer]
    needs_model: bool
    takes_sampler: bool
    export: str | None = None
    benchmark: str | None = None
    summary: str = ""


_BENCH = "experiments.benchmarking.methods"

METHODS: dict[str, MethodSpec] = {
    "identity": MethodSpec(
        "lightning_modules.baselines.classical:_identity",
        needs_model=False,
        takes_sampler=False,
        summary="the corrupted tile unchanged (the do-nothing reference)",
    ),
    "telea": MethodSpec(
        "lightning_modules.baselines.classical:_telea",
        needs_model=False,
        takes_sampler=False,
        summary="OpenCV fast-marching inpainting (Telea 2004) of the artifact region",
    ),
    "ns": MethodSpec(
        "lightning_modules.baselines.classical:_ns",
        needs_model=False,
        takes_sampler=False,
        summary="OpenCV Navier-Stokes inpainting (Bertalmio et al. 2001) of the artifact region",
    ),
    "latent": MethodSpec(
        "lightning_modules.components.pipeline:_latent",
        needs_model=True,
        takes_sampler=True,
        export="latent",
        benchmark=f"{_BENCH}:LatentBench",
        summary="the latent pipeline in --model, RePaint preset (the paper's method)",
    ),
    "latent-conditional": MethodSpec(
        "lightning_modules.components.pipeline:_latent_conditional",
        needs_model=True,
        takes_sampler=True,
        export="conditional",
        benchmark=f"{_BENCH}:ConditionalBench",
        summary="the mask-conditioned latent restorer (docs/METHOD.md section 9)",
    ),
    "latent-reference": MethodSpec(
        "lightning_modules.components.pipeline:_latent_reference",
        needs_model=True,
        takes_sampler=True,
        export="latent",
        summary="a latent pipeline with the authors' reference preset (no paste-back)",
    ),
    "artifusion": MethodSpec(
        "lightning_modules.components.artifusion:build_artifusion_restorer",
        needs_model=True,
        takes_sampler=True,
        export="artifusion",
        benchmark=f"{_BENCH}:ArtiFusionBench",
        summary="the pixel-space ArtiFusion baseline (MICCAI 2023)",
    ),
    "cyclegan": MethodSpec(
        "lightning_modules.baselines.cyclegan:_cyclegan",
        needs_model=True,
        takes_sampler=False,
        export="cyclegan",
        benchmark=f"{_BENCH}:CycleGANBench",
        summary="whole-tile CycleGAN translation (artifact -> clean generator)",
    ),
}


def register_restorer(
    name: str, *, needs_model: bool | None = None, takes_sampler: bool = False, summary: str = ""
) -> Callable:
    """Decorator adding a third-party restorer factory to :data:`METHODS` under ``name``.

    Args:
        name: Method name; must not be in the table yet.
        needs_model: Whether it loads ``--model``; by default, whether the factory has a ``model`` parameter.
        takes_sampler: Whether its restorer accepts sampler overrides.
        summary: One line describing it.

    Raises:
        ValueError: ``name`` is already in the table (raised when the factory is decorated).
    """

    def wrap(factory: Callable) -> Callable:
        if name in METHODS:
            raise ValueError(f"restorer {name!r} is already registered")
        model = "model" in inspect.signature(factory).parameters if needs_model is None else needs_model
        METHODS[name] = MethodSpec(factory, needs_model=model, takes_sampler=takes_sampler, summary=summary)
        return factory

    return wrap


def method_spec(name: str) -> MethodSpec:
    """The table entry of ``name``; unknown names raise ValueError listing the available ones."""
    if name not in METHODS:
        raise ValueError(f"unknown restoration method {name!r}; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]


def resolve(path: str) -> Any:
    """Import ``"package.module:attribute"`` and return the attribute (ImportError or AttributeError when broken)."""
    module, sep, attr = path.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{path!r} is not of the form 'package.module:attribute'")
    return getattr(importlib.import_module(module), attr)


def load_factory(name: str) -> Callable[..., Restorer]:
    """The factory of method ``name``, importing its module now.

    Raises:
        ValueError: Unknown method.
        ImportError: Its factory path does not import; the one-line message names the method and the path.
    """
    factory = method_spec(name).factory
    if callable(factory):
        return factory
    try:
        return resolve(factory)
    except (ImportError, AttributeError, ValueError) as err:
        why = " ".join(str(err).split()) or type(err).__name__
        raise ImportError(f"method {name!r}: cannot load its factory {factory!r} ({why})") from err


def build_restorer(name: str, **kwargs: Any) -> Restorer:
    """Build method ``name`` (``model=``, ``device=``, ``precision=``...); unknown names list the available ones."""
    return load_factory(name)(**kwargs)


def available_restorers() -> list[str]:
    """Names of every method in the table, sorted."""
    return sorted(METHODS)
