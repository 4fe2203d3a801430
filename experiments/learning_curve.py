r"""The paper's efficiency claim as a curve a user can check: restoration quality against training wall-clock.

    python -m experiments.learning_curve --budgets 300,600,1200 --out outputs/learning_curve
    python -m experiments.learning_curve --budgets 20,40 --methods latent-conditional --tiles 7 --out /tmp/lc  # smoke

Each method trains ONCE through ``experiments.train fit`` with the demo's configs (``experiments.demo``: the
paper's unconditional latent denoiser, ``latent-conditional``, the pixel-space ArtiFusion), and
``TimedSnapshots`` exports a pipeline whenever its training time passes a budget (validation and exports are paused
out of the clock, so every method gets the same seconds of optimisation on this machine). Every snapshot then
restores the same evaluation tiles (default: the demo's held-out test set) and is scored in the artifact region.

Needs the demo's VAE (``--demo outputs/demo``, run ``make demo`` first); the VAE's own training time is not part of
the budgets (all latent methods share it). Writes ``OUT/learning_curve.json``, ``OUT/learning_curve.md`` (table:
method x budget, artifact PSNR/SSIM with 95 % intervals) and ``OUT/learning_curve.png``. A method whose snapshots
all exist is not retrained (``--force`` retrains). Time nothing else while it runs.
"""

import argparse
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import torch

from experiments.report import write_json_atomic
from lightning_modules.components.hardware import resolve_precision

log = logging.getLogger("experiments.learning_curve")
METHODS = ("latent", "latent-conditional", "artifusion")


def _train_args(method: str, demo: Path, settings, budgets: list[float], snapshots: Path) -> list[str]:
    from experiments import demo as demo_module

    builders = {
        "latent": (demo_module.latent_args, demo_module.latent_sampler),
        "latent-conditional": (demo_module.conditional_args, demo_module.conditional_sampler),
        "artifusion": (demo_module.artifusion_args, demo_module.artifusion_sampler),
    }
    args_of, sampler_of = builders[method]
    args = args_of(demo, settings)
    # redirect the run (checkpoints, wandb, caches stay shared with the demo), train until the last budget
    args = [a for a in args if not a.startswith(("--trainer.default_root_dir", "--trainer.logger.init_args.name"))]
    sampler = json.dumps(sampler_of(settings).to_dict())
    return args + [
        f"--trainer.default_root_dir={snapshots / 'run'}",
        f"--trainer.logger.init_args.name=curve-{method}",
        "--trainer.max_steps=-1",
        f"--trainer.max_time={{seconds: {int(10 * budgets[-1])}}}",
        "--trainer.callbacks+=lightning_modules.callbacks.snapshots.TimedSnapshots",
        f"--trainer.callbacks.budgets={json.dumps(budgets)}",
        f"--trainer.callbacks.out={snapshots}",
        f"--trainer.callbacks.sampler={sampler}",
    ]


def train_snapshots(method: str, demo: Path, budgets: list[float], out: Path, *, force: bool = False) -> list[dict]:
    """Train ``method`` once and export its snapshots; returns the snapshot records (reused when complete)."""
    from experiments.demo import DemoSettings, fit

    snapshots = out / method
    record = snapshots / "snapshots.json"
    if record.is_file() and not force:
        done = json.loads(record.read_text())
        if [d["budget_s"] for d in done] == budgets and all(Path(d["path"]).is_dir() for d in done):
            print(f"[learning_curve] {method}: reusing {len(done)} snapshots")
            return done
    shutil.rmtree(snapshots, ignore_errors=True)
    print(f"[learning_curve] {method}: training to {budgets[-1]:.0f} s with snapshots at {budgets}", flush=True)
    fit(_train_args(method, demo, DemoSettings(), budgets, snapshots))
    done = json.loads(record.read_text()) if record.is_file() else []
    if len(done) < len(budgets):
        raise SystemExit(f"{method}: training ended after {len(done)} of {len(budgets)} budgets (see {snapshots})")
    return done


def evaluate_snapshots(
    method: str, snapshots: list[dict], evalset: Path, out: Path, *, tiles: int | None, precision: str
) -> list[dict]:
    """Restore and score the evaluation tiles with every snapshot; adds artifact PSNR/SSIM to each record."""
    from experiments.evaluate import EvaluateJob, evaluate

    data = evalset
    if tiles is not None:
        data = out / "evalset_subset"
        if not data.is_dir():
            _subset(evalset, data, tiles)
    rows = []
    for snap in snapshots:
        result = out / method / f"eval_t{int(snap['budget_s']):05d}s"
        if not (result / "summary.json").is_file():
            evaluate(
                EvaluateJob(
                    out=result,
                    data=data,
                    methods=f"{method}={snap['path']}",
                    batch_size=8,
                    precision=precision,
                    no_kid=True,
                    references="",
                )
            )
        summary = json.loads((result / "summary.json").read_text())
        artifact = summary["metrics"][method]["artifact"]
        rows.append({**snap, "method": method, "psnr": artifact["psnr"], "ssim": artifact["ssim"]})
    return rows


def _subset(evalset: Path, target: Path, tiles: int) -> None:
    """Copy the first ``tiles`` triplets (and their manifest items) of an evaluation set."""
    names = sorted(p.name for p in (evalset / "clean").iterdir())[:tiles]
    for sub in ("clean", "corrupted", "masks"):
        (target / sub).mkdir(parents=True, exist_ok=True)
        for name in names:
            shutil.copyfile(evalset / sub / name, target / sub / name)
    manifest = evalset / "manifest.json"
    if manifest.is_file():
        data = json.loads(manifest.read_text())
        data["items"] = [it for it in data.get("items", []) if it["name"] in names]
        (target / "manifest.json").write_text(json.dumps(data, indent=2))


def markdown(rows: list[dict], budgets: list[float], machine: str) -> str:
    """Table: method x budget, artifact-region PSNR and SSIM with 95 % intervals."""
    lines = [
        f"Machine: {machine}. Training wall-clock per method (validation and exports excluded); the artifact "
        "region of the evaluation tiles; 95 % bootstrap intervals over tiles.",
        "",
        "| method | " + " | ".join(f"{b / 60:g} min" for b in budgets) + " |",
        "|---|" + "---|" * len(budgets),
    ]
    for method in dict.fromkeys(r["method"] for r in rows):
        cells = []
        for b in budgets:
            r = next((x for x in rows if x["method"] == method and x["budget_s"] == b), None)
            if r is None:
                cells.append("n/a")
                continue
            p, s = r["psnr"], r["ssim"]
            cells.append(
                f"{p['mean']:.2f} dB [{p['ci95'][0]:.2f}, {p['ci95'][1]:.2f}] / SSIM {s['mean']:.3f} "
                f"(step {r['global_step']})"
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Artifact PSNR and SSIM against training minutes, one line per method, 95 % intervals as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        x = [r["budget_s"] / 60 for r in mine]
        for ax, key in zip(axes, ("psnr", "ssim"), strict=True):
            mean = [r[key]["mean"] for r in mine]
            err = [
                [m - r[key]["ci95"][0] for m, r in zip(mean, mine, strict=True)],
                [r[key]["ci95"][1] - m for m, r in zip(mean, mine, strict=True)],
            ]
            ax.errorbar(x, mean, yerr=err, marker="o", capsize=3, label=method)
    for ax, label in zip(axes, ("artifact-region PSNR (dB)", "artifact-region SSIM"), strict=True):
        ax.set_xlabel("training wall-clock (min, 2 CPU cores)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    from experiments.vae_study import machine_name

    p = argparse.ArgumentParser(prog="python -m experiments.learning_curve", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("outputs/learning_curve"))
    p.add_argument("--demo", type=Path, default=Path("outputs/demo"), help="demo folder holding vae/ (make demo)")
    p.add_argument("--budgets", default="300,600,1200", help="training seconds, comma separated, increasing")
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list of {','.join(METHODS)}")
    p.add_argument("--evalset", type=Path, help="triplet folder to score (default: DEMO/evalset)")
    p.add_argument("--tiles", type=int, help="score only the first N tiles")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    p.add_argument("--force", action="store_true", help="retrain methods that have their snapshots")
    args = p.parse_args(argv)
    args.precision = resolve_precision(args.precision, "cpu")
    try:
        budgets = [float(b) for b in args.budgets.split(",") if b.strip()]
    except ValueError as err:
        raise SystemExit(f"--budgets must be comma-separated seconds, got {args.budgets!r}") from err
    if not budgets or budgets != sorted(budgets) or budgets[0] <= 0:
        raise SystemExit(f"--budgets must be increasing positive seconds, got {args.budgets!r}")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {list(METHODS)}")
    if not (args.demo / "vae" / "config.json").is_file():
        raise SystemExit(f"{args.demo / 'vae'} is not an exported VAE: run `make demo` first (or pass --demo DIR)")
    evalset = args.evalset or args.demo / "evalset"
    if not (evalset / "corrupted").is_dir():
        raise SystemExit(f"{evalset} is not an evaluation set (no corrupted/); build one with datamodules.synthesize")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in methods:
        snapshots = train_snapshots(method, args.demo, budgets, args.out, force=args.force)
        rows += evaluate_snapshots(method, snapshots, evalset, args.out, tiles=args.tiles, precision=args.precision)
    machine = machine_name()
    write_json_atomic(args.out / "learning_curve.json", {"machine": machine, "budgets_s": budgets, "rows": rows})
    table = markdown(rows, budgets, machine)
    (args.out / "learning_curve.md").write_text(table)
    plot(rows, args.out / "learning_curve.png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
