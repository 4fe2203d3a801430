r"""Run a W&B sweep spec (``experiments/sweeps/*.yaml``) offline, with W&B's own search engine, one run at a time.

The same YAML serves both ways:

Online (needs a W&B account and key; the agent launches the spec's ``command``)::

    wandb sweep experiments/sweeps/latent_lr_ema.yaml          # prints SWEEP_ID
    wandb agent ENTITY/PROJECT/SWEEP_ID --count 20

Offline (no server, no key)::

    python -m experiments.sweep --spec experiments/sweeps/latent_lr_ema.yaml --runs 8 --seed 0 \
        -- --model.init_args.autoencoder=outputs/vae_cpu --data.init_args.autoencoder=outputs/vae_cpu
    python -m experiments.sweep --spec experiments/sweeps/latent_lr_ema.yaml --runs 8 --dry-run   # proposals only

How the offline driver works: ``sweeps.next_run`` (the engine behind ``wandb sweep``: grid, random, bayes) proposes
the next parameters from the spec and the finished runs, with Python's ``random`` and numpy seeded from
``(--seed, run index)`` so the same seed and the same results give the same proposals. Each run is launched like
the agent would launch it: a fresh ``python -m experiments.sweep --worker ...`` process that calls
:func:`experiments.train.cli_main` with the arguments of the spec's ``command`` (everything after
``experiments.train``), then ``--trainer.default_root_dir=OUT/run-NNN``, then the extra arguments given after ``--``,
then the proposals as ``--key=value`` (formatted as the agent's ``${args}`` does). The proposals come last, so no
extra argument or ``--config`` can override them. A fresh process per run isolates crashes (recorded as ``crashed``
and fed to the engine as such), leaves no wandb run or global state behind, and lets DDP re-launch its ranks.

The worker reads the spec's metric back from the checkpoint callback's best score when that callback monitors the
same metric, else from the last epoch's ``trainer.callback_metrics``, and reads every swept key back from the parsed
config: a run whose value did not land where the spec said is marked ``failed`` instead of silently training with
the default. Records go to ``OUT/sweep.json`` (spec, seed and every run: parameters, metric, state, seconds,
checkpoint) and ``OUT/runs.csv``, rewritten after each run (wandb offline writes no summary files); each run's
output goes to ``OUT/run-NNN/train.log``. A table sorted by the metric is printed at the end.

``WANDB_MODE`` defaults to ``offline`` in the runs, so the ``--trainer.logger.init_args.offline=false`` that the
specs carry for the online agent still logs offline here; set ``WANDB_MODE=disabled`` to skip wandb entirely.
"""

import argparse
import csv
import json
import logging
import math
import os
import random
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

log = logging.getLogger("experiments.sweep")

ENTRY_MODULE = "experiments.train"
ARGS_MACRO = "${args}"
FINISHED, FAILED, CRASHED, PROPOSED = "finished", "failed", "crashed", "proposed"


def load_spec(path: str | os.PathLike) -> dict[str, Any]:
    """Read a sweep YAML and check the parts the offline driver relies on.

    Args:
        path: A W&B sweep spec with ``method``, ``metric`` (``name``, ``goal``), ``parameters`` and ``command``.

    Returns:
        The spec as a dict.

    Raises:
        ValueError: If the metric is missing or the command does not forward ``${args}`` to ``experiments.train``.
    """
    spec = yaml.safe_load(Path(path).read_text())
    if not isinstance(spec, dict) or not spec.get("parameters"):
        raise ValueError(f"{path}: a sweep spec needs a 'parameters' mapping")
    metric = spec.get("metric") or {}
    if not metric.get("name") or metric.get("goal") not in ("minimize", "maximize"):
        raise ValueError(f"{path}: 'metric' needs a name and a goal (minimize or maximize), got {metric}")
    command_args(spec)  # validates the command
    return spec


def command_args(spec: Mapping[str, Any]) -> list[str]:
    """The LightningCLI arguments of the spec's command, i.e. everything after ``-m experiments.train``.

    Args:
        spec: The sweep spec.

    Returns:
        The arguments with ``${args}`` left in place, e.g. ``["fit", "--config=base.yaml", "${args}"]``.

    Raises:
        ValueError: If the command is missing, does not run ``python -m experiments.train``, lacks ``${args}`` (the
            agent would then drop every swept value silently) or uses another ``${...}`` macro after the module.
    """
    command = [str(c) for c in spec.get("command") or []]
    at = command.index(ENTRY_MODULE) if ENTRY_MODULE in command else -1
    if at < 1 or command[at - 1] != "-m":
        raise ValueError(f"the sweep command must run `python -m {ENTRY_MODULE}`, got {command}")
    args = command[at + 1 :]
    if args.count(ARGS_MACRO) != 1:
        raise ValueError(f"the sweep command must contain {ARGS_MACRO} exactly once (else values are lost): {command}")
    macros = [a for a in args if a.startswith("${") and a != ARGS_MACRO]
    if macros:
        raise ValueError(f"unsupported macros after {ENTRY_MODULE} in the sweep command: {macros}")
    return args


def format_args(params: Mapping[str, Any]) -> list[str]:
    """``--key=value`` flags exactly as the W&B agent's ``${args}`` writes them (``str`` of each value)."""
    return [f"--{key}={value}" for key, value in params.items()]


def train_args(
    spec: Mapping[str, Any], params: Mapping[str, Any], extra: Sequence[str] = (), run_dir: str | None = None
) -> list[str]:
    """The full ``experiments.train`` argument list of one run.

    Args:
        spec: The sweep spec.
        params: Proposed values by dotted key.
        extra: Arguments inserted before the proposals (after the spec's own arguments).
        run_dir: ``--trainer.default_root_dir`` of the run (before ``extra``, so ``extra`` may override it).

    Returns:
        The spec's arguments with ``${args}`` replaced by ``[root dir,] *extra, *proposals``.
    """
    args = command_args(spec)
    at = args.index(ARGS_MACRO)
    inserted = ([f"--trainer.default_root_dir={run_dir}"] if run_dir else []) + list(extra) + format_args(params)
    return args[:at] + inserted + args[at + 1 :]


def _import_sweeps():
    with warnings.catch_warnings():  # sweeps 0.3 still uses pydantic-v1 config names
        warnings.simplefilter("ignore")
        import sweeps
    return sweeps


def propose(spec: Mapping[str, Any], runs: list, seed: int, index: int) -> dict[str, Any] | None:
    """Ask W&B's engine for the parameters of run ``index``.

    Args:
        spec: The sweep spec.
        runs: ``sweeps.SweepRun`` objects of the earlier runs (finished, failed or pending).
        seed: Sweep seed; with ``index`` it seeds ``random`` and numpy, which the engine draws from.
        index: Run index.

    Returns:
        ``{dotted key: value}``, or ``None`` when a grid is exhausted.
    """
    sweeps = _import_sweeps()
    state = np.random.SeedSequence([seed, index]).generate_state(2)
    random.seed(int(state[0]))
    np.random.seed(int(state[1]))
    engine_spec = {k: v for k, v in spec.items() if k in ("method", "metric", "parameters", "early_terminate")}
    run = sweeps.next_run(engine_spec, runs, validate=True)
    return None if run is None else {key: item["value"] for key, item in run.config.items()}


def _sweep_run(name: str, params: Mapping[str, Any], state: str, metric: str, value: float | None):
    sweeps = _import_sweeps()
    states = {FINISHED: "finished", FAILED: "failed", CRASHED: "crashed", PROPOSED: "pending"}
    summary = {metric: value} if value is not None else {}
    return sweeps.SweepRun(
        name=name,
        state=sweeps.RunState(states[state]),
        config={k: {"value": v} for k, v in params.items()},
        summary_metrics=summary,
        history=[summary] if summary else [],
    )


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        try:
            return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
        except (TypeError, ValueError):
            return False
    return a == b


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, default=str, allow_nan=True))
    os.replace(tmp, path)


def write_records(out: Path, header: Mapping[str, Any], records: list[dict[str, Any]], keys: Sequence[str]) -> None:
    """Rewrite ``out/sweep.json`` (header + records) and ``out/runs.csv`` (one row per run, one column per key)."""
    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "sweep.json", {**header, "runs": records})
    columns = ["name", "state", "metric", "seconds", *keys, "error"]
    tmp = out / "runs.csv.tmp"
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for record in records:
            writer.writerow({"name": record["name"], "state": record["state"], "metric": record["metric"],
                             "seconds": record["seconds"], "error": record.get("error") or "",
                             **record["params"]})  # fmt: skip
    os.replace(tmp, out / "runs.csv")


def _launch(
    args: list[str], metric: str, keys: Sequence[str], run_dir: Path, timeout: float | None
) -> tuple[int | None, dict | None]:
    """Run one training in a fresh worker process; returns its exit code (None on timeout) and its result."""
    run_dir.mkdir(parents=True, exist_ok=True)
    result_path = run_dir / "result.json"
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline")}
    cmd = [sys.executable, "-m", "experiments.sweep", "--worker", str(result_path), "--metric", metric,
           "--keys", ",".join(keys), "--", *args]  # fmt: skip
    with open(run_dir / "train.log", "w") as logfile:
        logfile.write(" ".join(cmd) + "\n")
        logfile.flush()
        try:
            code = subprocess.run(cmd, stdout=logfile, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = None
    result = json.loads(result_path.read_text()) if result_path.exists() else None
    return code, result


def run_sweep(
    spec: Mapping[str, Any],
    n_runs: int,
    out: Path,
    *,
    seed: int = 0,
    extra: Sequence[str] = (),
    dry_run: bool = False,
    timeout: float | None = None,
    spec_path: str | None = None,
) -> list[dict[str, Any]]:
    """Propose, launch and record ``n_runs`` runs one after another, feeding each result back to the engine.

    Args:
        spec: The sweep spec (see :func:`load_spec`).
        n_runs: Number of runs (fewer when a grid is exhausted).
        out: Output folder for records and run folders.
        seed: Seed of the proposals.
        extra: Extra ``experiments.train`` arguments for every run (placed before the proposals).
        dry_run: Only propose (each proposal treated as pending, as while runs are in flight) and record.
        timeout: Seconds after which a run is killed and recorded as crashed.
        spec_path: Path of the spec, for the records.

    Returns:
        One record per run: ``name``, ``params``, ``state``, ``metric``, ``metric_source``, ``seconds``, ``args``,
        ``best_model_path``, ``error``.
    """
    metric = spec["metric"]["name"]
    keys = list(spec["parameters"])
    for key in keys:
        if any(a == f"--{key}" or a.startswith(f"--{key}=") for a in extra):
            log.warning("extra argument --%s is overridden by the sweep's proposals", key)
    header = {"spec": spec_path, "method": spec.get("method"), "metric": spec["metric"], "seed": seed,
              "extra_args": list(extra), "dry_run": dry_run}  # fmt: skip
    records: list[dict[str, Any]] = []
    engine_runs: list = []
    for index in range(n_runs):
        params = propose(spec, engine_runs, seed, index)
        if params is None:
            log.info("the grid is exhausted after %d runs", index)
            break
        name = f"run-{index:03d}"
        run_dir = out / name
        args = train_args(spec, params, extra, str(run_dir))
        record = {"name": name, "params": params, "state": PROPOSED, "metric": None, "metric_source": None,
                  "seconds": None, "args": args, "best_model_path": None, "error": None}  # fmt: skip
        if not dry_run:
            start = time.perf_counter()
            code, result = _launch(args, metric, keys, run_dir, timeout)
            record["seconds"] = round(time.perf_counter() - start, 2)
            record.update(_judge(code, result, params, run_dir))
        records.append(record)
        engine_runs.append(_sweep_run(name, params, record["state"], metric, record["metric"]))
        write_records(out, header, records, keys)
    return records


def _judge(code: int | None, result: dict | None, params: Mapping[str, Any], run_dir: Path) -> dict[str, Any]:
    """State, metric and error of a launched run from its exit code and worker result."""
    if code is None:
        return {"state": CRASHED, "error": "timed out"}
    if code != 0 or result is None:
        return {"state": CRASHED, "error": f"exit code {code}; see {run_dir / 'train.log'}"}
    fields = {k: result.get(k) for k in ("metric", "metric_source", "best_model_path")}
    applied = result.get("applied", {})
    wrong = [k for k, v in params.items() if not _same(applied.get(k), v)]
    if wrong:
        return {**fields, "state": FAILED, "error": f"not applied by the CLI: {wrong} (got {applied})"}
    value = fields["metric"]
    if value is None or not math.isfinite(value):
        return {**fields, "state": FAILED, "error": f"metric missing or not finite: {value}"}
    return {**fields, "state": FINISHED}


def format_table(records: Sequence[Mapping[str, Any]], keys: Sequence[str], metric: str, goal: str) -> str:
    """A plain-text table of the runs, best first (runs without a metric last)."""

    def order(r: Mapping[str, Any]) -> tuple:
        value = r["metric"]
        if value is None:
            return (1, 0.0)
        return (0, value if goal == "minimize" else -value)

    short = [k.replace("init_args.", "") for k in keys]
    rows = [["run", "state", metric, "seconds", *short]]
    for r in sorted(records, key=order):
        value = "" if r["metric"] is None else f"{r['metric']:.6g}"
        seconds = "" if r["seconds"] is None else f"{r['seconds']:.1f}"
        rows.append([r["name"], r["state"], value, seconds, *(f"{r['params'][k]:.6g}" if isinstance(
            r["params"][k], float) else str(r["params"][k]) for k in keys)])  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


def run_worker(result_path: Path, metric: str, keys: Sequence[str], args: list[str]) -> int:
    """Train one run in this process and write its result (rank 0 only); used by :func:`run_sweep`.

    Args:
        result_path: Where to write the JSON result.
        metric: The spec's metric name.
        keys: Swept dotted keys to read back from the parsed config.
        args: ``experiments.train`` arguments (``fit`` and the rest).

    Returns:
        0.
    """
    import torch

    from experiments.train import cli_main

    cli = cli_main(args)
    trainer = cli.trainer
    config = cli.config[cli.subcommand] if cli.subcommand else cli.config
    applied = {}
    for key in keys:
        try:
            value = config[key]
        except (KeyError, TypeError):
            continue
        applied[key] = value if isinstance(value, (int, float, str, bool, type(None))) else str(value)
    ckpt = trainer.checkpoint_callback
    value, source = None, None
    if ckpt is not None and ckpt.monitor == metric and ckpt.best_model_score is not None:
        value, source = float(ckpt.best_model_score), "best checkpoint"
    elif metric in trainer.callback_metrics:
        value, source = float(trainer.callback_metrics[metric]), "last epoch"
    scalars = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    if trainer.is_global_zero:
        _write_json(result_path, {
            "metric": value, "metric_source": source, "applied": applied, "callback_metrics": scalars,
            "global_step": trainer.global_step, "best_model_path": ckpt.best_model_path if ckpt else None,
        })  # fmt: skip
    if "wandb" in sys.modules:
        import wandb

        if wandb.run is not None:
            wandb.finish()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """Options before ``--`` and the extra training arguments after it."""
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    p = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.split("\n\n")[0])
    p.add_argument("--spec", type=Path, help="W&B sweep YAML (experiments/sweeps/*.yaml)")
    p.add_argument("--runs", type=int, default=1, help="number of runs")
    p.add_argument("--seed", type=int, default=0, help="seed of the proposals")
    p.add_argument("--out", type=Path, help="output folder (default: outputs/sweeps/<spec name>)")
    p.add_argument("--dry-run", action="store_true", help="print the proposed runs without training")
    p.add_argument("--timeout", type=float, help="seconds per run before it is killed")
    p.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--metric", help=argparse.SUPPRESS)
    p.add_argument("--keys", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker is None and args.spec is None:
        p.error("--spec is required")
    if args.runs < 1:
        p.error("--runs must be >= 1")
    return args, extra


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args, extra = parse_args(argv)
    if args.worker is not None:
        return run_worker(args.worker, args.metric, [k for k in args.keys.split(",") if k], extra)
    spec = load_spec(args.spec)
    out = args.out or Path("outputs/sweeps") / args.spec.stem
    records = run_sweep(spec, args.runs, out, seed=args.seed, extra=extra, dry_run=args.dry_run,
                        timeout=args.timeout, spec_path=str(args.spec))  # fmt: skip
    if args.dry_run:
        for record in records:
            print(f"{record['name']}: python -m {ENTRY_MODULE} {' '.join(record['args'])}")
    print(format_table(records, list(spec["parameters"]), spec["metric"]["name"], spec["metric"]["goal"]))
    print(f"records: {out / 'sweep.json'} and {out / 'runs.csv'}")
    return 0 if args.dry_run or any(r["state"] == FINISHED for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
