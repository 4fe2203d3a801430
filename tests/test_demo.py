"""The demo's artifact-segmenter stage: quick settings include it, it trains through LightningCLI and exports
``artifact_segmenter/``, its Dice lands in the report, and the stage mechanism skips it when done."""

import json

import pytest
import torch

from experiments import demo
from lightning_modules.components.segmenters import build_segmenter, load_segmenter, save_segmenter


@pytest.fixture(autouse=True)
def _one_thread():
    # two threads on a busy 2-core machine make these models many times slower; one is plenty
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_quick_and_full_settings_size_the_segmenter_stage():
    quick, full = demo.DemoSettings.quick(), demo.DemoSettings()
    assert 0 < quick.segmenter_steps < full.segmenter_steps <= 240
    for s in (quick, full):
        assert s.segmenter_tile % 32 == 0, "the CPU segmenter's deepest stride is 32"
    assert quick.digest("segmenter_steps") != full.digest("segmenter_steps")


def test_quick_segmenter_trains_through_the_cli_and_exports(tmp_path):
    s = demo.DemoSettings.quick()
    path = demo.train_segmenter(tmp_path, s)
    assert path == tmp_path / demo.SEGMENTER
    net = load_segmenter(path)
    assert net.config.extra["size"] == "cpu" and net.config.extra["steps"] == s.segmenter_steps
    assert net.predict_proba(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    assert list((tmp_path / "runs").rglob("segmenter-*.ckpt")), "the config's checkpoint callback ran"


def _fake_export(path, steps=3):
    torch.manual_seed(0)
    return save_segmenter(build_segmenter("tiny").eval(), path, extra={"steps": steps, "tile_size": 64})


def test_demo_quick_runs_the_segmenter_stage_once_and_reports_its_dice(tmp_path, monkeypatch, capsys):
    """Every other stage is stubbed: this checks the wiring (stage, digest, Dice on evalset/, report)."""
    from datamodules import gallery
    from experiments import ceilings, downstream, evaluate

    calls = []

    def train_segmenter(out, s):
        calls.append(s.segmenter_steps)
        return _fake_export(out / demo.SEGMENTER, s.segmenter_steps)

    def study(job):
        folder = tmp_path / "out" / "downstream"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "downstream.json").write_text("{}")

    refiner_calls = []

    def train_refiner(out, s):
        refiner_calls.append(s.refiner_steps)
        (out / "pipeline_conditional" / "refiner").mkdir(parents=True, exist_ok=True)

    for name in ("train_vae", "train_latent", "train_conditional"):
        monkeypatch.setattr(demo, name, lambda out, s: None)
    monkeypatch.setattr(demo, "train_segmenter", train_segmenter)
    monkeypatch.setattr(demo, "train_refiner", train_refiner)
    monkeypatch.setattr(gallery, "write_gallery", lambda out, **_: out)
    monkeypatch.setattr(evaluate, "evaluate", lambda job: {})
    monkeypatch.setattr(ceilings, "main", lambda argv: 0)
    monkeypatch.setattr(downstream, "run", study)
    out = tmp_path / "out"
    argv = ["--quick", "--no-baselines", "--out", str(out)]
    assert demo.main(argv) == 0
    assert calls == [demo.DemoSettings.quick().segmenter_steps]
    figures = json.loads((out / "segmenter_eval.json").read_text())
    assert figures["tiles"] == demo.DemoSettings.quick().test_count and 0 <= figures["dice"] <= 1
    assert figures["seconds"] < 20
    report = (out / "report.md").read_text()
    assert "## Automatic artifact masks" in report and f"**{figures['dice']:.3f}**" in report
    assert "| train artifact segmenter + export artifact_segmenter |" in report
    capsys.readouterr()
    assert demo.main(argv) == 0
    assert calls == [demo.DemoSettings.quick().segmenter_steps], "done before with the same settings: skipped"
    assert len(refiner_calls) == 1
    (out / "pipeline_conditional" / "refiner").rmdir()
    assert demo.main(argv) == 0
    assert len(refiner_calls) == 2, "a re-exported pipeline without its refiner/ reruns the refiner stage"
    assert "train artifact segmenter + export artifact_segmenter: done before" in capsys.readouterr().out


def test_segmenter_dice_counts_pixels_and_types(tmp_path):
    import numpy as np

    from datamodules.imageio import write_image_atomic, write_mask_atomic
    from lightning_modules.components.segmenters import segment_images

    torch.manual_seed(0)
    net = build_segmenter("tiny").eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (32, 32, 3), dtype=np.uint8) for _ in range(2)]
    probs = segment_images(net, images)
    net.config.threshold = float(np.median(np.concatenate([p.ravel() for p in probs])))  # about half the pixels
    seg = save_segmenter(net, tmp_path / "seg")
    preds = [p > net.config.threshold for p in probs]
    truths = [preds[0].copy(), np.zeros((32, 32), bool)]  # tile 0: exact; tile 1: a 4x4 corner
    truths[1][:4, :4] = True
    for i, (img, truth) in enumerate(zip(images, truths, strict=True)):
        write_image_atomic(tmp_path / "ev" / "corrupted" / f"t{i}.png", img)
        write_mask_atomic(tmp_path / "ev" / "masks" / f"t{i}.png", truth)
    (tmp_path / "ev" / "manifest.json").write_text(
        json.dumps({"items": [{"name": "t0.png", "types": ["ink"]}, {"name": "t1.png", "types": ["fold"]}]})
    )
    r = demo.segmenter_dice(seg, tmp_path / "ev")
    inter = [int((p & t).sum()) for p, t in zip(preds, truths, strict=True)]
    sizes = [int(p.sum() + t.sum()) for p, t in zip(preds, truths, strict=True)]
    assert preds[0].any() and preds[1].any()
    assert r["tiles"] == 2 and r["threshold"] == net.config.threshold
    assert r["dice"] == pytest.approx(2 * sum(inter) / sum(sizes)), "pooled over every pixel"
    assert r["per_type"] == {"fold": pytest.approx(2 * inter[1] / sizes[1]), "ink": pytest.approx(1.0)}
    assert r["mean_tile_dice"] == pytest.approx((1.0 + 2 * inter[1] / sizes[1]) / 2)


def test_an_edited_training_config_changes_the_stage_fingerprint(tmp_path):
    """A stage is reused only when its settings AND the configs it composes are unchanged (never a stale model)."""
    (tmp_path / "model").mkdir()
    config = tmp_path / "model" / "x.yaml"
    config.write_text("model:\n  lr: 1.0e-3\n")
    before = demo.configs_fingerprint(tmp_path)
    assert demo.configs_fingerprint(tmp_path) == before, "deterministic"
    config.write_text("model:\n  lr: 3.0e-4\n")
    assert demo.configs_fingerprint(tmp_path) != before
    assert len(demo.configs_fingerprint()) == 16, "the shipped configs hash"
