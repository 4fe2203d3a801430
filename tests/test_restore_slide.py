"""Whole-slide restoration (`experiments.restore_slide`) on a 1024 x 1024 crop of the bundled SVS with painted ink.

The crop is written as a pyramidal TIFF with its 0.499 um/px resolution, ink is painted inside known polygons (the
truth mask), and the clean crop is kept as the truth image. Restoration uses the classical `telea` method where
pixels must move toward the truth, and a tiny random latent pipeline where only plumbing is checked (resume,
process count, manifests).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
import tifffile
import torch

from datamodules.datasets import to_tensor
from datamodules.pyramid import write_pyramid
from datamodules.slide_masks import PolygonMask, _edges, fill_polygon
from datamodules.slides import SlideInfo, TileGrid
from experiments import restore_slide
from lightning_modules.components.segmenters import build_segmenter, save_segmenter
from lightning_modules.components.slide_restore import SlideAssembler, TilePlan, tile_weights

ROOT = Path(__file__).resolve().parents[1]
MPP = 0.499
SIZE = 1024
# tiny-pipeline runs work on level 2 (256 x 256; the GeoJSON's level-0 coordinates are scaled by 1/4), 64 px tiles
TINY = ("--level", "2", "--tile", "64", "--overlap", "8", "--batch-size", "2")
SMALL = "small.geojson"  # polygons 0 and 2 only: fewer tiles for the tiny-pipeline runs
POLYGONS = [  # level-0 pixel coordinates (x, y) of the painted ink; they cross several tile borders
    [[100, 120], [420, 160], [380, 300], [90, 260]],
    [[520, 430], [560, 400], [950, 780], [910, 820]],
    [[200, 700], [300, 700], [300, 800], [200, 800]],
]


def write_tiff(path: Path, rgb: np.ndarray, mpp: float = MPP) -> None:
    """Pyramidal tiled TIFF as ENVIRONMENT.md describes (independent of the code under test)."""
    with tifffile.TiffWriter(path) as tw:
        level, k = rgb, 0
        while True:
            res = 1e4 / (mpp * 2**k)
            tw.write(
                level,
                tile=(256, 256),
                compression="zlib",
                photometric="rgb",
                resolution=(res, res),
                resolutionunit="CENTIMETER",
                subfiletype=1 if k else 0,
                metadata=None,
            )
            if max(level.shape[:2]) <= 256:
                break
            level, k = np.ascontiguousarray(level[::2, ::2]), k + 1


def read_level0(path: Path) -> np.ndarray:
    s = openslide.OpenSlide(str(path))
    w, h = s.level_dimensions[0]
    return np.asarray(s.read_region((0, 0), 0, (w, h)))[..., :3].copy()


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    return 10 * np.log10(255.0**2 / np.mean((a.astype(float) - b.astype(float)) ** 2))


@pytest.fixture(scope="module")
def case(tmp_path_factory, bundled_svs) -> dict:
    root = tmp_path_factory.mktemp("slide")
    s = openslide.OpenSlide(bundled_svs)
    clean = np.asarray(s.read_region((800, 600), 0, (SIZE, SIZE)))[..., :3].copy()
    truth = np.zeros((SIZE, SIZE), bool)
    for p in POLYGONS:
        truth |= fill_polygon(_edges([np.asarray(p, float)]), 0, 0, SIZE, SIZE)
    ink = clean.copy()
    ink[truth] = np.round(0.2 * ink[truth] + 0.8 * np.array([30.0, 60.0, 140.0])).astype(np.uint8)
    write_tiff(root / "ink.tif", ink)
    write_tiff(root / "clean.tif", clean)
    cv2.imwrite(str(root / "mask.png"), truth.astype(np.uint8) * 255)
    cv2.imwrite(str(root / "mask_half.png"), truth[::2, ::2].astype(np.uint8) * 255)
    cv2.imwrite(str(root / "mask_wide.png"), np.zeros((100, 300), np.uint8))
    features = [
        {
            "type": "Feature",
            "properties": {"classification": {"name": "Pen"}},
            "geometry": {"type": "Polygon", "coordinates": [p + [p[0]]]},
        }
        for p in POLYGONS
    ]
    (root / "ink.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    (root / "small.geojson").write_text(json.dumps(features[0::2]))  # a plain list of Features, as QuPath exports
    return {"root": root, "clean": clean, "ink": ink, "truth": truth}


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory) -> Path:
    from diffusers import DDPMScheduler

    from lightning_modules.components.autoencoders import build_autoencoder
    from lightning_modules.components.denoisers import build_unet
    from lightning_modules.components.pipeline import save_pipeline
    from lightning_modules.components.regional_sampler import SamplerConfig
    from lightning_modules.latent_diffusion import PAPER_SCHEDULER

    torch.manual_seed(0)
    return save_pipeline(
        tmp_path_factory.mktemp("pipe") / "pipeline",
        unet=build_unet("tiny", sample_size=8),
        scheduler=DDPMScheduler(**PAPER_SCHEDULER),
        vae=build_autoencoder("tiny"),
        image_size=64,
        sampler=SamplerConfig.from_preset("repaint", num_steps=2, feather=2),
    )


def run_cli(case: dict, out: Path, *extra: str, masks: str = "ink.geojson") -> dict:
    root = case["root"]
    masks = masks if masks == "auto" else str(root / masks)
    args = [
        "--slide",
        str(root / "ink.tif"),
        "--out",
        str(out),
        "--masks",
        masks,
        "--device",
        "cpu",
        "--no-progress",
        *extra,
    ]
    restore_slide.main(args)
    return json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}


def fails(capsys, argv: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as err:
        restore_slide.main(argv)
    assert err.value.code == 2
    text = capsys.readouterr().err
    assert message in text and text.count("\n") == 1, text


def test_telea_restores_only_the_mask_losslessly(case, tmp_path):
    out = tmp_path / "R.tif"
    report = run_cli(
        case,
        out,
        "--method",
        "telea",
        "--truth-mask",
        str(case["root"] / "mask.png"),
        "--truth-image",
        str(case["root"] / "clean.tif"),
    )
    s = openslide.OpenSlide(str(out))
    assert openslide.OpenSlide.detect_format(str(out)) == "generic-tiff"
    assert s.level_dimensions[0] == (SIZE, SIZE) and s.level_count == 3
    assert float(s.properties["openslide.mpp-x"]) == pytest.approx(MPP, rel=1e-4)
    restored, ink, truth = read_level0(out), case["ink"], case["truth"]
    assert np.array_equal(restored[~truth], ink[~truth]), "pixels outside the mask are byte-identical (zlib)"
    synthetic = cv2.imread(str(tmp_path / "R.mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    assert synthetic.shape == truth.shape and not (synthetic & ~truth).any()
    assert synthetic.sum() == report["synthetic_px"] and report["artifact_px"] == truth.sum()
    assert psnr(restored[truth], case["clean"][truth]) > psnr(ink[truth], case["clean"][truth]) + 3
    assert report["dice_vs_truth_mask"] == 1.0
    assert report["mpp"] == pytest.approx(MPP) and report["artifact_mm2"] == pytest.approx(truth.sum() * MPP**2 / 1e6)
    t = report["tiles"]
    assert t["grid"] == 25 and t["restored"] + t["flagged"] == t["read"] and t["restored_now"] == t["restored"]
    seams = report["truth_image"]
    assert seams["psnr_output_artifact"] > seams["psnr_input_artifact"]
    assert seams["psnr_output_band"] is not None and seams["psnr_output_interior"] is not None
    assert (tmp_path / "R.preview.png").stat().st_size > 0 and report["versions"]["openslide-python"]


def test_geojson_and_mask_images_agree(case, tmp_path):
    run_cli(case, tmp_path / "a.tif", "--method", "telea")
    run_cli(case, tmp_path / "b.tif", "--method", "telea", masks="mask.png")
    assert (tmp_path / "a.tif").read_bytes() == (tmp_path / "b.tif").read_bytes()
    assert (tmp_path / "a.mask.png").read_bytes() == (tmp_path / "b.mask.png").read_bytes()
    report = run_cli(
        case,
        tmp_path / "c.tif",
        "--method",
        "telea",
        "--truth-mask",
        str(case["root"] / "mask.png"),
        masks="mask_half.png",
    )  # a mask at half the resolution is scaled up
    assert 0.97 < report["dice_vs_truth_mask"] < 1.0


def test_blending_removes_tile_seams(case, tmp_path):
    common = (
        "--method",
        "telea",
        "--level",
        "1",
        "--tile",
        "128",
        "--max-artifact-fraction",
        "1",
        "--truth-image",
        str(case["root"] / "clean.tif"),
    )
    hard = run_cli(case, tmp_path / "hard.tif", *common, "--overlap", "0")
    soft = run_cli(case, tmp_path / "soft.tif", *common, "--overlap", "16")
    assert hard["seam_step_ratio"] > 5, "tiles inpainted independently step at their borders"
    assert soft["seam_step_ratio"] < 1.5, "raised-cosine blending inside the mask hides the borders"
    band, inner = soft["truth_image"]["psnr_output_band"], soft["truth_image"]["psnr_output_interior"]
    assert band > soft["truth_image"]["psnr_input_band"] + 2 and abs(band - inner) < 2


def test_flagged_tiles_stay_as_input(case, tmp_path):
    report = run_cli(case, tmp_path / "R.tif", "--method", "telea", "--max-artifact-fraction", "0.1")
    t = report["tiles"]
    assert t["flagged"] > 0 and t["restored"] > 0
    grid = TileGrid.build((SIZE, SIZE), 256, 32)
    restored = read_level0(tmp_path / "R.tif")
    kept = np.zeros((SIZE, SIZE), bool)
    for x, y, w, h in t["flagged_boxes_xywh"]:
        kept[y : y + h, x : x + w] = True
    for i in _restored_indices(tmp_path):  # areas a restored neighbour overlaps are blended, the rest is kept
        x, y, w, h = grid.box(i)
        kept[y : y + h, x : x + w] = False
    assert kept.any() and np.array_equal(restored[kept], case["ink"][kept]), "flagged-only areas are untouched"


def _restored_indices(out_dir: Path) -> set[int]:
    return {int(p.stem) for p in (out_dir / "R.tiles" / "tiles").glob("*.png")}


def test_latent_resume_is_byte_identical_and_manifest_guards(case, tmp_path, tiny_pipeline, capsys):
    args = ("--model", str(tiny_pipeline), *TINY, "--seed", "3")
    full = run_cli(case, tmp_path / "full.tif", *args, masks=SMALL)
    n = full["tiles"]["restored"]
    assert n >= 6 and full["seconds_per_restored_tile"] > 0 and full["shape"] == [256, 256]
    ink2 = np.asarray(openslide.OpenSlide(str(case["root"] / "ink.tif")).read_region((0, 0), 2, (256, 256)))[..., :3]
    synthetic = cv2.imread(str(tmp_path / "full.mask.png"), cv2.IMREAD_GRAYSCALE) > 0
    out = read_level0(tmp_path / "full.tif")
    assert out.shape == (256, 256, 3) and synthetic.sum() == full["artifact_px"] > 0
    assert np.array_equal(out[~synthetic], ink2[~synthetic]) and not np.array_equal(out[synthetic], ink2[synthetic])
    # interrupted after 4 tiles, then resumed
    assert run_cli(case, tmp_path / "part.tif", *args, "--max-tiles", "4", masks=SMALL) == {}
    assert "rerun to resume" in capsys.readouterr().out and not (tmp_path / "part.tif").exists()
    assert len(list((tmp_path / "part.tiles" / "tiles").glob("*.png"))) == 4
    resumed = run_cli(case, tmp_path / "part.tif", *args, masks=SMALL)
    assert resumed["tiles"]["resumed_from_store"] == 4 and resumed["tiles"]["restored_now"] == n - 4
    assert (tmp_path / "part.tif").read_bytes() == (tmp_path / "full.tif").read_bytes()
    # tiles lost from the store are redone, identically
    for p in sorted((tmp_path / "full.tiles" / "tiles").glob("*.png"))[1::3]:
        p.unlink()
    again = run_cli(case, tmp_path / "full.tif", *args, masks=SMALL)
    assert 0 < again["tiles"]["restored_now"] < n
    assert (tmp_path / "part.tif").read_bytes() == (tmp_path / "full.tif").read_bytes()
    # other settings: refused, unless --force
    argv = [
        "--slide",
        str(case["root"] / "ink.tif"),
        "--out",
        str(tmp_path / "full.tif"),
        "--masks",
        str(case["root"] / "small.geojson"),
        "--device",
        "cpu",
        "--no-progress",
        *args[:-1],
        "4",
    ]
    fails(capsys, argv, "other settings (seed: stored 3, now 4)")
    restore_slide.main(argv + ["--force", "--max-tiles", "2"])
    manifest = json.loads((tmp_path / "full.tiles" / "manifest.json").read_text())
    assert manifest["seed"] == 4 and len(list((tmp_path / "full.tiles" / "tiles").glob("*.png"))) == 2


def test_automatic_masks_from_an_exported_segmenter(case, tmp_path):
    torch.manual_seed(0)
    net = build_segmenter("tiny").eval()
    seg = save_segmenter(net, tmp_path / "segmenter")
    half = cv2.resize(case["ink"], (SIZE // 2, SIZE // 2), interpolation=cv2.INTER_AREA)
    threshold = float(torch.quantile(net.predict_proba(to_tensor(half)[None]).flatten(), 0.9))  # random net: ~10 %
    args = (
        "--method",
        "telea",
        "--mask-model",
        str(seg),
        "--mask-downsample",
        "2",
        "--mask-tile",
        "128",
        "--mask-threshold",
        str(threshold),
        "--truth-mask",
        str(case["root"] / "mask.png"),
        "--max-artifact-fraction",
        "1",
    )
    report = run_cli(case, tmp_path / "R.tif", *args, masks="auto")
    auto = report["mask"]["auto"]
    assert report["mask"]["kind"] == "auto" and auto["shape"] == [SIZE // 2, SIZE // 2] and auto["png_scale"] == 1
    assert 0 < auto["tiles_predicted"] <= auto["tiles"] == 25 and auto["threshold"] == threshold
    used = cv2.imread(str(tmp_path / "R.automask.png"), cv2.IMREAD_GRAYSCALE) > 0
    assert used.shape == (SIZE, SIZE) and used.sum() == report["artifact_px"] > 0
    truth = case["truth"]
    dice = 2 * (used & truth).sum() / (used.sum() + truth.sum())
    assert report["dice_vs_truth_mask"] == pytest.approx(dice, abs=1e-12), "OUT.json Dice = Dice of OUT.automask.png"
    out = read_level0(tmp_path / "R.tif")
    assert np.array_equal(out[~used], case["ink"][~used])
    again = run_cli(case, tmp_path / "R.tif", *args, masks="auto")  # cached map, stored tiles: nothing recomputed
    assert again["mask"]["auto"]["seconds"] == auto["seconds"] and again["tiles"]["restored_now"] == 0


def test_clear_errors_for_bad_inputs(case, tmp_path, capsys):
    root = case["root"]
    base = ["--out", str(tmp_path / "R.tif"), "--method", "telea", "--device", "cpu", "--no-progress"]
    ok_slide, ok_mask = ["--slide", str(root / "ink.tif")], ["--masks", str(root / "ink.geojson")]
    fails(capsys, base + ["--slide", str(tmp_path / "nope.svs")] + ok_mask, "nope.svs does not exist")
    (tmp_path / "broken.svs").write_bytes(b"II*\x00garbage" * 100)
    fails(capsys, base + ["--slide", str(tmp_path / "broken.svs")] + ok_mask, "broken.svs")
    (tmp_path / "broken.tif").write_bytes((root / "ink.tif").read_bytes()[:5000])
    fails(capsys, base + ["--slide", str(tmp_path / "broken.tif")] + ok_mask, "broken.tif")
    (tmp_path / "text.png").write_text("not an image")
    fails(capsys, base + ["--slide", str(tmp_path / "text.png")] + ok_mask, "text.png")
    fails(capsys, base + ok_slide + ["--masks", str(root / "mask_wide.png")], "aspect ratio must match")
    far = {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[5000, 10], [6000, 10], [6000, 90]]]}}
    (tmp_path / "far.geojson").write_text(json.dumps(far))
    fails(capsys, base + ok_slide + ["--masks", str(tmp_path / "far.geojson")], "lies outside the slide")
    (tmp_path / "points.geojson").write_text(json.dumps({"type": "Point", "coordinates": [1, 2]}))
    fails(capsys, base + ok_slide + ["--masks", str(tmp_path / "points.geojson")], "no Polygon or MultiPolygon")
    fails(capsys, base + ok_slide + ["--masks", "auto"], "needs an artifact segmenter: pass --mask-model")
    fails(capsys, base + ok_slide + ok_mask + ["--level", "5"], "level 5 does not exist")
    fails(capsys, base + ok_slide + ok_mask + ["--mpp", "0.1"], "finer than the slide")
    fails(capsys, ["--out", str(tmp_path / "R.png")] + base[2:] + ok_slide + ok_mask, "must be a .tif")
    fails(capsys, base + ok_slide + ok_mask + ["--method", "latent", "--model", str(tmp_path)], "no pipeline.json")


def test_plain_image_smaller_than_a_tile(case, tmp_path):
    img = np.ascontiguousarray(case["ink"][:150, :100])
    cv2.imwrite(str(tmp_path / "small.png"), img[..., ::-1])
    mask = np.zeros((150, 100), np.uint8)
    mask[40:90, 30:70] = 255
    cv2.imwrite(str(tmp_path / "m.png"), mask)
    restore_slide.main(
        [
            "--slide",
            str(tmp_path / "small.png"),
            "--out",
            str(tmp_path / "R.tif"),
            "--masks",
            str(tmp_path / "m.png"),
            "--method",
            "telea",
            "--no-progress",
        ]
    )
    out = read_level0(tmp_path / "R.tif")
    assert out.shape == (150, 100, 3) and np.array_equal(out[mask == 0], img[mask == 0])
    assert not np.array_equal(out[mask > 0], img[mask > 0])
    assert json.loads((tmp_path / "R.json").read_text())["mpp"] is None


def test_polygon_windows_equal_the_whole_raster(case):
    info = SlideInfo(Path("x"), (SIZE, SIZE), MPP, 0, 1.0, (SIZE, SIZE), "generic-tiff")
    mask = PolygonMask(case["root"] / "ink.geojson", info)
    whole = mask.window(0, 0, SIZE, SIZE)
    assert np.array_equal(whole, case["truth"])
    assert whole[700:800, 200:300].all() and not whole[699, 200:300].any() and not whole[700:800, 300].any()
    rng = np.random.default_rng(0)
    for _ in range(100):
        x, y = rng.integers(0, SIZE - 1, size=2)
        w, h = rng.integers(1, 300, size=2)
        w, h = min(w, SIZE - x), min(h, SIZE - y)
        assert np.array_equal(mask.window(x, y, w, h), whole[y : y + h, x : x + w]), (x, y, w, h)
    level1 = SlideInfo(Path("x"), (SIZE // 2, SIZE // 2), 2 * MPP, 1, 2.0, (SIZE, SIZE), "generic-tiff")
    half = PolygonMask(case["root"] / "ink.geojson", level1).window(0, 0, SIZE // 2, SIZE // 2)
    assert abs(int(half.sum()) * 4 - int(whole.sum())) < 0.02 * whole.sum()


def test_blend_weights_sum_to_one_and_are_smooth():
    for shape, exact in (((320, 512), True), ((300, 520), False)):  # 128 + k * 96 fits exactly; else a last tile
        grid = TileGrid.build(shape, 128, 32)
        total = np.zeros(shape)
        for i in range(len(grid)):
            x, y, w, h = grid.box(i)
            wy, wx = tile_weights(grid, i)
            total[y : y + h, x : x + w] += wy[:, None] * wx[None, :]
        if exact:
            np.testing.assert_allclose(total, 1.0, atol=1e-12)  # raised cosines of an overlap sum to one
        else:  # the shifted last tile overlaps two tiles; the assembler divides by the weight sum
            assert grid.xs == (0, 96, 192, 288, 384, 392) and grid.ys == (0, 96, 172) and total.min() > 0.5
    # two tiles of constant colour 0 and 200: the output ramps smoothly across their 32 px overlap
    grid = TileGrid.build((64, 224), 128, 32)

    class Full:
        def window(self, x, y, w, h):
            return np.ones((h, w), bool)

    class Grey:
        def read_region(self, x, y, w, h):
            return np.full((h, w, 3), 90, np.uint8)

    plan = TilePlan(grid, (0, 1), (), {0: 1.0, 1: 1.0}, 2)
    tiles = {0: np.zeros((64, 128, 3), np.uint8), 1: np.full((64, 128, 3), 200, np.uint8)}
    row = SlideAssembler(Grey(), Full(), plan, tiles.__getitem__).strip(0, 64)[10, :, 0].astype(int)
    assert (row[:96] == 0).all() and (row[128:] == 200).all()
    assert np.all(np.diff(row) >= 0) and np.diff(row).max() <= int(np.ceil(200 * np.pi / 64)) + 1


def test_pyramid_writer_odd_sizes_and_jpeg(tmp_path, case):
    img = np.ascontiguousarray(case["clean"][:301, :517])
    for jpeg in (False, True):
        out = tmp_path / f"p{int(jpeg)}.tif"
        info = write_pyramid(out, lambda y0, y1: img[y0:y1], img.shape[:2], mpp=0.25, jpeg=jpeg)
        s = openslide.OpenSlide(str(out))
        assert s.level_dimensions == ((517, 301), (258, 150), (129, 75))
        assert info["levels"] == [(301, 517), (150, 258), (75, 129)]
        assert float(s.properties["openslide.mpp-x"]) == pytest.approx(0.25)
        back = read_level0(out)
        if jpeg:
            assert psnr(back, img) > 30
        else:
            assert np.array_equal(back, img)
    assert not list(tmp_path.glob(".*"))  # no temporary files left


@pytest.mark.slow
def test_two_processes_give_the_same_slide_as_one(case, tmp_path, tiny_pipeline):
    root = case["root"]
    common = [
        "--slide",
        str(root / "ink.tif"),
        "--masks",
        str(root / "small.geojson"),
        "--model",
        str(tiny_pipeline),
        *TINY,
        "--device",
        "cpu",
        "--no-progress",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "NO_ALBUMENTATIONS_UPDATE": "1"}
    cmd = [sys.executable, "-m", "experiments.restore_slide", *common, "--out", str(tmp_path / "two.tif")]
    cmd += ["--devices", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "MEMBER: 2/2" in proc.stderr, "two DDP processes ran"
    restore_slide.main(common + ["--out", str(tmp_path / "one.tif")])
    assert (tmp_path / "two.tif").read_bytes() == (tmp_path / "one.tif").read_bytes()
    assert (tmp_path / "two.mask.png").read_bytes() == (tmp_path / "one.mask.png").read_bytes()
    report = json.loads((tmp_path / "two.json").read_text())
    assert report["tiles"]["restored_now"] == report["tiles"]["restored"] > 0
