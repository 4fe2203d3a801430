"""Export the model being trained at fixed training wall-clock budgets (the learning curve's snapshots).

``TimedSnapshots(budgets=[300, 600, 1200], out=DIR)`` calls ``pl_module.export(DIR/t0300s, sampler=...,
image_size=...)`` the first time the training time passes each budget; the modules with an ``export`` of that shape
are ``LatentDiffusionModule``, ``ConditionalLatentDiffusionModule`` and ``PixelDiffusionModule``. The clock counts
training batches only: validation, the restoration check and the exports themselves are paused out, so a snapshot at
600 s means 600 s of optimisation on this machine whatever else the run does. When every budget is reached it stops
the run (``trainer.should_stop``). Rank 0 writes the exports; every rank keeps the same clock and stops together
(``should_stop`` is reduced across ranks by Lightning).
"""

import json
import logging
import time
from pathlib import Path

from lightning.pytorch import Callback, LightningModule, Trainer

from lightning_modules.components.regional_sampler import SamplerConfig

log = logging.getLogger(__name__)


class TimedSnapshots(Callback):
    """Export at training-time budgets, then stop.

    Args:
        budgets: Training seconds at which to export (increasing).
        out: Folder that receives one ``t{seconds:05d}s`` pipeline per budget and ``snapshots.json``.
        sampler: ``SamplerConfig`` fields of the exported pipelines (the module's ``sampler_defaults`` apply too).
        image_size: Tile edge stored in the pipelines.
        stop: Stop training after the last budget.

    Raises:
        ValueError: For empty, non-positive or unsorted budgets.
    """

    def __init__(
        self, budgets: list[float], out: str, sampler: dict | None = None, image_size: int = 256, stop: bool = True
    ) -> None:
        super().__init__()
        if not budgets or any(b <= 0 for b in budgets) or list(budgets) != sorted(budgets):
            raise ValueError(f"budgets must be increasing positive seconds, got {budgets}")
        self.budgets, self.out, self.image_size, self.stop = [float(b) for b in budgets], Path(out), image_size, stop
        self.sampler = SamplerConfig.from_dict(sampler) if sampler else None
        self.trained = 0.0
        self.done: list[dict] = []
        self._batch_start: float | None = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch, batch_idx: int) -> None:
        """Start the clock of this batch."""
        self._batch_start = time.perf_counter()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs, batch, batch_idx: int) -> None:
        """Add the batch's time; export every budget it passed; stop after the last."""
        if self._batch_start is None:
            return
        self.trained += time.perf_counter() - self._batch_start
        self._batch_start = None
        while len(self.done) < len(self.budgets) and self.trained >= self.budgets[len(self.done)]:
            budget = self.budgets[len(self.done)]
            folder = self.out / f"t{int(budget):05d}s"
            if trainer.is_global_zero:
                pl_module.export(folder, sampler=self.sampler, image_size=self.image_size)
            self.done.append(
                {
                    "budget_s": budget,
                    "trained_s": round(self.trained, 1),
                    "global_step": int(trainer.global_step),
                    "path": str(folder),
                }
            )
            log.info("snapshot at %.0f s of training (step %d): %s", self.trained, trainer.global_step, folder)
            if trainer.is_global_zero:
                self.out.mkdir(parents=True, exist_ok=True)
                (self.out / "snapshots.json").write_text(json.dumps(self.done, indent=2))
        if self.stop and len(self.done) == len(self.budgets):
            trainer.should_stop = True
