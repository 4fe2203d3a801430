"""The optimiser/scheduler wiring every recipe shares: injected factories, scheduler stepped per optimiser step."""

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn


def configure_step_optimizers(
    params: Iterable[nn.Parameter], optimizer_factory: Callable, lr_scheduler_factory: Callable | None
) -> Any:
    """Build the optimiser from ``params`` and, if given, an LR scheduler stepped every optimiser step.

    Args:
        params: The parameters to optimise (only the trained network's: frozen parts stay out).
        optimizer_factory: LightningCLI's ``OptimizerCallable`` (``params -> Optimizer``).
        lr_scheduler_factory: ``LRSchedulerCallable`` (``optimizer -> scheduler``) or None.

    Returns:
        What ``LightningModule.configure_optimizers`` returns: the optimiser, or a dict with the scheduler.
    """
    optimizer = optimizer_factory(params)
    if lr_scheduler_factory is None:
        return optimizer
    scheduler = lr_scheduler_factory(optimizer)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


class WarmupCosine(torch.optim.lr_scheduler.LambdaLR):
    """Linear warm-up, then cosine decay to ``final_fraction`` of the base learning rate at ``total_steps``.

    Short CPU schedules gain most of their last decibels from the decay (docs/VAE.md). Step it every optimiser step
    (``configure_step_optimizers`` does); past ``total_steps`` the rate stays at the final value.

    Args:
        optimizer: The optimiser.
        total_steps: Optimiser steps of the whole run (the trainer's ``max_steps``).
        warmup_steps: Steps of the linear warm-up from ``1 / warmup_steps`` of the base rate.
        final_fraction: Rate at the end as a fraction of the base rate.

    Raises:
        ValueError: For non-positive ``total_steps``, negative ``warmup_steps`` or a fraction outside ``[0, 1]``.
    """

    def __init__(
        self, optimizer: torch.optim.Optimizer, total_steps: int, warmup_steps: int = 50, final_fraction: float = 0.05
    ) -> None:
        if total_steps < 1 or warmup_steps < 0 or not 0.0 <= final_fraction <= 1.0:
            raise ValueError(
                f"need total_steps >= 1, warmup_steps >= 0, 0 <= final_fraction <= 1; got "
                f"{total_steps}, {warmup_steps}, {final_fraction}"
            )
        self.total_steps, self.warmup_steps, self.final_fraction = total_steps, warmup_steps, final_fraction
        super().__init__(optimizer, self.factor)

    def factor(self, step: int) -> float:
        """Multiplier of the base rate after ``step`` optimiser steps."""
        warm = min(1.0, (step + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        progress = min(1.0, step / self.total_steps)
        return warm * (self.final_fraction + (1 - self.final_fraction) * 0.5 * (1 + math.cos(math.pi * progress)))
