"""Sampler settings files: every bundled file is valid, errors name the file, flags win over the file, ``base:``
resets to a preset, and restore / evaluate / downstream / benchmark take ``--sampler`` and record it."""

import dataclasses
import json
import logging

import pytest
import torch

from experiments import evaluate, restore
from lightning_modules.components.pipeline import RestorationPipeline
from lightning_modules.components.regional_sampler import SamplerConfig
from lightning_modules.components.sampler_files import (
    SAMPLER_DIR,
    SamplerSpec,
    allowed_keys,
    apply_sampler,
    load_sampler_file,
    parse_sampler_sets,
    sampler_kwargs,
)
from lightning_modules.components.schedulers import scheduler_names
from tests.tiny_data import write_tiny_evalset, write_tiny_pipeline

SIZE = 64
FILES = sorted(SAMPLER_DIR.glob("*.yaml"))
# no_refine.yaml sets `refine`, which lands in SamplerConfig with the pixel refiner; until then it cannot validate.
HAS_REFINE = "refine" in {f.name for f in dataclasses.fields(SamplerConfig)}
VALID_FILES = [p for p in FILES if HAS_REFINE or p.name != "no_refine.yaml"]
REQUIRED = {
    "repaint",
    "reference",
    "conditional",
    "steps_4",
    "steps_10",
    "steps_20",
    "steps_50",
    "ddim_10",
    "dpmsolver_10",
    "strength_0.5",
    "dilate_1",
    "dilate_2",
    "feather_0",
    "feather_4",
    "jumps_10x10",
    "color_match",
    "decode_full",
    "decode_delta",
    "decode_adaptive",
    "no_refine",
}


@pytest.fixture(scope="module")
def pipeline_dir(tmp_path_factory):
    return write_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "pipeline", SIZE)


@pytest.fixture(scope="module")
def evalset(tmp_path_factory, he_tiles):
    root = write_tiny_evalset(tmp_path_factory.mktemp("evalset"), he_tiles, 1, SIZE)
    return root


def _write(tmp_path, text, name="s.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _restore_argv(pipeline_dir, evalset, out, *extra):
    return [
        "--model",
        str(pipeline_dir),
        "--images",
        str(evalset / "corrupted"),
        "--masks",
        str(evalset / "masks"),
        "--out",
        str(out),
        "--batch-size",
        "2",
        *map(str, extra),
    ]


# ------------------------------------------------------------------------------------------------- the files


def test_the_bundled_files_cover_every_preset_and_ablation_row():
    assert REQUIRED <= {p.stem for p in FILES}
    for path in FILES:
        first = path.read_text().splitlines()[0]
        assert first.startswith("# "), f"{path.name} starts with a comment saying what the row ablates"


@pytest.mark.parametrize("path", VALID_FILES, ids=lambda p: p.name)
def test_every_sampler_file_loads_and_builds_a_valid_config(path):
    spec = load_sampler_file(path)
    assert set(spec.overrides) | {"base", "scheduler"} <= set(allowed_keys())
    for stored in (
        SamplerConfig.from_preset("repaint", num_steps=4, feather=2),
        SamplerConfig.from_preset("reference"),
    ):
        config, scheduler = apply_sampler(stored, spec)
        assert isinstance(config, SamplerConfig)
        assert scheduler in (None, *scheduler_names())
    json.dumps(spec.to_dict())


def test_no_refine_waits_for_the_refine_field():
    path = SAMPLER_DIR / "no_refine.yaml"
    if HAS_REFINE:
        assert load_sampler_file(path).overrides == {"refine": False}
    else:
        with pytest.raises(ValueError, match="no_refine.yaml.*unknown key 'refine'"):
            load_sampler_file(path)


def test_preset_files_hold_the_presets_and_the_conditional_defaults():
    stored = SamplerConfig.from_preset("repaint", num_steps=4, feather=2)
    assert apply_sampler(stored, load_sampler_file(SAMPLER_DIR / "repaint.yaml")) == (
        SamplerConfig.from_preset("repaint"),
        "ddpm",
    )
    assert apply_sampler(stored, load_sampler_file(SAMPLER_DIR / "reference.yaml"))[0] == SamplerConfig.from_preset(
        "reference"
    )
    config, scheduler = apply_sampler(
        SamplerConfig.from_preset("reference"), load_sampler_file(SAMPLER_DIR / "conditional.yaml")
    )
    assert (config.preset, config.num_steps, config.decode, config.feather, scheduler) == (
        "repaint",
        1,
        "adaptive",
        2,
        "ddim",
    )
    jumps = load_sampler_file(SAMPLER_DIR / "jumps_10x10.yaml").overrides
    assert jumps == {"jump_length": 10, "jump_n_sample": 10}, "paper's j = 10, r = 10 (r counts every run)"


def test_kwargs_give_make_sampler_the_same_config_as_apply_sampler(pipeline_dir):
    pipe = RestorationPipeline.from_pretrained(pipeline_dir)
    for path in VALID_FILES:
        spec = load_sampler_file(path)
        expected, scheduler = apply_sampler(pipe.sampler_config, spec)
        sampler = pipe.make_sampler(**sampler_kwargs(spec))
        assert sampler.config == expected, path.name
        assert scheduler is None or sampler._scheduler_cls.__name__.lower().startswith(scheduler[:4]), path.name


# ------------------------------------------------------------------------------------------------- errors


def test_unknown_key_names_the_file_the_key_and_the_allowed_keys(tmp_path):
    path = _write(tmp_path, "num_step: 4\n")
    with pytest.raises(ValueError) as err:
        load_sampler_file(path)
    text = str(err.value)
    assert str(path) in text and "'num_step'" in text and "num_steps" in text and "base" in text
    assert "\n" not in text


@pytest.mark.parametrize(
    "body, words",
    [
        ("num_steps: 0\n", "num_steps must be an int >= 1"),
        ("strength: 1.5\n", "strength must be in (0, 1]"),
        ("paste_back: 'yes'\n", "paste_back must be true or false"),
        ("decode: fancy\n", "unknown decode 'fancy'"),
        ("scheduler: euler\n", "unknown scheduler 'euler'"),
        ("base: textbook\n", "unknown preset 'textbook'"),
        ("feather: null\n", "feather is null"),
        ("base: repaint\npreset: reference\n", "disagree"),
        ("- num_steps\n", "expected a mapping"),
    ],
)
def test_bad_values_name_the_file(tmp_path, body, words):
    path = _write(tmp_path, body)
    with pytest.raises(ValueError) as err:
        load_sampler_file(path)
    assert str(path) in str(err.value) and words in str(err.value)


def test_bad_yaml_and_missing_file_give_one_line_naming_the_file(tmp_path):
    path = _write(tmp_path, "num_steps: [4\nfeather: 2\n")
    with pytest.raises(ValueError) as err:
        load_sampler_file(path)
    assert str(path) in str(err.value) and "invalid YAML" in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(ValueError, match="nope.yaml: cannot read"):
        load_sampler_file(tmp_path / "nope.yaml")
    assert load_sampler_file(_write(tmp_path, "# only a comment\n")) == SamplerSpec()


def test_sampler_set_parses_yaml_values_and_validates():
    assert parse_sampler_sets(["feather=4", "paste_back=false", "strength=0.5"]) == {
        "feather": 4,
        "paste_back": False,
        "strength": 0.5,
    }
    for items, words in (
        (["feather"], "KEY=VALUE"),
        (["fether=4"], "unknown key 'fether'"),
        (["feather=-1"], "feather must be an int >= 0"),
        (["preset=reference"], "--preset"),
        (["feather=1", "feather=2"], "twice"),
    ):
        with pytest.raises(ValueError, match=words):
            parse_sampler_sets(items)


# ------------------------------------------------------------------------------------------- precedence, base


def test_cli_override_beats_the_file_and_base_resets_to_the_preset():
    stored = SamplerConfig.from_preset("repaint", num_steps=4, feather=2)
    steps_4 = load_sampler_file(SAMPLER_DIR / "steps_4.yaml")
    assert apply_sampler(stored, steps_4, {"num_steps": 10})[0].num_steps == 10, "the flag wins"
    assert apply_sampler(stored, steps_4)[0].feather == 2, "without base the stored settings stay"
    based = SamplerSpec(base="repaint", overrides={"num_steps": 4})
    assert apply_sampler(stored, based)[0] == SamplerConfig.from_preset("repaint", num_steps=4), "feather back to 0"
    config, _ = apply_sampler(stored, based, {"preset": "reference"})
    assert config == SamplerConfig.from_preset("reference", num_steps=4), "--preset replaces the file's base"
    ddim = load_sampler_file(SAMPLER_DIR / "ddim_10.yaml")
    assert apply_sampler(stored, ddim, {"scheduler": "ddpm"})[1] == "ddpm"


def test_restore_resolves_file_then_flags_and_refuses_contradictions(pipeline_dir, evalset, tmp_path):
    args = restore.parse_args(
        _restore_argv(
            pipeline_dir,
            evalset,
            tmp_path / "o",
            "--sampler",
            SAMPLER_DIR / "steps_4.yaml",
            "--steps",
            "6",
            "--sampler-set",
            "feather=3",
        )
    )
    spec, kwargs = restore.resolve_sampler(args)
    assert spec.overrides == {"num_steps": 4} and kwargs == {"num_steps": 6, "feather": 3}
    clash = restore.parse_args(
        _restore_argv(pipeline_dir, evalset, tmp_path / "o", "--steps", "6", "--sampler-set", "num_steps=5")
    )
    with pytest.raises(restore.CLIError, match="contradicts"):
        restore.resolve_sampler(clash)
    nothing = restore.parse_args(
        _restore_argv(
            pipeline_dir, evalset, tmp_path / "o", "--sampler", SAMPLER_DIR / "strength_0.5.yaml", "--steps", "1"
        )
    )
    with pytest.raises(restore.CLIError, match="runs no step"):
        restore.resolve_sampler(nothing)


# --------------------------------------------------------------------------------------------- the commands


def test_restore_with_steps_4_and_steps_10_records_the_file_and_refuses_a_resume_with_another(
    pipeline_dir, evalset, tmp_path, capsys
):
    out4, out10 = tmp_path / "s4", tmp_path / "s10"
    assert restore.main(_restore_argv(pipeline_dir, evalset, out4, "--sampler", SAMPLER_DIR / "steps_4.yaml")) == 0
    assert "4 NFE per tile" in capsys.readouterr().out
    assert restore.main(_restore_argv(pipeline_dir, evalset, out10, "--sampler", SAMPLER_DIR / "steps_10.yaml")) == 0
    assert "10 NFE per tile" in capsys.readouterr().out
    assert (out4 / "t0.png").read_bytes() != (out10 / "t0.png").read_bytes()
    manifest = json.loads((out4 / restore.MANIFEST).read_text())
    assert manifest["sampler_file"] == {
        "file": str(SAMPLER_DIR / "steps_4.yaml"),
        "spec": {"base": None, "scheduler": None, "overrides": {"num_steps": 4}},
        "overrides": {"num_steps": 4},
    }
    assert manifest["sampler"]["file"]["overrides"] == {"num_steps": 4}
    again = _restore_argv(pipeline_dir, evalset, out4, "--sampler", SAMPLER_DIR / "steps_4.yaml")
    assert restore.main(again) == 0 and "resuming: 1 outputs" in capsys.readouterr().out
    other = _restore_argv(pipeline_dir, evalset, out4, "--sampler", SAMPLER_DIR / "steps_10.yaml")
    assert restore.main(other) == 2
    err = capsys.readouterr().err
    assert "sampler.file.overrides.num_steps 4 -> 10" in err and err.count("\n") == 1
    assert restore.main(_restore_argv(pipeline_dir, evalset, out4)) == 2, "dropping the file changes the settings"
    assert "sampler.file.overrides.num_steps 4 -> None" in capsys.readouterr().err


def test_restore_refuses_a_sampler_for_methods_without_one_and_bad_files(pipeline_dir, evalset, tmp_path, capsys):
    argv = [
        "--method",
        "telea",
        "--images",
        str(evalset / "corrupted"),
        "--masks",
        str(evalset / "masks"),
        "--out",
        str(tmp_path / "t"),
        "--sampler",
        str(SAMPLER_DIR / "steps_4.yaml"),
    ]
    assert restore.main(argv) == 2
    assert "telea has no diffusion sampler" in capsys.readouterr().err
    assert not (tmp_path / "t" / restore.MANIFEST).exists()
    bad = _write(tmp_path, "num_steps: [4\n", "bad.yaml")
    assert restore.main(_restore_argv(pipeline_dir, evalset, tmp_path / "b", "--sampler", bad)) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "invalid YAML" in err and err.count("\n") == 1
    assert restore.main(_restore_argv(pipeline_dir, evalset, tmp_path / "b", "--sampler-set", "fether=2")) == 2
    assert "unknown key 'fether'" in capsys.readouterr().err


def test_evaluate_applies_the_file_to_methods_with_a_sampler_only(pipeline_dir, evalset, tmp_path, caplog):
    out, steps_2 = tmp_path / "eval", _write(tmp_path, "# two steps\nnum_steps: 2\n")
    with caplog.at_level(logging.WARNING, logger="experiments.evaluate"):
        assert (
            evaluate.main(
                [
                    "--data",
                    str(evalset),
                    "--methods",
                    "identity,latent",
                    "--model",
                    str(pipeline_dir),
                    "--sampler",
                    str(steps_2),
                    "--sampler-set",
                    "feather=1",
                    "--no-kid",
                    "--out",
                    str(out),
                ]
            )
            == 0
        )
    assert "apply to latent; not to identity (no sampler)" in caplog.text
    summary = json.loads((out / "summary.json").read_text())
    record = summary["sampler_file"]
    assert record["file"] == str(steps_2) and record["applied_to"] == ["latent"]
    assert record["spec"]["overrides"] == {"num_steps": 2} and record["set"] == {"feather": 1}
    assert record["overrides"] == {"latent": {"num_steps": 2, "feather": 1}}
    assert summary["timings"]["latent"]["nfe_per_tile"] == 2 and summary["timings"]["identity"]["nfe_per_tile"] == 0
    assert (
        evaluate.main(
            [
                "--data",
                str(evalset),
                "--methods",
                "identity",
                "--sampler",
                str(SAMPLER_DIR / "steps_4.yaml"),
                "--out",
                str(tmp_path / "e2"),
            ]
        )
        == 2
    )


def test_downstream_resolves_the_file_at_argument_parsing(pipeline_dir, tmp_path):
    from experiments import downstream

    base = ["--out", str(tmp_path), "--model", str(pipeline_dir), "--sampler", str(SAMPLER_DIR / "steps_4.yaml")]
    args = downstream.parse_args([*base, "--methods", "identity,latent"])
    spec, kwargs = downstream.resolve_sampler(args)
    assert kwargs == {"num_steps": 4} and spec.overrides == {"num_steps": 4}
    six = downstream.parse_args([*base, "--methods", "latent", "--steps", "6"])
    assert downstream.resolve_sampler(six)[1] == {"num_steps": 6}
    with pytest.raises(SystemExit):
        downstream.parse_args([*base, "--methods", "identity,telea"])
    typed = downstream.DownstreamJob(out=tmp_path, methods="identity,telea", sampler=SAMPLER_DIR / "steps_4.yaml")
    with pytest.raises(ValueError, match="has a diffusion sampler"):
        downstream.run(typed)  # the typed call checks what the parser checks, before any model loads


def test_benchmark_gives_diffusion_benches_the_file_and_records_it():
    from experiments import benchmark
    from experiments.benchmarking.methods import CONFIGS, build_bench

    args = benchmark.parse_args(["--sampler", str(SAMPLER_DIR / "ddim_10.yaml"), "--sampler-set", "feather=1"])
    bench = build_bench("latent", CONFIGS["tiny"], torch.device("cpu"))
    record = benchmark.apply_sampler_file(bench, args)
    assert bench.nfe == 10 and bench.pipeline.scheduler_name == "ddim" and bench.pipeline.sampler_config.feather == 1
    assert record["overrides"] == {"scheduler": "ddim", "num_steps": 10, "feather": 1}
    assert benchmark.apply_sampler_file(build_bench("cyclegan", CONFIGS["tiny"], torch.device("cpu")), args) is None
    with pytest.raises(SystemExit):
        benchmark.parse_args(["--sampler-set", "num_steps=0"])
    jumps = benchmark.BenchmarkJob(sampler=SAMPLER_DIR / "jumps_10x10.yaml", sampler_set=["num_steps=20"])
    bench.pipeline.scheduler_name = "dpmsolver++"
    with pytest.raises(SystemExit, match="sampler settings refused"):
        benchmark.apply_sampler_file(bench, jumps)
