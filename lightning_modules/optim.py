"""The optimiser/scheduler wiring every recipe shares: injected factories, scheduler stepped per optimiser step."""

from collections.abc import Callable, Iterable
from typing import Any

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
