"""Albumentations pipelines for clean tiles (applied BEFORE artifact synthesis).

Geometric transforms (flips, 90-degree rotations) keep the tissue statistics exact; the photometric part is a mild
colour jitter (small hue/saturation/value and brightness/contrast changes), so the denoiser sees some of the stain
variability of real slides. albumentations' ``HEStain`` was tried and rejected as a default: its ``random_preset``
method swaps in another lab's stain matrix (mean channel shifts of up to 40 grey levels on real tiles), which is a
domain shift, not a mild jitter. Artifacts
are synthesised afterwards on the augmented clean tile, so the mask never needs to follow a geometric transform.

Seeding: albumentations keeps its own generators. Call ``transform.set_random_seed(seed)`` with a per-sample seed
before each call (``datasets.OnlineArtifactDataset`` does this) for deterministic augmentation.
"""

import os

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402


def clean_tile_augmentation(*, geometric: bool = True, stain: bool = True, stain_strength: float = 1.0) -> A.Compose:
    """Build the augmentation applied to clean uint8 RGB tiles.

    Args:
        geometric: Random horizontal/vertical flips and 90-degree rotations (the dihedral group of the square).
        stain: Mild colour jitter (hue +-4, saturation +-10, value +-5, brightness/contrast +-5 %).
        stain_strength: Scales the stain jitter ranges (1.0 = mild defaults; 0 disables it).

    Returns:
        An ``A.Compose`` mapping ``image`` uint8 (H, W, 3) to an augmented uint8 (H, W, 3) of the same size.
    """
    if stain_strength < 0:
        raise ValueError(f"stain_strength must be >= 0, got {stain_strength}")
    ops: list[A.BasicTransform] = []
    if geometric:
        ops += [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5), A.RandomRotate90(p=0.5)]
    if stain and stain_strength > 0:
        s = stain_strength
        ops += [
            A.HueSaturationValue(
                hue_shift_limit=round(4 * s), sat_shift_limit=round(10 * s), val_shift_limit=round(5 * s), p=0.8
            ),
            A.RandomBrightnessContrast(brightness_limit=0.05 * s, contrast_limit=0.05 * s, p=0.5),
        ]
    return A.Compose(ops)
