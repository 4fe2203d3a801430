"""KID realism score: which patches are compared, and that it separates real tissue from a blurry fill."""

import pytest
import torch

from lightning_modules.components.features import PooledFeatures
from lightning_modules.metrics.realism import artifact_group, artifact_patches, kid, patches_at
from tests.tiny_data import real_crops


def test_patches_are_the_artifact_covered_windows():
    images = torch.arange(2 * 3 * 128 * 128, dtype=torch.float32).reshape(2, 3, 128, 128) / 1e6 - 1
    masks = torch.zeros(2, 1, 128, 128)
    masks[1, :, 64:, 64:] = 1
    patches, index = artifact_patches(images, masks, size=64, stride=32, min_fraction=0.5)
    assert index.tolist() == [[1, 32, 64], [1, 64, 32], [1, 64, 64]], "windows at least half covered"
    assert torch.equal(patches[2], images[1, :, 64:, 64:])
    assert torch.equal(patches_at(images, index, 64), patches)
    assert patches_at(images, index[:0], 64).shape == (0, 3, 64, 64)
    with pytest.raises(ValueError, match="patch size"):
        artifact_patches(images[:, :, :32], masks[:, :, :32], size=64)


def test_groups():
    assert artifact_group(["ink", "stain"]) == "semi-transparent"
    assert artifact_group(["ink", "thread"]) == "occluding"
    assert artifact_group(["fold"]) == "occluding"


def test_kid_prefers_real_tissue_to_a_blurry_fill():
    real = real_crops(40)
    other = real_crops(80)[40:]
    blurred = torch.nn.functional.avg_pool2d(other, 9, 1, 4)
    feature = PooledFeatures()
    same = kid(other, real, feature=feature, subset_size=20, subsets=20)
    blurry = kid(blurred, real, feature=feature, subset_size=20, subsets=20)
    assert same["patches"] == 40 and blurry["kid"] > same["kid"]
    assert kid(real[:1], real, feature=feature)["kid"] != kid(real[:1], real, feature=feature)["kid"]  # NaN
