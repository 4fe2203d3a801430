"""Settings of the pixel-space ArtiFusion baseline (MICCAI 2023, arXiv 2307.14262) and its `artifusion` restorer.

- Noise schedule: improved-diffusion's linear schedule (Nichol & Dhariwal 2021) for ``T`` training steps, whose betas
  run linearly from ``0.0001 * 1000 / T`` to ``0.02 * 1000 / T`` (the DDPM schedule rescaled so that ``T = 4000``
  destroys the signal as fast as 1000 DDPM steps), learned-range variance, no sample clipping, epsilon prediction.
- Sampler: RePaint (Lugmayr et al. 2022) with 250 respaced steps, jump length 10 and 10 resamples, i.e.
  ``250 + 24 * 9 * 10 = 2410`` network evaluations per tile (docs/METHOD.md section 5).

The restorer ``artifusion`` loads a pixel pipeline folder written by ``PixelDiffusionModule.export`` (or
:func:`pipeline.save_pipeline` without a VAE) and restores with its stored sampler settings, which callers may override
per call (e.g. ``num_steps=25, jump_n_sample=1`` for a CPU demo).

No ``lightning`` import here.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from lightning_modules.components.pipeline import RestorationPipeline
from lightning_modules.components.regional_sampler import SamplerConfig

log = logging.getLogger(__name__)

PAPER_TIMESTEPS = 4000


def artifusion_scheduler_config(num_train_timesteps: int = PAPER_TIMESTEPS) -> dict[str, Any]:
    """``DDPMScheduler`` keyword arguments of improved-diffusion's rescaled linear schedule with learned-range variance.

    Args:
        num_train_timesteps: ``T`` (4000 in ArtiFusion).

    Returns:
        A fresh dict: ``beta_start = 1e-4 * 1000 / T``, ``beta_end = 0.02 * 1000 / T``, ``beta_schedule="linear"``,
        ``variance_type="learned_range"``, ``prediction_type="epsilon"``, ``clip_sample=False``.

    Raises:
        ValueError: ``num_train_timesteps`` < 2.
    """
    if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be an int >= 2, got {num_train_timesteps!r}")
    scale = 1000.0 / num_train_timesteps
    return {
        "num_train_timesteps": num_train_timesteps,
        "beta_schedule": "linear",
        "beta_start": 0.0001 * scale,
        "beta_end": 0.02 * scale,
        "prediction_type": "epsilon",
        "variance_type": "learned_range",
        "clip_sample": False,
    }


PAPER_SCHEDULER: dict[str, Any] = artifusion_scheduler_config(PAPER_TIMESTEPS)


def paper_sampler_config(**overrides: Any) -> SamplerConfig:
    """ArtiFusion's RePaint sampler: 250 steps, jump length 10, 10 resamples (2410 network evaluations).

    Args:
        **overrides: :class:`SamplerConfig` fields to change (e.g. ``num_steps=25`` for a CPU demo).
    """
    return SamplerConfig.from_preset(
        "repaint", **{"num_steps": 250, "jump_length": 10, "jump_n_sample": 10, **overrides}
    )


def build_artifusion_restorer(
    *, model: str | Path | None = None, device: str = "cpu", precision: str = "fp32", **_: Any
) -> RestorationPipeline:
    """Restorer factory for the pixel-space ArtiFusion baseline.

    Args:
        model: A pixel pipeline folder (``PixelDiffusionModule.export``).
        device: Torch device.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` autocast.

    Returns:
        A :class:`RestorationPipeline` named ``"artifusion"``.

    Raises:
        ValueError: No ``model`` given, or the folder holds a latent (VAE) pipeline.
    """
    if model is None:
        raise ValueError("method 'artifusion' needs --model PIPELINE_DIR (a pixel pipeline from PixelDiffusionModule)")
    pipe = RestorationPipeline.from_pretrained(model, device=device, precision=precision, name="artifusion")
    if pipe.codec is not None:
        raise ValueError(f"{model} is a latent pipeline; method 'artifusion' needs a pixel pipeline (no vae/)")
    log.info("artifusion: %s, sampler %s", type(pipe.unet).__name__, pipe.sampler_config)
    return pipe


__all__ = [
    "PAPER_SCHEDULER",
    "PAPER_TIMESTEPS",
    "artifusion_scheduler_config",
    "build_artifusion_restorer",
    "paper_sampler_config",
]
