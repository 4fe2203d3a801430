"""Artifact segmenter: offline ImageNet encoder weights, per-type Dice, a tiny LightningCLI fit on synthetic artifacts
of the bundled slides, and the export folder that `restore_slide --mask-model` loads."""

import math

import pytest
import torch

from experiments import export
from experiments.train import cli_main
from lightning_modules.components.classifiers import bundled_efficientnet_lite0_path
from lightning_modules.components.segmenters import build_segmenter, load_segmenter, save_segmenter
from lightning_modules.segmenter import DicePerType

CONFIGS = "experiments/configs"


def test_encoder_starts_from_the_offline_imagenet_weights():
    net = build_segmenter("cpu", pretrained="bundled-efficientnet-lite0")
    source = torch.load(bundled_efficientnet_lite0_path(), map_location="cpu", weights_only=True)
    first = next(iter(source.values()))
    assert torch.equal(net.encoder.conv_stem.weight, first), "stem conv = first tensor of the bundled weights"
    assert net.stride == 32 and net(torch.zeros(1, 3, 64, 64)).shape == (1, 1, 64, 64)
    with pytest.raises(ValueError, match="multiple of 32"):
        net(torch.zeros(1, 3, 48, 48))


def test_dice_per_type_counts_each_tile_for_its_types():
    metric = DicePerType(types=("ink", "fold", "blur"))
    target = torch.zeros(2, 1, 4, 4)
    target[0, 0, :2] = 1  # 8 px
    probs = torch.zeros(2, 1, 4, 4)
    probs[0, 0, :1] = 0.9  # 4 px, all inside the target
    probs[1, 0, 0, 0] = 0.9  # 1 false positive
    metric.update(probs, target, ["ink,fold", "fold"])
    dice = metric.compute()
    assert dice["ink"] == pytest.approx(2 * 4 / (4 + 8))
    assert dice["fold"] == pytest.approx(2 * 4 / (5 + 8))
    assert math.isnan(dice["blur"])


def test_tiny_fit_on_synthetic_artifacts_then_export(tmp_path):
    cli = cli_main(
        [
            "fit",
            "--config",
            f"{CONFIGS}/base.yaml",
            "--config",
            f"{CONFIGS}/model/segmenter_tiny.yaml",
            "--config",
            f"{CONFIGS}/data/bundled_restoration.yaml",
            "--data.init_args.tile_size",
            "64",
            "--data.init_args.stride",
            "64",
            "--data.init_args.batch_size",
            "4",
            "--data.init_args.num_workers",
            "0",
            "--data.init_args.max_tiles",
            "{train: 8, val: 4, test: 4}",
            "--trainer.max_steps",
            "2",
            "--trainer.limit_val_batches",
            "1",
            "--trainer.logger",
            "false",
            "--trainer.default_root_dir",
            str(tmp_path),
        ]
    )
    assert cli.trainer.global_step == 2
    logged = cli.trainer.callback_metrics
    assert {"val/dice", "val/iou", "val/loss"} <= set(logged) and any(k.startswith("val/dice_") for k in logged)
    ckpt = next((tmp_path / "checkpoints").glob("segmenter-*.ckpt"))
    out = tmp_path / "artifact_segmenter"
    assert export.main(["segmenter", "--ckpt", str(ckpt), "--out", str(out), "--image-size", "64"]) == 0
    loaded = load_segmenter(out)
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    module = cli.model.eval()
    assert torch.allclose(loaded.predict_proba(x), torch.sigmoid(module(x)), atol=1e-5)


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    net = build_segmenter("tiny", threshold=0.3).eval()
    path = save_segmenter(net, tmp_path / "seg", extra={"note": "test"})
    again = load_segmenter(path)
    assert again.config.threshold == 0.3 and again.config.extra["note"] == "test"
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    assert torch.equal(again.predict_proba(x), net.predict_proba(x))
    with pytest.raises(FileNotFoundError, match="no segmenter.json"):
        load_segmenter(tmp_path)


def test_cpu_and_paper_configs_parse(tmp_path):
    for size in ("cpu", "paper"):
        cli = cli_main(
            [
                "--config",
                f"{CONFIGS}/base.yaml",
                "--config",
                f"{CONFIGS}/model/segmenter_{size}.yaml",
                "--config",
                f"{CONFIGS}/data/bundled_restoration.yaml",
                "--trainer.logger=false",
                "--trainer.default_root_dir",
                str(tmp_path),
            ],
            run=False,
        )
        assert cli.config["model"]["init_args"]["net"]["init_args"]["size"] == size
        assert cli.model.net.config.extra["size"] == size and cli.datamodule.batch_size in (8, 32)


def test_segment_images_pads_to_the_stride_and_crops_back():
    import numpy as np

    from datamodules.datasets import to_tensor
    from lightning_modules.components.segmenters import segment_images

    torch.manual_seed(0)
    net = build_segmenter("tiny").eval()
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((37, 50), (32, 32), (37, 50))]
    probs = segment_images(net, images, batch_size=1)
    assert [p.shape for p in probs] == [(37, 50), (32, 32), (37, 50)] and all(p.dtype == np.float32 for p in probs)
    padded = np.pad(images[0], ((0, 3), (0, 6), (0, 0)), mode="reflect")  # next multiples of the stride 8
    assert np.array_equal(probs[0], net.predict_proba(to_tensor(padded)[None])[0, 0].numpy()[:37, :50])
    with pytest.raises(ValueError, match="larger than"):
        segment_images(net, images, size=(32, 32))


def test_real_histoqc_annotations_are_scored_per_image_and_pooled(tmp_path, capsys):
    import json

    import numpy as np

    from experiments import segmenter_real

    data = segmenter_real.histoqc_annotations()
    assert set(data) == {"pen_green", "pen_red", "pen_black", "coverslip_edge"}
    for rgb, truth in data.values():
        assert rgb.dtype == np.uint8 and rgb.shape[:2] == truth.shape and 0 < truth.mean() < 0.5
    pred, truth = np.zeros((4, 4), bool), np.zeros((4, 4), bool)
    pred[:2], truth[1:3] = True, True
    s = segmenter_real.scores(pred, truth)
    assert s["dice"] == 0.5 and s["precision"] == 0.5 and s["recall"] == 0.5
    torch.manual_seed(0)
    model = save_segmenter(build_segmenter("tiny").eval(), tmp_path / "seg")
    rgb = data["pen_green"][0][:100, :140]
    prob = segmenter_real.predict(load_segmenter(model), rgb, 2)
    assert prob.shape == (100, 140) and prob.dtype == np.float32 and 0 <= prob.min() <= prob.max() <= 1
    out = tmp_path / "real.json"
    assert segmenter_real.main(["--model", str(model), "--scales", "1", "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [r["image"] for r in records] == ["pen_green", "pen_red", "pen_black", "coverslip_edge", "all"]
    assert sum(r["counts"][2] for r in records[:4]) == records[4]["counts"][2]
    assert "| all | 1x |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        segmenter_real.main(["--model", str(tmp_path), "--scales", "1"])
