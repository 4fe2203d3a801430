"""The suite's main job, end to end on real offline H&E.

Gallery -> train the VAE -> train the paper's latent denoiser (latent cache) and the mask-conditioned restorer
(restoration latent cache) -> export both pipelines -> train the conditional pipeline's pixel refiner on its own
restorations and add it to ``pipeline_conditional/`` -> train and export the artifact segmenter (automatic masks) ->
train the pixel ArtiFusion and CycleGAN baselines -> synthesise two held-out evaluation sets -> the segmenter's Dice
on the test evalset -> restore with every method -> compare report (+ downstream study).

    python -m experiments.demo            # under 30 minutes on 2 quiet CPU cores (`make demo`)
    python -m experiments.demo --quick    # a few minutes, a smoke test of every stage

Everything lands in ``outputs/demo/`` (``--out``): ``gallery.png``, ``vae/``, ``pipeline/`` (the paper's method) and
``pipeline_conditional/`` (``latent-conditional``), both usable with ``python -m experiments.restore --model DIR``,
``artifact_segmenter/`` (``--masks auto --mask-model DIR`` of ``experiments.restore`` and ``experiments.restore_slide``;
its Dice on ``evalset/`` is in ``segmenter_eval.json`` and the report),
``evalset/`` (TEST split of the bundled slides, spatially disjoint from training) and ``evalset_unseen/`` (whole
images no model trains on), one artifact per tile and the types in turn, their ``eval*/`` folders (metrics.csv,
summary.json, report.md, grid.png) and ``report.md``. Training goes through the same LightningCLI entry point users
run (``experiments.train``), with the configs under ``experiments/configs``; the demo only shortens the schedules.

A stage whose output exists and whose settings and training configs (experiments/configs) are unchanged is skipped, so a
second run (or a run after an interruption) resumes; ``--force`` redoes everything.
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

from lightning_modules.components.hardware import resolve_precision

log = logging.getLogger("experiments.demo")
CONFIGS = Path(__file__).parent / "configs"


@dataclass
class DemoSettings:
    """Sizes of every stage; ``quick()`` is the smoke-test version."""

    vae_tile: int = 64
    vae_steps: int = 2000
    vae_batch: int = 8
    # the paper's unconditional denoiser: its prior barely forms in CPU minutes at any of the budgets that fit
    latent_steps: int = 300
    latent_batch: int = 16
    cache_variants: int = 8
    # 1000 steps + the refiner (below) fit the budget that 1500 steps alone took (docs/METHOD.md section 10)
    conditional_steps: int = 1000
    conditional_batch: int = 16
    conditional_variants: int = 8
    test_count: int = 56
    unseen_count: int = 28
    # 10 DDPM steps: 11.3 dB artifact PSNR on the demo evalset against 9.7 dB for 50 DDIM steps (README)
    sample_steps: int = 10
    sample_scheduler: str = "ddpm"
    # SDEdit-style partial regeneration (start from the corrupted latent noised to half of T): at CPU scale the paper
    # method's prior cannot invent tissue from pure noise; at 0.5 it beats the unrestored input on the occluding
    # types, at 1.0 (the paper) it loses 1-4 dB to it (docs/METHOD.md section 13)
    sample_strength: float = 0.5
    # decode only a window around each mask: +0.14 / +0.18 dB on the test / unseen sets and faster (docs/METHOD.md
    # section 11); latent-conditional has it in CONDITIONAL_SAMPLER
    sample_crop_decode: bool = True
    conditional_sample_steps: int = 1
    # pixel refiner of latent-conditional (model/refiner_cpu.yaml): K variants per train tile restored once by the
    # exported pipeline, then 128 px crops, batch 8 (0.27 s per step on 2 quiet cores)
    refiner_steps: int = 500
    refiner_variants: int = 2
    refiner_batch: int = 8
    refiner_crop: int = 128
    feather: int = 2
    methods: str = "identity,telea,ns,latent-reference,latent,latent-conditional"
    baselines: bool = True
    artifusion_steps: int = 80
    artifusion_sample_steps: int = 5
    cyclegan_epochs: int = 4
    cyclegan_batches: int = 15
    downstream: bool = True
    downstream_methods: str = "identity,telea,latent,latent-conditional"
    # artifact segmenter (model/segmenter_cpu.yaml) on 128 px crops, batch 8: 0.56 s per step measured on 2 busy
    # cores (1 thread), so 160 steps + setup, validation and export take under two minutes
    segmenter_steps: int = 160
    segmenter_tile: int = 128
    segmenter_batch: int = 8

    @classmethod
    def quick(cls) -> "DemoSettings":
        """A few-minute run of every stage."""
        return cls(
            vae_steps=40,
            vae_batch=4,
            latent_steps=40,
            latent_batch=8,
            cache_variants=1,
            conditional_steps=40,
            conditional_batch=8,
            conditional_variants=1,
            test_count=7,
            unseen_count=7,
            sample_steps=4,
            conditional_sample_steps=1,
            refiner_steps=10,
            refiner_variants=1,
            refiner_batch=4,
            refiner_crop=64,
            artifusion_steps=10,
            artifusion_sample_steps=4,
            cyclegan_epochs=1,
            cyclegan_batches=5,
            segmenter_steps=10,
            segmenter_tile=64,
            segmenter_batch=4,
        )

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


def configs_fingerprint(root: Path = CONFIGS) -> str:
    """Hash of every training config the demo composes, so that an edited config reruns the stages, never reuses."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*.yaml")):
        if path.relative_to(root).parts[0] == "sampler":  # sampling settings files train nothing
            continue
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


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


def _run_args(out: Path, name: str) -> list[str]:
    """Where a stage's run writes (checkpoints, wandb offline run)."""
    return [
        f"--trainer.default_root_dir={out / 'runs'}",
        "--trainer.logger.init_args.save_dir",
        str(out / "runs"),
        f"--trainer.logger.init_args.name=demo-{name}",
    ]


def train_vae(out: Path, s: DemoSettings) -> Path:
    """Train the CPU VAE (model/vae_cpu.yaml) on clean train crops through LightningCLI, then export it."""
    cli = fit(
        [
            "--config",
            str(CONFIGS / "base.yaml"),
            "--config",
            str(CONFIGS / "model/vae_cpu.yaml"),
            "--config",
            str(CONFIGS / "data/bundled.yaml"),
            f"--data.init_args.tile_size={s.vae_tile}",
            f"--data.init_args.stride={s.vae_tile // 2}",
            f"--data.init_args.batch_size={s.vae_batch}",
            "--data.init_args.num_workers=0",
            f"--data.init_args.max_tiles={{val: {2 * s.vae_batch}}}",
            f"--trainer.max_steps={s.vae_steps}",
            f"--model.init_args.lr_scheduler.init_args.total_steps={s.vae_steps}",
            f"--trainer.val_check_interval={max(1, min(500, s.vae_steps))}",
            "--trainer.check_val_every_n_epoch=null",
            *_run_args(out, "vae"),
        ]
    )
    from datamodules.restoration import CleanTileDataModule

    # the scaling factor is estimated on whole 256 px val tiles: what the denoisers will encode
    val = CleanTileDataModule(tile_size=256, stride=256, augment=False, num_workers=0).make_dataset("val")
    images = torch.stack([val[i]["clean"] for i in range(len(val))])
    return Path(cli.model.export(out / "vae", images=images))


def latent_channels(out: Path) -> int:
    """Latent channels of the demo's exported VAE."""
    return int(json.loads((out / "vae" / "config.json").read_text())["latent_channels"])


def latent_args(out: Path, s: DemoSettings) -> list[str]:
    """``experiments.train fit`` arguments of the paper's (unconditional) denoiser on the demo VAE's latent cache."""
    return [
        "--config",
        str(CONFIGS / "base.yaml"),
        "--config",
        str(CONFIGS / "model/latent_cpu.yaml"),
        "--config",
        str(CONFIGS / "data/latent_cache.yaml"),
        f"--model.init_args.autoencoder={out / 'vae'}",
        f"--data.init_args.autoencoder={out / 'vae'}",
        f"--model.init_args.denoiser.init_args.in_channels={latent_channels(out)}",
        f"--data.init_args.cache_dir={out / 'latent_cache'}",
        f"--data.init_args.variants={s.cache_variants}",
        f"--data.init_args.batch_size={s.latent_batch}",
        f"--trainer.max_steps={s.latent_steps}",
        "--trainer.max_epochs=-1",
        *_run_args(out, "latent"),
    ]


def latent_sampler(s: DemoSettings):
    """Default sampler of the exported paper-method pipeline."""
    from lightning_modules.components.regional_sampler import SamplerConfig

    return SamplerConfig.from_preset(
        "repaint",
        num_steps=s.sample_steps,
        strength=s.sample_strength,
        feather=s.feather,
        crop_decode=s.sample_crop_decode,
    )


def train_latent(out: Path, s: DemoSettings) -> Path:
    """Encode the latent cache once, train the paper's (unconditional) denoiser on it, export ``pipeline/``."""
    cli = fit(latent_args(out, s))
    return cli.model.export(
        out / "pipeline",
        sampler=latent_sampler(s),
        image_size=256,
        scheduler_name=s.sample_scheduler,
        extra={"trained_by": "experiments.demo", "settings": asdict(s)},
    )


def conditional_args(out: Path, s: DemoSettings) -> list[str]:
    """``experiments.train fit`` arguments of ``latent-conditional`` on the demo VAE's restoration latent cache."""
    channels = latent_channels(out)
    return [
        "--config",
        str(CONFIGS / "base.yaml"),
        "--config",
        str(CONFIGS / "model/conditional_cpu.yaml"),
        "--config",
        str(CONFIGS / "data/restoration_cache.yaml"),
        f"--model.init_args.autoencoder={out / 'vae'}",
        f"--data.init_args.autoencoder={out / 'vae'}",
        f"--model.init_args.denoiser.init_args.in_channels={2 * channels + 1}",
        f"--model.init_args.denoiser.init_args.out_channels={channels}",
        f"--data.init_args.cache_dir={out / 'restoration_cache'}",
        f"--data.init_args.variants={s.conditional_variants}",
        f"--data.init_args.batch_size={s.conditional_batch}",
        f"--trainer.max_steps={s.conditional_steps}",
        "--trainer.max_epochs=-1",
        *_run_args(out, "conditional"),
        f"--model.init_args.lr_scheduler.init_args.total_steps={s.conditional_steps}",
    ]


def conditional_sampler(s: DemoSettings):
    """Default sampler of the exported ``latent-conditional`` pipeline (``CONDITIONAL_SAMPLER`` + the demo's steps)."""
    from lightning_modules.components.regional_sampler import SamplerConfig
    from lightning_modules.conditional_latent import CONDITIONAL_SAMPLER

    return SamplerConfig.from_preset(
        "repaint", feather=s.feather, **{**CONDITIONAL_SAMPLER, "num_steps": s.conditional_sample_steps}
    )


def train_conditional(out: Path, s: DemoSettings) -> Path:
    """Encode the restoration latent cache once, train ``latent-conditional``, export ``pipeline_conditional/``."""
    cli = fit(conditional_args(out, s))
    return cli.model.export(
        out / "pipeline_conditional",
        sampler=conditional_sampler(s),
        image_size=256,
        scheduler_name="ddim",
        extra={"trained_by": "experiments.demo", "settings": asdict(s)},
    )


def refiner_args(out: Path, s: DemoSettings) -> list[str]:
    """``experiments.train fit`` arguments of the pixel refiner on a pool of ``pipeline_conditional``'s restorations.

    It is validated once, at the end, on whole val tiles (``val/artifact_psnr_gain``: refined minus latent stage).
    """
    return [
        "--config",
        str(CONFIGS / "base.yaml"),
        "--config",
        str(CONFIGS / "model/refiner_cpu.yaml"),
        "--config",
        str(CONFIGS / "data/refiner_pool.yaml"),
        f"--data.init_args.pipeline={out / 'pipeline_conditional'}",
        f"--data.init_args.cache_dir={out / 'refiner_pool'}",
        f"--data.init_args.variants={s.refiner_variants}",
        f"--data.init_args.batch_size={s.refiner_batch}",
        f"--data.init_args.crop={s.refiner_crop}",
        f"--data.init_args.max_tiles={{val: {2 * s.refiner_batch}}}",
        f"--trainer.max_steps={s.refiner_steps}",
        f"--trainer.val_check_interval={s.refiner_steps}",
        "--trainer.check_val_every_n_epoch=null",
        f"--model.init_args.lr_scheduler.init_args.total_steps={s.refiner_steps}",
        *_run_args(out, "refiner"),
    ]


def train_refiner(out: Path, s: DemoSettings) -> Path:
    """Train the pixel refiner through LightningCLI and add it to ``pipeline_conditional/`` (``refiner/``)."""
    from lightning_modules.components.pipeline import attach_refiner

    cli = fit(refiner_args(out, s))
    return attach_refiner(
        out / "pipeline_conditional",
        cli.model.net,
        {"trained_by": "experiments.demo", "steps": s.refiner_steps, "variants": s.refiner_variants},
    )


def artifusion_args(out: Path, s: DemoSettings) -> list[str]:
    """``experiments.train fit`` arguments of the CPU pixel ArtiFusion (Swin-UNet + time token) on clean tiles."""
    return [
        "--config",
        str(CONFIGS / "base.yaml"),
        "--config",
        str(CONFIGS / "model/artifusion_cpu.yaml"),
        "--config",
        str(CONFIGS / "data/bundled.yaml"),
        "--data.init_args.batch_size=8",
        # fully convolutional/windowed networks: train on 128 px crops (4x cheaper), restore 256 px tiles
        "--data.init_args.tile_size=128",
        "--data.init_args.num_workers=1",
        "--data.init_args.max_tiles={val: 8}",
        f"--trainer.max_steps={s.artifusion_steps}",
        "--trainer.max_epochs=-1",
        *_run_args(out, "artifusion"),
    ]


def artifusion_sampler(s: DemoSettings):
    """The demo's pixel sampler: ``artifusion_sample_steps`` plain steps (the paper's 2410-NFE preset: benchmark)."""
    from lightning_modules.components.regional_sampler import SamplerConfig

    return SamplerConfig.from_preset("repaint", num_steps=s.artifusion_sample_steps, feather=s.feather)


def train_artifusion(out: Path, s: DemoSettings) -> Path:
    """Train the CPU-sized pixel ArtiFusion on clean tiles and export a pixel pipeline.

    The paper samples with RePaint at 250 steps x 10 resamples (2410 network evaluations per tile); on 2 CPU cores
    the demo samples with ``artifusion_sample_steps`` plain steps instead (the benchmark times the paper preset).
    """
    cli = fit(artifusion_args(out, s))
    return cli.model.export(out / "artifusion", sampler=artifusion_sampler(s), image_size=256)


def train_cyclegan(out: Path, s: DemoSettings) -> Path:
    """Train the CPU-sized CycleGAN unpaired on corrupted vs clean tiles and export its generator."""
    cli = fit(
        [
            "--config",
            str(CONFIGS / "base.yaml"),
            "--config",
            str(CONFIGS / "model/cyclegan_cpu.yaml"),
            "--config",
            str(CONFIGS / "data/bundled_restoration.yaml"),
            "--data.init_args.num_workers=1",
            "--data.init_args.tile_size=128",
            "--data.init_args.max_tiles={val: 8}",
            # its LR schedule is per epoch (constant, then linear decay), so the demo shortens epochs, not max_epochs=-1
            f"--trainer.max_epochs={s.cyclegan_epochs}",
            f"--trainer.limit_train_batches={s.cyclegan_batches}",
            *_run_args(out, "cyclegan"),
        ]
    )
    return cli.model.export(out / "cyclegan")


SEGMENTER = "artifact_segmenter"


def segmenter_args(out: Path, s: DemoSettings) -> list[str]:
    """``experiments.train fit`` arguments of the CPU artifact segmenter (model/segmenter_cpu.yaml).

    It trains on synthetic artifacts of the bundled slides' train split and is validated once, at the end.
    """
    return [
        "--config",
        str(CONFIGS / "base.yaml"),
        "--config",
        str(CONFIGS / "model/segmenter_cpu.yaml"),
        "--config",
        str(CONFIGS / "data/bundled_restoration.yaml"),
        f"--data.init_args.tile_size={s.segmenter_tile}",
        f"--data.init_args.stride={s.segmenter_tile // 2}",
        f"--data.init_args.batch_size={s.segmenter_batch}",
        "--data.init_args.num_workers=1",
        f"--data.init_args.max_tiles={{val: {2 * s.segmenter_batch}}}",
        f"--trainer.max_steps={s.segmenter_steps}",
        "--trainer.max_epochs=-1",
        f"--trainer.val_check_interval={s.segmenter_steps}",
        "--trainer.check_val_every_n_epoch=null",
        *_run_args(out, "segmenter"),
    ]


def train_segmenter(out: Path, s: DemoSettings) -> Path:
    """Train the artifact segmenter through LightningCLI and export it to ``artifact_segmenter/``.

    That folder is the ``--mask-model`` of ``experiments.restore --masks auto`` and ``restore_slide --masks auto``.
    """
    cli = fit(segmenter_args(out, s))
    return cli.model.export(
        out / SEGMENTER,
        extra={"trained_by": "experiments.demo", "tile_size": s.segmenter_tile, "steps": s.segmenter_steps},
    )


def segmenter_dice(model_dir: Path, evalset: Path, batch_size: int = 8) -> dict:
    """Dice of an exported segmenter's predicted masks against a synthesised evalset's exact masks.

    Predicts ``evalset/corrupted/*`` (whole tiles, the segmenter's threshold) and compares with ``evalset/masks/*``.

    Returns:
        ``{"tiles", "threshold", "dice" (pooled over every pixel), "mean_tile_dice", "per_type": {type: pooled Dice},
        "seconds"}``; a tile with empty prediction and truth counts as Dice 1 in the mean.
    """
    from datamodules.imageio import read_image, read_mask
    from experiments.scoring import index_images
    from lightning_modules.components.segmenters import load_segmenter, segment_images

    start = time.perf_counter()
    net = load_segmenter(model_dir)
    images, masks = index_images(evalset / "corrupted"), index_images(evalset / "masks")
    names = sorted(set(images) & set(masks))
    manifest = evalset / "manifest.json"
    items = json.loads(manifest.read_text()).get("items", []) if manifest.is_file() else []
    types = {Path(it["name"]).stem: list(it.get("types", [])) for it in items}
    counts: dict[str, list[int]] = {"all": [0, 0, 0]}  # intersection, predicted, true pixels
    tile_dice = []
    for b in range(0, len(names), batch_size):
        chunk = names[b : b + batch_size]
        rgbs = [read_image(images[n]) for n in chunk]
        for name, rgb, prob in zip(chunk, rgbs, segment_images(net, rgbs, batch_size=batch_size), strict=True):
            pred, truth = prob > net.config.threshold, read_mask(masks[name], shape=rgb.shape[:2])
            inter, npred, ntrue = int((pred & truth).sum()), int(pred.sum()), int(truth.sum())
            tile_dice.append(2 * inter / (npred + ntrue) if npred + ntrue else 1.0)
            for key in ("all", *types.get(name, [])):
                c = counts.setdefault(key, [0, 0, 0])
                c[0], c[1], c[2] = c[0] + inter, c[1] + npred, c[2] + ntrue

    def dice(c: list[int]) -> float | None:
        return 2 * c[0] / (c[1] + c[2]) if c[1] + c[2] else None

    return {
        "tiles": len(names),
        "threshold": net.config.threshold,
        "dice": dice(counts.pop("all")),
        "mean_tile_dice": sum(tile_dice) / len(tile_dice) if tile_dice else None,
        "per_type": {t: dice(c) for t, c in sorted(counts.items())},
        "seconds": time.perf_counter() - start,
    }


def segmenter_section(out: Path) -> list[str]:
    """Report lines for ``segmenter_eval.json`` (the exported segmenter's Dice on ``evalset/``), if it exists."""
    path = out / "segmenter_eval.json"
    if not path.is_file():
        return []
    r = json.loads(path.read_text())

    def fmt(v) -> str:
        return "-" if v is None else f"{v:.3f}"

    return [
        "## Automatic artifact masks (`artifact_segmenter/`)",
        "",
        f"Dice of the exported segmenter's masks (threshold {r['threshold']:g}, whole 256 px tiles) against the exact "
        f"masks of the {r['tiles']} test-split tiles in `evalset/`: **{fmt(r['dice'])}** pooled over every pixel, "
        f"{fmt(r['mean_tile_dice'])} averaged over tiles. Trained {r.get('steps', '?')} steps on "
        f"{r.get('tile_size', '?')} px crops of the train split (`model/segmenter_cpu.yaml`); use it with "
        "`python -m experiments.restore --masks auto --mask-model outputs/demo/artifact_segmenter` or "
        "`experiments.restore_slide --masks auto --mask-model ...`.",
        "",
        "| artifact type | Dice |",
        "|---|---|",
        *[f"| {t} | {fmt(v)} |" for t, v in r["per_type"].items()],
        "",
    ]


def write_report(out: Path, s: DemoSettings, timings: dict[str, float], quick: bool) -> Path:
    """Assemble ``report.md``: both evaluations (per-type tables first), the segmenter, downstream, timings."""

    def section(folder: str, title: str) -> list[str]:
        path = out / folder / "report.md"
        if not path.is_file():
            return []
        text = path.read_text().replace("](grid.png)", f"]({folder}/grid.png)")
        text = text.replace("# Restoration comparison", f"## {title}", 1)
        return [text, ""]

    lines = [
        "# LatentArtiFusion suite: demo report"
        + (" (--quick: smoke test, numbers are not meaningful)" if quick else ""),
        "",
        "Real H&E from the offline sample packages (OpenSlide CMU-1-Small-Region, HistoQC templates); artifacts are "
        "synthesised with exact masks, one per tile, the seven types in turn; models are CPU-sized and trained for "
        "minutes, so absolute quality is far below a paper-scale run. `latent` is the paper's method (unconditional "
        f"latent denoiser, regional sampling, started from the corrupted latent at strength {s.sample_strength}: "
        "docs/METHOD.md section 13); `latent-conditional` is this suite's mask-conditioned latent restorer "
        "(one network evaluation) followed by its full-resolution pixel refiner (docs/METHOD.md sections 9-10; "
        "`--sampler-set refine=false` restores without the refiner). Pixel ArtiFusion is sampled with "
        f"{s.artifusion_sample_steps} plain steps here (the paper's 2410-evaluation RePaint preset is timed by "
        "`python -m experiments.benchmark`); the baselines are trained for a few minutes and far from converged.",
        "",
        *section("eval", "Held-out test split (same slides as training, spatially disjoint regions)"),
        *section("eval_unseen", "Unseen tissue (whole images no model trains on)"),
    ]
    lines += segmenter_section(out)
    lines += [
        "What the VAE allows at best (the clean tile's own latent, each decode mode): "
        f"`python -m experiments.ceilings --vae {out / 'vae'} --data {out / 'evalset'}`.",
        "",
    ]
    if (out / "downstream" / "downstream.md").is_file():
        lines += [(out / "downstream" / "downstream.md").read_text(), ""]
    lines += [
        "## Stages",
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
    ]
    path = out / "report.md"
    tmp = path.with_suffix(".md.tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def main(argv: list[str] | None = None) -> int:
    """Run every stage (skipping finished ones) and write the report."""
    p = argparse.ArgumentParser(prog="python -m experiments.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("outputs/demo"))
    p.add_argument("--quick", action="store_true", help="tiny schedules: a smoke test of every stage")
    p.add_argument("--force", action="store_true", help="redo every stage")
    p.add_argument(
        "--precision",
        default="auto",
        choices=("auto", "fp32", "bf16"),
        help="restoration autocast precision (auto: bf16 where the CPU computes it natively, else fp32)",
    )
    p.add_argument("--no-baselines", action="store_true", help="skip training pixel ArtiFusion and CycleGAN")
    args = p.parse_args(argv)
    args.precision = resolve_precision(args.precision, "cpu")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    s = DemoSettings.quick() if args.quick else DemoSettings()
    s.baselines = not args.no_baselines
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}

    configs = configs_fingerprint()

    def stage(name: str, keys: tuple[str, ...], fn, output: Path | None = None) -> None:
        digest = f"{s.digest(*keys)}-{configs}" if keys else s.digest()
        earlier = None if args.force or (output is not None and not output.exists()) else stage_done(out, name, digest)
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

    from datamodules.gallery import write_gallery
    from datamodules.synthesize import SynthesisJob, synthesize
    from experiments.downstream import DownstreamJob
    from experiments.downstream import run as run_downstream
    from experiments.evaluate import EvaluateJob, evaluate

    vae_keys = ("vae_tile", "vae_steps", "vae_batch")
    latent_keys = (
        *vae_keys,
        "latent_steps",
        "latent_batch",
        "cache_variants",
        "sample_steps",
        "sample_scheduler",
        "sample_strength",
        "sample_crop_decode",
        "feather",
    )
    conditional_keys = (
        *vae_keys,
        "conditional_steps",
        "conditional_batch",
        "conditional_variants",
        "conditional_sample_steps",
        "feather",
    )
    baseline_keys = ("baselines", "artifusion_steps", "artifusion_sample_steps", "cyclegan_epochs", "cyclegan_batches")
    stage("gallery", (), lambda: write_gallery(out / "gallery.png", columns=4))
    stage("train VAE", vae_keys, lambda: train_vae(out, s))
    stage("train latent denoiser + export pipeline", latent_keys, lambda: train_latent(out, s))
    stage("train latent-conditional + export pipeline_conditional", conditional_keys, lambda: train_conditional(out, s))
    refiner_keys = (*conditional_keys, "refiner_steps", "refiner_variants", "refiner_batch", "refiner_crop")
    # re-exporting pipeline_conditional drops its refiner, so a missing refiner/ reruns this stage whatever the stamp
    stage(
        "train pixel refiner + add it to pipeline_conditional",
        refiner_keys,
        lambda: train_refiner(out, s),
        output=out / "pipeline_conditional" / "refiner",
    )
    segmenter_keys = ("segmenter_steps", "segmenter_tile", "segmenter_batch")
    stage("train artifact segmenter + export artifact_segmenter", segmenter_keys, lambda: train_segmenter(out, s))
    methods = s.methods.replace("latent-conditional", f"latent-conditional={out / 'pipeline_conditional'}")
    if s.baselines:
        stage(
            "train pixel ArtiFusion baseline",
            ("artifusion_steps", "artifusion_sample_steps", "feather"),
            lambda: train_artifusion(out, s),
        )
        stage("train CycleGAN baseline", ("cyclegan_epochs", "cyclegan_batches"), lambda: train_cyclegan(out, s))
        methods += f",artifusion={out / 'artifusion'},cyclegan={out / 'cyclegan'}"
    evalsets = {"evalset": ("test", s.test_count), "evalset_unseen": ("unseen", s.unseen_count)}
    for folder, (split, count) in evalsets.items():
        job = SynthesisJob(out=out / folder, bundled=True, split=split, balanced=True, count=count, seed=0)
        stage(f"synthesise {folder}", ("test_count", "unseen_count"), lambda j=job: synthesize(j))

    def evaluate_segmenter() -> None:
        figures = segmenter_dice(out / SEGMENTER, out / "evalset")
        meta = json.loads((out / SEGMENTER / "segmenter.json").read_text()).get("extra", {})
        figures |= {"steps": meta.get("steps"), "tile_size": meta.get("tile_size")}
        tmp = out / "segmenter_eval.json.tmp"
        tmp.write_text(json.dumps(figures, indent=2, sort_keys=True))
        os.replace(tmp, out / "segmenter_eval.json")
        print(f"[demo] artifact segmenter: Dice {figures['dice']} on {figures['tiles']} evalset tiles")

    stage("artifact segmenter Dice on evalset", (*segmenter_keys, "test_count"), evaluate_segmenter)
    all_keys = (*latent_keys, *refiner_keys, *baseline_keys, "test_count", "unseen_count", "methods")

    def restore_and_evaluate() -> None:
        for folder, result in (("evalset", "eval"), ("evalset_unseen", "eval_unseen")):
            shutil.rmtree(out / result, ignore_errors=True)  # restored outputs of older pipelines must not be reused
            evaluate(
                EvaluateJob(
                    out=out / result,
                    data=out / folder,
                    methods=methods,
                    model=out / "pipeline",
                    batch_size=8,
                    precision=args.precision,
                    title="Restoration comparison",
                )
            )

    stage("restore + evaluate", all_keys, restore_and_evaluate)
    if s.downstream:
        downstream_methods = s.downstream_methods.replace(
            "latent-conditional", f"latent-conditional={out / 'pipeline_conditional'}"
        )
        study_job = DownstreamJob(
            out=out / "downstream", methods=downstream_methods, model=out / "pipeline", quick=args.quick
        )

        def study() -> None:
            run_downstream(study_job)
            shutil.copyfile(out / "downstream" / "downstream.json", out / "downstream.json")

        stage("downstream classifier study", (*all_keys, "downstream_methods"), study)
    report = write_report(out, s, timings, args.quick)
    print(f"[demo] report: {report}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
