"""Exported pipeline round trip, `experiments.restore` (resume, bad files, mask conventions) and
`experiments.evaluate` in both modes, with tiny random models on real H&E tiles."""

import csv
import json

import numpy as np
import pytest
import torch

from datamodules.datasets import to_mask_tensor, to_tensor, to_uint8
from datamodules.imageio import read_image, write_image_atomic, write_mask_atomic
from experiments import evaluate, restore
from lightning_modules.components.pipeline import RestorationPipeline
from lightning_modules.methods import available_restorers, build_restorer
from tests.tiny_data import write_tiny_evalset, write_tiny_pipeline

SIZE = 64


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "pipeline", SIZE)


@pytest.fixture(scope="module")
def evalset(tmp_path_factory, he_tiles):
    root = write_tiny_evalset(tmp_path_factory.mktemp("evalset"), he_tiles, 3, SIZE)
    items = [{"name": f"t{i}.png", "types": ["ink"] if i else ["ink", "blur"]} for i in range(3)]
    (root / "manifest.json").write_text(json.dumps({"items": items}))
    return root


def _batch(evalset):
    x = torch.stack([to_tensor(read_image(p)) for p in sorted((evalset / "corrupted").iterdir())])
    m = torch.stack([to_mask_tensor(read_image(p)[..., 0] > 0) for p in sorted((evalset / "masks").iterdir())])
    return x, m


def test_pipeline_round_trip_and_clean_region_bit_exact(pipeline_dir, evalset):
    pipe = RestorationPipeline.from_pretrained(pipeline_dir)
    x, m = _batch(evalset)
    out1 = pipe.restore(x, m, generator=torch.Generator().manual_seed(1))
    out2 = pipe.restore(x, m, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out1, out2), "same seed, same output"
    keep = (m == 0).expand_as(x)
    assert torch.equal(out1[keep], x[keep]), "paste-back keeps every clean pixel bit-exact"
    assert not torch.equal(out1[~keep], x[~keep]), "the artifact region is regenerated"
    assert (
        np.array_equal(
            to_uint8(out1)[~keep.permute(0, 2, 3, 1).numpy()], to_uint8(x)[~keep.permute(0, 2, 3, 1).numpy()]
        )
        is False
    )
    assert pipe.nfe == 4
    # export again from the loaded pipeline: identical results
    again = RestorationPipeline.from_pretrained(pipe.save_pretrained(pipeline_dir.parent / "copy"))
    assert torch.equal(again.restore(x, m, generator=torch.Generator().manual_seed(1)), out1)


@pytest.mark.parametrize("scheduler", ["ddim", "dpmsolver++"])
def test_scheduler_swap(pipeline_dir, evalset, scheduler):
    pipe = RestorationPipeline.from_pretrained(pipeline_dir)
    x, m = _batch(evalset)
    out = pipe.restore(x, m, scheduler=scheduler, num_steps=3, generator=torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.isfinite(out).all() and pipe.nfe == 3


def test_reference_preset_has_no_paste_back(pipeline_dir, evalset):
    pipe = RestorationPipeline.from_pretrained(pipeline_dir)
    x, m = _batch(evalset)
    out = pipe.restore(x, m, preset="reference", num_steps=3, generator=torch.Generator().manual_seed(0))
    keep = (m == 0).expand_as(x)
    assert not torch.equal(out[keep], x[keep]), "reference preset returns the VAE reconstruction everywhere"


def test_registry_lists_methods_and_rejects_unknown():
    names = available_restorers()
    assert {"identity", "telea", "ns", "latent", "latent-reference"} <= set(names)
    with pytest.raises(ValueError, match="unknown restoration method 'magic'.*telea"):
        build_restorer("magic")


def test_classical_restorers_only_touch_the_mask(evalset):
    x, m = _batch(evalset)
    for name in ("telea", "ns"):
        out = build_restorer(name).restore(x, m)
        keep = (m == 0).expand_as(x)
        assert torch.equal(out[keep], x[keep])
        assert not torch.equal(out[~keep], x[~keep])


def test_restore_cli_resumes_and_skips_bad_files(pipeline_dir, evalset, tmp_path, capsys):
    images, masks = tmp_path / "images", tmp_path / "masks"
    for p in (evalset / "corrupted").iterdir():
        write_image_atomic(images / p.name, read_image(p))
    for p in (evalset / "masks").iterdir():
        write_mask_atomic(masks / p.name, read_image(p)[..., 0] > 0)
    (images / "bad.png").write_bytes(b"\x89PNG truncated")
    write_mask_atomic(masks / "bad.png", np.zeros((SIZE, SIZE), bool))
    write_image_atomic(images / "orphan.png", read_image(evalset / "clean" / "t0.png"))
    out = tmp_path / "out"
    args = [
        "--model",
        str(pipeline_dir),
        "--images",
        str(images),
        "--masks",
        str(masks),
        "--out",
        str(out),
        "--steps",
        "2",
        "--batch-size",
        "2",
        "--seed",
        "0",
    ]
    assert restore.main(args) == 0
    text = capsys.readouterr().out
    assert sorted(p.name for p in out.glob("*.png")) == ["t0.png", "t1.png", "t2.png"]
    assert "bad.png" in text and "orphan.png" in text and "tiles/s" in text
    first = (out / "t0.png").read_bytes()
    assert restore.main(args) == 0
    assert "resuming: 3 outputs already" in capsys.readouterr().out
    assert (out / "t0.png").read_bytes() == first


def test_restore_cli_keep_convention_inverts_masks(pipeline_dir, evalset, tmp_path):
    keep_masks = tmp_path / "keep"
    for p in (evalset / "masks").iterdir():
        write_mask_atomic(keep_masks / p.name, ~(read_image(p)[..., 0] > 0))  # 255 = keep, 0 = artifact
    out = tmp_path / "out"
    restore.main(
        [
            "--method",
            "telea",
            "--images",
            str(evalset / "corrupted"),
            "--masks",
            str(keep_masks),
            "--out",
            str(out),
            "--mask-convention",
            "keep",
        ]
    )
    for p in (evalset / "corrupted").iterdir():
        restored, corrupted = read_image(out / p.name), read_image(p)
        artifact = read_image(evalset / "masks" / p.name)[..., 0] > 0
        assert np.array_equal(restored[~artifact], corrupted[~artifact])
        assert not np.array_equal(restored[artifact], corrupted[artifact])


def test_restore_cli_auto_masks_from_an_exported_segmenter(pipeline_dir, evalset, tmp_path, capsys):
    from lightning_modules.components.segmenters import build_segmenter, save_segmenter, segment_images

    torch.manual_seed(0)
    net = build_segmenter("tiny").eval()
    seg = save_segmenter(net, tmp_path / "segmenter")
    images = sorted((evalset / "corrupted").iterdir())
    probs = segment_images(net, [read_image(p) for p in images])
    threshold = float(np.quantile(np.concatenate([p.ravel() for p in probs]), 0.9))  # random net: ~10 % artifact
    out = tmp_path / "out"

    def argv(threshold):
        return [
            "--model",
            str(pipeline_dir),
            "--images",
            str(evalset / "corrupted"),
            "--masks",
            "auto",
            "--mask-model",
            str(seg),
            "--mask-threshold",
            str(threshold),
            "--out",
            str(out),
            "--steps",
            "2",
            "--batch-size",
            "2",
        ]

    args = argv(threshold)
    assert restore.main(args) == 0
    changed = 0
    for p, prob in zip(images, probs, strict=True):
        mask = read_image(out / f"{p.stem}.mask.png")[..., 0]
        assert set(np.unique(mask)) <= {0, 255}
        artifact = mask > 0
        assert np.array_equal(artifact, prob > threshold), "the written mask is the segmenter's prediction"
        restored, corrupted = read_image(out / p.name), read_image(p)
        assert np.array_equal(restored[~artifact], corrupted[~artifact]), "outside the predicted mask: bit-exact"
        changed += int(artifact.any() and not np.array_equal(restored[artifact], corrupted[artifact]))
    assert changed > 0, "the predicted artifact region is restored"
    manifest = json.loads((out / restore.MANIFEST).read_text())
    assert manifest["mask_model_fingerprint"] == restore.model_fingerprint(seg)
    assert manifest["mask_threshold"] == threshold and manifest["mask_model"] == str(seg)
    first = (out / "t0.png").read_bytes()
    (out / "t1.mask.png").unlink()  # a lost mask is redone with its output, identically
    capsys.readouterr()
    assert restore.main(args) == 0
    assert "resuming: 2 outputs already" in capsys.readouterr().out
    assert (out / "t0.png").read_bytes() == first and (out / "t1.mask.png").is_file()
    assert restore.main(argv(0.7)) == 2, "another threshold makes other outputs: refused without --force"
    assert "mask_threshold" in capsys.readouterr().err


def test_evaluate_run_mode_writes_csv_summary_report_grid(pipeline_dir, evalset, tmp_path):
    out = tmp_path / "eval"
    assert (
        evaluate.main(
            [
                "--data",
                str(evalset),
                "--methods",
                "identity,telea,latent",
                "--model",
                str(pipeline_dir),
                "--steps",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = list(csv.DictReader((out / "metrics.csv").open()))
    assert set(rows[0]) == {"method", "image", "region", "metric", "value"}
    assert {r["method"] for r in rows} == {"identity", "telea", "latent"}
    assert {r["region"] for r in rows} == {"whole", "artifact", "clean", "boundary"}
    assert {r["metric"] for r in rows} == {"l2", "mse", "psnr", "ssim", "fsim"}
    assert len(rows) == 3 * 3 * 4 * 5
    summary = json.loads((out / "summary.json").read_text())
    ident = summary["metrics"]["identity"]
    assert ident["clean"]["mse"]["mean"] == 0.0, "identity leaves the clean region untouched"
    assert summary["metrics"]["latent"]["clean"]["mse"]["mean"] == 0.0, "paste-back keeps clean tissue exact"
    assert summary["metrics"]["telea"]["artifact"]["psnr"]["mean"] > ident["artifact"]["psnr"]["mean"]
    assert "paired_vs_first" in summary["metrics"]["telea"]["artifact"]["psnr"]
    assert summary["timings"]["latent"]["nfe_per_tile"] == 2
    report = (out / "report.md").read_text()
    assert "| telea |" in report and "grid.png" in report
    assert "| ink | 3 |" in report and "| blur | 1 |" in report, "per-artifact-type table from the manifest"
    assert (out / "grid.png").stat().st_size > 0


def test_evaluate_score_mode_reports_mismatches(evalset, tmp_path):
    restored = tmp_path / "restored"
    for p in list((evalset / "corrupted").iterdir())[:2]:
        write_image_atomic(restored / p.name, read_image(p))
    out = tmp_path / "eval"
    evaluate.main(
        [
            "--clean",
            str(evalset / "clean"),
            "--masks",
            str(evalset / "masks"),
            "--restored",
            f"mine={restored}",
            "--out",
            str(out),
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images"] == 3
    assert any("missing" in s["reason"] for s in summary["skipped"])
    assert summary["metrics"]["mine"]["artifact"]["psnr"]["n"] == 2


def test_evaluate_reports_non_binary_and_counts_empty_masks(evalset, tmp_path):
    import cv2

    masks = tmp_path / "masks"
    masks.mkdir()
    for i, p in enumerate(sorted((evalset / "masks").iterdir())):
        m = read_image(p)[..., 0]
        if i == 0:
            m = np.where(m > 0, 128, 0).astype(np.uint8)  # not a 0/255 mask
        elif i == 1:
            m = np.zeros_like(m)  # an empty mask: nothing to restore
        cv2.imwrite(str(masks / p.name), m)
    out = tmp_path / "eval"
    evaluate.main(
        [
            "--clean",
            str(evalset / "clean"),
            "--masks",
            str(masks),
            "--restored",
            f"id={evalset / 'corrupted'}",
            "--out",
            str(out),
        ]
    )
    summary = json.loads((out / "summary.json").read_text())
    reasons = " ".join(s["reason"] for s in summary["skipped"])
    assert "t0" in " ".join(s["file"] for s in summary["skipped"]) and "128" in reasons
    art = summary["metrics"]["id"]["artifact"]["psnr"]
    assert art["n"] == 1 and art["n_empty"] == 1, "the empty mask is counted, not scored as 0"
    assert summary["metrics"]["id"]["whole"]["psnr"]["n"] == 2


def test_channels_last_and_compile_keep_the_restoration(pipeline_dir, evalset):
    x, m = _batch(evalset)
    plain = RestorationPipeline.from_pretrained(pipeline_dir)
    expected = plain.restore(x, m, generator=torch.Generator().manual_seed(1))
    fast = RestorationPipeline.from_pretrained(pipeline_dir).accelerate(channels_last=True, compile="eager")
    conv = next(p for p in fast.unet.parameters() if p.ndim == 4)
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert fast.performance == {"channels_last": True, "compile": "eager"}
    assert not any("_compiled_unet" in k for k in fast.state_dict()), "the compiled wrapper is not a second copy"
    out = fast.restore(x, m, generator=torch.Generator().manual_seed(1))
    keep = (m == 0).expand_as(x)
    assert torch.equal(out[keep], x[keep])
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=0)


def test_restore_command_takes_channels_last_and_compile_for_pipelines_only(pipeline_dir, evalset, tmp_path):
    argv = ["--images", str(evalset / "corrupted"), "--masks", str(evalset / "masks"), "--device", "cpu"]
    out = tmp_path / "fast"
    assert (
        restore.main([*argv, "--model", str(pipeline_dir), "--out", str(out), "--channels-last", "--compile", "eager"])
        == 0
    )
    manifest = json.loads((out / "restore_manifest.json").read_text())
    assert manifest["channels_last"] is True and manifest["compile"] == "eager"
    assert restore.main([*argv, "--method", "telea", "--out", str(tmp_path / "t"), "--channels-last"]) == 2
