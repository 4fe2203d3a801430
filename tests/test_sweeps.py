"""Sweep specs (experiments/sweeps/*.yaml) and the offline sweep driver (experiments.sweep)."""

import csv
import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from experiments import sweep
from experiments.train import cli_main

REPO = Path(__file__).resolve().parents[1]
SPECS = sorted((REPO / "experiments" / "sweeps").glob("*.yaml"))


def _get(config: dict, dotted: str):
    for part in dotted.split("."):
        config = config[part]
    return config


def _sample_values(param: dict) -> list:
    """Values that probe a parameter's whole range: every listed value, or both ends of a distribution."""
    if "values" in param:
        return list(param["values"])
    if "value" in param:
        return [param["value"]]
    return [param["min"], param["max"]]


def _print_config(args: list[str], capsys) -> dict:
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*args, "--print_config"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    return yaml.safe_load(capsys.readouterr().out)


def test_there_is_a_sweep_spec():
    assert any(p.name == "latent_lr_ema.yaml" for p in SPECS)


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.name)
def test_spec_command_forwards_args_to_the_module_entry_point(spec_path):
    spec = yaml.safe_load(spec_path.read_text())
    command = spec["command"]
    assert command[:4] == ["${env}", "python", "-m", "experiments.train"] and command[4] == "fit"
    assert command.count("${args}") == 1
    assert spec["metric"]["goal"] in ("minimize", "maximize") and spec["method"] in ("grid", "random", "bayes")
    for arg in command[5:]:
        if arg.startswith("--config="):
            assert (REPO / arg.split("=", 1)[1]).is_file(), arg
    assert sweep.load_spec(spec_path) == spec


@pytest.mark.parametrize("spec_path", SPECS, ids=lambda p: p.name)
def test_every_swept_key_lands_in_the_parsed_config(spec_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    spec = sweep.load_spec(spec_path)
    for key, param in spec["parameters"].items():
        for value in _sample_values(param):
            # the same --key=value string the W&B agent's ${args} produces
            config = _print_config(sweep.train_args(spec, {key: value}), capsys)
            assert _get(config, key) == value, (key, value)


def test_a_misspelled_key_is_rejected_by_the_cli(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    spec = sweep.load_spec(REPO / "experiments/sweeps/latent_lr_ema.yaml")
    with pytest.raises(SystemExit) as exit_info:
        cli_main([*sweep.train_args(spec, {"model.init_args.optimizer.init_args.lrate": 0.1}), "--print_config"])
    assert exit_info.value.code != 0


def test_specs_without_args_or_module_entry_are_refused():
    base = {"method": "random", "metric": {"name": "val/loss", "goal": "minimize"}, "parameters": {"a": {"value": 1}}}
    with pytest.raises(ValueError, match=r"\$\{args\}"):
        sweep.command_args({**base, "command": ["${env}", "python", "-m", "experiments.train", "fit"]})
    with pytest.raises(ValueError, match="-m experiments.train"):
        sweep.command_args({**base, "command": ["${env}", "${interpreter}", "${program}", "${args}"]})


def _dry_run(tmp_path, name, seed, runs=4) -> list[dict]:
    out = tmp_path / name
    spec = str(REPO / "experiments/sweeps/latent_lr_ema.yaml")
    code = sweep.main(["--spec", spec, "--runs", str(runs), "--seed", str(seed), "--out", str(out), "--dry-run",
                       "--", "--trainer.max_epochs=3"])  # fmt: skip
    assert code == 0
    return json.loads((out / "sweep.json").read_text())["runs"]


def test_dry_run_proposals_are_reproducible_and_inside_the_spec(tmp_path, capsys):
    first, again, other = _dry_run(tmp_path, "a", 7), _dry_run(tmp_path, "b", 7), _dry_run(tmp_path, "c", 8)
    assert [r["params"] for r in first] == [r["params"] for r in again]
    assert [r["params"] for r in first] != [r["params"] for r in other]
    printed = capsys.readouterr().out
    assert "run-003: python -m experiments.train fit --config=experiments/configs/base.yaml" in printed
    spec = yaml.safe_load((REPO / "experiments/sweeps/latent_lr_ema.yaml").read_text())
    lr_key, ema_key = "model.init_args.optimizer.init_args.lr", "model.init_args.ema_decay"
    for record in first:
        assert record["state"] == "proposed" and record["metric"] is None
        lr = record["params"][lr_key]
        assert spec["parameters"][lr_key]["min"] <= lr <= spec["parameters"][lr_key]["max"]
        assert record["params"][ema_key] in spec["parameters"][ema_key]["values"]
        # extra arguments come before the proposals, so they can never override a swept value
        assert record["args"][-2:] == [f"--{k}={v}" for k, v in record["params"].items()]
        assert "--trainer.max_epochs=3" in record["args"]


def _tiny_spec(tmp_path) -> Path:
    spec = {
        "method": "bayes",
        "metric": {"name": "val/loss_ema", "goal": "minimize"},
        "parameters": {
            "model.init_args.optimizer.init_args.lr": {"distribution": "log_uniform_values", "min": 1e-4, "max": 1e-2},
            "model.init_args.ema_decay": {"values": [0.5, 0.9]},
        },
        "command": ["${env}", "python", "-m", "experiments.train", "fit",
                    "--config=experiments/configs/base.yaml", "--config=experiments/configs/model/latent_tiny.yaml",
                    "--data.class_path=tests.tiny_data.TinyLatentDataModule", "${args}"],
    }  # fmt: skip
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.slow
def test_offline_sweep_trains_two_runs_feeds_them_back_and_records_them(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    out = tmp_path / "sweep"
    extra = [
        "--trainer.max_steps=2",
        "--trainer.limit_val_batches=1",
        "--trainer.precision=32-true",
        "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={out}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
    ]
    code = sweep.main(["--spec", str(_tiny_spec(tmp_path)), "--runs", "2", "--seed", "0", "--out", str(out),
                       "--timeout", "300", "--", *extra])  # fmt: skip
    assert code == 0, [(out / f"run-00{i}" / "train.log").read_text()[-3000:] for i in range(2)]
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert [r["name"] for r in runs] == ["run-000", "run-001"]
    assert [r["params"] for r in runs] == [r["params"] for r in _proposals_given(tmp_path, runs)]
    for record in runs:
        assert record["state"] == "finished" and record["metric_source"] == "best checkpoint"
        assert math.isfinite(record["metric"]) and record["seconds"] > 0
        ckpt = torch.load(record["best_model_path"], weights_only=True, map_location="cpu")
        lr = ckpt["optimizer_states"][0]["param_groups"][0]["lr"]
        assert lr == pytest.approx(record["params"]["model.init_args.optimizer.init_args.lr"], rel=1e-12)
        assert ckpt["hyper_parameters"]["ema_decay"] == record["params"]["model.init_args.ema_decay"]
    assert len({r["best_model_path"] for r in runs}) == 2
    with open(out / "runs.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["name"], r["state"], float(r["metric"])) for r in rows] == [
        (r["name"], "finished", r["metric"]) for r in runs
    ]
    assert [float(r["model.init_args.optimizer.init_args.lr"]) for r in rows] == [
        r["params"]["model.init_args.optimizer.init_args.lr"] for r in runs
    ]
    table = capsys.readouterr().out
    best = min(runs, key=lambda r: r["metric"])
    assert table.splitlines()[1].startswith(best["name"])


def _proposals_given(tmp_path, runs: list[dict]) -> list[dict]:
    """Replay the engine: run 0 from nothing, run 1 from run 0's finished result (what the driver must have done)."""
    spec = sweep.load_spec(tmp_path / "tiny.yaml")
    engine_runs, replay = [], []
    for index, record in enumerate(runs):
        replay.append({"params": sweep.propose(spec, engine_runs, 0, index)})
        engine_runs.append(sweep._sweep_run(record["name"], record["params"], "finished", "val/loss_ema",
                                            record["metric"]))  # fmt: skip
    return replay


def test_a_run_the_cli_rejects_is_recorded_as_crashed(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    spec = yaml.safe_load(_tiny_spec(tmp_path).read_text())
    spec["parameters"] = {"model.init_args.optimizer.init_args.lrate": {"values": [0.1]}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    assert sweep.main(["--spec", str(path), "--runs", "1", "--out", str(tmp_path / "bad")]) == 1
    [record] = json.loads((tmp_path / "bad" / "sweep.json").read_text())["runs"]
    assert record["state"] == "crashed" and "exit code" in record["error"]
    assert "lrate" in (tmp_path / "bad" / "run-000" / "train.log").read_text()
