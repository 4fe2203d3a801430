r"""Which autoencoder levers pay off at CPU scale: train each row of a study for the same wall-clock, then score it.

    python -m experiments.vae_study --out outputs/vae_study                    # every row of the study file
    python -m experiments.vae_study --rows fast-c4,fast-c8 --out outputs/vae_study
    python -m experiments.vae_study --rows fast-c8 --scale 0.02 --out /tmp/vs   # smoke test (2 % of the steps)

Rows live in ``experiments/ablations/vae_levers.yaml`` (name, description, step budget, LightningCLI overrides of
``model/vae_cpu.yaml`` + ``data/bundled.yaml`` on 64 px crops). Every row trains through the same entry point as
``make demo`` (``experiments.train fit``); budgets are sized so that rows cost about the same wall-clock, and the
table reports the seconds and steps each really took. Each trained VAE is then scored on whole 256 px tiles,
posterior mean, fp32:

- **seen tissue**: the test-split tiles of the CMU skin slide (same slide as training, spatially disjoint regions);
- **unseen tissue**: every tile of the two HistoQC templates that no model of the suite trains on (``template1`` is
  the val split, ``template3`` the test split: breast-like tissue of other morphologies and stains).

Writes ``OUT/vae_study.json`` (rows, steps, seconds, parameters, PSNR/SSIM/FSIM per tissue with 95 % bootstrap
intervals), ``OUT/vae_study.md`` (the table for docs/VAE.md) and ``OUT/ROW/vae`` (the exported VAE of each row). A
row whose JSON record exists is skipped on a rerun with the same steps (``--force`` redoes it). Time nothing else
while it runs: on 2 cores a second busy process slows a row 5-10x and so changes how far it trains.
"""

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch
import yaml

from experiments.report import write_json_atomic
from lightning_modules.metrics.statistics import bootstrap_ci

log = logging.getLogger("experiments.vae_study")
CONFIGS = Path(__file__).parent / "configs"
STUDY = Path(__file__).parent / "ablations" / "vae_levers.yaml"
UNSEEN = ("template1.png", "template3.png")


def load_rows(path: Path = STUDY) -> dict[str, dict]:
    """``{name: {"description", "steps", "schedule", "overrides"}}`` from the study YAML (``rows:`` list)."""
    try:
        rows = yaml.safe_load(path.read_text())["rows"]
        return {
            row["name"]: {
                "description": row.get("description", ""),
                "steps": int(row["steps"]),
                "schedule": bool(row.get("schedule", False)),
                "overrides": list(row.get("overrides", [])),
                "extra_trainer_steps": int(row.get("extra_trainer_steps", 0)),
            }
            for row in rows
        }
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError) as err:
        raise SystemExit(f"{path}: cannot read the study rows ({err})") from err


def eval_tiles() -> dict[str, torch.Tensor]:
    """Whole 256 px evaluation tiles, ``{"seen": (N, 3, 256, 256), "unseen": (M, 3, 256, 256)}`` in ``[-1, 1]``."""
    from datamodules.datasets import to_tensor
    from datamodules.sources import bundled_sources
    from datamodules.splits import tiles_for_split
    from datamodules.tiling import grid_tiles

    sources = bundled_sources()
    seen = [
        to_tensor(sources[i].read_region(r.x, r.y, r.size, r.size))
        for i, r in tiles_for_split(sources, "test", size=256, stride=256)
        if sources[i].name not in UNSEEN
    ]
    unseen = []
    for src in sources:
        if src.name in UNSEEN:
            for r in grid_tiles(src.tissue(), size=256, stride=244, min_tissue=0.5, source=src.name, shape=src.shape()):
                unseen.append(to_tensor(src.read_region(r.x, r.y, r.size, r.size)))
    return {"seen": torch.stack(seen), "unseen": torch.stack(unseen)}


@torch.no_grad()
def score_vae(vae, tiles: dict[str, torch.Tensor], *, seed: int = 0) -> dict[str, dict]:
    """PSNR/SSIM/FSIM of posterior-mean reconstructions per tissue, with 95 % bootstrap intervals."""
    from lightning_modules.metrics.functional import per_image_metrics

    vae = vae.eval().float()
    out: dict[str, dict] = {}
    for tissue, x in tiles.items():
        rec = torch.cat([vae.decode(vae.encode(b).latent_dist.mean).sample.clamp(-1, 1) for b in x.split(4)])
        ones = torch.ones(x.shape[0], 1, *x.shape[-2:])
        values = per_image_metrics(rec, x, ones, regions=("whole",), metrics=("psnr", "ssim", "fsim"))
        out[tissue] = {"n": int(x.shape[0])}
        for key, v in values.items():
            metric = key.split("/")[1]
            mean, low, high, _ = bootstrap_ci(v.cpu().numpy(), seed=seed)
            out[tissue][metric] = {"mean": mean, "ci95": [low, high]}
    return out


def row_args(name: str, row: dict, *, out: Path, steps: int, scale: float = 1.0) -> list[str]:
    """The ``experiments.train fit`` arguments of one row (the row's overrides come last and win)."""
    trainer_steps = steps + round(row["extra_trainer_steps"] * scale)
    args = [
        "fit",
        "--config",
        str(CONFIGS / "base.yaml"),
        "--config",
        str(CONFIGS / "model/vae_cpu.yaml"),
        "--config",
        str(CONFIGS / "data/bundled.yaml"),
        "--data.init_args.num_workers=0",
        "--data.init_args.tile_size=64",
        "--data.init_args.stride=32",
        "--data.init_args.batch_size=8",
        "--data.init_args.max_tiles={val: 8}",
        f"--trainer.default_root_dir={out / name / 'run'}",
        "--trainer.logger.init_args.save_dir",
        str(out / name / "run"),
        f"--trainer.logger.init_args.name=vae-{name}",
        f"--trainer.max_steps={trainer_steps}",
        "--trainer.max_epochs=-1",
        "--trainer.enable_progress_bar=false",
        f"--trainer.val_check_interval={max(1, steps // 4)}",
        "--trainer.check_val_every_n_epoch=null",
    ]
    if row["schedule"]:
        args += [f"--model.init_args.lr_scheduler.init_args.total_steps={steps}"]
    else:
        args += ["--model.init_args.lr_scheduler=null"]
    return args + row["overrides"]


def train_row(name: str, row: dict, *, out: Path, steps: int, scale: float = 1.0) -> dict:
    """Train one row through ``experiments.train fit``; export its VAE and return its record."""
    import wandb

    from experiments.train import cli_main

    args = row_args(name, row, out=out, steps=steps, scale=scale)
    start = time.perf_counter()
    try:
        cli = cli_main(args)
    finally:
        wandb.finish()
    seconds = time.perf_counter() - start
    module = cli.model
    vae = module.vae
    record = {
        "name": name,
        "overrides": row["overrides"],
        "planned_steps": steps,
        "train_s": round(seconds, 1),
        # VAE optimiser steps (with the adversarial term Lightning's global_step also counts the discriminator's)
        "steps": int(cli.trainer.global_step if module.automatic_optimization else module.vae_steps),
        "params_m": round(sum(p.numel() for p in vae.parameters()) / 1e6, 3),
        "latent_channels": int(vae.config.latent_channels),
        "tile_size": int(cli.datamodule.tile_size),
    }
    dm = cli.datamodule
    val = dm.datasets.get("val") or dm.make_dataset("val")
    images = torch.stack([val[i]["clean"] for i in range(len(val))])
    module.export(out / name / "vae", images=images)
    return record


def _fmt(entry: dict) -> str:
    return f"{entry['mean']:.2f} [{entry['ci95'][0]:.2f}, {entry['ci95'][1]:.2f}]"


def markdown(records: list[dict], rows: dict[str, dict], machine: str) -> str:
    """The study table: config | params | train s | steps | PSNR | SSIM | FSIM for seen and unseen tissue."""
    lines = [
        f"Machine: {machine}. Equal training wall-clock per row; whole 256 px tiles, posterior mean, fp32; "
        "95 % bootstrap intervals over tiles.",
        "",
        "| row | what changes | params (M) | train s | steps | seen PSNR | seen SSIM | seen FSIM | unseen PSNR | "
        "unseen SSIM | unseen FSIM |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        s, u = r["scores"]["seen"], r["scores"]["unseen"]
        lines.append(
            f"| {r['name']} | {rows.get(r['name'], {}).get('description', '')} | {r['params_m']:.2f} | "
            f"{r['train_s']:.0f} | {r['steps']} | {_fmt(s['psnr'])} | {s['ssim']['mean']:.3f} | "
            f"{s['fsim']['mean']:.3f} | "
            f"{_fmt(u['psnr'])} | {u['ssim']['mean']:.3f} | {u['fsim']['mean']:.3f} |"
        )
    return "\n".join(lines) + "\n"


def run_study(
    names: list[str], rows: dict[str, dict], *, out: Path, scale: float = 1.0, force: bool = False
) -> list[dict]:
    """Train and score every named row (finished rows with the same settings are reused); returns the records."""
    unknown = [n for n in names if n not in rows]
    if unknown:
        raise SystemExit(f"unknown row(s) {unknown}; the study file has {list(rows)}")
    out.mkdir(parents=True, exist_ok=True)
    tiles = eval_tiles()
    records = []
    for name in names:
        path = out / name / "record.json"
        steps = max(1, round(rows[name]["steps"] * scale))
        if path.is_file() and not force:
            record = json.loads(path.read_text())
            if record.get("planned_steps") == steps and record.get("overrides") == rows[name]["overrides"]:
                print(f"[vae_study] {name}: reusing {path}")
                records.append(record)
                continue
        print(f"[vae_study] {name}: {steps} steps ({rows[name]['description']})", flush=True)
        record = train_row(name, rows[name], out=out, steps=steps, scale=scale)
        from lightning_modules.components.autoencoders import load_autoencoder

        record["scores"] = score_vae(load_autoencoder(out / name / "vae"), tiles)
        write_json_atomic(path, record)
        s, u = record["scores"]["seen"], record["scores"]["unseen"]
        print(
            f"[vae_study] {name}: {record['steps']} steps in {record['train_s']:.0f} s; seen PSNR "
            f"{s['psnr']['mean']:.2f} SSIM {s['ssim']['mean']:.3f}; unseen PSNR {u['psnr']['mean']:.2f} "
            f"SSIM {u['ssim']['mean']:.3f}",
            flush=True,
        )
        records.append(record)
    return records


def machine_name() -> str:
    """CPU model and thread count, for the table header."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    p = argparse.ArgumentParser(prog="python -m experiments.vae_study", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("outputs/vae_study"))
    p.add_argument("--scale", type=float, default=1.0, help="multiply every row's steps (e.g. 0.02 for a smoke test)")
    p.add_argument("--rows", help="comma list of row names (default: every row of the study file)")
    p.add_argument("--study", type=Path, default=STUDY, help="study YAML")
    p.add_argument("--force", action="store_true", help="retrain rows that have a record")
    args = p.parse_args(argv)
    if args.scale <= 0:
        raise SystemExit(f"--scale must be positive, got {args.scale}")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = load_rows(args.study)
    names = [n.strip() for n in args.rows.split(",")] if args.rows else list(rows)
    records = run_study(names, rows, out=args.out, scale=args.scale, force=args.force)
    table = markdown(records, rows, machine_name())
    (args.out / "vae_study.md").write_text(table)
    write_json_atomic(args.out / "vae_study.json", {"machine": machine_name(), "rows": records})
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
