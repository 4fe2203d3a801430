"""Downstream tissue-classifier study: Lab stain layer, offline weights, Lightning fit, data modules, the study CLI."""

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from datamodules.classification import (
    BUNDLED_CLASSES,
    BundledTissueDataModule,
    ImageFolderClassificationDataModule,
    scan_class_folders,
)
from lightning_modules.components.classifiers import (
    build_classifier,
    bundled_efficientnet_lite0_path,
    load_weights_in_order,
)
from lightning_modules.components.stain_norm import LabStainNorm, lab_to_rgb, rgb_to_lab


def _to_minus1_1(rgb: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 127.5 - 1.0


# ------------------------------------------------------------------------------------------------------ Lab layer


def test_rgb_to_lab_matches_skimage(he_tile):
    skcolor = pytest.importorskip("skimage.color")
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    colours[0, :4] = [[0, 0, 0], [255, 255, 255], [1, 2, 3], [255, 0, 0]]  # black, white, near-black, gamut corner
    for image in (he_tile[:64, :64], colours):
        x = torch.from_numpy(image).permute(2, 0, 1)[None].double() / 255.0
        ours = rgb_to_lab(x)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(ours, skcolor.rgb2lab(image), atol=1e-3)  # skimage rounds 6/29 constants
        np.testing.assert_allclose(lab_to_rgb(rgb_to_lab(x)).numpy(), x.numpy(), atol=1e-9)


def test_lab_stain_norm_round_trips_with_own_statistics(he_tile):
    x = _to_minus1_1(he_tile[:96, :96])
    layer = LabStainNorm(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))  # backbone normalisation = back to [-1, 1]
    mu, s = layer.image_stats(rgb_to_lab((x + 1) / 2))
    layer.set_targets(mu.flatten(), s.flatten())
    torch.testing.assert_close(layer(x), x, atol=2e-4, rtol=0)


def test_lab_stain_norm_moves_statistics_to_targets_and_learns(he_tile):
    layer = LabStainNorm(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5))
    x = _to_minus1_1(he_tile[:96, :96]).requires_grad_(True)
    out = layer.normalize_lab(x)
    mu, _ = layer.image_stats(rgb_to_lab(out.detach()))
    torch.testing.assert_close(mu.flatten(), torch.tensor([54.0, 24.0, -21.0]), atol=2.5, rtol=0)
    layer(x).square().mean().backward()
    assert layer.target_mean.grad is not None and layer.target_mean.grad.abs().sum() > 0
    assert layer.log_target_std.grad.abs().sum() > 0 and torch.isfinite(x.grad).all()
    flat = torch.full((1, 3, 8, 8), 1.0, requires_grad=True)  # white glass: no NaN from a zero std
    layer(flat).sum().backward()
    assert torch.isfinite(flat.grad).all()


# ---------------------------------------------------------------------------------------------- classifier weights


def test_bundled_efficientnet_weights_load_into_timm_in_order():
    path = bundled_efficientnet_lite0_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    torch.manual_seed(0)
    pretrained = build_classifier("tf_efficientnet_lite0", num_classes=5, pretrained="bundled-efficientnet-lite0")
    torch.manual_seed(0)
    random = build_classifier("tf_efficientnet_lite0", num_classes=5, pretrained=False)
    torch.testing.assert_close(pretrained.backbone.conv_stem.weight, source["_conv_stem.weight"])
    torch.testing.assert_close(pretrained.backbone.bn2.running_var, source["_bn1.running_var"])
    assert pretrained.backbone.classifier.weight.shape == (5, 1280)  # head re-initialised, not loaded
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        assert not torch.allclose(pretrained.eval()(x), random.eval()(x), atol=1e-3)
    full = build_classifier("tf_efficientnet_lite0", num_classes=1000, pretrained=str(path), stain_norm=False)
    torch.testing.assert_close(full.backbone.classifier.weight, source["_fc.weight"])  # 1000 classes: head kept


def test_wrong_weights_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="tf_efficientnet_lite0"):
        build_classifier("densenet121", pretrained="bundled-efficientnet-lite0")
    with pytest.raises(ValueError, match="holds 296 tensors"):
        build_classifier("tf_efficientnet_lite1", num_classes=5, pretrained=str(bundled_efficientnet_lite0_path()))
    a, b = torch.nn.Sequential(torch.nn.Linear(3, 4)), torch.nn.Sequential(torch.nn.Linear(4, 3))
    with pytest.raises(ValueError, match=r"tensor 0 '0.weight' has shape \(4, 3\).*\(3, 4\)"):
        load_weights_in_order(b, a.state_dict(), source="a.pth")
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_classifier("test_efficientnet", num_classes=3, pretrained=str(tmp_path / "missing.pth"))


# ------------------------------------------------------------------------------------------------- ImageFolder data


def _write_class_folders(root: Path, templates, classes=("ADI", "TUM"), per_class=4, size=48) -> None:
    for k, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            crop = templates[k % 4][i * size : (i + 1) * size, :size]
            cv2.imwrite(str(root / name / f"{name}_{i}.png"), crop[:, :, ::-1])


def test_imagefolder_empty_class_folder_is_named(tmp_path, he_templates):
    _write_class_folders(tmp_path, he_templates)
    (tmp_path / "MUC").mkdir()
    (tmp_path / "NORM").mkdir()
    (tmp_path / "NORM" / "broken.png").write_bytes(b"")
    with pytest.raises(ValueError, match=r"MUC/.*NORM/ \(1 files, none readable\)"):
        scan_class_folders(tmp_path)


def test_imagefolder_unknown_test_class_and_unreadable_file(tmp_path, he_templates, caplog):
    train, test = tmp_path / "train", tmp_path / "test"
    _write_class_folders(train, he_templates)
    (train / "TUM" / "truncated.png").write_bytes((train / "TUM" / "TUM_0.png").read_bytes()[:100])
    _write_class_folders(test, he_templates, classes=("ADI", "TUM", "XYZ"), per_class=2)
    dm = ImageFolderClassificationDataModule(
        str(train), root_test=str(test), image_size=32, batch_size=2, val_fraction=0.25, num_workers=0
    )
    with pytest.raises(ValueError, match=r"\['XYZ'\] are unknown to the classifier.*\['ADI', 'TUM'\]"):
        dm.setup()
    (test / "XYZ" / "XYZ_0.png").unlink()
    (test / "XYZ" / "XYZ_1.png").unlink()
    (test / "XYZ").rmdir()
    dm = ImageFolderClassificationDataModule(
        str(train), root_test=str(test), image_size=32, batch_size=2, val_fraction=0.25, num_workers=0
    )
    dm.setup()
    assert [p.name for p, _ in dm.skipped] == ["truncated.png"]
    assert len(dm.datasets["train"]) + len(dm.datasets["val"]) == 8 and len(dm.datasets["val"]) == 2
    assert dm.class_names == ["ADI", "TUM"] and len(dm.datasets["test"]) == 4


def test_imagefolder_mixed_sizes_resized_and_warned_once(tmp_path, he_templates, caplog):
    _write_class_folders(tmp_path, he_templates, size=48)
    cv2.imwrite(str(tmp_path / "ADI" / "big.png"), he_templates[0][:80, :80, ::-1])
    dm = ImageFolderClassificationDataModule(str(tmp_path), image_size=40, batch_size=4, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="datamodules.classification"):
        dm.setup()
    assert sum("mixed sizes" in r.message for r in caplog.records) == 1
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (4, 3, 40, 40) and batch["label"].dtype == torch.long
    assert batch["image"].min() >= -1 and batch["image"].max() <= 1


# ----------------------------------------------------------------------------------------------------- bundled data


def test_bundled_labels_are_spatially_disjoint_across_splits():
    dm = BundledTissueDataModule(max_per_class={"train": 1000, "val": 1000, "test": 1000})
    tiles = dm.split_tiles(__import__("datamodules.sources", fromlist=["x"]).bundled_sources())
    for cls in range(len(BUNDLED_CLASSES)):
        boxes = {s: [ref.box for c, ref in t if c == cls] for s, t in tiles.items()}
        assert all(boxes[s] for s in boxes), f"class {BUNDLED_CLASSES[cls]} misses a split"
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            for x0, y0, x1, y1 in boxes[a]:
                for u0, v0, u1, v1 in boxes[b]:
                    assert x1 <= u0 or u1 <= x0 or y1 <= v0 or v1 <= y0, (cls, a, b)
    assert len({ref.source for c, ref in tiles["test"] if c == 0}) == 1  # one image per class


def test_bundled_datamodule_batches_and_caps():
    dm = BundledTissueDataModule(image_size=48, max_per_class={"train": 6, "val": 2, "test": 3}, batch_size=5)
    dm.setup()
    assert dm.num_classes == 5 and "NOT tissue types" in dm.labels_description
    assert len(dm.datasets["test"]) == 15 and sorted(set(dm.datasets["test"].labels)) == [0, 1, 2, 3, 4]
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (5, 3, 48, 48) and batch["label"].shape == (5,)
    assert set(batch["meta"]["class_name"]) <= set(BUNDLED_CLASSES)


# ------------------------------------------------------------------------------------------------ Lightning module


def test_fit_logs_val_metrics_and_reloads(tmp_path, he_templates):
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_modules.classifier import TissueClassifierModule

    _write_class_folders(tmp_path / "data", he_templates, per_class=4, size=40)
    dm = ImageFolderClassificationDataModule(
        str(tmp_path / "data"), image_size=32, batch_size=4, val_fraction=0.5, num_workers=0
    )
    spec = {"name": "test_efficientnet", "num_classes": 2, "pretrained": False, "stain_norm": True}
    module = TissueClassifierModule(build_classifier(**spec), num_classes=2, class_names=["ADI", "TUM"], net_spec=spec)
    target_before = module.net.normalize.target_mean.detach().clone()
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="val/acc", mode="max")
    trainer = L.Trainer(
        max_steps=2,
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        callbacks=[ckpt],
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(module, datamodule=dm)
    assert {"val/acc", "val/f1", "val/loss", "train/acc"} <= set(trainer.callback_metrics)
    assert 0.0 <= float(trainer.callback_metrics["val/acc"]) <= 1.0
    assert module.confusion["val"].sum() == 4  # 2 val images per class
    assert not torch.equal(module.net.normalize.target_mean.detach(), target_before)  # Lab targets are trained
    loaded = TissueClassifierModule.load_for_eval(ckpt.best_model_path)
    assert loaded.class_names == ["ADI", "TUM"]
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), module.eval()(x))


# ----------------------------------------------------------------------------------------------------------- study


def test_study_statistics_and_failure_handling():
    from torchmetrics.functional.classification import multiclass_f1_score

    from experiments.downstream import _restore_batch, condition_metrics, macro_f1, synthesize_at

    rng = np.random.default_rng(0)
    labels, preds = rng.integers(0, 4, 50), rng.integers(0, 4, 50)
    expected = multiclass_f1_score(torch.from_numpy(preds), torch.from_numpy(labels), 5, average="macro")
    assert macro_f1(labels, preds, 5) == pytest.approx(float(expected), abs=1e-6)  # class 4 absent: ignored
    m = condition_metrics(labels, preds, 5, n_boot=200, seed=0)
    assert m["ci95"][0] <= m["accuracy"] <= m["ci95"][1] and m["n"] == 50
    assert m["macro_f1_ci95"][0] <= m["macro_f1"] <= m["macro_f1_ci95"][1]

    class Flaky:
        name = "flaky"

        def restore(self, corrupted, mask, *, generator=None):
            if corrupted.shape[0] > 1 or corrupted[0, 0, 0, 0] > 0.5:
                raise RuntimeError("boom")
            return corrupted

    x = torch.zeros(3, 3, 8, 8)
    x[1] = 1.0
    outs, failures = _restore_batch(Flaky(), x, torch.zeros(3, 1, 8, 8), ["a", "b", "c"], None)
    assert [o is None for o in outs] == [False, True, False]
    assert failures == [{"method": "flaky", "image": "b", "error": "RuntimeError: boom"}]

    from datamodules.artifacts import ArtifactSynthesizer

    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    bad, mask, bad_big, mask_big = synthesize_at(image, ArtifactSynthesizer(), np.random.default_rng(1), 256)
    assert bad.shape == image.shape and mask.any()
    assert np.array_equal(bad[~mask], image[~mask])
    assert bad_big.shape == (256, 256, 3) and mask_big.shape == (256, 256) and mask_big.any()

    from experiments.downstream import to_input_size

    restored_big = torch.zeros(1, 3, 256, 256)
    small = to_input_size(restored_big, torch.ones(1, 3, 64, 64), torch.from_numpy(mask)[None, None].float())
    assert small.shape == (1, 3, 64, 64)
    assert torch.all(small[0, :, ~torch.from_numpy(mask)] == 1), "outside the mask the corrupted input is kept"
    inside = small[0, :, torch.from_numpy(mask)]
    assert inside.abs().max() <= 1 / 127.5, "inside the mask: the restored tile (resized at 8 bits)"
    from datamodules.datasets import to_tensor

    identity = to_input_size(to_tensor(bad_big)[None], to_tensor(bad)[None], torch.from_numpy(mask)[None, None])
    assert torch.equal(identity[0], to_tensor(bad)), "identity restorer == the artifact condition exactly"


@pytest.mark.slow
def test_downstream_quick_study_writes_wellformed_json(tmp_path):
    from experiments.downstream import main

    out = tmp_path / "study"
    assert (
        main(
            [
                "--out",
                str(out),
                "--quick",
                "--methods",
                "identity,telea",
                "--classifier",
                "test_efficientnet",
                "--pretrained",
                "none",
                "--n-boot",
                "100",
                "--epochs",
                "1",
            ]
        )
        == 0
    )
    result = json.loads((out / "downstream.json").read_text())
    assert {"clean", "artifact", "restored", "checkpoint", "selected_on", "labels", "n_test"} <= set(result)
    assert result["selected_on"] == "val" and Path(result["checkpoint"]).is_file()
    assert set(result["restored"]) == {"identity", "telea"} and result["n_test"] == 30
    for cond in [result["clean"], result["artifact"], *result["restored"].values()]:
        assert 0 <= cond["accuracy"] <= 1 and 0 <= cond["macro_f1"] <= 1 and len(cond["ci95"]) == 2
        assert cond["ci95"][0] <= cond["accuracy"] <= cond["ci95"][1] and cond["n"] == 30
    assert result["restored"]["identity"]["accuracy"] == result["artifact"]["accuracy"]  # identity = no restoration
    assert "NOT tissue types" in result["labels"]
    for name in ("clean", "artifact", "restored_identity", "restored_telea"):
        assert (out / f"confusion_{name}.png").stat().st_size > 1000
    assert "| restored: telea | 30 |" in (out / "downstream.md").read_text()


def test_the_downstream_classifier_does_not_depend_on_the_restorers_built_before_it(tmp_path):
    """Building a restorer draws random init from the global RNG; the classifier must start from the same state."""
    from experiments import downstream

    args = downstream.DownstreamJob(out=tmp_path, quick=True, pretrained="none")
    weights = []
    for draws in (0, 1000):
        torch.rand(draws)  # what building one more (or one fewer) restorer does to the global RNG
        cli = downstream.build_recipe(args)
        weights.append(torch.cat([p.detach().flatten() for p in cli.model.net.parameters()]))
    torch.testing.assert_close(weights[0], weights[1], rtol=0, atol=0)


def test_the_downstream_recipe_is_the_train_recipe_with_the_jobs_values(tmp_path):
    """The study composes the configs experiments.train uses and overrides only what the job sets."""
    from experiments import downstream

    cli = downstream.build_recipe(downstream.DownstreamJob(out=tmp_path, quick=True, lr=3e-4, seed=5))
    config = cli.config
    assert config["model"]["class_path"] == "lightning_modules.classifier.TissueClassifierModule"
    assert config["model"]["init_args"]["net"]["init_args"]["name"] == "tf_efficientnet_lite0"  # from the config
    assert config["model"]["init_args"]["net"]["init_args"]["pretrained"] == "bundled-efficientnet-lite0"
    assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 3e-4 and config["seed_everything"] == 5
    assert config["trainer"]["max_epochs"] == downstream.QUICK["epochs"]
    assert cli.datamodule.image_size == downstream.QUICK["image_size"]
    assert cli.model.hparams.net_spec["name"] == "tf_efficientnet_lite0"  # so load_for_eval can rebuild it
    other = downstream.recipe_args(downstream.DownstreamJob(out=tmp_path, classifier="resnet18"))
    assert any(a.endswith("net.init_args.pretrained=false") for a in other), "config weights fit only lite0"
