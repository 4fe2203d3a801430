"""Tiny LightningDataModules over real H&E for model and CLI tests (64x64 crops of the histoqc templates).

``TinyTileDataModule`` yields ``{"clean": (B, 3, 64, 64) in [-1, 1], "meta": {...}}``; ``TinyLatentDataModule`` yields
``{"latent": (B, 4, 8, 8), "meta": {...}}`` as a latent cache would (seeded Gaussian latents: enough to exercise the
training loop without an autoencoder).
"""

import cv2
import numpy as np
import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from tests.conftest import _site_file


def real_crops(n: int, size: int = 64) -> torch.Tensor:
    """``n`` real H&E crops from the four 500x500 templates, float ``(n, 3, size, size)`` in ``[-1, 1]``."""
    images = []
    for i in range(1, 5):
        bgr = cv2.imread(_site_file("histoqc", "data", "templates", f"template{i}.png"), cv2.IMREAD_COLOR)
        images.append(np.ascontiguousarray(bgr[:, :, ::-1]))
    crops = []
    step = (500 - size) // 4
    for k in range(n):
        image = images[k % 4]
        y, x = step * ((k // 4) % 5), step * ((k // 20 + k // 4) % 5)
        crops.append(image[y : y + size, x : x + size])
    array = np.stack(crops).astype(np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(0, 3, 1, 2).contiguous()


class _DictDataset(Dataset):
    def __init__(self, key: str, values: torch.Tensor, offset: int) -> None:
        self.key, self.values, self.offset = key, values, offset

    def __len__(self) -> int:
        return len(self.values)

    def __getitem__(self, index: int) -> dict:
        return {self.key: self.values[index], "meta": {"source": "histoqc-template", "index": self.offset + index}}


class TinyTileDataModule(LightningDataModule):
    """Real 64x64 H&E crops: ``n_train`` for training and ``n_val`` for validation.

    Args:
        batch_size: Batch size of both loaders.
        n_train: Number of training crops.
        n_val: Number of validation crops.
        size: Crop side in pixels (a multiple of 8).
    """

    def __init__(self, batch_size: int = 4, n_train: int = 8, n_val: int = 4, size: int = 64) -> None:
        super().__init__()
        self.batch_size, self.n_train, self.n_val, self.size = batch_size, n_train, n_val, size

    def _values(self) -> torch.Tensor:
        return real_crops(self.n_train + self.n_val, self.size)

    def _key(self) -> str:
        return "clean"

    def setup(self, stage: str) -> None:
        """Read the crops once."""
        values = self._values()
        self.train_set = _DictDataset(self._key(), values[: self.n_train], 0)
        self.val_set = _DictDataset(self._key(), values[self.n_train :], self.n_train)

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, num_workers=0)

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return DataLoader(self.val_set, batch_size=self.batch_size, shuffle=False, num_workers=0)


class TinyLatentDataModule(TinyTileDataModule):
    """Seeded Gaussian latents ``(4, size/8, size/8)`` standing in for a latent cache (``{"latent", "meta"}``)."""

    def _values(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(0)
        side = self.size // 8
        return torch.randn(self.n_train + self.n_val, 4, side, side, generator=generator)

    def _key(self) -> str:
        return "latent"


def write_tiny_pipeline(path, size: int = 64):
    """A random-weight latent pipeline folder (tiny UNet and VAE, repaint preset, 4 steps) for ``size`` px tiles."""
    import torch
    from diffusers import DDPMScheduler

    from lightning_modules.components.autoencoders import build_autoencoder
    from lightning_modules.components.denoisers import build_unet
    from lightning_modules.components.pipeline import save_pipeline
    from lightning_modules.components.regional_sampler import SamplerConfig
    from lightning_modules.latent_diffusion import PAPER_SCHEDULER

    torch.manual_seed(0)
    return save_pipeline(
        path,
        unet=build_unet("tiny", sample_size=size // 8),
        scheduler=DDPMScheduler(**PAPER_SCHEDULER),
        sampler=SamplerConfig.from_preset("repaint", num_steps=4, feather=2),
        vae=build_autoencoder("tiny"),
        image_size=size,
    )


def write_tiny_evalset(root, tiles, count: int, size: int = 64):
    """``count`` clean/corrupted/mask triplets (a darkened band per tile) from real uint8 tiles under ``root``."""
    from datamodules.imageio import write_image_atomic, write_mask_atomic

    for i, tile in enumerate(tiles[:count]):
        clean = tile[:size, :size]
        mask = np.zeros((size, size), bool)
        mask[8 + 4 * i : 30 + 4 * i, 10:50] = True
        corrupted = clean.copy()
        corrupted[mask] = (corrupted[mask] * 0.3).astype(np.uint8)
        write_image_atomic(root / "clean" / f"t{i}.png", clean)
        write_image_atomic(root / "corrupted" / f"t{i}.png", corrupted)
        write_mask_atomic(root / "masks" / f"t{i}.png", mask)
    return root
