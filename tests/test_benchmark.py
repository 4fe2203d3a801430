"""End-to-end checks of ``python -m experiments.benchmark`` at tiny sizes: record layout, NFE, labels, FLOP split.

These are not timing tests: the budgets are tiny and no value of a timing is asserted, only that it is positive.
"""

import contextlib
import io
import json

import pytest

from experiments import benchmark
from experiments.benchmarking.methods import available_methods
from lightning_modules.conditional_latent import CONDITIONAL_SAMPLER

TINY = [
    "--config",
    "tiny",
    "--batch-sizes",
    "1",
    "--precision",
    "fp32",
    "--max-seconds",
    "0.02",
    "--warmup",
    "1",
    "--threads",
    "1",
    "--peak-size",
    "256",
    "--train-batch",
    "2",
]
EXPECTED_NFE = {"latent": 50, "latent-conditional": CONDITIONAL_SAMPLER["num_steps"], "artifusion": 2410, "cyclegan": 1}
LATENT_METHODS = ("latent", "latent-conditional")
RESTORE_KEYS = {
    "method",
    "config",
    "precision",
    "batch_size",
    "seconds_per_tile",
    "nfe",
    "measured_or_extrapolated",
    "flops_per_tile",
    "utilisation",
    "device",
}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One tiny run of every available method; returns (records from the JSON file, printed report)."""
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert benchmark.main([*TINY, "--json", str(out)]) == 0
    return json.loads(out.read_text()), stdout.getvalue()


def _restore(records):
    return {r["method"]: r for r in records if r["record"] == "restore"}


def test_json_is_well_formed(run):
    records, _ = run
    assert isinstance(records, list) and all(isinstance(r, dict) and "record" in r for r in records)
    machines = [r for r in records if r["record"] == "machine"]
    assert len(machines) == 1
    machine = machines[0]
    assert machine["cpu_model"] and machine["threads"] == 1 and machine["torch"]
    assert machine["peaks_flops_per_second"]["fp32"] > 0
    peaks = [r for r in records if r["record"] == "peak"]
    assert {r["when"] for r in peaks} == {"start", "end"} and all(r["flops_per_second"] > 0 for r in peaks)


def test_every_available_method_has_a_record_with_the_right_nfe_and_label(run):
    records, _ = run
    runnable, skipped = available_methods()
    restore = _restore(records)
    assert set(restore) == set(runnable) and "latent" in restore
    assert {r["method"] for r in records if r["record"] == "skipped"} == set(skipped)
    for method, r in restore.items():
        assert RESTORE_KEYS <= set(r), RESTORE_KEYS - set(r)
        assert r["nfe"] == EXPECTED_NFE[method]
        assert r["measured_or_extrapolated"] in ("measured", "extrapolated")
        assert r["config"] == "tiny" and r["precision"] == "fp32" and r["batch_size"] == 1 and r["device"] == "cpu"
        assert r["seconds_per_tile"] > 0 and r["utilisation"] > 0 and r["network_utilisation"] > 0
        assert r["parts_seconds_per_tile"]["eval"] > 0
    if "artifusion" in restore:
        # 2410 tiny evaluations cannot fit a 0.02 s budget: the time is the extrapolation fixed + NFE x per-eval.
        r = restore["artifusion"]
        assert r["measured_or_extrapolated"] == "extrapolated"
        assert r["seconds_per_tile"] == pytest.approx(r["estimate_seconds_per_tile"])
    if "cyclegan" in restore:
        assert restore["cyclegan"]["measured_or_extrapolated"] == "measured"


def test_flops_split_adds_up(run):
    records, _ = run
    for method, r in _restore(records).items():
        assert r["flops_per_eval_per_tile"] > 0
        assert r["flops_fixed_per_tile"] == r["flops_vae_encode_per_tile"] + r["flops_vae_decode_per_tile"]
        assert r["flops_per_tile"] == r["flops_fixed_per_tile"] + r["nfe"] * r["flops_per_eval_per_tile"]
        if method in LATENT_METHODS:
            assert r["flops_vae_encode_per_tile"] > 0 and r["flops_vae_decode_per_tile"] > 0
            assert r["vae_utilisation"] > 0 and r["vae_params"] > 0
        else:
            assert r["flops_fixed_per_tile"] == 0 and r["vae_utilisation"] is None


def test_ratio_training_and_tables(run):
    records, printed = run
    restore = _restore(records)
    ratios = [r for r in records if r["record"] == "ratio"]
    if "artifusion" in restore:
        (ratio,) = ratios
        assert ratio["ratio"] == pytest.approx(
            restore["artifusion"]["seconds_per_tile"] / restore["latent"]["seconds_per_tile"]
        )
    training = [r for r in records if r["record"] == "training"]
    for method in LATENT_METHODS:
        own = [r for r in training if r["method"] == method]
        assert sorted(r["latent_cache"] for r in own) == [False, True], method
    assert all(r["images_per_second"] > 0 and r["flops_per_step"] > 0 and r["batch_size"] == 2 for r in training)
    for title in ("## Restore", "## Denoiser training throughput", "## Matmul peak", "| method | config |"):
        assert title in printed


def test_full_restore_is_measured_when_asked(tmp_path, capsys):
    out = tmp_path / "latent.json"
    benchmark.main([*TINY, "--methods", "latent", "--no-training", "--extrapolate", "never", "--json", str(out)])
    (r,) = _restore(json.loads(out.read_text())).values()
    assert r["measured_or_extrapolated"] == "measured" and r["full_restore_reps"] >= 1 and r["nfe"] == 50
    assert "## Restore" in capsys.readouterr().out


def test_bad_arguments_are_rejected():
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--methods", "latent,nope"])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--batch-sizes", "0"])


@pytest.fixture(scope="module")
def grid_inputs(tmp_path_factory, he_tiles):
    """A tiny trained-pipeline stand-in (random weights) and a 3-tile evaluation set of the tiny config's size."""
    from tests.tiny_data import write_tiny_evalset, write_tiny_pipeline

    root = tmp_path_factory.mktemp("grid")
    return write_tiny_pipeline(root / "pipeline", 64), write_tiny_evalset(root / "evalset", he_tiles, 3, 64)


def test_grid_rows_are_timed_end_to_end_and_scored_against_the_50_step_whole_tile_restore(tmp_path, grid_inputs):
    pipe, evalset = grid_inputs
    out = tmp_path / "grid.json"
    args = [*TINY, "--methods", "latent", "--no-training", "--grid", "--schedulers", "ddim,unipc"]
    args += ["--grid-steps", "2", "--crops", "off,decode", "--quality-model", f"latent={pipe}"]
    args += ["--quality-data", str(evalset)]
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert benchmark.main([*args, "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    rows = [r for r in records if r["record"] == "sampler_row"]
    # the reference (pipeline scheduler, 50 steps, whole tile), the pipeline's own 4 steps, 2 schedulers x 2 steps;
    # each with and without the decode-only crop
    assert [r["row"] for r in rows] == [
        "default 50",
        "default 4",
        "default 4, decode crop",
        "ddim 2",
        "ddim 2, decode crop",
        "unipc 2",
        "unipc 2, decode crop",
    ]
    for r in rows:
        assert {"method", "config", "precision", "batch", "nfe", "seconds_per_tile", "how", "sampler"} <= set(r)
        assert r["how"] == "measured" and r["seconds_per_tile"] > 0 and r["reps"] >= 1
        assert r["quality_tiles"] == 3 and str(pipe) in r["quality_from"] and r["timed_on"] == "evaluation tiles"
    reference = rows[0]
    assert reference["psnr_artifact_delta"] == 0 and reference["speedup_vs_reference"] == 1
    assert reference["nfe"] == 50 and rows[3]["nfe"] == 2 and rows[3]["sampler"]["scheduler"] == "ddim"
    # two steps of a random denoiser restore differently from fifty: the quality columns come from real restores
    assert any(abs(r["psnr_artifact_delta"]) > 1e-3 for r in rows[1:])
    low, high = rows[3]["psnr_artifact_delta_ci"]
    assert low <= rows[3]["psnr_artifact_delta"] <= high
    (target,) = [r for r in records if r["record"] == "speed_target"]
    ok = [r for r in rows if r["psnr_artifact_delta"] >= -0.3]
    assert target["seconds_per_tile"] == min(r["seconds_per_tile"] for r in ok)
    assert target["speedup_vs_reference"] == pytest.approx(reference["seconds_per_tile"] / target["seconds_per_tile"])
    assert "## Sampler grid" in stdout.getvalue()


def test_grid_tiny_autoencoder_rows_are_timed_scored_and_compared_with_their_full_vae_twin(tmp_path, grid_inputs):
    import shutil

    from lightning_modules.components.pipeline import RestorationPipeline, attach_tiny_autoencoder
    from lightning_modules.components.tiny_autoencoder import (
        build_tiny_autoencoder,
        save_tiny_autoencoder,
        teacher_fingerprint,
    )

    pipe, evalset = grid_inputs
    args = [*TINY, "--methods", "latent", "--no-training", "--grid", "--schedulers", "ddim", "--grid-steps", "2"]
    args += ["--crops", "decode", "--autoencoders", "full,tiny,tiny-decoder", "--quality-data", str(evalset)]
    with pytest.raises(SystemExit):  # the scoring pipeline has no tiny autoencoder: refused before any model runs
        benchmark.parse_args([*args, "--quality-model", f"latent={pipe}"])
    with_tiny = tmp_path / "pipeline"
    shutil.copytree(pipe, with_tiny)
    vae = RestorationPipeline.from_pretrained(with_tiny).codec.vae
    student = tmp_path / "student"
    tiny = build_tiny_autoencoder("tiny", latent_channels=vae.config.latent_channels)
    save_tiny_autoencoder(tiny, student, {"teacher_fingerprint": teacher_fingerprint(vae)})
    attach_tiny_autoencoder(with_tiny, student)
    out = tmp_path / "grid.json"
    with contextlib.redirect_stdout(io.StringIO()):
        assert benchmark.main([*args, "--quality-model", f"latent={with_tiny}", "--json", str(out)]) == 0
    rows = {r["row"]: r for r in json.loads(out.read_text()) if r["record"] == "sampler_row"}
    assert {"ddim 2, decode crop", "ddim 2, decode crop, tiny AE", "ddim 2, decode crop, tiny decoder"} <= set(rows)
    tiny_row = rows["ddim 2, decode crop, tiny AE"]
    assert tiny_row["sampler"]["autoencoder"] == "tiny" and tiny_row["how"] == "measured"
    assert tiny_row["psnr_vs_full_autoencoder"] > 0 and "psnr_vs_full_autoencoder" not in rows["ddim 2, decode crop"]
    assert tiny_row["psnr_artifact"] != rows["ddim 2, decode crop"]["psnr_artifact"]


def test_speed_target_takes_the_fastest_row_within_the_tolerance_and_the_fastest_pixel_row():
    from experiments.benchmarking.speed_quality import REFERENCE, target_records

    def row(name, seconds, delta, sampler=None):
        return {
            "record": "sampler_row",
            "method": "latent",
            "config": "paper",
            "precision": "bf16",
            "batch": 8,
            "row": name,
            "sampler": sampler or {"scheduler": "ddim", "num_steps": 4, "crop": "decode"},
            "seconds_per_tile": seconds,
            "psnr_artifact_delta": delta,
        }

    pixel = [
        {
            "record": "restore",
            "method": "artifusion",
            "config": "paper",
            "seconds_per_tile": s,
            "measured_or_extrapolated": h,
        }
        for s, h in ((300.0, "extrapolated"), (120.0, "extrapolated"))
    ]
    records = [
        row("default 50", 4.0, 0.0, REFERENCE.as_dict()),
        row("ddim 4, crop", 0.5, -0.8),  # fastest, but loses too much
        row("ddim 10, crop", 1.0, -0.2),
        row("ddim 20", 2.0, +0.1),
        *pixel,
    ]
    default = {"record": "restore", "method": "latent", "config": "paper", "precision": "bf16", "batch_size": 8}
    records.append({**default, "nfe": 50, "seconds_per_tile": 5.0, "measured_or_extrapolated": "extrapolated"})
    (t,) = target_records(records)
    assert t["row"] == "ddim 10, crop" and t["speedup_vs_reference"] == 4.0 and t["speedup_vs_artifusion"] == 120.0
    assert t["speedup_vs_default_restore"] == 5.0 and t["default_restore_nfe"] == 50
    assert t["artifusion_how"] == "extrapolated"


def test_grid_refuses_a_quality_model_of_the_other_kind(tmp_path, grid_inputs):
    pipe, evalset = grid_inputs
    with pytest.raises(SystemExit, match="not a latent-conditional"):
        benchmark.main(
            [*TINY, "--methods", "latent-conditional", "--no-training", "--grid", "--grid-steps", "2", "--schedulers"]
            + [
                "ddim",
                "--crops",
                "off",
                "--quality-model",
                f"latent-conditional={pipe}",
                "--quality-data",
                str(evalset),
            ]
        )
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--grid", "--quality-model", "latent"])
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--grid", "--quality-model", f"latent={tmp_path / 'missing'}"])


def test_an_extrapolated_restore_is_checked_against_measured_restores_at_smaller_nfe(tmp_path):
    out = tmp_path / "check.json"
    args = [*TINY, "--methods", "artifusion", "--no-training", "--extrapolate", "always", "--check-nfe", "3,6"]
    benchmark.main([*args, "--json", str(out)])
    (r,) = _restore(json.loads(out.read_text())).values()
    assert r["how"] == "extrapolated" and [c["nfe"] for c in r["extrapolation_check"]] == [3, 6]
    for c in r["extrapolation_check"]:
        assert c["measured_seconds"] > 0
        assert c["error"] == pytest.approx(c["predicted_seconds"] / c["measured_seconds"] - 1)
    assert r["extrapolation_error_max"] == max(abs(c["error"]) for c in r["extrapolation_check"])
    out2 = tmp_path / "none.json"
    benchmark.main([*args[:-1], "none", "--json", str(out2)])
    (r,) = _restore(json.loads(out2.read_text())).values()
    assert r["extrapolation_check"] == [] and r["extrapolation_error_max"] is None


def test_folder_bench_restores_the_whole_folder_per_order_and_batch(tmp_path, grid_inputs, capsys):
    from experiments import folder_bench

    pipe, evalset = grid_inputs
    out = tmp_path / "folder.json"
    argv = ["--model", str(pipe), "--method", "latent", "--images", str(evalset / "corrupted")]
    argv += ["--masks", str(evalset / "masks"), "--batch-sizes", "1,2", "--sampler-set", "crop_decode=true"]
    assert folder_bench.main([*argv, "--json", str(out)]) == 0
    records = json.loads(out.read_text())
    assert [(r["order"], r["batch_size"]) for r in records] == [
        ("name", 1),
        ("name", 2),
        ("mask-size", 1),
        ("mask-size", 2),
    ]
    assert all(r["tiles"] == 3 and r["tiles_per_second"] > 0 for r in records)
    assert "crop_decode" in json.dumps(records[0]["sampler"]) and "| mask-size | 2 |" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        folder_bench.main([*argv, "--orders", "size"])
