"""experiments.ablate: mask perturbations, suite files, dry runs, a tiny robustness and sampler run, resuming."""

import csv
import dataclasses
import json

import numpy as np
import pytest

from datamodules.imageio import write_image_atomic, write_mask_atomic
from experiments import ablate
from experiments.ablation_report import BIT_EXACT_PSNR
from experiments.ablation_suite import SuiteError, available_suites, load_suite, parse_suite
from lightning_modules.components import mask_perturb as mp

SIZE = 64


def _rect(h: int = 64, w: int = 64) -> np.ndarray:
    mask = np.zeros((h, w), bool)
    mask[20:40, 10:50] = True
    return mask


# ------------------------------------------------------------------------------------------------ perturbations


@pytest.mark.parametrize("kind", mp.KINDS)
def test_severity_zero_is_identity(kind):
    mask = _rect()
    out = mp.perturb(mask, kind, 0, np.random.default_rng(3))
    assert out.dtype == bool and np.array_equal(out, mask) and out is not mask


def test_erode_and_dilate_move_the_outline_by_the_radius():
    mask = _rect()
    eroded, dilated = mp.erode(mask, 2), mp.dilate(mask, 2)
    assert np.array_equal(eroded, np.pad(np.ones((16, 36), bool), ((22, 26), (12, 16))))
    assert not (eroded & ~mask).any() and not (mask & ~dilated).any()
    ys, xs = np.nonzero(dilated)
    assert (ys.min(), ys.max(), xs.min(), xs.max()) == (18, 41, 8, 51)
    assert not mp.erode(mask, 10).any(), "an artifact thinner than the footprint vanishes"
    border = np.zeros((16, 16), bool)
    border[:, :4] = True
    assert mp.erode(border, 1)[:, 0].all(), "the tile border counts as artifact when eroding"


def test_shift_displaces_by_the_length_in_the_drawn_direction():
    mask = _rect()
    out = mp.shift(mask, 8)  # no generator: 45 degrees, (6, 6) px
    assert out.sum() == mask.sum() and np.array_equal(out[6:, 6:], mask[:-6, :-6])
    big = np.pad(mask, 32)
    a, b = mp.shift(big, 4, np.random.default_rng(1)), mp.shift(big, 16, np.random.default_rng(1))
    centre = [np.argwhere(m).mean(0) - np.argwhere(big).mean(0) for m in (a, b)]
    assert np.linalg.norm(centre[0]) == pytest.approx(4, abs=0.8)
    np.testing.assert_allclose(centre[1] / 4, centre[0], atol=0.3)  # same direction, four times as far
    assert not mp.shift(mask, 100).any()


def test_miss_cuts_the_fraction_of_every_component():
    mask = _rect()
    mask[50:60, 5:25] = True  # a second artifact
    out = mp.miss(mask, 0.5, np.random.default_rng(0))
    assert not (out & ~mask).any()
    assert out[:45].sum() == 400 and out[45:].sum() == 100
    assert mp.miss(mask, 1.0).sum() == 0
    quarter = mp.miss(mask, 0.25, np.random.default_rng(0))
    assert not (out & ~quarter).any(), "a larger cut in the same direction removes a superset"


def test_blobs_add_false_positives_on_clean_tissue_only():
    mask = np.zeros((128, 128), bool)
    mask[:30, :30] = True
    allowed = np.ones_like(mask)
    allowed[:, 100:] = False
    one = mp.blobs(mask, 1, np.random.default_rng(5), allowed=allowed)
    three = mp.blobs(mask, 3, np.random.default_rng(5), allowed=allowed)
    assert np.array_equal(three & mask, mask) and not (one & ~three).any(), "nested: the first blob stays"
    added = three & ~mask
    assert not (added & mp.dilate(mask, 11)).any(), "blobs keep a gap to the artifact"
    assert not added[:, 111:].any(), "centres only where allowed"
    from scipy import ndimage

    assert ndimage.label(added)[1] == 3
    assert added.sum() == pytest.approx(3 * np.pi * 10**2, rel=0.1)


def test_bad_perturbations_are_refused():
    with pytest.raises(ValueError, match="unknown mask perturbation"):
        mp.perturb(_rect(), "blur", 1)
    with pytest.raises(ValueError, match="non-negative"):
        mp.erode(_rect(), -1)
    with pytest.raises(ValueError, match="fraction"):
        mp.miss(_rect(), 1.5)
    with pytest.raises(ValueError, match="keyword"):
        mp.perturb(_rect(), "erode", 1, radius=3)


# ---------------------------------------------------------------------------------------------------- suite files


@pytest.mark.parametrize("name", ["robustness", "sampler", "paper", "training"])
def test_dry_run_lists_every_row(name, capsys):
    assert ablate.main(["--suite", name, "--dry-run"]) == 0
    text = capsys.readouterr().out
    suite = load_suite(name)
    assert all(f"- {row.name}" in text for row in suite.rows)
    assert "methods:" in text and "evalsets:" in text
    if name == "paper":
        assert "not implemented" in text and "speed-artifusion-250-repaint" in text and "accuracy" in text


def test_suite_files_and_schema_errors(tmp_path):
    assert {"robustness", "sampler", "paper", "training"} <= set(available_suites())
    sampler = load_suite("sampler")
    assert [r.name for r in sampler.rows if r.group == "steps"] == [f"steps-{n}" for n in (1, 4, 10, 20, 50)]
    assert {r.name for r in sampler.selected(quick=True)} < {r.name for r in sampler.rows}
    with pytest.raises(ValueError, match="unknown key"):
        parse_suite({"kind": "sampler", "rows": [{"name": "a"}], "extra": 1})
    with pytest.raises(ValueError, match="neither SamplerConfig field"):
        parse_suite({"kind": "sampler", "rows": [{"name": "a", "overrides": {"num_stepz": 2}}]})
    with pytest.raises(ValueError, match="not an ablation suite"):
        parse_suite({"rows": []})
    with pytest.raises(SuiteError, match="unknown suite"):
        load_suite("nope")


def test_bad_input_fails_with_one_line_before_loading(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("kind: sampler\nrows: [{name: a, overrides: {steps: 3}}]\n")
    assert ablate.main(["--suite", str(bad), "--dry-run"]) == 2
    assert ablate.main(["--suite", "robustness", "--model", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    assert ablate.main(["--suite", "robustness", "--rows", "erode-99", "--dry-run"]) == 2
    assert ablate.main(["--suite", "robustness", "--demo", str(tmp_path / "none"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("error: ") for line in err)


def test_unimplemented_suite_fails_non_zero(tmp_path, capsys):
    assert ablate.main(["--suite", "paper", "--out", str(tmp_path / "p")]) == 1
    assert "not implemented" in capsys.readouterr().err
    with pytest.raises(ablate.SuiteNotImplemented):
        ablate.run_suite(load_suite("training"), tmp_path, quick=True, models={}, evalsets={})


# -------------------------------------------------------------------------------------------------------- tiny runs


@pytest.fixture(scope="module")
def untrained(tmp_path_factory, he_tiles):
    """Tiny random-weight pipelines (64 px) and a 2-tile evaluation set with a manifest."""
    root = tmp_path_factory.mktemp("ablate")
    evalset = root / "evalset"
    for i, tile in enumerate(he_tiles[:2]):
        clean = tile[:SIZE, :SIZE]
        mask = np.zeros((SIZE, SIZE), bool)
        mask[10 + 6 * i : 30 + 6 * i, 12:44] = True
        corrupted = clean.copy()
        corrupted[mask] = (corrupted[mask] * 0.3).astype(np.uint8)
        write_image_atomic(evalset / "clean" / f"t{i}.png", clean)
        write_image_atomic(evalset / "corrupted" / f"t{i}.png", corrupted)
        write_mask_atomic(evalset / "masks" / f"t{i}.png", mask)
    items = [{"name": f"t{i}.png", "types": [("ink", "fold")[i]]} for i in range(2)]
    (evalset / "manifest.json").write_text(json.dumps({"items": items}))
    models, evalsets = ablate.build_untrained(root, size=SIZE)
    return models, evalsets


def _read_csv(path):
    with path.open() as fh:
        return list(csv.DictReader(fh))


def test_tiny_robustness_run_writes_report_and_resumes(untrained, tmp_path, monkeypatch):
    models, evalsets = untrained
    models = {"latent-conditional": models["latent-conditional"]}  # latent: skipped with a note (keeps it fast)
    suite = load_suite("robustness")
    opts = ablate.RunOptions(
        rows=("dilate-4", "blobs-3"), batch_size=2, precision="fp32", progress=False, untrained=True
    )
    report = ablate.run_suite(suite, tmp_path, quick=True, models=models, evalsets=evalsets, options=opts)
    text = report.read_text()
    assert "untrained" in text and "Δ artifact/psnr" in text and "dilate-4" in text
    assert "latent skipped (no model" in text
    assert (tmp_path / "robustness_evalset.png").stat().st_size > 0
    lines = _read_csv(tmp_path / "tiles.csv")
    assert len(lines) == 3 * 2 * 2  # rows x methods x tiles
    clean_psnr = {(r["row"], r["method"]): float(r["clean/psnr"]) for r in lines if r["tile"] == "t0"}
    assert clean_psnr[("true-mask", "telea")] == pytest.approx(BIT_EXACT_PSNR)
    assert clean_psnr[("dilate-4", "telea")] < 60, "a dilated mask changes clean pixels"
    dilated = [r for r in lines if r["row"] == "dilate-4"]
    assert all(int(r["mask_pixels"]) > int(r["true_pixels"]) for r in dilated)

    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "rows").iterdir()}
    calls = []
    monkeypatch.setattr(ablate, "run_row", lambda *a, **k: calls.append(a) or ([], []))
    ablate.run_suite(suite, tmp_path, quick=True, models=models, evalsets=evalsets, options=opts)
    assert calls == [] and stamps == {p.name: p.stat().st_mtime_ns for p in (tmp_path / "rows").iterdir()}
    ablate.run_suite(
        suite,
        tmp_path,
        quick=True,
        models=models,
        evalsets=evalsets,
        options=dataclasses.replace(opts, seed=1, rows=("dilate-4",)),
    )
    assert len(calls) == 2, "other settings: the row and its reference run again"


def test_tiny_sampler_run_skips_what_does_not_apply(untrained, tmp_path):
    models, evalsets = untrained
    suite = load_suite("sampler")
    opts = ablate.RunOptions(
        rows=("steps-4", "decode-full", "refine-true"), batch_size=2, precision="fp32", progress=False
    )
    report = ablate.run_suite(
        suite,
        tmp_path,
        quick=True,
        models={"latent-conditional": models["latent-conditional"]},
        evalsets=evalsets,
        options=opts,
    )
    text = report.read_text()
    assert "latent skipped (no model" in text
    refine = next(r for r in suite.rows if r.name == "refine-true")
    assert refine.missing_field == ("refine-true: skipped" in text)
    lines = _read_csv(tmp_path / "tiles.csv")
    nfe = {r["row"]: int(r["nfe"]) for r in lines}
    assert nfe["default"] == 1 and nfe["steps-4"] == 4
    assert (tmp_path / "sampler_evalset.png").is_file()


def test_rows_that_do_not_apply_are_explained():
    from lightning_modules.methods import build_restorer

    sampler = load_suite("sampler")
    decode = next(r for r in sampler.rows if r.name == "decode-full")
    assert "no diffusion sampler" in ablate.applies(decode, build_restorer("telea"))
