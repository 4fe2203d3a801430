"""Exponential moving average of a denoiser's weights, built on ``torch.optim.swa_utils.AveragedModel``.

Only the denoiser is averaged. The averaged copy is a plain submodule, so it is saved in the owner's ``state_dict``
together with ``n_averaged`` (a buffer of ``AveragedModel``): the update count survives checkpoints and resume. The
caller decides when to update (after real optimiser steps only, on every rank); this class does no collectives.

No ``lightning`` import here: this is a pure torch component.
"""

import copy
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.optim.swa_utils import AveragedModel


def ema_decay_at(decay: float, n_averaged: int, warmup: bool = True) -> float:
    """Decay used for the update after ``n_averaged`` updates.

    With warm-up the decay is ``min(decay, (1 + n) / (10 + n))`` (the default schedule of diffusers' ``EMAModel``):
    without it, a short run's average stays dominated by its first, barely trained weights (with decay 0.999 the
    weights of step 1 still carry 0.999**1000 = 37 % of the average after 1000 steps).
    """
    return min(decay, (1.0 + n_averaged) / (10.0 + n_averaged)) if warmup else decay


def _ema_multi_avg_fn(decay: float, warmup: bool) -> Callable:
    @torch.no_grad()
    def update(ema_params: list[Tensor], params: list[Tensor], num_averaged: Tensor) -> None:
        # AveragedModel groups tensors by dtype: floats are averaged; integer buffers (e.g. the Swin-UNet's relative
        # position index) are indices, not weights, so they follow the model.
        if ema_params[0].is_floating_point() or ema_params[0].is_complex():
            torch._foreach_lerp_(ema_params, params, 1.0 - ema_decay_at(decay, int(num_averaged), warmup))
        else:
            torch._foreach_copy_(ema_params, params)

    return update


class DenoiserEMA(nn.Module):
    """EMA weights ``ema <- d * ema + (1 - d) * model`` of a denoiser; the first update copies the model.

    The averaged copy has gradients off and stays in eval mode: it is only ever used for evaluation and sampling.

    Args:
        model: The denoiser to average (deep-copied; the original is not modified).
        decay: EMA decay in ``(0, 1)``; 0.9999 is the usual value for long runs, 0.999 suits short CPU runs.
        warmup: Ramp the decay as ``min(decay, (1 + n) / (10 + n))`` over the first updates (see
            :func:`ema_decay_at`); off = a constant decay.

    Raises:
        ValueError: If ``decay`` is not in ``(0, 1)``.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True) -> None:
        super().__init__()
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay, self.warmup = float(decay), bool(warmup)
        self.averaged = AveragedModel(
            copy.deepcopy(model), multi_avg_fn=_ema_multi_avg_fn(self.decay, self.warmup), use_buffers=True
        )
        self.averaged.requires_grad_(False)
        self.eval()

    def train(self, mode: bool = True) -> "DenoiserEMA":
        """Keep the averaged copy in eval mode whatever ``mode`` is asked for."""
        return super().train(False)

    @property
    def module(self) -> nn.Module:
        """The averaged denoiser (same class and call signature as the original)."""
        return self.averaged.module

    @property
    def n_averaged(self) -> int:
        """Number of updates so far (0 before the first, which copies the weights)."""
        return int(self.averaged.n_averaged.item())

    def update(self, model: nn.Module) -> None:
        """Fold the current weights (and buffers) of ``model`` into the average.

        Args:
            model: The trained denoiser, of the same architecture as the one given at construction.
        """
        self.averaged.update_parameters(model)

    def forward(self, *args, **kwargs) -> Tensor:
        """Call the averaged denoiser."""
        return self.averaged.module(*args, **kwargs)
