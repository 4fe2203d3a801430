"""Lightning hooks shared by the diffusion recipes: EMA updates on real optimiser steps, the denoiser to sample with.

A module using :class:`DiffusionEMAHooks` sets ``self.denoiser`` (the trained network) and ``self.denoiser_ema`` (a
``DenoiserEMA`` or None) in its constructor and calls ``super().__init__()`` first.
"""

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightning_modules.components.denoisers import predict


class DiffusionEMAHooks:
    """Mixin for LightningModules: EMA bookkeeping that is correct under gradient accumulation and DDP."""

    _last_ema_step: int = 0

    def on_train_start(self) -> None:
        """Remember the (possibly restored) step so EMA updates only follow real optimiser steps."""
        self._last_ema_step = self.trainer.global_step

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Update the EMA on every rank, only when the optimiser stepped (correct under gradient accumulation).

        Every rank holds identical weights after the all-reduce, so the averages stay identical without collectives.
        """
        if self.denoiser_ema is None or self.trainer.global_step == self._last_ema_step:
            return
        self._last_ema_step = self.trainer.global_step
        self.denoiser_ema.update(self.denoiser)

    @property
    def sampling_network(self) -> nn.Module:
        """The denoiser to sample with or export: the EMA copy when EMA is on, the raw denoiser otherwise."""
        return self.denoiser_ema.module if self.denoiser_ema is not None else self.denoiser

    def sampling_denoiser(self) -> Callable[[Tensor, Tensor], Tensor]:
        """The :attr:`sampling_network` as the function the regional sampler calls.

        Returns:
            ``fn(x_t (B, C, h, w), t (int, 0-dim or (B,) tensor)) -> model output (B, C or 2C, h, w)``, run without
            gradients (2C when the network also predicts a variance).
        """
        net = self.sampling_network

        @torch.no_grad()
        def fn(x_t: Tensor, t: Tensor | int) -> Tensor:
            t = torch.as_tensor(t, device=x_t.device)
            if t.ndim == 0:
                t = t.expand(x_t.shape[0])
            return predict(net, x_t, t)

        return fn
