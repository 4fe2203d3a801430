"""Region-wise metrics against scikit-image / piq / numpy on real H&E tiles with realistic degradations."""

import ast
import math
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import piq
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from lightning_modules.metrics import RegionMetrics, per_image_metrics, region_masks
from lightning_modules.metrics.functional import PSNR_MSE_FLOOR, to_uint8_scale

SSIM_KW = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255, channel_axis=-1)
REPO = Path(__file__).resolve().parents[1]


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) -> float32 (B, 3, H, W) in [-1, 1], as the suite's loaders produce it."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 127.5 - 1.0


def degrade(clean: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Noise or blur over the tile, plus a painted dark-purple fold-like band; returns (degraded uint8, mask bool)."""
    rng = np.random.default_rng(seed)
    h, w, _ = clean.shape
    if seed % 2:
        out = np.clip(clean + rng.normal(0.0, 6.0, clean.shape), 0, 255).astype(np.uint8)
    else:
        out = cv2.GaussianBlur(clean, (0, 0), 1.2)
    mask = np.zeros((h, w), np.uint8)
    y0 = int(rng.integers(40, h - 80))
    cv2.line(mask, (0, y0), (w - 1, y0 + int(rng.integers(-30, 30))), 1, thickness=int(rng.integers(10, 25)))
    painted = (0.4 * out + 0.6 * np.array([110, 40, 130])).astype(np.uint8)
    out = np.where(mask[..., None] > 0, painted, out)
    return out, mask.astype(bool)


@pytest.fixture(scope="module")
def pairs(he_tiles):
    """Eight (degraded, clean, mask) real-tile triples: uint8 (8, 256, 256, 3) x2 and bool (8, 256, 256)."""
    degraded, masks = zip(*(degrade(t, i) for i, t in enumerate(he_tiles)), strict=True)
    return np.stack(degraded), np.stack(he_tiles), np.stack(masks)


@pytest.fixture(scope="module")
def values(pairs):
    """per_image_metrics on the eight pairs (all regions, all metrics)."""
    degraded, clean, masks = pairs
    return per_image_metrics(to_tensor(degraded), to_tensor(clean), torch.from_numpy(masks)[:, None].float())


def test_uint8_round_trip_is_exact(he_tile):
    x = to_tensor(he_tile[None])
    assert torch.allclose(to_uint8_scale(x), torch.from_numpy(he_tile[None]).permute(0, 3, 1, 2).double(), atol=1e-4)


def test_psnr_matches_skimage(pairs, values):
    degraded, clean, masks = pairs
    for i in range(len(clean)):
        whole = peak_signal_noise_ratio(clean[i], degraded[i], data_range=255)
        artifact = peak_signal_noise_ratio(clean[i][masks[i]], degraded[i][masks[i]], data_range=255)
        assert values["whole/psnr"][i].item() == pytest.approx(whole, abs=0.01)
        assert values["artifact/psnr"][i].item() == pytest.approx(artifact, abs=0.01)
    assert values["artifact/psnr"].mean() < values["clean/psnr"].mean()


def test_ssim_matches_skimage_whole_and_region(pairs, values):
    degraded, clean, masks = pairs
    for i in range(len(clean)):
        mssim, full = structural_similarity(degraded[i], clean[i], full=True, **SSIM_KW)
        assert values["whole/ssim"][i].item() == pytest.approx(mssim, abs=2e-3)
        # Region SSIM = skimage's per-pixel map (channel mean) averaged under the mask, both cropped by 5 px.
        crop_map, crop_mask = full.mean(axis=-1)[5:-5, 5:-5], masks[i][5:-5, 5:-5]
        assert values["artifact/ssim"][i].item() == pytest.approx(crop_map[crop_mask].mean(), abs=2e-3)
        assert values["clean/ssim"][i].item() == pytest.approx(crop_map[~crop_mask].mean(), abs=2e-3)


def test_fsim_matches_piq(pairs, values):
    degraded, clean, _ = pairs
    ref = piq.fsim(to_tensor(degraded) + 1, to_tensor(clean) + 1, data_range=2.0, chromatic=True, reduction="none")
    assert torch.allclose(values["whole/fsim"], ref.double(), atol=2e-3)
    assert (values["artifact/fsim"] < values["clean/fsim"]).all()


def test_fsim_mirrors_piq_downsampling_on_large_images(he_templates):
    clean = he_templates[0][None]  # 500x500: piq average-pools by round(500 / 256) = 2
    degraded = cv2.GaussianBlur(clean[0], (0, 0), 2.0)[None]
    ours = per_image_metrics(to_tensor(degraded), to_tensor(clean), torch.zeros(1, 1, 500, 500), metrics=("fsim",))
    ref = piq.fsim(to_tensor(degraded) + 1, to_tensor(clean) + 1, data_range=2.0, chromatic=True)
    assert ours["whole/fsim"].item() == pytest.approx(ref.item(), abs=2e-3)


def test_l2_and_mse_by_hand(pairs, values):
    degraded, clean, masks = pairs
    err = (degraded.astype(np.float64) - clean.astype(np.float64)) ** 2
    for i in range(len(clean)):
        for region, sel in (("whole", np.ones_like(masks[i])), ("artifact", masks[i]), ("clean", ~masks[i])):
            l2 = err[i][sel].sum()
            assert values[f"{region}/l2"][i].item() == pytest.approx(l2, rel=1e-6)
            assert values[f"{region}/mse"][i].item() == pytest.approx(l2 / (3 * sel.sum()), rel=1e-6)


def test_all_ones_mask_equals_whole(pairs):
    degraded, clean, _ = pairs
    ones = torch.ones(len(clean), 1, 256, 256)
    out = per_image_metrics(to_tensor(degraded[:2]), to_tensor(clean[:2]), ones[:2])
    for metric in ("l2", "mse", "psnr", "ssim", "fsim"):
        assert torch.allclose(out[f"artifact/{metric}"], out[f"whole/{metric}"], rtol=1e-12, atol=0)
        assert torch.isnan(out[f"clean/{metric}"]).all()
        assert torch.isnan(out[f"boundary/{metric}"]).all()  # no edge inside the tile


def test_left_half_mask_gives_left_half_mse(pairs):
    degraded, clean, _ = pairs
    mask = torch.zeros(2, 1, 256, 256)
    mask[..., :128] = 1
    out = per_image_metrics(to_tensor(degraded[:2]), to_tensor(clean[:2]), mask, metrics=("mse", "psnr"))
    err = (degraded[:2].astype(np.float64) - clean[:2]) ** 2
    left, right = err[:, :, :128].mean(axis=(1, 2, 3)), err[:, :, 128:].mean(axis=(1, 2, 3))
    np.testing.assert_allclose(out["artifact/mse"].numpy(), left, rtol=1e-6)
    np.testing.assert_allclose(out["clean/mse"].numpy(), right, rtol=1e-6)
    np.testing.assert_allclose(out["artifact/psnr"].numpy(), 10 * np.log10(255**2 / left), rtol=1e-6)


def test_boundary_band_geometry():
    mask = torch.zeros(2, 1, 64, 64, dtype=torch.bool)
    mask[0, 0, 20:40, 20:40] = True  # interior 20x20 square
    mask[1, 0, :, :16] = True  # touches the left tile edge
    band = region_masks(mask, regions=("boundary",), boundary_radius=3)["boundary"]
    assert band.dtype == torch.bool and band.shape == mask.shape
    expected = torch.zeros(64, 64, dtype=torch.bool)
    expected[17:43, 17:43] = True
    expected[23:37, 23:37] = False
    assert torch.equal(band[0, 0], expected)  # (20 + 6)^2 - (20 - 6)^2 pixels
    # The tile edge is not an artifact boundary: only columns 13..18 around the inner edge form the band.
    assert torch.equal(band[1, 0].any(dim=0).nonzero().flatten(), torch.arange(13, 19))
    assert band[1, 0, :, 13:19].all()
    wider = region_masks(mask, regions=("boundary",), boundary_radius=5)["boundary"]
    assert int(wider[0].sum()) == 30**2 - 10**2


def test_region_masks_partition():
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 5:12, 8:30] = 1
    r = region_masks(mask)
    assert list(r) == ["whole", "artifact", "clean", "boundary"]
    assert torch.equal(r["artifact"] ^ r["clean"], r["whole"])
    assert r["whole"].all() and r["boundary"].any()


def test_empty_mask_gives_nan_and_is_counted(pairs):
    degraded, clean, masks = pairs
    mask = torch.from_numpy(masks[:3])[:, None].float()
    mask[1] = 0
    preds, target = to_tensor(degraded[:3]), to_tensor(clean[:3])
    out = per_image_metrics(preds, target, mask)
    for metric in ("l2", "mse", "psnr", "ssim", "fsim"):
        assert torch.isnan(out[f"artifact/{metric}"][1]) and torch.isnan(out[f"boundary/{metric}"][1])
        assert torch.isfinite(out[f"artifact/{metric}"][[0, 2]]).all()
        assert torch.isfinite(out[f"whole/{metric}"]).all()
    metric = RegionMetrics()
    metric.update(preds, target, mask)
    res = metric.compute()
    assert res["artifact/n_empty"].item() == 1 and res["boundary/n_empty"].item() == 1
    assert res["whole/n_empty"].item() == 0 and res["clean/n_empty"].item() == 0
    assert res["artifact/psnr"].item() == pytest.approx(out["artifact/psnr"][[0, 2]].mean().item(), rel=1e-12)


def test_identical_images_give_finite_capped_psnr(he_tile):
    x = to_tensor(he_tile[None])
    out = per_image_metrics(x, x, torch.zeros(1, 1, 256, 256), regions=("whole",))
    assert out["whole/l2"].item() == 0 and out["whole/mse"].item() == 0
    assert out["whole/psnr"].item() == pytest.approx(10 * math.log10(255**2 / PSNR_MSE_FLOOR))
    assert out["whole/ssim"].item() == pytest.approx(1.0, abs=1e-9)
    assert out["whole/fsim"].item() == pytest.approx(1.0, abs=1e-5)


def test_region_metrics_two_updates_equal_one_concatenated(pairs):
    degraded, clean, masks = pairs
    preds, target, mask = to_tensor(degraded[:4]), to_tensor(clean[:4]), torch.from_numpy(masks[:4])[:, None]
    mask[3] = False
    split, joint = RegionMetrics(prefix="test/"), RegionMetrics(prefix="test/")
    split.update(preds[:1], target[:1], mask[:1])
    split.update(preds[1:], target[1:], mask[1:])
    joint.update(preds, target, mask)
    a, b = split.compute(), joint.compute()
    assert a.keys() == b.keys() and len(a) == 4 * 6
    assert all(k.startswith("test/") and v.ndim == 0 for k, v in a.items())
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-12, atol=0), key
    per_image = per_image_metrics(preds, target, mask)
    assert a["test/whole/ssim"].item() == pytest.approx(per_image["whole/ssim"].mean().item(), rel=1e-12)


def test_paper_mode_prefixes_keys_and_shifts_psnr(pairs):
    degraded, clean, masks = pairs
    args = (to_tensor(degraded[:2]), to_tensor(clean[:2]), torch.from_numpy(masks[:2])[:, None])
    standard = per_image_metrics(*args)
    paper = per_image_metrics(*args, mode="paper")
    assert set(paper) == {k.replace("/", "/paper_") for k in standard}
    shift = 20 * math.log10(4095 / 255)
    assert shift == pytest.approx(24.1143, abs=1e-4)
    torch.testing.assert_close(paper["whole/paper_psnr"], standard["whole/psnr"] + shift)
    torch.testing.assert_close(paper["artifact/paper_psnr"], standard["artifact/psnr"] + shift)
    torch.testing.assert_close(paper["whole/paper_l2"], standard["whole/l2"])
    # 256x larger SSIM constants push SSIM towards 1 (docs/METHOD.md section 7: 0.961 -> 0.995 on their example).
    assert (1 - paper["whole/paper_ssim"] < 0.5 * (1 - standard["whole/ssim"])).all()
    # Paper FSIM = mean over R, G, B of grey FSIM.
    grey = [
        piq.fsim(
            args[0][:, c : c + 1] + 1, args[1][:, c : c + 1] + 1, data_range=2.0, chromatic=False, reduction="none"
        )
        for c in range(3)
    ]
    torch.testing.assert_close(paper["whole/paper_fsim"], torch.stack(grey).mean(0).double(), atol=2e-3, rtol=0)
    keys = RegionMetrics(mode="paper", metrics=("psnr",), regions=("whole",))
    keys.update(*args)
    assert set(keys.compute()) == {"whole/paper_psnr", "whole/n_empty"}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"regions": ("artifact", "edge")}, "unknown region"),
        ({"metrics": ("psnr", "lpips")}, "unknown metric"),
        ({"mode": "published"}, "mode must be one of"),
        ({"boundary_radius": 0}, "boundary_radius"),
    ],
)
def test_bad_options_raise(kwargs, match):
    x = torch.zeros(1, 3, 16, 16)
    with pytest.raises(ValueError, match=match):
        per_image_metrics(x, x, torch.zeros(1, 1, 16, 16), **kwargs)


def test_bad_inputs_raise():
    x = torch.zeros(1, 3, 16, 16)
    mask = torch.zeros(1, 1, 16, 16)
    with pytest.raises(ValueError, match=r"\[-1, 1\]"):
        per_image_metrics(x * 0 + 1.5, x, mask)
    with pytest.raises(ValueError, match="0 or 1"):
        per_image_metrics(x, x, mask + 0.5)
    with pytest.raises(ValueError, match=r"\(B, 1, H, W\)"):
        per_image_metrics(x, x, torch.zeros(1, 16, 16))
    with pytest.raises(ValueError, match="float"):
        per_image_metrics(x.to(torch.uint8), x, mask)
    with pytest.raises(ValueError, match="smaller than the SSIM window"):
        per_image_metrics(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 8), torch.zeros(1, 1, 8, 8))


def test_pure_modules_do_not_import_lightning():
    for name in ("functional.py", "regions.py", "maps.py"):
        tree = ast.parse((REPO / "lightning_modules" / "metrics" / name).read_text())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not roots & {"lightning", "pytorch_lightning", "torchmetrics"}, (name, roots)


@pytest.mark.slow
def test_ddp_sum_states_match_single_process():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "ddp_metrics_script.py")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "DDP metrics OK" in proc.stdout
