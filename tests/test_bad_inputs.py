"""Bad-input matrix (issue 13) against `experiments.restore`, `experiments.evaluate` and `datamodules.synthesize`.

Each case asserts the exit status, the one-line message, the files written and that the good files are intact. The
cases follow the issue: corrupt, truncated, grayscale, RGBA, 16-bit, palette, tiny, huge and odd-sized images; masks
of the wrong size, 0/1, 0/128, gradient, empty, full; unmatched names; empty and missing folders; odd names;
unwritable outputs; interrupts; nonsense flags; a damaged pipeline folder; a bad training config; plus same-stem
subfolders, odd tile sizes through a latent pipeline and reruns with other settings. Models are tiny and random
(32 px tiles, 1-2 sampling steps) and run on one thread.
"""

import csv
import json
import shutil

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from datamodules import synthesize
from datamodules.imageio import read_image, write_image_atomic, write_mask_atomic
from experiments import evaluate, restore
from lightning_modules.components.pipeline import RestorationPipeline

SIZE = 32


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # two threads on a busy 2-core machine make these tiny models 50x slower; one is plenty
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    """A tiny latent pipeline for 32 px tiles: VAE factor 8 x UNet downsampling 2 = 16 px unit."""
    from diffusers import DDPMScheduler

    from lightning_modules.components.autoencoders import build_autoencoder
    from lightning_modules.components.denoisers import build_unet
    from lightning_modules.components.pipeline import save_pipeline
    from lightning_modules.components.regional_sampler import SamplerConfig
    from lightning_modules.latent_diffusion import PAPER_SCHEDULER

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("pipe") / "pipeline"
    save_pipeline(
        path,
        unet=build_unet("tiny", sample_size=SIZE // 8),
        scheduler=DDPMScheduler(**PAPER_SCHEDULER),
        sampler=SamplerConfig.from_preset("repaint", num_steps=2),
        vae=build_autoencoder("tiny"),
        image_size=SIZE,
    )
    return path


def _crop(he_tiles, i, h=SIZE, w=SIZE):
    return np.ascontiguousarray(he_tiles[i % len(he_tiles)][:h, :w])


def _box(h=SIZE, w=SIZE, y=4, x=6, bh=10, bw=12):
    m = np.zeros((h, w), bool)
    m[y : y + bh, x : x + bw] = True
    return m


def _pair(root, rel, img, mask):
    write_image_atomic(root / "images" / f"{rel}.png", img)
    write_mask_atomic(root / "masks" / f"{rel}.png", mask)


def _snapshot(*folders):
    return {str(p): p.read_bytes() for f in folders if f.is_dir() for p in sorted(f.rglob("*")) if p.is_file()}


def _run(module, argv, capsys):
    rc = module.main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_line_error(err, *needles):
    assert "Traceback" not in err
    lines = [ln for ln in err.strip().splitlines() if ln.startswith(("error:", "interrupted"))]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _restore_argv(root, out=None, method="telea", *extra):
    return [
        "--method",
        method,
        "--images",
        root / "images",
        "--masks",
        root / "masks",
        "--out",
        out or root / "out",
        "--device",
        "cpu",
        *extra,
    ]


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if a restorer (a model) is built: validation must come first."""

    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were validated")

    monkeypatch.setattr(restore, "build_restorer", boom)


# ---------------------------------------------------------------- image files (cases 1-6)


def _odd_file(path, kind, img):
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "corrupt":
        path.write_bytes(b"this is not an image\n" * 20)
    elif kind == "truncated":
        write_image_atomic(path, img)
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2])
    elif kind == "grayscale":
        Image.fromarray(cv2.cvtColor(img, cv2.COLOR_RGB2GRAY)).save(path)
    elif kind == "rgba":
        Image.fromarray(np.dstack([img, np.full(img.shape[:2], 255, np.uint8)])).save(path)
    elif kind == "16bit":
        cv2.imwrite(str(path), img[..., ::-1].astype(np.uint16) * 257)
    elif kind == "palette":
        Image.fromarray(img).convert("P").save(path)


@pytest.mark.parametrize("kind", ["corrupt", "truncated", "grayscale", "rgba", "16bit", "palette"])
def test_odd_image_files(tmp_path, he_tiles, capsys, kind):
    good, odd = _crop(he_tiles, 0), _crop(he_tiles, 1)
    _pair(tmp_path, "good", good, _box())
    _odd_file(tmp_path / "images" / "odd.png", kind, odd)
    write_mask_atomic(tmp_path / "masks" / "odd.png", _box())
    before = _snapshot(tmp_path / "images", tmp_path / "masks")
    rc, out, _ = _run(restore, _restore_argv(tmp_path), capsys)
    assert rc == 0
    restored = read_image(tmp_path / "out" / "good.png")
    assert np.array_equal(restored[~_box()], good[~_box()]) and not np.array_equal(restored, good)
    unreadable = kind in ("corrupt", "truncated")
    assert (tmp_path / "out" / "odd.png").exists() is not unreadable
    if unreadable:
        line = next(ln for ln in out.splitlines() if "odd.png" in ln)
        assert line.count("odd.png") == 1, "the skipped line names the file once"
        assert ("truncated" if kind == "truncated" else "not a recognised image") in line
        assert "1 skipped" in out
    else:
        assert read_image(tmp_path / "out" / "odd.png").shape == (SIZE, SIZE, 3)
    assert _snapshot(tmp_path / "images", tmp_path / "masks") == before, "inputs are never modified"

    # evaluate: the odd file as a clean reference next to a good one
    rc, out, _ = _run(
        evaluate,
        [
            "--clean",
            tmp_path / "images",
            "--masks",
            tmp_path / "masks",
            "--restored",
            f"telea={tmp_path / 'out'}",
            "--out",
            tmp_path / "eval",
        ],
        capsys,
    )
    assert rc == 0 and (tmp_path / "eval" / "report.md").exists()
    scored = {r["image"] for r in csv.DictReader((tmp_path / "eval" / "metrics.csv").open())}
    assert scored == ({"good"} if unreadable else {"good", "odd"})
    if unreadable:
        assert "skipped" in out and "odd" in out, "evaluate's console shows the skip reasons"

    # synthesize from a folder holding the odd file
    src = tmp_path / "src"
    write_image_atomic(src / "good.png", _crop(he_tiles, 2, 64, 64))
    _odd_file(src / "odd.png", kind, _crop(he_tiles, 3, 64, 64))
    rc, _, _ = _run(
        synthesize,
        ["--images", src, "--count", 2, "--size", SIZE, "--min-tissue", 0, "--out", tmp_path / "evalset"],
        capsys,
    )
    assert rc == 0 and len(list((tmp_path / "evalset" / "masks").iterdir())) == 2


# ---------------------------------------------------------------- masks (cases 10-15)


@pytest.mark.parametrize("kind", ["wrong_size", "zero_one", "zero_128", "gradient", "empty", "full"])
def test_odd_masks(tmp_path, he_tiles, capsys, kind):
    good, other = _crop(he_tiles, 0), _crop(he_tiles, 1)
    _pair(tmp_path, "good", good, _box())
    write_image_atomic(tmp_path / "images" / "x.png", other)
    m = {
        "wrong_size": _box(16, 16).astype(np.uint8) * 255,
        "zero_one": _box().astype(np.uint8),
        "zero_128": _box().astype(np.uint8) * 128,
        "gradient": np.tile(np.arange(SIZE, dtype=np.uint8) * 8, (SIZE, 1)),
        "empty": np.zeros((SIZE, SIZE), np.uint8),
        "full": np.full((SIZE, SIZE), 255, np.uint8),
    }[kind]
    cv2.imwrite(str(tmp_path / "masks" / "x.png"), m)
    rc, out, _ = _run(restore, _restore_argv(tmp_path), capsys)
    assert rc == 0 and (tmp_path / "out" / "good.png").exists()
    rejected = kind in ("wrong_size", "zero_128", "gradient")
    assert (tmp_path / "out" / "x.png").exists() is not rejected
    if rejected:
        line = next(ln for ln in out.splitlines() if "x.png" in ln)
        assert "threshold=" not in line and ("mask is 16x16" in line or "{0, 255} or {0, 1}" in line)
    elif kind == "empty":
        assert np.array_equal(read_image(tmp_path / "out" / "x.png"), other), "nothing to restore: output = input"
    elif kind == "zero_one":
        assert not np.array_equal(read_image(tmp_path / "out" / "x.png")[_box()], other[_box()])
    rc, out, _ = _run(
        evaluate,
        [
            "--clean",
            tmp_path / "images",
            "--masks",
            tmp_path / "masks",
            "--restored",
            f"t={tmp_path / 'out'}",
            "--out",
            tmp_path / "eval",
        ],
        capsys,
    )
    assert rc == 0
    scored = {r["image"] for r in csv.DictReader((tmp_path / "eval" / "metrics.csv").open())}
    assert scored == ({"good"} if rejected else {"good", "x"})


# ---------------------------------------------------------------- folders and names (cases 16-19, 25)


def test_unmatched_names(tmp_path, he_tiles, capsys):
    _pair(tmp_path, "good", _crop(he_tiles, 0), _box())
    write_image_atomic(tmp_path / "images" / "orphan.png", _crop(he_tiles, 1))
    write_mask_atomic(tmp_path / "masks" / "lonely.png", _box())
    rc, out, _ = _run(restore, _restore_argv(tmp_path), capsys)
    assert rc == 0 and sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["good.png"]
    assert "no mask orphan.*" in out and "mask without an image lonely.*" in out
    assert "orphan.png" in (tmp_path / "out" / "skipped.tsv").read_text()
    rc, out, _ = _run(
        evaluate,
        [
            "--clean",
            tmp_path / "images",
            "--masks",
            tmp_path / "masks",
            "--restored",
            f"t={tmp_path / 'out'}",
            "--out",
            tmp_path / "eval",
        ],
        capsys,
    )
    assert rc == 0 and "scored 1 of 1 images" in out
    assert "no mask orphan.*" in out and "no clean image lonely.*" in out
    (tmp_path / "images" / "good.png").unlink()
    rc, _, err = _run(restore, _restore_argv(tmp_path, tmp_path / "out2"), capsys)
    assert rc == 1
    _one_line_error(err, "nothing to restore", "orphan")


def test_empty_and_missing_folders(tmp_path, he_tiles, capsys, no_model):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    rc, _, err = _run(restore, _restore_argv(tmp_path), capsys)
    assert rc == 1
    _one_line_error(err, "nothing to restore", "holds no images")
    rc, _, err = _run(
        restore,
        ["--images", tmp_path / "nope", "--masks", tmp_path / "masks", "--out", tmp_path / "o", "--method", "telea"],
        capsys,
    )
    assert rc == 2
    _one_line_error(err, "--images", "nope", "does not exist")
    assert not (tmp_path / "o").exists()
    # evaluate with an empty restored folder: no 'scored 6 images', no empty metrics.csv, exit 1
    _pair(tmp_path, "a", _crop(he_tiles, 0), _box())
    (tmp_path / "empty").mkdir()
    rc, out, err = _run(
        evaluate,
        [
            "--clean",
            tmp_path / "images",
            "--masks",
            tmp_path / "masks",
            "--restored",
            f"mine={tmp_path / 'empty'}",
            "--out",
            tmp_path / "eval",
        ],
        capsys,
    )
    assert rc == 1 and not (tmp_path / "eval" / "metrics.csv").exists()
    _one_line_error(err, "nothing scored")
    assert "1 of 1 restored file(s) missing" in out
    rc, _, err = _run(
        evaluate,
        [
            "--clean",
            tmp_path / "nope",
            "--masks",
            tmp_path / "masks",
            "--restored",
            f"m={tmp_path / 'empty'}",
            "--out",
            tmp_path / "eval",
        ],
        capsys,
    )
    assert rc == 2
    _one_line_error(err, "--clean", "does not exist")
    # synthesize on an empty or missing folder
    rc, _, err = _run(synthesize, ["--images", tmp_path / "empty", "--out", tmp_path / "s"], capsys)
    assert rc == 1
    _one_line_error(err, "no images", "empty")
    rc, _, err = _run(synthesize, ["--images", tmp_path / "nope", "--out", tmp_path / "s"], capsys)
    assert rc == 2
    _one_line_error(err, "--images", "does not exist")


ODD_NAMES = ["with space", "ünï cødé", "a.b.c", "br[1]", "-dash", "UPPER"]


def test_odd_names(tmp_path, he_tiles, capsys):
    for i, name in enumerate(ODD_NAMES):
        suffix = ".PNG" if name == "UPPER" else ".png"
        write_image_atomic(tmp_path / "images" / f"{name}{suffix}", _crop(he_tiles, i))
        write_mask_atomic(tmp_path / "masks" / f"{name}.png", _box())
    rc, out, _ = _run(restore, _restore_argv(tmp_path), capsys)
    assert rc == 0 and "0 skipped" in out
    assert sorted(p.stem for p in (tmp_path / "out").glob("*.png")) == sorted(ODD_NAMES)
    rc, out, err = _run(
        evaluate,
        [
            "--clean",
            tmp_path / "images",
            "--masks",
            tmp_path / "masks",
            "--restored",
            f"t={tmp_path / 'out'}",
            "--out",
            tmp_path / "eval",
        ],
        capsys,
    )
    assert rc == 0, err
    assert {r["image"] for r in csv.DictReader((tmp_path / "eval" / "metrics.csv").open())} == set(ODD_NAMES)
    assert (tmp_path / "eval" / "grid.png").stat().st_size > 0
    rc, _, _ = _run(
        synthesize,
        ["--images", tmp_path / "images", "--count", 3, "--size", SIZE, "--min-tissue", 0, "--out", tmp_path / "s"],
        capsys,
    )
    assert rc == 0


def test_same_stem_in_subfolders_pairs_by_relative_path(tmp_path, he_tiles, capsys):
    imgs = {"a/t": _crop(he_tiles, 0), "b/t": _crop(he_tiles, 1)}
    masks = {"a/t": _box(y=2, x=2), "b/t": _box(y=18, x=16)}
    for rel in imgs:
        _pair(tmp_path, rel, imgs[rel], masks[rel])
    rc, out, _ = _run(restore, _restore_argv(tmp_path), capsys)
    assert rc == 0 and "0 skipped" in out
    assert not (tmp_path / "out" / "t.png").exists(), "outputs keep the subfolder layout"
    for rel in imgs:
        restored = read_image(tmp_path / "out" / f"{rel}.png")
        changed = (restored != imgs[rel]).any(-1)
        assert changed.any() and not changed[~masks[rel]].any(), f"{rel} is restored with its own mask"
    # evaluate --data with subfolders scores both
    data = tmp_path / "data"
    for rel in imgs:
        write_image_atomic(data / "clean" / f"{rel}.png", imgs[rel])
        write_image_atomic(data / "corrupted" / f"{rel}.png", imgs[rel])
        write_mask_atomic(data / "masks" / f"{rel}.png", masks[rel])
    rc, out, _ = _run(evaluate, ["--data", data, "--methods", "identity", "--out", tmp_path / "eval"], capsys)
    assert rc == 0 and "scored 2 of 2 images" in out
    assert {r["image"] for r in csv.DictReader((tmp_path / "eval" / "metrics.csv").open())} == {"a/t", "b/t"}
    # two files standing for one name: refused, listing them
    write_image_atomic(tmp_path / "images" / "a" / "t.jpg", imgs["a/t"])
    rc, _, err = _run(restore, _restore_argv(tmp_path, tmp_path / "out2"), capsys)
    assert rc == 2 and not (tmp_path / "out2").exists()
    _one_line_error(err, "ambiguous", "a/t.jpg and a/t.png")


# ---------------------------------------------------------------- outputs, flags, interrupts (cases 20-22)


def test_unwritable_outputs(tmp_path, he_tiles, capsys, no_model, monkeypatch):
    _pair(tmp_path, "a", _crop(he_tiles, 0), _box())
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out, needle in ((afile, "is a file"), (afile / "sub", "not writable")):
        rc, _, err = _run(restore, _restore_argv(tmp_path, out), capsys)
        assert rc == 2
        _one_line_error(err, "--out", needle)
        rc, _, err = _run(
            evaluate,
            [
                "--clean",
                tmp_path / "images",
                "--masks",
                tmp_path / "masks",
                "--restored",
                f"m={tmp_path / 'images'}",
                "--out",
                out,
            ],
            capsys,
        )
        assert rc == 2
        _one_line_error(err, "--out", needle)
        rc, _, err = _run(synthesize, ["--bundled", "--out", out], capsys)
        assert rc == 2
        _one_line_error(err, "--out", needle)
    rc, _, err = _run(restore, _restore_argv(tmp_path, tmp_path / "images"), capsys)
    assert rc == 2
    _one_line_error(err, "would replace inputs")
    assert afile.read_text() == "x"


def test_disk_full_while_writing_is_one_line(tmp_path, he_tiles, capsys, monkeypatch):
    _pair(tmp_path, "a", _crop(he_tiles, 0), _box())

    def full(path, rgb):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(restore, "write_image_atomic", full)
    rc, _, err = _run(restore, _restore_argv(tmp_path), capsys)
    assert rc == 1
    _one_line_error(err, "cannot write", "No space left on device", "rerun to resume")


def test_a_failing_model_call_costs_only_its_tiles(tmp_path, he_tiles, capsys, monkeypatch):
    from lightning_modules.baselines.classical import OpenCVInpaintRestorer

    for i in range(3):
        _pair(tmp_path, f"t{i}", _crop(he_tiles, i), _box())
    original, calls = OpenCVInpaintRestorer.restore, {"n": 0}

    def flaky(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("out of memory\nsecond line")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(OpenCVInpaintRestorer, "restore", flaky)
    rc, out, _ = _run(restore, _restore_argv(tmp_path, None, "telea", "--batch-size", 1), capsys)
    assert rc == 0 and sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["t0.png", "t2.png"]
    assert "t1.png: restoration failed (RuntimeError: out of memory second line)" in out


NONSENSE = [
    (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--batch-size", "-2"], "--batch-size must be >= 1, got -2"),
    (["--steps", "0"], "--steps must be >= 1, got 0"),
    (["--steps", "-3"], "--steps must be >= 1, got -3"),
    (["--strength", "2"], "--strength must be in (0, 1], got 2.0"),
    (["--strength", "0"], "--strength must be in (0, 1], got 0.0"),
    (["--device", "cuda"], "no CUDA GPU"),
    (["--device", "gpu"], "is not a device"),
    (["--method", "nope"], "--method 'nope' is unknown; choose one of"),
    (["--method", "latent"], "needs --model"),
    (["--masks", "auto"], "--masks auto needs --mask-model DIR"),
    (["--masks", "auto", "--mask-model", "nope"], "--mask-model nope is not a folder"),
    (["--masks", "auto", "--mask-model", ".", "--mask-threshold", "0.5"], "is not an artifact segmenter"),
    (["--mask-model", "."], "--mask-model and --mask-threshold are for --masks auto"),
]


@pytest.mark.parametrize(("extra", "needle"), NONSENSE)
def test_nonsense_flags_fail_before_any_model(tmp_path, he_tiles, capsys, no_model, monkeypatch, extra, needle):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    _pair(tmp_path, "a", _crop(he_tiles, 0), _box())
    argv = [
        "--images",
        tmp_path / "images",
        "--masks",
        tmp_path / "masks",
        "--out",
        tmp_path / "out",
        "--device",
        "cpu",
        "--method",
        "telea",
        *extra,
    ]
    rc, _, err = _run(restore, argv, capsys)
    assert rc == 2
    _one_line_error(err, needle)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--steps", "-3"], "--steps must be >= 1"),
        (["--device", "cuda"], "no CUDA GPU"),
        (["--methods", "identity,nope"], "unknown method(s) nope; choose from"),
        (["--methods", "identity,identity"], "listed twice"),
        (["--methods", "latent"], "latent needs a model folder"),
    ],
)
def test_evaluate_nonsense_flags(tmp_path, he_tiles, capsys, no_model, monkeypatch, extra, needle):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for sub in ("clean", "corrupted"):
        write_image_atomic(tmp_path / "data" / sub / "a.png", _crop(he_tiles, 0))
    write_mask_atomic(tmp_path / "data" / "masks" / "a.png", _box())
    argv = ["--data", tmp_path / "data", "--methods", "identity", "--out", tmp_path / "eval", *extra]
    rc, _, err = _run(evaluate, argv, capsys)
    assert rc == 2
    _one_line_error(err, needle)
    assert not (tmp_path / "eval" / "restored").exists()


def test_unknown_flags_and_repeated_names(tmp_path, he_tiles, capsys):
    for module, argv in (
        (restore, ["--images", "x", "--masks", "y", "--out", "z", "--frobnicate"]),
        (evaluate, ["--out", "z", "--frobnicate"]),
        (synthesize, ["--bundled", "--out", "z", "--frobnicate"]),
    ):
        with pytest.raises(SystemExit) as info:
            module.main(argv)
        assert info.value.code == 2 and "unrecognized arguments: --frobnicate" in capsys.readouterr().err
    _pair(tmp_path, "a", _crop(he_tiles, 0), _box())
    base = ["--clean", tmp_path / "images", "--masks", tmp_path / "masks", "--out", tmp_path / "eval", "--restored"]
    rc, _, err = _run(evaluate, [*base, f"m={tmp_path / 'images'}", f"m={tmp_path / 'masks'}"], capsys)
    assert rc == 2
    _one_line_error(err, "names 'm' twice")
    rc, _, err = _run(evaluate, [*base, f"m={tmp_path / 'images'}", f"m={tmp_path / 'images'}"], capsys)
    assert rc == 0


def test_tiny_images_are_skipped_by_evaluate_not_fatal(tmp_path, he_tiles, capsys):
    data = tmp_path / "data"
    for name, side in (("a_tiny", 6), ("b", SIZE)):
        for sub in ("clean", "corrupted"):
            write_image_atomic(data / sub / f"{name}.png", _crop(he_tiles, 0, side, side))
        write_mask_atomic(data / "masks" / f"{name}.png", _box(side, side, 1, 1, 2, 2))
    rc, out, _ = _run(evaluate, ["--data", data, "--methods", "identity,telea", "--out", tmp_path / "eval"], capsys)
    assert rc == 0 and "scored 1 of 2 images" in out
    assert "identity:a_tiny: cannot be scored: images of size (6, 6) are smaller than the SSIM window" in out


def test_interrupted_synthesize_and_evaluate(tmp_path, he_tiles, capsys, monkeypatch):
    calls = {"n": 0}
    original = synthesize.write_image_atomic

    def stop(*args):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(*args)

    monkeypatch.setattr(synthesize, "write_image_atomic", stop)
    rc, _, err = _run(synthesize, ["--bundled", "--count", 2, "--size", SIZE, "--out", tmp_path / "s"], capsys)
    assert rc == 130 and not list((tmp_path / "s").rglob(".*tmp"))
    _one_line_error(err, "interrupted", "rerun the same command")
    monkeypatch.undo()
    for sub in ("clean", "corrupted"):
        write_image_atomic(tmp_path / "data" / sub / "a.png", _crop(he_tiles, 0))
    write_mask_atomic(tmp_path / "data" / "masks" / "a.png", _box())
    monkeypatch.setattr(restore, "write_image_atomic", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    rc, _, err = _run(evaluate, ["--data", tmp_path / "data", "--methods", "telea", "--out", tmp_path / "e"], capsys)
    assert rc == 130 and not (tmp_path / "e" / "metrics.csv").exists()
    _one_line_error(err, "interrupted after writing 0 output(s)", "rerun the same command to resume")


def test_synthesize_warns_about_dropped_small_images(tmp_path, he_tiles, capsys, caplog):
    write_image_atomic(tmp_path / "src" / "big.png", _crop(he_tiles, 0, 64, 64))
    write_image_atomic(tmp_path / "src" / "small.png", _crop(he_tiles, 1, 20, 24))
    with caplog.at_level("WARNING", logger="datamodules.synthesize"):
        rc, _, _ = _run(
            synthesize,
            ["--images", tmp_path / "src", "--count", 2, "--size", SIZE, "--min-tissue", 0, "--out", tmp_path / "s"],
            capsys,
        )
    assert rc == 0
    assert "small.png (24x20)" in caplog.text and "smaller than --size 32" in caplog.text


# ---------------------------------------------------------------- latent pipeline (cases 7-9, 21, 23, 26, 27)


def _latent_set(root, he_tiles):
    """An odd-sized tile sorting first, a good one, a huge one (windows), a tiny one (skipped)."""
    shapes = {"a_odd": (24, 40), "b_good": (SIZE, SIZE), "c_huge": (72, 48), "d_tiny": (6, 6), "e_small": (12, 20)}
    imgs = {}
    for i, (name, (h, w)) in enumerate(shapes.items()):
        imgs[name] = _crop(he_tiles, i, h, w)
        _pair(root, name, imgs[name], _box(h, w, y=1, x=1, bh=max(1, h // 3), bw=max(1, w // 3)))
    return imgs


def test_odd_huge_and_tiny_tiles_through_a_latent_pipeline(tmp_path, he_tiles, capsys, pipeline_dir):
    imgs = _latent_set(tmp_path, he_tiles)
    rc, out, _ = _run(
        restore,
        _restore_argv(tmp_path, None, "latent", "--model", pipeline_dir, "--steps", 1, "--batch-size", 2),
        capsys,
    )
    assert rc == 0
    assert "reflect-padded to multiples of 16 px" in out and "restored in 32 px windows" in out
    line = next(ln for ln in out.splitlines() if "d_tiny" in ln)
    assert "too small" in line and "at least 9 px" in line
    for name, img in imgs.items():
        if name == "d_tiny":
            assert not (tmp_path / "out" / "d_tiny.png").exists()
            continue
        restored = read_image(tmp_path / "out" / f"{name}.png")
        mask = read_image(tmp_path / "masks" / f"{name}.png")[..., 0] > 0
        assert restored.shape == img.shape
        assert np.array_equal(restored[~mask], img[~mask]), f"{name}: clean pixels bit-exact"
        assert not np.array_equal(restored[mask], img[mask]), f"{name}: artifact regenerated"


def test_evaluate_data_with_an_odd_tile_first_writes_the_report(tmp_path, he_tiles, capsys, pipeline_dir):
    data = tmp_path / "data"
    for name, (h, w) in {"a_odd": (40, 56), "b": (SIZE, SIZE)}.items():
        img = _crop(he_tiles, len(name), h, w)
        write_image_atomic(data / "clean" / f"{name}.png", img)
        write_image_atomic(data / "corrupted" / f"{name}.png", img)
        write_mask_atomic(data / "masks" / f"{name}.png", _box(h, w))
    argv = [
        "--data",
        data,
        "--methods",
        "identity,latent",
        "--model",
        pipeline_dir,
        "--steps",
        1,
        "--out",
        tmp_path / "eval",
    ]
    rc, out, err = _run(evaluate, argv, capsys)
    assert rc == 0, err
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert summary["metrics"]["latent"]["clean"]["mse"]["mean"] == 0.0
    assert summary["metrics"]["latent"]["whole"]["psnr"]["n"] == 2
    first = summary["timings"]["latent"]
    assert first["nfe_per_tile"] == 1 and first["seconds_per_tile"] > 0
    # a rerun resumes and still reports NFE and s/tile of the run that made the files
    rc, out, _ = _run(evaluate, argv, capsys)
    assert rc == 0
    again = json.loads((tmp_path / "eval" / "summary.json").read_text())["timings"]["latent"]
    assert again["already_done"] == 2 and again["nfe_per_tile"] == 1
    assert again["seconds_per_tile"] == pytest.approx(first["seconds_per_tile"])
    assert "n/a" not in (tmp_path / "eval" / "report.md").read_text().split("#### speed")[1].split("####")[0]
    # other settings into the same --out: refused, then --force
    rc, _, err = _run(evaluate, [*argv[:-4], "--steps", 2, "--out", tmp_path / "eval"], capsys)
    assert rc == 2
    _one_line_error(err, "other settings", "steps", "--force")
    rc, _, _ = _run(evaluate, [*argv[:-4], "--steps", 2, "--out", tmp_path / "eval", "--force"], capsys)
    assert rc == 0


def test_interrupt_then_resume_equals_an_uninterrupted_run(tmp_path, he_tiles, capsys, pipeline_dir, monkeypatch):
    _latent_set(tmp_path, he_tiles)
    argv = ["--model", pipeline_dir, "--steps", 1, "--batch-size", 2, "--seed", 7]
    rc, _, _ = _run(restore, _restore_argv(tmp_path, tmp_path / "full", "latent", *argv), capsys)
    assert rc == 0
    rc, _, _ = _run(restore, _restore_argv(tmp_path, tmp_path / "again", "latent", *argv), capsys)
    full, again = _snapshot(tmp_path / "full"), _snapshot(tmp_path / "again")
    pngs = sorted(k.split("/full/")[1] for k in full if k.endswith(".png"))
    assert pngs == ["a_odd.png", "b_good.png", "c_huge.png", "e_small.png"]
    assert all(full[str(tmp_path / "full" / p)] == again[str(tmp_path / "again" / p)] for p in pngs)

    calls = {"n": 0}
    original = RestorationPipeline.restore

    def interrupted(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(RestorationPipeline, "restore", interrupted)
    rc, _, err = _run(restore, _restore_argv(tmp_path, tmp_path / "part", "latent", *argv), capsys)
    assert rc == 130
    _one_line_error(err, "interrupted after writing", "rerun the same command to resume")
    written = sorted(p.name for p in (tmp_path / "part").glob("*.png"))
    assert 0 < len(written) < 4 and not list((tmp_path / "part").glob(".*tmp")), "no partial files"
    monkeypatch.setattr(RestorationPipeline, "restore", original)
    rc, out, _ = _run(restore, _restore_argv(tmp_path, tmp_path / "part", "latent", *argv), capsys)
    assert rc == 0 and f"{len(written)} resumed" in out
    for p in pngs:
        assert (tmp_path / "part" / p).read_bytes() == full[str(tmp_path / "full" / p)], f"{p}: resumed = full run"


def test_rerun_with_other_settings_and_damaged_outputs(tmp_path, he_tiles, capsys, pipeline_dir):
    for i in range(3):
        _pair(tmp_path, f"t{i}", _crop(he_tiles, i), _box())
    out = tmp_path / "out"
    argv = _restore_argv(tmp_path, out, "latent", "--model", pipeline_dir, "--steps", 1)
    assert _run(restore, argv, capsys)[0] == 0
    first = _snapshot(out)
    for extra, needle in (
        (["--steps", 2], "sampler.steps 1 -> 2"),
        (["--seed", 1], "seed 0 -> 1"),
        (["--mask-convention", "keep"], "mask_convention"),
        (["--batch-size", 3], "batch_size"),
    ):
        rc, _, err = _run(restore, [*argv, *extra], capsys)
        assert rc == 2
        _one_line_error(err, "other settings", needle, "new --out", "--force")
    rc, _, err = _run(restore, _restore_argv(tmp_path, out, "telea"), capsys)
    assert rc == 2
    _one_line_error(err, "method 'latent' -> 'telea'")
    assert _snapshot(out) == first, "a refused rerun touches nothing"
    # zero-byte and undecodable outputs are redone, byte for byte
    (out / "t0.png").write_bytes(b"")
    (out / "t1.png").write_bytes(first[str(out / "t1.png")][:100])
    rc, stdout, _ = _run(restore, argv, capsys)
    assert rc == 0 and "restored 2 tile(s)" in stdout and "1 resumed" in stdout
    assert all((out / f"t{i}.png").read_bytes() == first[str(out / f"t{i}.png")] for i in range(3))
    # --force redoes everything with the new settings
    rc, stdout, _ = _run(restore, [*argv, "--steps", 2, "--force"], capsys)
    assert rc == 0 and "restored 3 tile(s)" in stdout
    assert json.loads((out / "restore_manifest.json").read_text())["sampler"]["steps"] == 2
    # a folder of images from elsewhere (no manifest) is not resumed
    foreign = tmp_path / "foreign"
    write_image_atomic(foreign / "t0.png", _crop(he_tiles, 5))
    rc, _, err = _run(restore, _restore_argv(tmp_path, foreign, "latent", "--model", pipeline_dir), capsys)
    assert rc == 2
    _one_line_error(err, "no restore_manifest.json", "--force")


def test_damaged_pipeline_folder(tmp_path, he_tiles, capsys, pipeline_dir):
    _pair(tmp_path, "a", _crop(he_tiles, 0), _box())

    def damaged(name, how):
        pipe = tmp_path / name
        shutil.copytree(pipeline_dir, pipe)
        how(pipe)
        return pipe

    cases = [
        (
            damaged("json", lambda p: (p / "pipeline.json").write_text('{"kind": "latent", ')),
            ["pipeline.json is not valid JSON", "re-export"],
        ),
        (damaged("nojson", lambda p: (p / "pipeline.json").unlink()), ["no pipeline.json"]),
        (
            damaged("weights", lambda p: [f.unlink() for f in (p / "unet").glob("*.safetensors")]),
            ["unet: cannot load", "re-export"],
        ),
        (
            damaged("truncated", lambda p: [f.write_bytes(f.read_bytes()[:200]) for f in (p / "vae").glob("*.safet*")]),
            ["vae: cannot load"],
        ),
        (damaged("novae", lambda p: shutil.rmtree(p / "vae")), ["vae is missing"]),
        (tmp_path / "missing", ["--model", "is not a folder"]),
    ]
    for pipe, needles in cases:
        rc, _, err = _run(
            restore, _restore_argv(tmp_path, tmp_path / f"out_{pipe.name}", "latent", "--model", pipe), capsys
        )
        assert rc in (1, 2), err
        _one_line_error(err, *needles)
        assert not list((tmp_path / f"out_{pipe.name}").glob("*.png"))
    data = tmp_path / "data"
    for sub in ("clean", "corrupted"):
        write_image_atomic(data / sub / "a.png", _crop(he_tiles, 0))
    write_mask_atomic(data / "masks" / "a.png", _box())
    rc, _, err = _run(
        evaluate, ["--data", data, "--methods", "latent", "--model", cases[0][0], "--out", tmp_path / "eval"], capsys
    )
    assert rc == 1
    _one_line_error(err, "pipeline.json is not valid JSON")
    with pytest.raises(ValueError, match="not valid JSON"):
        restore.main(
            [str(a) for a in _restore_argv(tmp_path, tmp_path / "dbg", "latent", "--model", cases[0][0], "--debug")]
        )


def test_bad_training_config_is_one_line(tmp_path, capsys):
    from experiments import train

    rc = train.main(
        [
            "fit",
            "--config",
            "experiments/configs/base.yaml",
            "--config",
            "experiments/configs/model/vae_cpu.yaml",
            "--config",
            "experiments/configs/data/bundled.yaml",
            "--data.init_args.sources",
            str(tmp_path / "nope"),
            "--trainer.fast_dev_run=1",
            "--trainer.logger=false",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    assert rc == 1
    _one_line_error(capsys.readouterr().err, "data source", "nope", "does not exist")


def test_pixel_pipeline_and_cyclegan_take_odd_sizes(tmp_path, he_tiles, capsys):
    """Pixel methods read their own geometry: Swin-UNet patch x 2**(levels-1) x window, CycleGAN's 4 px."""
    from diffusers import DDPMScheduler

    from lightning_modules.components.artifusion import artifusion_scheduler_config
    from lightning_modules.components.gan_networks import ResnetGenerator
    from lightning_modules.components.pipeline import save_pipeline
    from lightning_modules.components.regional_sampler import SamplerConfig
    from lightning_modules.components.swin_unet import build_swin_unet

    torch.manual_seed(0)
    save_pipeline(
        tmp_path / "pixel",
        unet=build_swin_unet("tiny"),
        image_size=SIZE,
        scheduler=DDPMScheduler(**artifusion_scheduler_config(100)),
        sampler=SamplerConfig.from_preset("repaint", num_steps=1),
    )
    ResnetGenerator(ngf=8, n_blocks=1).save_pretrained(tmp_path / "gan")
    imgs = {"odd": _crop(he_tiles, 0, 20, 30), "big": _crop(he_tiles, 1, 40, 36)}
    for name, img in imgs.items():
        _pair(tmp_path, name, img, _box(*img.shape[:2], bh=6, bw=6))
    for method, model in (("artifusion", tmp_path / "pixel"), ("cyclegan", tmp_path / "gan")):
        rc, out, _ = _run(restore, _restore_argv(tmp_path, tmp_path / method, method, "--model", model), capsys)
        assert rc == 0 and "0 skipped" in out and "reflect-padded" in out
        for name, img in imgs.items():
            restored = read_image(tmp_path / method / f"{name}.png")
            assert restored.shape == img.shape
            if method == "artifusion":  # paste-back; CycleGAN rewrites the whole tile by design
                mask = _box(*img.shape[:2], bh=6, bw=6)
                assert np.array_equal(restored[~mask], img[~mask])
