"""Mask conventions and morphology (lightning_modules/components/masks.py)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lightning_modules.components.masks import (
    artifact_to_keep,
    boundary_band,
    dilate,
    erode,
    feather,
    keep_to_artifact,
    to_latent_mask,
)


def _blank(size: int = 16) -> torch.Tensor:
    return torch.zeros(1, 1, size, size)


def test_maxpool_marks_any_artifact_pixel():
    mask = _blank()
    mask[0, 0, 5, 6] = 1  # bottom-right area of block (0, 0)
    mask[0, 0, 15, 8] = 1  # last row of block (1, 1)
    latent = to_latent_mask(mask, 8, "maxpool")
    assert latent.shape == (1, 1, 2, 2)
    assert latent[0, 0].tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_nearest_takes_top_left_pixel_and_misses_thin_lines():
    mask = _blank()
    mask[0, 0, 3, :] = 1  # thin horizontal line, not on a block's top row
    mask[0, 0, :, 13] = 1  # thin vertical line, not on a block's left column
    assert to_latent_mask(mask, 8, "nearest").sum() == 0  # stays "known" (the authors' behaviour)
    assert to_latent_mask(mask, 8, "maxpool")[0, 0].tolist() == [[1.0, 1.0], [0.0, 1.0]]
    mask[0, 0, 8, :] = 1  # on the top row of the second block row
    latent = to_latent_mask(mask, 8, "nearest")
    assert latent[0, 0].tolist() == [[0.0, 0.0], [1.0, 1.0]]
    assert torch.equal(latent, F.interpolate(mask, scale_factor=1 / 8, mode="nearest"))


def test_latent_mask_dilate_and_factor_one():
    mask = torch.zeros(2, 1, 32, 32)
    mask[1, 0, 16, 16] = 1
    latent = to_latent_mask(mask, 8, dilate=1)
    assert latent[0].sum() == 0
    assert latent[1, 0].tolist() == [[0, 0, 0, 0], [0, 1, 1, 1], [0, 1, 1, 1], [0, 1, 1, 1]]
    assert torch.equal(to_latent_mask(mask, 1), mask)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(factor=3), "not divisible by factor 3"),
        (dict(factor=0), "factor must be a positive int, got 0"),
        (dict(factor=8, mode="bilinear"), "'bilinear'"),
        (dict(factor=8, dilate=-1), "dilate must be a non-negative int, got -1"),
    ],
)
def test_latent_mask_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        to_latent_mask(_blank(), **kwargs)


def test_non_binary_and_badly_shaped_masks_raise():
    with pytest.raises(ValueError, match="0.5"):
        to_latent_mask(torch.full((1, 1, 8, 8), 0.5), 8)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        to_latent_mask(torch.zeros(1, 3, 8, 8), 8)


def test_dilate_erode_single_pixel_and_square():
    mask = _blank()
    mask[0, 0, 7, 7] = 1
    grown = dilate(mask, 1)
    assert grown.sum() == 9 and torch.all(grown[0, 0, 6:9, 6:9] == 1)
    assert torch.equal(erode(grown, 1), mask)
    assert erode(mask, 1).sum() == 0
    assert torch.equal(dilate(mask, 0), mask)


def test_erode_does_not_seam_at_image_border():
    full = torch.ones(1, 1, 8, 8)
    assert torch.equal(erode(full, 2), full)
    strip = torch.zeros(1, 1, 8, 8)
    strip[..., :, :3] = 1  # artifact band touching the left border
    eroded = erode(strip, 1)
    assert torch.all(eroded[..., :, :2] == 1) and eroded[..., :, 2:].sum() == 0


def test_boundary_band_counts_both_sides():
    mask = _blank()
    mask[0, 0, 5:11, 5:11] = 1  # 6 x 6 square
    band = boundary_band(mask, 1)
    assert band.sum() == 8 * 8 - 4 * 4
    assert band[0, 0, 7, 7] == 0 and band[0, 0, 4, 4] == 1 and band[0, 0, 5, 5] == 1 and band[0, 0, 3, 3] == 0
    assert boundary_band(mask, 0).sum() == 0


def test_keep_artifact_round_trip_numpy_and_torch():
    keep = np.full((8, 8), 255, np.uint8)
    keep[2:4, 3:6] = 0
    artifact = keep_to_artifact(keep)
    assert artifact.dtype == np.float32 and artifact.sum() == 6 and artifact[2, 3] == 1
    assert np.array_equal(artifact_to_keep(artifact), keep)
    mask = (torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.7).float()
    keep_t = artifact_to_keep(mask)
    assert keep_t.dtype == torch.uint8 and set(keep_t.unique().tolist()) <= {0, 255}
    assert torch.equal(keep_to_artifact(keep_t), mask)
    assert torch.equal(keep_to_artifact(1 - mask), mask)  # float keep mask on the 0..1 scale


def test_feather_range_and_profile():
    mask = _blank()
    mask[0, 0, 2:14, 2:14] = 1  # 12 x 12 square
    soft = feather(mask, 3)
    assert soft.min() >= 0 and soft.max() <= 1
    assert torch.all(soft[mask == 0] == 0)
    assert soft[0, 0, 2, 8] == pytest.approx(1 / 4)  # boundary artifact pixel
    assert soft[0, 0, 3, 8] == pytest.approx(2 / 4)
    assert soft[0, 0, 8, 8] == 1  # >= 4 pixels deep
    assert torch.equal(feather(mask, 0), mask)
    with pytest.raises(ValueError, match="radius must be a non-negative int, got -2"):
        feather(mask, -2)
