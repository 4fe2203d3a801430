"""The suite's main job, end to end on real offline H&E.

Gallery -> train VAE -> latent cache -> train latent denoiser -> export pipeline -> synthesise a held-out test set ->
restore with every method -> compare report.

    python -m experiments.demo            # about 15 minutes on 2 CPU cores (`make demo`)
    python -m experiments.demo --quick    # about 2-3 minutes, a smoke test of every stage

Everything lands in ``outputs/demo/`` (``--out``): ``gallery.png``, ``vae/``, ``latent_cache/``, ``pipeline/`` (the
exported restoration pipeline, usable with ``python -m experiments.restore --model outputs/demo/pipeline``),
``evalset/`` (clean/corrupted/masks triplets from the TEST split, spatially disjoint from training), ``eval/``
(metrics.csv, summary.json, grid.png) and ``report.md``. Training goes through the same LightningCLI entry point users
run (``experiments.train``), with the configs under ``experiments/configs``; the demo only shortens the schedules.

A stage whose output exists and whose settings are unchanged is skipped, so a second run (or a run after an
interruption) resumes; ``--force`` redoes everything.
"""

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

log = logging.getLogger("experiments.demo")
CONFIGS = Path(__file__).parent / "configs"


@dataclass
class DemoSettings:
    """Sizes of every stage; ``quick()`` is the smoke-test version."""

    vae_tile: int = 128
    vae_steps: int = 500
    vae_batch: int = 8
    latent_steps: int = 2000
    latent_batch: int = 16
    cache_variants: int = 8
    test_count: int = 16
    sample_steps: int = 50
    feather: int = 2
    methods: str = "identity,telea,ns,latent-reference,latent"
    baselines: bool = True
    artifusion_steps: int = 300
    artifusion_sample_steps: int = 50
    cyclegan_epochs: int = 10
    cyclegan_batches: int = 15
    downstream: bool = True

    @classmethod
    def quick(cls) -> "DemoSettings":
        """A 2-3 minute run of every stage."""
        return cls(vae_steps=40, vae_batch=4, latent_steps=60, latent_batch=16, cache_variants=2, test_count=4,
                   sample_steps=10, artifusion_steps=10, artifusion_sample_steps=10, cyclegan_epochs=1,
                   cyclegan_batches=5)

    def digest(self, *keys: str) -> str:
        """Hash of the named settings (a stage reruns when these change)."""
        d = asdict(self)
        return hashlib.sha256(json.dumps({k: d[k] for k in keys}, sort_keys=True).encode()).hexdigest()[:16]


def fit(args: list[str]):
    """Run ``experiments.train fit`` in-process, then close its wandb run.

    wandb reuses an active run, which would merge the stages' logs and checkpoint folders; closing it lets the next
    stage start a run of its own.
    """
    import wandb

    from experiments.train import cli_main

    try:
        return cli_main(["fit", *args])
    finally:
        wandb.finish()


def stage_done(out: Path, name: str, digest: str) -> float | None:
    """Seconds the stage took when ``name`` finished before with the same settings, else None."""
    stamp = out / ".stages" / name
    try:
        record = json.loads(stamp.read_text())
    except (OSError, ValueError):
        return None
    return float(record["seconds"]) if record.get("digest") == digest else None


def mark_done(out: Path, name: str, digest: str, seconds: float) -> None:
    """Record that ``name`` finished with these settings, and how long it took."""
    (out / ".stages").mkdir(parents=True, exist_ok=True)
    (out / ".stages" / name).write_text(json.dumps({"digest": digest, "seconds": seconds}))


def train_vae(out: Path, s: DemoSettings) -> Path:
    """Train the CPU-sized VAE on clean train tiles through LightningCLI, then export it with its scaling factor."""
    cli = fit([
        "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "model/vae_cpu.yaml"),
        "--config", str(CONFIGS / "data/bundled.yaml"),
        f"--data.init_args.tile_size={s.vae_tile}", f"--data.init_args.batch_size={s.vae_batch}",
        "--data.init_args.num_workers=1", f"--data.init_args.max_tiles={{val: {2 * s.vae_batch}}}",
        f"--trainer.max_steps={s.vae_steps}", "--trainer.max_epochs=-1", f"--trainer.default_root_dir={out / 'runs'}",
        f"--trainer.val_check_interval={min(200, s.vae_steps)}", "--trainer.check_val_every_n_epoch=null",
        "--trainer.logger.init_args.save_dir", str(out / "runs"), "--trainer.logger.init_args.name=demo-vae",
    ])
    dm = cli.datamodule
    images = torch.stack([dm.datasets["val"][i]["clean"] for i in range(len(dm.datasets["val"]))])
    return Path(cli.model.export(out / "vae", images=images))


def train_latent(out: Path, s: DemoSettings) -> "object":
    """Encode the latent cache once, then train the CPU-sized latent denoiser on it through LightningCLI."""
    cli = fit([
        "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "model/latent_cpu.yaml"),
        "--config", str(CONFIGS / "data/latent_cache.yaml"),
        f"--model.init_args.autoencoder={out / 'vae'}", f"--data.init_args.autoencoder={out / 'vae'}",
        f"--data.init_args.cache_dir={out / 'latent_cache'}", f"--data.init_args.variants={s.cache_variants}",
        f"--data.init_args.batch_size={s.latent_batch}",
        f"--trainer.max_steps={s.latent_steps}", "--trainer.max_epochs=-1",
        f"--trainer.default_root_dir={out / 'runs'}",
        "--trainer.logger.init_args.save_dir", str(out / "runs"), "--trainer.logger.init_args.name=demo-latent",
    ])
    return cli.model


def export_pipeline(out: Path, model, s: DemoSettings) -> Path:
    """Write the restoration pipeline folder: EMA denoiser, training scheduler, VAE, sampler defaults."""
    from lightning_modules.components.autoencoders import load_autoencoder
    from lightning_modules.components.pipeline import save_pipeline
    from lightning_modules.components.regional_sampler import SamplerConfig

    sampler = SamplerConfig.from_preset("repaint", num_steps=s.sample_steps, feather=s.feather)
    return save_pipeline(out / "pipeline", unet=model.sampling_network, scheduler=model.noise_scheduler,
                         sampler=sampler, vae=load_autoencoder(out / "vae"), image_size=256, scheduler_name="ddim",
                         extra={"trained_by": "experiments.demo", "settings": asdict(s)})


def train_artifusion(out: Path, s: DemoSettings) -> Path:
    """Train the CPU-sized pixel ArtiFusion (Swin-UNet + time token) on clean tiles and export a pixel pipeline.

    The paper samples with RePaint at 250 steps x 10 resamples (2410 network evaluations per tile); on 2 CPU cores
    the demo samples with ``artifusion_sample_steps`` plain steps instead (the benchmark times the paper preset).
    """
    from lightning_modules.components.regional_sampler import SamplerConfig

    cli = fit([
        "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "model/artifusion_cpu.yaml"),
        "--config", str(CONFIGS / "data/bundled.yaml"), "--data.init_args.batch_size=8",
        # fully convolutional/windowed networks: train on 128 px crops (4x cheaper), restore 256 px tiles
        "--data.init_args.tile_size=128",
        "--data.init_args.num_workers=1", "--data.init_args.max_tiles={val: 8}",
        f"--trainer.max_steps={s.artifusion_steps}", "--trainer.max_epochs=-1",
        f"--trainer.default_root_dir={out / 'runs'}", "--trainer.logger.init_args.save_dir", str(out / "runs"),
        "--trainer.logger.init_args.name=demo-artifusion",
    ])
    sampler = SamplerConfig.from_preset("repaint", num_steps=s.artifusion_sample_steps, feather=s.feather)
    return cli.model.export(out / "artifusion", sampler=sampler, image_size=256)


def train_cyclegan(out: Path, s: DemoSettings) -> Path:
    """Train the CPU-sized CycleGAN unpaired on corrupted vs clean tiles and export its generator."""
    cli = fit([
        "--config", str(CONFIGS / "base.yaml"), "--config", str(CONFIGS / "model/cyclegan_cpu.yaml"),
        "--config", str(CONFIGS / "data/bundled_restoration.yaml"), "--data.init_args.num_workers=1",
        "--data.init_args.tile_size=128",
        "--data.init_args.max_tiles={val: 8}",
        # its LR schedule is per epoch (constant, then linear decay), so the demo shortens epochs, not max_epochs=-1
        f"--trainer.max_epochs={s.cyclegan_epochs}", f"--trainer.limit_train_batches={s.cyclegan_batches}",
        f"--trainer.default_root_dir={out / 'runs'}", "--trainer.logger.init_args.save_dir", str(out / "runs"),
        "--trainer.logger.init_args.name=demo-cyclegan",
    ])
    return cli.model.export(out / "cyclegan")


def write_report(out: Path, s: DemoSettings, timings: dict[str, float], quick: bool) -> Path:
    """Assemble ``report.md`` from the stage timings, the gallery and the evaluation report."""
    eval_md = (out / "eval" / "report.md").read_text().replace("](grid.png)", "](eval/grid.png)")
    eval_md = eval_md.replace("# Restoration comparison", "## Restoration comparison on the held-out test set", 1)
    lines = [
        "# LatentArtiFusion suite: demo report"
        + (" (--quick: smoke test, numbers are not meaningful)" if quick else ""),
        "",
        "Real H&E from the offline sample packages (OpenSlide CMU-1-Small-Region, HistoQC templates); artifacts are "
        "synthesised with exact masks; models are CPU-sized and trained for minutes, so absolute quality is far "
        "below a paper-scale run. The test tiles come from the test split, spatially disjoint from training.",
        "",
        f"Pixel ArtiFusion is sampled here with {s.artifusion_sample_steps} plain steps; the paper's RePaint preset "
        "(250 steps x 10 resamples = 2410 network evaluations per tile) is timed by `python -m experiments.benchmark` "
        "(BENCHMARKS.md). The baselines are trained for a few minutes on 128 px crops and are far from converged.",
        "",
        "| stage | seconds |",
        "|---|---|",
        *[f"| {k} | {v:.1f} |" for k, v in timings.items()],
        f"| total | {sum(timings.values()):.1f} |",
        "",
        f"Settings: `{json.dumps(asdict(s))}`",
        "",
        "Artifact types on real tiles (corrupted tile, and the exact mask outlined on the clean tile):",
        "",
        "![gallery](gallery.png)",
        "",
        eval_md,
    ]
    if (out / "downstream" / "downstream.md").is_file():
        lines += ["", (out / "downstream" / "downstream.md").read_text()]
    path = out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    """Run every stage (skipping finished ones) and write the report."""
    p = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("outputs/demo"))
    p.add_argument("--quick", action="store_true", help="tiny schedules: a 2-3 minute smoke test of every stage")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument("--precision", default="bf16", choices=("fp32", "bf16"), help="restoration autocast precision")
    p.add_argument("--no-baselines", action="store_true", help="skip training pixel ArtiFusion and CycleGAN")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    s = DemoSettings.quick() if args.quick else DemoSettings()
    s.baselines = not args.no_baselines
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    def stage(name: str, keys: tuple[str, ...], fn) -> None:
        digest = s.digest(*keys)
        earlier = None if args.force else stage_done(out, name, digest)
        if earlier is not None:
            print(f"[demo] {name}: done before with the same settings ({earlier:.0f} s), skipping")
            timings[f"{name} (earlier run)"] = earlier
            return
        print(f"[demo] {name} ...", flush=True)
        start = time.perf_counter()
        fn()
        timings[name] = time.perf_counter() - start
        mark_done(out, name, digest, timings[name])
        print(f"[demo] {name}: {timings[name]:.1f} s", flush=True)

    from datamodules import gallery, synthesize
    from experiments import downstream, evaluate

    stage("gallery", (), lambda: gallery.main(["--out", str(out / "gallery.png"), "--columns", "4"]))
    stage("train VAE", ("vae_tile", "vae_steps", "vae_batch"), lambda: train_vae(out, s))
    latent_keys = ("vae_tile", "vae_steps", "vae_batch", "latent_steps", "latent_batch", "cache_variants",
                   "sample_steps", "feather")
    stage("train latent denoiser + export pipeline", latent_keys,
          lambda: export_pipeline(out, train_latent(out, s), s))
    methods = s.methods
    if s.baselines:
        stage("train pixel ArtiFusion baseline", ("artifusion_steps", "artifusion_sample_steps", "feather"),
              lambda: train_artifusion(out, s))
        stage("train CycleGAN baseline", ("cyclegan_epochs", "cyclegan_batches"), lambda: train_cyclegan(out, s))
        methods += f",artifusion={out / 'artifusion'},cyclegan={out / 'cyclegan'}"
    stage("synthesise test set", ("test_count",), lambda: synthesize.main(
        ["--bundled", "--count", str(s.test_count), "--seed", "0", "--out", str(out / "evalset")]))
    def restore_and_evaluate() -> None:
        shutil.rmtree(out / "eval", ignore_errors=True)  # restored outputs of an older pipeline must not be reused
        evaluate.main(["--data", str(out / "evalset"), "--methods", methods, "--model", str(out / "pipeline"),
                       "--out", str(out / "eval"), "--batch-size", "8", "--precision", args.precision,
                       "--title", "Restoration comparison"])

    baseline_keys = ("baselines", "artifusion_steps", "artifusion_sample_steps", "cyclegan_epochs", "cyclegan_batches")
    stage("restore + evaluate", (*latent_keys, *baseline_keys, "test_count", "methods"), restore_and_evaluate)
    if s.downstream:
        downstream_argv = ["--out", str(out / "downstream"), "--methods", methods, "--model", str(out / "pipeline")]

        def study() -> None:
            downstream.main(downstream_argv + (["--quick"] if args.quick else []))
            shutil.copyfile(out / "downstream" / "downstream.json", out / "downstream.json")

        stage("downstream classifier study", (*latent_keys, *baseline_keys, "test_count", "methods"), study)
    report = write_report(out, s, timings, args.quick)
    print(f"[demo] report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
