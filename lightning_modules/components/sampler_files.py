"""Sampler settings files (``experiments/configs/sampler/*.yaml``): load, validate and apply them.

A file holds :class:`~lightning_modules.components.regional_sampler.SamplerConfig` fields, optionally
``scheduler`` (the sampling scheduler: ``ddpm``, ``ddim`` or ``dpmsolver++``) and ``base`` (a preset name)::

    # Ablation row: 4 sampling steps.
    num_steps: 4

Without ``base`` the file only changes the keys it names and the pipeline keeps its own stored settings for the
rest; with ``base: repaint`` every field starts from that preset's defaults. A ``preset`` key means the same as
``base``. Single-field overrides from the command line (``--steps``, ``--sampler-set KEY=VALUE``) win over the file.

The result is expressed as the keyword arguments of ``RestorationPipeline.make_sampler`` / ``restore``
(``preset``, ``scheduler`` and fields), so every command passes it on the way it passes its other overrides.
This module imports no Lightning.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lightning_modules.components.regional_sampler import SamplerConfig
from lightning_modules.components.schedulers import scheduler_names

SAMPLER_DIR = Path(__file__).resolve().parents[2] / "experiments" / "configs" / "sampler"
"""The bundled sampler files (one per preset and per sampler ablation row)."""

EXTRA_KEYS = ("base", "scheduler")


def field_names() -> tuple[str, ...]:
    """Every :class:`SamplerConfig` field name, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(SamplerConfig))


def allowed_keys() -> tuple[str, ...]:
    """Top-level keys a sampler file may hold."""
    return (*EXTRA_KEYS, *field_names())


@dataclass(frozen=True)
class SamplerSpec:
    """The validated content of a sampler file.

    Attributes:
        base: Preset whose settings the file starts from; ``None`` keeps the pipeline's stored settings.
        scheduler: Sampling scheduler name; ``None`` keeps the pipeline's.
        overrides: :class:`SamplerConfig` fields to set (never ``preset``, never a ``None`` value).
    """

    base: str | None = None
    scheduler: str | None = None
    overrides: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable form, for recording in outputs."""
        return {"base": self.base, "scheduler": self.scheduler, "overrides": dict(self.overrides)}


def load_sampler_file(path: str | Path) -> SamplerSpec:
    """Read and validate a sampler file.

    Args:
        path: A YAML file with the keys of :func:`allowed_keys`.

    Returns:
        The file's :class:`SamplerSpec`.

    Raises:
        ValueError: The file is missing or unreadable, is not valid YAML, is not a mapping, or holds an unknown key
            or a bad value; the one-line message names the file.
    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"sampler file {path}: cannot read it ({getattr(err, 'strerror', None) or err})") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where is not None else ""
        problem = getattr(err, "problem", None) or type(err).__name__
        raise ValueError(f"sampler file {path}: invalid YAML{at} ({problem})") from None
    return spec_from_dict({} if data is None else data, source=f"sampler file {path}")


def spec_from_dict(data: Any, *, source: str = "sampler settings") -> SamplerSpec:
    """Validate a mapping read from a sampler file.

    Args:
        data: The parsed YAML.
        source: What to name in error messages (``"sampler file PATH"``).

    Raises:
        ValueError: Not a mapping, an unknown key, or a bad value.
    """
    if not isinstance(data, Mapping):
        raise ValueError(f"{source}: expected a mapping of sampler settings, got {type(data).__name__}")
    data = dict(data)
    _check_keys(data, allowed_keys(), source)
    base, preset = data.pop("base", None), data.pop("preset", None)
    if base is not None and preset is not None and base != preset:
        raise ValueError(f"{source}: base {base!r} and preset {preset!r} disagree; keep one of them")
    base = base if base is not None else preset
    scheduler = data.pop("scheduler", None)
    if scheduler is not None and scheduler not in scheduler_names():
        raise ValueError(f"{source}: unknown scheduler {scheduler!r}; expected one of {', '.join(scheduler_names())}")
    check_overrides(data, source=source, base=base)
    return SamplerSpec(base=base, scheduler=scheduler, overrides=data)


def _check_keys(data: Mapping[str, Any], allowed: Iterable[str], source: str) -> None:
    """Raise ValueError naming the first key of ``data`` that is not in ``allowed``, and listing the allowed ones."""
    allowed = tuple(allowed)
    unknown = [k for k in data if k not in allowed]
    if unknown:
        raise ValueError(f"{source}: unknown key {unknown[0]!r}; allowed keys: {', '.join(allowed)}")


def check_overrides(overrides: Mapping[str, Any], *, source: str, base: str | None = None) -> SamplerConfig:
    """Validate field overrides by building a :class:`SamplerConfig` from a preset with them.

    Args:
        overrides: :class:`SamplerConfig` fields (``preset`` excluded).
        source: What to name in error messages.
        base: Preset to build from (default ``repaint``).

    Returns:
        The config built.

    Raises:
        ValueError: An unknown field, a ``None`` value, a non-boolean for a boolean field, or a value the
            config refuses.
    """
    _check_keys(overrides, [n for n in field_names() if n != "preset"], source)
    for key, value in overrides.items():
        if value is None:
            raise ValueError(f"{source}: {key} is null; leave it out to keep the pipeline's setting")
        if _field_type(key) == "bool" and not isinstance(value, bool):
            raise ValueError(f"{source}: {key} must be true or false, got {value!r}")
    try:
        return SamplerConfig.from_preset(base or "repaint", **overrides)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {' '.join(str(err).split())}") from None


def _field_type(name: str) -> str:
    """The annotation of a :class:`SamplerConfig` field as written in the source."""
    (f,) = (f for f in dataclasses.fields(SamplerConfig) if f.name == name)
    return f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))


def parse_sampler_sets(items: Iterable[str] | None, *, flag: str = "--sampler-set") -> dict[str, Any]:
    """``["num_steps=4", "paste_back=false"]`` -> ``{"num_steps": 4, "paste_back": False}`` (YAML values).

    Raises:
        ValueError: An item without ``=``, a key given twice, an unknown field, or a bad value.
    """
    out: dict[str, Any] = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"{flag} expects KEY=VALUE (e.g. {flag} feather=4), got {item!r}")
        if key in out:
            raise ValueError(f"{flag} sets {key} twice; give each field once")
        try:
            out[key] = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError:
            raise ValueError(f"{flag} {item}: the value is not valid YAML") from None
    if "preset" in out:
        raise ValueError(f"{flag} preset=...: use --preset (or base: in a sampler file) to switch presets")
    check_overrides(out, source=flag)
    return out


def merge_cli_overrides(flags: Mapping[str, Any], sets: Mapping[str, Any]) -> dict[str, Any]:
    """Combine the single-field flags (``{"num_steps": args.steps, ...}``) with ``--sampler-set`` fields.

    ``None`` flags are dropped; a field both set by a flag and by ``--sampler-set`` with another value is an error.

    Raises:
        ValueError: A field given twice with different values.
    """
    out = {k: v for k, v in flags.items() if v is not None}
    for key, value in sets.items():
        if key in out and out[key] != value:
            raise ValueError(f"--sampler-set {key}={value!r} contradicts the {key} flag ({out[key]!r}); pass one")
        out[key] = value
    return out


def sampler_kwargs(spec: SamplerSpec | None, overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The effective ``make_sampler`` / ``restore`` keyword arguments of a file and command-line overrides.

    Args:
        spec: The sampler file's content, or ``None`` (only ``overrides`` then, as before files existed).
        overrides: Command-line values that win over the file: ``preset`` (replaces the file's ``base``),
            ``scheduler`` and :class:`SamplerConfig` fields; ``None`` values are ignored.

    Returns:
        ``{"preset": ..., "scheduler": ..., field: value}`` with only the keys that are set. With a base preset
        every field of that preset is included, so the result does not depend on the pipeline's stored settings.
    """
    cli = {k: v for k, v in (overrides or {}).items() if v is not None}
    if spec is None:
        return cli
    base = cli.pop("preset", spec.base)
    out: dict[str, Any] = {}
    if base is not None:
        out = {k: v for k, v in SamplerConfig.from_preset(base).to_dict().items() if v is not None}
    if spec.scheduler is not None:
        out["scheduler"] = spec.scheduler
    return {**out, **spec.overrides, **cli}


def apply_sampler(
    config: SamplerConfig, spec: SamplerSpec | None, overrides: Mapping[str, Any] | None = None
) -> tuple[SamplerConfig, str | None]:
    """Apply a sampler file and command-line overrides to a pipeline's stored settings.

    Follows ``RestorationPipeline.make_sampler``: a ``preset`` other than the stored one starts from that preset's
    defaults, then the fields are replaced.

    Args:
        config: The stored settings (not modified).
        spec: The sampler file's content, or ``None``.
        overrides: Command-line values that win over the file (see :func:`sampler_kwargs`).

    Returns:
        The new settings and the scheduler name (``None``: keep the pipeline's).

    Raises:
        ValueError: The combination is refused by :class:`SamplerConfig`.
    """
    kwargs = sampler_kwargs(spec, overrides)
    preset, scheduler = kwargs.pop("preset", None), kwargs.pop("scheduler", None)
    if preset is not None and preset != config.preset:
        config = SamplerConfig.from_preset(preset)
    return dataclasses.replace(config, **kwargs), scheduler


def sampler_record(path: str | Path | None, spec: SamplerSpec | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """What outputs record about the sampler: the file, its content and the effective overrides."""
    return {
        "file": None if path is None else str(path),
        "spec": None if spec is None else spec.to_dict(),
        "overrides": dict(kwargs),
    }
