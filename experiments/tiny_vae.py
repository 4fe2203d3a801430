"""Distil the tiny autoencoder from a trained VAE, add it to that VAE's pipelines, and report its cost and speed.

    python -m experiments.tiny_vae                 # from the demo's VAE into both demo pipelines (`make tiny-vae`)
    python -m experiments.tiny_vae --teacher outputs/vae --pipelines outputs/pipeline --steps 3000 --out outputs/tiny
    python -m experiments.tiny_vae --report-only   # re-measure an existing distillation

Three steps, each a function:

1. :func:`distil` trains ``TinyAutoencoderModule`` (``model/tiny_vae_cpu.yaml``) through the same LightningCLI
   recipe as every other network, on 64 px crops of the clean train tiles, and exports it to ``OUT/tiny_vae``;
2. :func:`attach` adds it to each pipeline folder (``tiny_vae/``; refused for a pipeline of another VAE);
3. :func:`measure` scores whole 256 px tiles of seen and unseen tissue (the VAE study's split) with the full VAE,
   the tiny autoencoder and the hybrid (VAE encoder, tiny decoder): PSNR/SSIM against the clean tiles with 95 %
   bootstrap intervals and PSNR against the full VAE's reconstruction; and times encode and decode of the trained
   sizes and of the paper sizes (kl-f8 against TAESD, random weights) in the same run, with FLOPs and the matmul
   peak measured beside them. ``OUT/tiny_vae.json`` holds the records, ``OUT/TINY_VAE.md`` the tables
   (docs/TINY_VAE.md is written from them).

The restore-level cost (artifact-region PSNR of restorations with and without the tiny autoencoder, and end-to-end
seconds per tile) is a row set of the sampler grid: ``python -m experiments.benchmark --grid --autoencoders
full,tiny,tiny-decoder``.
"""

from __future__ import annotations

import argparse
import functools
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch

from experiments.jobs import from_namespace

CONFIGS = Path(__file__).resolve().parent / "configs"
DEMO = Path("outputs/demo")


@dataclass
class TinyVaeJob:
    """The flags of ``python -m experiments.tiny_vae`` as typed values (same names and defaults).

    Attributes:
        teacher: The trained VAE folder to distil.
        pipelines: Pipeline folders of that VAE that receive the tiny autoencoder.
        out: Output folder (``tiny_vae/``, ``runs/``, ``tiny_vae.json``, ``TINY_VAE.md``).
        size: Student preset (``taesd``, ``cpu``, ``tiny``).
        steps: Optimiser steps.
        batch_size: Crops per step.
        tile: Crop side in pixels.
        report_only: Skip training; measure ``out/tiny_vae``.
        max_seconds: Timing budget per measured part.
        paper_timing: Also time the paper sizes (kl-f8 against TAESD).
    """

    teacher: Path = DEMO / "vae"
    pipelines: list[Path] = field(default_factory=lambda: [DEMO / "pipeline", DEMO / "pipeline_conditional"])
    out: Path = DEMO / "tiny_vae_run"
    size: str = "cpu"
    steps: int = 600
    batch_size: int = 8
    tile: int = 64
    report_only: bool = False
    max_seconds: float = 5.0
    paper_timing: bool = True


def distil(job: TinyVaeJob) -> Path:
    """Train the student through ``experiments.train``'s LightningCLI and export it to ``job.out / "tiny_vae"``."""
    from experiments.train import cli_main

    cli = cli_main(
        [
            "fit",
            "--config", str(CONFIGS / "base.yaml"),
            "--config", str(CONFIGS / "model/tiny_vae_cpu.yaml"),
            "--config", str(CONFIGS / "data/bundled.yaml"),
            f"--model.init_args.teacher={job.teacher}",
            f"--model.init_args.size={job.size}",
            f"--data.init_args.tile_size={job.tile}",
            f"--data.init_args.stride={job.tile // 2}",
            f"--data.init_args.batch_size={job.batch_size}",
            "--data.init_args.num_workers=0",
            f"--data.init_args.max_tiles={{val: {2 * job.batch_size}}}",
            f"--trainer.max_steps={job.steps}",
            f"--model.init_args.lr_scheduler.init_args.total_steps={job.steps}",
            f"--trainer.val_check_interval={max(1, min(500, job.steps))}",
            "--trainer.check_val_every_n_epoch=null",
            f"--trainer.default_root_dir={job.out / 'runs'}",
            "--trainer.logger.init_args.save_dir", str(job.out / "runs"),
            "--trainer.logger.init_args.name=tiny-vae",
        ]
    )  # fmt: skip
    return Path(cli.model.export(job.out / "tiny_vae", extra={"steps": job.steps, "tile": job.tile}))


def attach(folder: Path, pipelines: list[Path]) -> list[Path]:
    """Add the tiny autoencoder at ``folder`` to every pipeline folder (each checked against its teacher)."""
    from lightning_modules.components.pipeline import attach_tiny_autoencoder

    return [attach_tiny_autoencoder(p, folder) for p in pipelines]


def _round_trips(vae, tiny, x: torch.Tensor) -> dict[str, torch.Tensor]:
    from lightning_modules.components.autoencoders import LatentCodec
    from lightning_modules.components.tiny_autoencoder import TinyCodec

    full = LatentCodec(vae)
    student, hybrid = TinyCodec(tiny), TinyCodec(tiny, encoder=full)
    out: dict[str, list[torch.Tensor]] = {"full": [], "tiny": [], "tiny-decoder": []}
    for batch in x.split(8):
        out["full"].append(full.decode(full.encode(batch, sample=False)))
        out["tiny"].append(student.decode(student.encode(batch)))
        out["tiny-decoder"].append(hybrid.decode(hybrid.encode(batch, sample=False)))
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def score(vae, tiny, tiles: dict[str, torch.Tensor]) -> list[dict]:
    """``quality`` records: per tissue and autoencoder, PSNR/SSIM against the clean tiles and PSNR against the VAE."""
    from lightning_modules.metrics.functional import per_image_metrics
    from lightning_modules.metrics.statistics import bootstrap_ci

    records = []
    for tissue, x in tiles.items():
        recs = _round_trips(vae, tiny, x)
        ones = torch.ones(x.shape[0], 1, *x.shape[-2:])
        for name, rec in recs.items():
            vs_clean = per_image_metrics(rec, x, ones, regions=("whole",), metrics=("psnr", "ssim"))
            record = {"record": "quality", "tissue": tissue, "autoencoder": name, "tiles": int(x.shape[0])}
            for metric in ("psnr", "ssim"):
                mean, low, high, _ = bootstrap_ci(vs_clean[f"whole/{metric}"].cpu().numpy())
                record[metric] = {"mean": mean, "ci95": [low, high]}
            if name != "full":
                vs_full = per_image_metrics(rec, recs["full"], ones, regions=("whole",), metrics=("psnr",))
                mean, low, high, _ = bootstrap_ci(vs_full["whole/psnr"].cpu().numpy())
                record["psnr_vs_full"] = {"mean": mean, "ci95": [low, high]}
            records.append(record)
    return records


@torch.no_grad()
def time_codecs(
    codecs: dict[str, tuple], *, batch: int, precisions: list[str], max_seconds: float, label: str
) -> list[dict]:
    """``speed`` records: median seconds per tile of encode and decode of 256 px tiles, and GFLOP per tile.

    Args:
        codecs: ``name -> (encode_fn(x), decode_fn(z), latent_channels)``.
        batch: Tiles per call.
        precisions: Autocast precisions.
        max_seconds: Budget per measurement.
        label: ``"trained"`` or ``"paper"`` (which sizes).
    """
    from experiments.benchmarking.timing import autocast, count_flops, measure

    device = torch.device("cpu")
    x = torch.rand(batch, 3, 256, 256) * 2 - 1
    records = []
    for name, (encode, decode, channels) in codecs.items():
        z = torch.randn(batch, channels, 32, 32)
        calls = {"encode": functools.partial(encode, x), "decode": functools.partial(decode, z)}
        flops = {part: count_flops(fn) for part, fn in calls.items()}
        for precision in precisions:
            with autocast(device, precision):
                times = {
                    part: measure(fn, device, max_seconds=max_seconds, warmup=1).median for part, fn in calls.items()
                }
            for part in ("encode", "decode"):
                records.append(
                    {
                        "record": "speed",
                        "sizes": label,
                        "autoencoder": name,
                        "part": part,
                        "precision": precision,
                        "batch": batch,
                        "seconds_per_tile": times[part] / batch,
                        "gflop_per_tile": flops[part] / batch / 1e9,
                    }
                )
    return records


def _codec_fns(vae, tiny) -> dict[str, tuple]:
    from lightning_modules.components.autoencoders import LatentCodec
    from lightning_modules.components.tiny_autoencoder import TinyCodec

    full, student = LatentCodec(vae), TinyCodec(tiny)
    g = torch.Generator().manual_seed(0)
    return {
        "full": (lambda x: full.encode(x, generator=g), full.decode, full.latent_channels),
        "tiny": (student.encode, student.decode, student.latent_channels),
    }


def measure_all(job: TinyVaeJob) -> list[dict]:
    """Quality and speed records of the distilled student at ``job.out / "tiny_vae"`` against ``job.teacher``."""
    from experiments.benchmarking.timing import machine_info, matmul_peak
    from experiments.vae_study import eval_tiles
    from lightning_modules.components.autoencoders import build_autoencoder, load_autoencoder
    from lightning_modules.components.hardware import native_bf16
    from lightning_modules.components.tiny_autoencoder import build_tiny_autoencoder, load_tiny_autoencoder

    vae = load_autoencoder(job.teacher)
    tiny, facts = load_tiny_autoencoder(job.out / "tiny_vae")
    records = [{"record": "machine", **machine_info(torch.device("cpu")), "distillation": facts}]
    records += score(vae, tiny, eval_tiles())
    precisions = ["fp32", "bf16"] if native_bf16("cpu") else ["fp32"]  # emulated bf16 is ~20x slower
    peaks = {p: matmul_peak(p, torch.device("cpu"), size=2048) for p in precisions}
    records.append({"record": "peak", "flops_per_second": peaks})
    records += time_codecs(
        _codec_fns(vae, tiny), batch=8, precisions=precisions, max_seconds=job.max_seconds, label="trained"
    )
    if job.paper_timing:
        torch.manual_seed(0)
        paper = _codec_fns(build_autoencoder("kl-f8").eval(), build_tiny_autoencoder("taesd").eval())
        records += time_codecs(paper, batch=8, precisions=precisions, max_seconds=job.max_seconds, label="paper")
    return records


def markdown(records: list[dict]) -> str:
    """The quality and speed tables of :func:`measure_all`'s records."""

    def ci(entry: dict, fmt: str) -> str:
        low, high = entry["ci95"]
        return f"{entry['mean']:{fmt}} [{low:{fmt}}, {high:{fmt}}]"

    machine = next(r for r in records if r["record"] == "machine")
    lines = [
        f"Machine: {machine.get('cpu_model', '?')}, {machine.get('threads', '?')} threads; student: "
        f"{machine['distillation'].get('size')} preset, {machine['distillation'].get('steps')} steps.",
        "",
        "| tissue | autoencoder | tiles | PSNR [95 % CI] | SSIM [95 % CI] | PSNR vs full VAE |",
        "|---|---|---|---|---|---|",
    ]
    for r in (r for r in records if r["record"] == "quality"):
        vs = ci(r["psnr_vs_full"], ".2f") if "psnr_vs_full" in r else "-"
        lines.append(
            f"| {r['tissue']} | {r['autoencoder']} | {r['tiles']} | {ci(r['psnr'], '.2f')} | {ci(r['ssim'], '.3f')} "
            f"| {vs} |"
        )
    lines += [
        "",
        "| sizes | autoencoder | part | precision | s/tile (batch 8) | GFLOP/tile | speed-up |",
        "|---|---|---|---|---|---|---|",
    ]
    speed = [r for r in records if r["record"] == "speed"]
    full = {(r["sizes"], r["part"], r["precision"]): r["seconds_per_tile"] for r in speed if r["autoencoder"] == "full"}
    for r in speed:
        ratio = full[(r["sizes"], r["part"], r["precision"])] / r["seconds_per_tile"]
        lines.append(
            f"| {r['sizes']} | {r['autoencoder']} | {r['part']} | {r['precision']} | {r['seconds_per_tile']:.4g} "
            f"| {r['gflop_per_tile']:.3g} | {ratio:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def run(job: TinyVaeJob) -> list[dict]:
    """Distil (unless ``report_only``), attach to the pipelines, measure, and write the JSON and the tables."""
    from lightning_modules.components.slide_store import write_json_atomic

    if not (job.teacher / "config.json").is_file():
        raise SystemExit(
            f"error: {job.teacher} is not a VAE folder (no config.json); run `make demo` or pass --teacher"
        )
    for pipe in job.pipelines:
        if not (pipe / "pipeline.json").is_file():
            raise SystemExit(f"error: {pipe} is not a pipeline folder (no pipeline.json); export it or drop it")
    if not job.report_only:
        distil(job)
    elif not (job.out / "tiny_vae").is_dir():
        raise SystemExit(f"error: --report-only needs {job.out / 'tiny_vae'}; run without it first")
    try:
        attach(job.out / "tiny_vae", job.pipelines)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from err
    records = measure_all(job)
    write_json_atomic(job.out / "tiny_vae.json", records)
    text = markdown(records)
    tmp = job.out / "TINY_VAE.md.tmp"
    tmp.write_text(text)
    tmp.replace(job.out / "TINY_VAE.md")
    print(text)
    return records


def parse_args(argv: list[str] | None = None) -> TinyVaeJob:
    """Command-line arguments as a :class:`TinyVaeJob`."""
    p = argparse.ArgumentParser(prog="python -m experiments.tiny_vae", description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", type=Path, default=DEMO / "vae", help="trained VAE folder to distil")
    p.add_argument(
        "--pipelines",
        type=lambda text: [Path(t) for t in text.split(",") if t],
        default=[DEMO / "pipeline", DEMO / "pipeline_conditional"],
        help="comma-separated pipeline folders of that VAE that receive it (default: the demo's two)",
    )
    p.add_argument("--out", type=Path, default=DEMO / "tiny_vae_run")
    p.add_argument("--size", default="cpu", choices=("taesd", "cpu", "tiny"))
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--tile", type=int, default=64)
    p.add_argument("--report-only", action="store_true", help="measure an existing OUT/tiny_vae, do not train")
    p.add_argument("--max-seconds", type=float, default=5.0)
    p.add_argument("--no-paper-timing", dest="paper_timing", action="store_false")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 1 or args.tile % 8:
        p.error("--steps and --batch-size must be >= 1 and --tile a multiple of 8")
    return from_namespace(TinyVaeJob, args)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    run(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
