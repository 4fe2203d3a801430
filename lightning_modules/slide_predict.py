"""Slide restoration through Lightning's predict loop, so ``--devices N`` / ``--num-nodes`` use DDP like training.

Each dataset item is one fixed batch of the :class:`~lightning_modules.components.slide_restore.TilePlan`, so every
rank restores whole plan batches with the same per-batch generator as a single process would: the stored tiles, and
hence OUT.tif, do not depend on the number of processes. Rank 0 prepares the tile store (manifest, ``--force``) in
``setup`` before the others look at it; a :class:`TileStoreWriter` writes each restored tile as soon as its batch is
done, so a killed job resumes from the store.
"""

import warnings
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from torch.utils.data import DataLoader, Dataset

from lightning_modules.components.slide_restore import TilePlan, read_tiles, restore_tiles
from lightning_modules.components.slide_store import TileStore


class SlideTileDataset(Dataset):
    """Plan batches read from the slide: item ``k`` is :func:`read_tiles` of ``batches[k]``."""

    def __init__(self, source, mask, plan: TilePlan, batches: list[tuple[int, ...]]) -> None:
        self.source, self.mask, self.grid, self.batches = source, mask, plan.grid, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, k: int) -> dict[str, torch.Tensor]:
        return read_tiles(self.source, self.mask, self.grid, self.batches[k])


class SlideTileDataModule(L.LightningDataModule):
    """Serves the plan batches not yet in the tile store; rank 0 prepares the store first.

    Args:
        source: The slide (pickles without its OpenSlide handle, so DataLoader workers reopen it).
        mask: The artifact mask.
        plan: The tile plan.
        store: The tile store.
        force: Clear a store made with other settings.
        num_workers: DataLoader workers reading tiles.
    """

    def __init__(self, source, mask, plan: TilePlan, store: TileStore, *, force: bool, num_workers: int = 0) -> None:
        super().__init__()
        self.source, self.mask, self.plan, self.store = source, mask, plan, store
        self.force, self.num_workers = force, num_workers
        self.todo: list[tuple[int, ...]] = []

    def setup(self, stage: str) -> None:
        """Rank 0 writes the manifest (clearing with ``force``); every rank then lists the unfinished batches."""
        if self.trainer.is_global_zero:
            self.store.prepare(force=self.force)
        self.trainer.strategy.barrier("slide-tile-store")
        done = self.store.done()
        self.todo = [b for b in self.plan.batches() if not all(i in done for i in b)]

    def predict_dataloader(self) -> DataLoader:
        """Batches of the plan (``batch_size=None``: the dataset yields whole batches)."""
        dataset = SlideTileDataset(self.source, self.mask, self.plan, self.todo)
        return DataLoader(dataset, batch_size=None, shuffle=False, num_workers=self.num_workers)


class SlideRestoreModule(L.LightningModule):
    """Wraps a restorer for ``predict``; returns uint8 tiles and their grid indices.

    Args:
        restorer: Any registered restorer (moved to the rank's device when it is an ``nn.Module``).
        seed: Run seed (batch generators derive from it and the batch's first tile index).
        overrides: Sampler overrides for pipeline restorers.
    """

    def __init__(self, restorer, seed: int, overrides: dict | None = None) -> None:
        super().__init__()
        self.restorer, self.seed, self.overrides = restorer, seed, overrides or {}

    def predict_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> dict:
        """Restore one plan batch: ``{"index": long (B,), "tiles": uint8 numpy (B, T, T, 3)}``."""
        return {"index": batch["index"].cpu(), "tiles": restore_tiles(self.restorer, batch, self.seed, self.overrides)}


class TileStoreWriter(BasePredictionWriter):
    """Writes every restored tile of a batch into the tile store, cropped to its window."""

    def __init__(self, store: TileStore, plan: TilePlan) -> None:
        super().__init__(write_interval="batch")
        self.store, self.grid = store, plan.grid
        self.written = 0

    def write_on_batch_end(
        self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx
    ) -> None:
        """Store the batch's tiles (atomic per tile)."""
        for i, rgb in zip(prediction["index"].tolist(), prediction["tiles"], strict=True):
            _, _, w, h = self.grid.box(i)
            self.store.write(i, rgb[:h, :w])
            self.written += 1


def predict_tiles(
    restorer,
    source,
    mask,
    plan: TilePlan,
    store: TileStore,
    *,
    seed: int,
    overrides: dict,
    accelerator: str,
    devices: int,
    num_nodes: int,
    force: bool,
    progress: bool,
    num_workers: int = 0,
    root: Path | None = None,
) -> tuple[bool, int]:
    """Restore the unfinished plan batches on ``devices`` x ``num_nodes`` processes (DDP when more than one).

    Returns:
        (whether this process is global rank 0, tiles written by this process).
    """
    writer = TileStoreWriter(store, plan)
    trainer = L.Trainer(
        accelerator=accelerator,
        devices=devices,
        num_nodes=num_nodes,
        strategy="ddp" if devices * num_nodes > 1 else "auto",
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=progress,
        callbacks=[writer],
        default_root_dir=str(root) if root else None,
    )
    data = SlideTileDataModule(source, mask, plan, store, force=force, num_workers=num_workers)
    warnings.filterwarnings("ignore", message=".*infer the batch indices.*")  # items are whole batches, by design
    trainer.predict(SlideRestoreModule(restorer, seed, overrides), datamodule=data, return_predictions=False)
    trainer.strategy.barrier("slide-tiles-done")
    return trainer.is_global_zero, writer.written
