"""What every DataModule of the suite shares: the per-device batch derived from a global one, and the loaders.

Batch sizes in configs are GLOBAL (the batch one optimiser step sees over all devices), so a run on 1 or 8 GPUs
trains the same recipe; ``setup`` divides by the trainer's world size and refuses a batch that does not divide.
Training loaders draw their order from :class:`~datamodules.datasets.EpochIndexSampler` (a permutation seeded by the
base seed and the epoch, the same on every rank before Lightning's distributed sampler splits it), drop the last
partial batch when there is at least one full one, and evaluation loaders keep the dataset order.
"""

import lightning as L
from torch.utils.data import DataLoader, Dataset

from datamodules.datasets import EpochIndexSampler


def per_device_batch_size(global_batch: int, world_size: int) -> int:
    """Split a global batch over devices; raises when it does not divide."""
    if global_batch < 1:
        raise ValueError(f"batch_size must be >= 1, got {global_batch}")
    if global_batch % world_size:
        raise ValueError(
            f"global batch_size {global_batch} is not divisible by the {world_size} devices; "
            f"use a multiple of {world_size} (e.g. {world_size * max(1, global_batch // world_size)})"
        )
    return global_batch // world_size


class SuiteDataModule(L.LightningDataModule):
    """Base of the suite's DataModules: per-device batch sizes and the one way loaders are built.

    Subclasses call :meth:`set_batch_sizes` from ``setup`` (and may before, for a trainer-less default) and return
    :meth:`loader` from their ``*_dataloader`` hooks.

    Attributes:
        batch_size_per_device: Training batch on one device.
        eval_batch_size_per_device: Validation/test batch on one device.
    """

    batch_size_per_device: int
    eval_batch_size_per_device: int

    def world_size(self) -> int:
        """Devices of the attached trainer (1 without one)."""
        return self.trainer.world_size if self.trainer is not None else 1

    def set_batch_sizes(self, batch_size: int, eval_batch_size: int | None = None) -> None:
        """Per-device sizes from the GLOBAL ``batch_size`` (and ``eval_batch_size``, default ``batch_size``).

        Raises:
            ValueError: A size below 1, or one the world size does not divide.
        """
        world = self.world_size()
        self.batch_size_per_device = per_device_batch_size(batch_size, world)
        self.eval_batch_size_per_device = per_device_batch_size(eval_batch_size or batch_size, world)

    def loader(self, dataset: Dataset, *, train: bool, seed: int, num_workers: int) -> DataLoader:
        """A train loader (seeded epoch order, partial last batch dropped) or an evaluation one (dataset order).

        The last partial training batch is dropped only when the dataset holds at least one full batch.
        """
        batch = self.batch_size_per_device if train else self.eval_batch_size_per_device
        return DataLoader(
            dataset,
            batch_size=batch,
            sampler=EpochIndexSampler(len(dataset), seed=seed) if train else None,
            shuffle=False,
            drop_last=train and len(dataset) >= batch,
            num_workers=num_workers,
            persistent_workers=False,
        )
