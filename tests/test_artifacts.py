"""Artifact synthesis: exact masks, determinism, validation, configs, albumentations wrapper, coverage, realism."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from datamodules.artifacts import (
    ARTIFACT_TYPES,
    DEFAULT_TYPES,
    ArtifactSpec,
    ArtifactSynthesizer,
    ArtifactTransform,
    SynthesisResult,
)
from datamodules.artifacts.base import commit_change, ensure_changed
from datamodules.artifacts.optics import od_to_rgb, rgb_to_od

TYPES = sorted(ARTIFACT_TYPES)
SEEDS = (0, 1, 2)


def _check_exact(clean: np.ndarray, corrupted: np.ndarray, mask: np.ndarray) -> None:
    """The library's central guarantee: mask == changed pixels, and everything else is untouched."""
    assert corrupted.dtype == np.uint8 and corrupted.shape == clean.shape
    assert mask.dtype == bool and mask.shape == clean.shape[:2]
    assert np.array_equal(mask, (corrupted != clean).any(-1))
    assert np.array_equal(corrupted[~mask], clean[~mask])
    assert mask.any()


def test_registry_has_the_contract_names():
    assert set(ARTIFACT_TYPES) == {"fold", "ink", "bubble", "blur", "thread", "debris", "stain", "pen"}
    assert set(DEFAULT_TYPES) == set(ARTIFACT_TYPES) - {"pen"}, "the real-outline type is held out of training"
    assert ArtifactSynthesizer().types == DEFAULT_TYPES
    for name, cls in ARTIFACT_TYPES.items():
        assert issubclass(cls, ArtifactSpec) and cls.name == name


@pytest.mark.parametrize("name", TYPES)
def test_mask_is_exactly_the_changed_pixels(name, he_tiles):
    spec = ARTIFACT_TYPES[name]()
    for seed in SEEDS:
        for clean in he_tiles[seed::3]:
            before = clean.copy()
            corrupted, mask = spec.apply(clean, np.random.default_rng(seed))
            assert np.array_equal(clean, before), "input was mutated"
            _check_exact(clean, corrupted, mask)


@pytest.mark.parametrize("name", TYPES)
def test_deterministic_under_seed(name, he_tile):
    spec = ARTIFACT_TYPES[name]()
    a = spec.apply(he_tile, np.random.default_rng(5))
    b = spec.apply(he_tile, np.random.default_rng(5))
    c = spec.apply(he_tile, np.random.default_rng(6))
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert a[0].tobytes() != c[0].tobytes()


@pytest.mark.parametrize("name", TYPES)
@pytest.mark.parametrize("shape", [(64, 64), (97, 130), (300, 211), (16, 40)])
def test_any_tile_size(name, shape, he_templates):
    clean = he_templates[1][: shape[0], : shape[1]].copy()
    corrupted, mask = ARTIFACT_TYPES[name]().apply(clean, np.random.default_rng(3))
    _check_exact(clean, corrupted, mask)


@pytest.mark.parametrize("name", TYPES)
def test_coverage_in_documented_range(name, he_tiles):
    spec = ARTIFACT_TYPES[name]()
    rng = np.random.default_rng(11)
    coverage = np.array([spec.apply(he_tiles[i % 8], rng)[1].mean() for i in range(24)])
    low, high = spec.coverage
    assert low <= coverage.min() and coverage.max() <= high, (coverage.min(), coverage.max())


@pytest.mark.parametrize("name", TYPES)
def test_flat_white_tile_still_gives_exact_nonempty_mask(name):
    """Blur or under-staining of blank glass changes nothing by itself: the one-level nudge keeps the mask whole."""
    clean = np.full((80, 80, 3), 255, np.uint8)
    corrupted, mask = ARTIFACT_TYPES[name]().apply(clean, np.random.default_rng(0))
    _check_exact(clean, corrupted, mask)


def _mean_od_change(clean, corrupted, mask):
    return float((rgb_to_od(corrupted[mask]) - rgb_to_od(clean[mask])).mean())


@pytest.mark.parametrize("name", ["fold", "ink", "thread", "debris", "pen"])
def test_absorbing_artifacts_darken(name, he_tiles):
    for seed, clean in enumerate(he_tiles[:4]):
        corrupted, mask = ARTIFACT_TYPES[name]().apply(clean, np.random.default_rng(seed))
        assert _mean_od_change(clean, corrupted, mask) > 0.05


def test_stain_modes_follow_their_direction(he_tiles):
    for clean in he_tiles[:4]:
        over = ARTIFACT_TYPES["stain"](mode="over").apply(clean, np.random.default_rng(0))
        under = ARTIFACT_TYPES["stain"](mode="under").apply(clean, np.random.default_rng(0))
        assert _mean_od_change(clean, *over) > 0.02
        assert _mean_od_change(clean, *under) < -0.02


def test_bubble_brightens_and_blur_smooths(he_tile):
    import cv2

    corrupted, mask = ARTIFACT_TYPES["bubble"](radius=40).apply(he_tile, np.random.default_rng(0))
    assert corrupted[mask].mean() > he_tile[mask].mean() + 5
    corrupted, mask = ARTIFACT_TYPES["blur"](sigma=3.0).apply(he_tile, np.random.default_rng(0))
    grey = [cv2.Laplacian(cv2.cvtColor(x, cv2.COLOR_RGB2GRAY), cv2.CV_32F) for x in (he_tile, corrupted)]
    inner = cv2.erode(mask.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    assert np.abs(grey[1][inner]).mean() < 0.5 * np.abs(grey[0][inner]).mean()


def test_fold_and_thread_are_border_touching_bands(he_tile):
    touching = 0
    for seed in range(10):
        _, mask = ARTIFACT_TYPES["fold"]().apply(he_tile, np.random.default_rng(seed))
        border = np.concatenate([mask[0], mask[-1], mask[:, 0], mask[:, -1]])
        touching += bool(border.any())
    assert touching >= 7


def test_commit_change_nudges_unchanged_pixels_and_respects_range():
    clean = np.zeros((20, 20, 3), np.uint8)
    clean[:, 10:] = 255
    support = np.zeros((20, 20), bool)
    support[5:15, 5:15] = True
    corrupted, mask = commit_change(clean, clean.astype(np.float32), support)
    _check_exact(clean, corrupted, mask)
    assert np.array_equal(mask, support)
    assert set(np.unique(corrupted[support])) == {1, 254}


def test_ensure_changed_fixes_cancelled_pixels():
    clean = np.full((8, 8, 3), 100, np.uint8)
    mask = np.zeros((8, 8), bool)
    mask[2:4, 2:4] = True
    corrupted = ensure_changed(clean, clean.copy(), mask)
    assert np.array_equal(mask, (corrupted != clean).any(-1))


def test_od_round_trip_is_exact():
    levels = np.arange(256, dtype=np.uint8)
    assert np.array_equal(np.rint(od_to_rgb(rgb_to_od(levels))).astype(np.uint8), levels)


def test_mixture_union_is_exact_against_the_clean_tile(he_tiles):
    synth = ArtifactSynthesizer(min_artifacts=2, max_artifacts=4)
    seen = set()
    for seed in range(12):
        clean = he_tiles[seed % 8]
        res = synth(clean, np.random.default_rng(seed))
        assert isinstance(res, SynthesisResult)
        _check_exact(clean, res.corrupted, res.mask)
        assert 2 <= len(res.types) <= 4 and len(res.masks) == len(res.types)
        assert np.array_equal(np.logical_or.reduce(res.masks), res.mask)
        layers = [ARTIFACT_TYPES[t].layer for t in res.types]
        assert layers == sorted(layers)
        seen.update(res.types)
    assert len(seen) >= 5


def test_mixture_deterministic_and_respects_types_and_weights(he_tile):
    synth = ArtifactSynthesizer(types=("ink", "debris"), weights=(1.0, 0.0), min_artifacts=1, max_artifacts=1)
    a, b = synth(he_tile, np.random.default_rng(4)), synth(he_tile, 4)
    assert a.corrupted.tobytes() == b.corrupted.tobytes() and a.types == b.types == ["ink"]
    assert synth(he_tile, np.random.default_rng(5)).corrupted.tobytes() != a.corrupted.tobytes()


def test_mixture_may_leave_tile_clean_when_min_is_zero(he_tile):
    synth = ArtifactSynthesizer(types=("blur",), min_artifacts=0, max_artifacts=1)
    results = [synth(he_tile, np.random.default_rng(s)) for s in range(12)]
    clean = [r for r in results if not r.types]
    assert clean and all(not r.mask.any() and np.array_equal(r.corrupted, he_tile) for r in clean)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"width": (-1.0, 5.0)}, "FoldSpec.width"),
        ({"width": (30.0, 10.0)}, "FoldSpec.width"),
        ({"width": "wide"}, "FoldSpec.width"),
        ({"count": (1.5, 2)}, "FoldSpec.count"),
        ({"touch_border": 1.5}, "FoldSpec.touch_border"),
        ({"edge_softness": 0}, "FoldSpec.edge_softness"),
    ],
)
def test_spec_validation_names_the_bad_parameter(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ARTIFACT_TYPES["fold"](**kwargs)


def test_other_spec_validation():
    with pytest.raises(ValueError, match="purple"):
        ARTIFACT_TYPES["ink"](colors=["purple"])
    with pytest.raises(ValueError, match="mode"):
        ARTIFACT_TYPES["stain"](mode="sideways")
    assert ARTIFACT_TYPES["ink"](colors=[[10, 200, 30], "red"]).colors == ((10.0, 200.0, 30.0), "red")
    assert ARTIFACT_TYPES["fold"](width=12).width == (12.0, 12.0)
    assert ARTIFACT_TYPES["fold"](width=[10, 20]).width == (10.0, 20.0)


def test_image_validation():
    spec = ARTIFACT_TYPES["blur"]()
    with pytest.raises(ValueError, match="uint8"):
        spec.apply(np.zeros((64, 64, 3), np.float32), np.random.default_rng(0))
    with pytest.raises(ValueError, match="uint8"):
        spec.apply(np.zeros((64, 64), np.uint8), np.random.default_rng(0))
    with pytest.raises(ValueError, match=">= 16"):
        spec.apply(np.zeros((8, 64, 3), np.uint8), np.random.default_rng(0))


def test_synthesizer_validation_lists_valid_names():
    with pytest.raises(ValueError, match="smudge") as info:
        ArtifactSynthesizer(types=("fold", "smudge"))
    for name in ARTIFACT_TYPES:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="wdth"):
        ArtifactSynthesizer(types=("fold",), params={"fold": {"wdth": 3}})
    with pytest.raises(ValueError, match="not in types"):
        ArtifactSynthesizer(types=("fold",), params={"ink": {}})
    with pytest.raises(ValueError, match="weights"):
        ArtifactSynthesizer(types=("fold", "ink"), weights=(1.0,))
    with pytest.raises(ValueError, match="min_artifacts"):
        ArtifactSynthesizer(min_artifacts=3, max_artifacts=2)
    with pytest.raises(ValueError, match="valid keys"):
        ArtifactSynthesizer.from_config({"kinds": ["fold"]})


def test_config_round_trip(he_tile):
    config = {
        "types": ["fold", "ink", "stain"],
        "weights": [2, 1, 1],
        "min_artifacts": 1,
        "max_artifacts": 3,
        "params": {"fold": {"width": [12, 20]}, "ink": {"colors": ["green", [10, 20, 200]]}},
    }
    synth = ArtifactSynthesizer.from_config(config)
    assert synth.specs["fold"].width == (12.0, 20.0)
    dumped = synth.to_config()
    rebuilt = ArtifactSynthesizer.from_config(dumped)
    assert rebuilt.to_config() == dumped and rebuilt.specs == synth.specs
    assert dumped["params"]["fold"]["width"] == [12.0, 20.0]
    a, b = synth(he_tile, np.random.default_rng(1)), rebuilt(he_tile, np.random.default_rng(1))
    assert a.corrupted.tobytes() == b.corrupted.tobytes()


def test_albumentations_compose_with_flip(he_tile):
    import albumentations as A

    synth = ArtifactSynthesizer(types=("fold", "ink"))

    def run(seed):
        pipeline = A.Compose([A.HorizontalFlip(p=1.0), ArtifactTransform(synth)], seed=seed)
        return pipeline(image=he_tile, mask=np.ones(he_tile.shape[:2], np.uint8))

    out, again, other = run(3), run(3), run(4)
    flipped = he_tile[:, ::-1]
    assert out["mask"].dtype == np.uint8 and set(np.unique(out["mask"])) == {0, 1}
    assert np.array_equal(out["mask"].astype(bool), (out["image"] != flipped).any(-1))
    assert out["image"].tobytes() == again["image"].tobytes()
    assert out["image"].tobytes() != other["image"].tobytes()


def test_albumentations_p_zero_rng_arg_and_missing_mask(he_tile):
    import albumentations as A

    synth = ArtifactSynthesizer(types=("debris",))
    skipped = A.Compose([ArtifactTransform(synth, p=0.0)], seed=0)(image=he_tile, mask=np.ones((256, 256), np.uint8))
    assert np.array_equal(skipped["image"], he_tile) and not skipped["mask"].any()
    first = A.Compose([ArtifactTransform(synth, rng=np.random.default_rng(9))])(image=he_tile)
    second = A.Compose([ArtifactTransform(synth, rng=np.random.default_rng(9))])(image=he_tile)
    assert "mask" in first and np.array_equal(first["mask"].astype(bool), (first["image"] != he_tile).any(-1))
    assert first["image"].tobytes() == second["image"].tobytes()
    assert ArtifactTransform(synth.to_config()).synthesizer.to_config() == synth.to_config()


def test_core_imports_without_torch_or_lightning():
    code = (
        "import sys; import datamodules.artifacts as a; a.ArtifactSynthesizer(); "
        "assert 'torch' not in sys.modules and 'lightning' not in sys.modules, sorted(sys.modules)"
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root, env={"NO_ALBUMENTATIONS_UPDATE": "1"})


def test_pen_marks_take_real_outlines_and_colours(he_tile):
    from datamodules.artifacts.real_shapes import pen_colors_od, shape_masks

    masks = shape_masks()
    assert len(masks) == 4 and all(m.dtype == bool and m.any() for m in masks)
    colors = pen_colors_od()
    assert set(colors) == {"green", "red", "black"}
    assert colors["green"][0] > colors["green"][1], "green ink absorbs red light most"
    assert colors["red"][1] > colors["red"][0], "red ink absorbs green light most"
    corrupted, mask = ARTIFACT_TYPES["pen"](colors=("green",)).apply(he_tile, np.random.default_rng(0))
    od = rgb_to_od(corrupted[mask]) - rgb_to_od(he_tile[mask])
    assert od[:, 0].mean() > od[:, 1].mean()
    with pytest.raises(ValueError, match="colors"):
        ARTIFACT_TYPES["pen"](colors=("purple",))
