"""Build diffusers noise schedulers by name from a DDPM training configuration.

The denoiser is trained once with a DDPM noise schedule (``num_train_timesteps``, ``beta_schedule``, ``beta_start``,
``beta_end``, ``prediction_type``, ...). At inference any scheduler sharing that forward process can drive the
reverse chain; :func:`build_scheduler` turns the training config (a plain dict, an OmegaConf mapping or an existing
scheduler's ``.config``) into a fresh DDPM, DDIM, DPM-Solver++ or UniPC scheduler, keeping only the keys the target
class accepts. The caller's mapping is never modified.

Example:
    >>> train = build_scheduler("ddpm", num_train_timesteps=1000, beta_schedule="scaled_linear",
    ...                         beta_start=0.00085, beta_end=0.012, clip_sample=False)
    >>> fast = build_scheduler("dpmsolver++", train.config)
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Mapping
from typing import Any, Literal

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

log = logging.getLogger(__name__)

SchedulerName = Literal["ddpm", "ddim", "dpmsolver++", "unipc"]

_CLASSES: dict[str, type[SchedulerMixin]] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpmsolver++": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}

# Keys forced per scheduler name (applied before the caller's overrides).
_FIXED: dict[str, dict[str, Any]] = {"dpmsolver++": {"algorithm_type": "dpmsolver++"}}


def scheduler_names() -> tuple[str, ...]:
    """Names accepted by :func:`build_scheduler`."""
    return tuple(_CLASSES)


def _accepted_keys(cls: type) -> set[str]:
    """Keyword arguments of ``cls.__init__`` (the scheduler's config keys)."""
    return {p for p in inspect.signature(cls.__init__).parameters if p != "self"}


def build_scheduler(name: SchedulerName, config: Mapping[str, Any] | None = None, **overrides: Any) -> SchedulerMixin:
    """Create a diffusers scheduler from a DDPM training configuration.

    Args:
        name: ``"ddpm"`` (ancestral DDPM, Ho et al. 2020), ``"ddim"`` (Song et al. 2021; deterministic with eta 0) or
            ``"dpmsolver++"`` (multistep DPM-Solver++, Lu et al. 2022) or ``"unipc"`` (multistep UniPC with its
            corrector, Zhao et al. 2023, NeurIPS, arXiv 2302.04867).
        config: training-time scheduler settings: a dict, an OmegaConf ``DictConfig`` or another scheduler's
            ``.config``. Keys the target class does not accept (e.g. DDPM's ``variance_type`` for DDIM) and
            diffusers' private keys (``_class_name``...) are dropped. Not modified.
        **overrides: settings that win over ``config``; every key must be accepted by the target class.

    Returns:
        A new scheduler instance (``set_timesteps`` not yet called).

    Raises:
        ValueError: unknown ``name`` or an override key the target scheduler does not accept.

    Notes:
        DPM-Solver++ always gets ``variance_type=None`` unless overridden: diffusers slices learned-variance outputs
        to 3 channels there, which is wrong for 4-channel latents, so :class:`RegionalSampler` drops the variance
        half of a 2C-channel output itself before calling ``step``.
    """
    if name not in _CLASSES:
        raise ValueError(f"unknown scheduler name {name!r}; expected one of {scheduler_names()}")
    cls = _CLASSES[name]
    accepted = _accepted_keys(cls)
    bad = sorted(k for k in overrides if k not in accepted)
    if bad:
        raise ValueError(f"scheduler {name!r} ({cls.__name__}) does not accept override(s) {bad}")

    source = dict(config.items()) if config is not None else {}
    kwargs = {k: v for k, v in source.items() if k in accepted}
    dropped = sorted(k for k in source if k not in accepted and not k.startswith("_"))
    if dropped:
        log.debug("build_scheduler(%r): ignoring config keys %s", name, dropped)
    if name == "dpmsolver++":
        kwargs.pop("variance_type", None)
    kwargs.update(_FIXED.get(name, {}))
    kwargs.update(overrides)
    return cls(**kwargs)
