"""Speed and FLOP benchmark of restoration with random weights: latent vs pixel ArtiFusion vs CycleGAN, and training.

Usage:
    python -m experiments.benchmark                                   # paper sizes, fp32 + bf16, batch 1 and 8
    python -m experiments.benchmark --config cpu --methods latent,cyclegan --precision bf16 --json bench.json
    python -m experiments.benchmark --config tiny --batch-sizes 1 --precision fp32 --max-seconds 0.5   # smoke run
    python -m experiments.benchmark --device cuda --threads 16 --json gpu.json
    python -m experiments.benchmark --methods latent --sampler experiments/configs/sampler/steps_10.yaml
    python -m experiments.benchmark --methods latent,latent-conditional,artifusion --precision bf16 --grid \
        --json outputs/benchmark_grid.json        # scheduler x steps x crop rows, each timed and scored

What it reports, per method x precision x batch size (seconds are medians):

- seconds per tile of a full restore: latent = VAE encode + 50 DDPM steps of the ``repaint`` preset + decode +
  paste-back; pixel ArtiFusion = RePaint 250 steps, jump 10, 10 resamples (2410 network evaluations) + paste-back;
  CycleGAN = one generator pass. Each part is timed on its own; when ``fixed + NFE x (eval + sampler step)`` fits
  ``--max-seconds`` the full restore is run and timed ("measured"), otherwise that estimate is reported
  ("extrapolated"; e.g. the paper-size pixel model on a CPU);
- FLOPs per tile from ``FlopCounterMode`` (network evaluation and VAE encode/decode counted separately, total =
  fixed + NFE x per-eval), achieved FLOP/s and the utilisation of the whole restore, of the network alone and of the
  VAE alone, against matmul peaks (fp32 and bf16) measured in the same run on the same device and threads;
- the pixel/latent ratio of seconds per tile (the paper: 30.71 s / 0.83 s on a GPU);
- denoiser training images/s with and without the latent cache.

``--grid`` adds, for each latent method, one ``sampler_row`` record per (scheduler, steps, crop) setting: the full
restore timed end to end at ``--config`` on tiles and masks of ``--quality-data``, and the artifact-region PSNR/SSIM
of the trained pipeline given by ``--quality-model`` (default: the demo's exports) under the same settings, paired
against its 50-step whole-tile restore (``psnr_artifact_delta``); ``speed_target`` records name the fastest row within
0.3 dB and its speed-ups over that reference and over pixel ArtiFusion (``benchmarking/speed_quality.py``).

``--sampler FILE`` (``experiments/configs/sampler/*.yaml``) and ``--sampler-set KEY=VALUE`` change the sampler
settings of the diffusion methods (not CycleGAN); their restore records hold the file, its content and the effective
overrides under ``sampler_file``.

Weights are random (timing only). The machine's CPU model, threads and versions are recorded with the results.
Quote ratios measured in one run; absolute seconds depend on the machine and on its load.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from experiments.benchmarking import speed_quality
from experiments.benchmarking.methods import CONFIGS, METHODS, available_methods, build_bench, example_batch
from experiments.benchmarking.records import (
    EXTRAPOLATE_MODES,
    add_batch_speedups,
    add_utilisation,
    ratio_records,
    restore_record,
)
from experiments.benchmarking.tables import (
    machine_line,
    peak_table,
    ratio_table,
    restore_table,
    sampler_grid_table,
    speed_target_table,
    training_table,
)
from experiments.benchmarking.timing import DTYPES, machine_info, matmul_peak
from experiments.benchmarking.training import conditional_training_records, training_records
from experiments.jobs import from_namespace
from lightning_modules.components.sampler_files import (
    apply_sampler,
    load_sampler_file,
    parse_sampler_sets,
    sampler_kwargs,
    sampler_record,
)
from lightning_modules.components.schedulers import scheduler_names

log = logging.getLogger("experiments.benchmark")
DEMO_MODELS = {"latent": Path("outputs/demo/pipeline"), "latent-conditional": Path("outputs/demo/pipeline_conditional")}
DEMO_QUALITY_DATA = Path("outputs/demo/evalset_unseen")
LATENT_METHODS = tuple(DEMO_MODELS)


def _csv(kind: type, choices: tuple | None = None):
    def parse(text: str) -> list:
        values = [kind(v.strip()) for v in text.split(",") if v.strip()]
        if not values:
            raise argparse.ArgumentTypeError("expected a comma-separated list")
        if choices is not None and any(v not in choices for v in values):
            raise argparse.ArgumentTypeError(f"values must be among {', '.join(map(str, choices))}, got {text!r}")
        if kind is int and any(v < 1 for v in values):
            raise argparse.ArgumentTypeError(f"values must be positive, got {text!r}")
        return values

    return parse


def default_precisions(device: str | None = None) -> list[str]:
    """fp32, plus bf16 where ``device`` computes it natively (``components/hardware.py``)."""
    from lightning_modules.components.hardware import native_bf16

    return ["fp32", "bf16"] if native_bf16(device or _default_device()) else ["fp32"]


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@dataclass
class BenchmarkJob:
    """One benchmark run: the flags of ``python -m experiments.benchmark`` as typed values (same names, defaults).

    Attributes:
        methods: Subset of ``METHODS`` (``None``: every available one).
        config: Model sizes, a key of ``CONFIGS``.
        precision: Autocast precisions.
        batch_sizes: Restore batch sizes.
        device: Torch device.
        threads: Torch threads (``None``: unchanged).
        max_seconds: Time budget per measurement; a full restore runs only when its estimate fits it.
        warmup: Untimed calls before each measurement.
        extrapolate: ``auto``, ``always`` or ``never``.
        train_batch: Batch of the training-throughput measurement.
        training: Measure denoiser training throughput.
        peak_size: Matmul side for the peak (``None``: 2048 CPU, 8192 CUDA).
        json: Write every record to this file.
        seed: Torch seed.
        sampler: Sampler settings file for the diffusion methods.
        sampler_set: ``KEY=VALUE`` overrides of single ``SamplerConfig`` fields.
        grid: Time and score the latent methods under every (scheduler, steps, crop) row.
        schedulers: Schedulers of the grid.
        grid_steps: Sampling steps of the grid.
        crops: Crop settings of the grid (``off``, ``window``, ``decode``; ``benchmarking/speed_quality.py``).
        autoencoders: Autoencoders of the grid (``full``, ``tiny``, ``tiny-decoder``); the tiny ones need trained
            pipelines holding a distilled tiny autoencoder (``experiments.export tiny-vae``).
        quality_model: ``METHOD=DIR`` trained pipelines that score the grid rows (default: the demo's exports).
        quality_data: Evaluation set that scores the grid rows and whose tiles and masks are timed.
        quality_tiles: Tiles of ``quality_data`` scored per row.
        grid_precision: Precisions of the grid rows (``None``: bf16 when ``precision`` has it, else ``precision``).
        check_nfe: NFE of the full restores that validate each extrapolated figure (empty: no check).
        channels_last: Convolution weights in ``torch.channels_last`` (NHWC) for every method.
    """

    methods: list[str] | None = None
    config: str = "paper"
    precision: list[str] = field(default_factory=lambda: default_precisions())
    batch_sizes: list[int] = field(default_factory=lambda: [1, 8])
    device: str = field(default_factory=_default_device)
    threads: int | None = None
    max_seconds: float = 30.0
    warmup: int = 1
    extrapolate: str = "auto"
    train_batch: int = 8
    training: bool = True
    peak_size: int | None = None
    json: Path | None = None
    seed: int = 0
    sampler: Path | None = None
    sampler_set: list[str] = field(default_factory=list)
    grid: bool = False
    schedulers: list[str] = field(default_factory=lambda: list(speed_quality.SCHEDULERS))
    grid_steps: list[int] = field(default_factory=lambda: list(speed_quality.STEPS))
    crops: list[str] = field(default_factory=lambda: list(speed_quality.CROPS))
    autoencoders: list[str] = field(default_factory=lambda: ["full"])
    quality_model: list[str] = field(default_factory=list)
    quality_data: Path = DEMO_QUALITY_DATA
    quality_tiles: int = 16
    grid_precision: list[str] | None = None
    check_nfe: list[int] = field(default_factory=lambda: [10, 40])
    channels_last: bool = False


def quality_models(args: BenchmarkJob) -> dict[str, Path]:
    """Trained pipeline folder per latent method: ``--quality-model`` items over the demo's exports that exist.

    Raises:
        ValueError: An item that is not ``METHOD=DIR`` with a latent method and an existing folder.
    """
    models = {m: p for m, p in DEMO_MODELS.items() if (p / "pipeline.json").is_file()}
    for item in args.quality_model:
        method, sep, folder = item.partition("=")
        if not sep or method not in LATENT_METHODS:
            raise ValueError(f"--quality-model {item!r}: expected METHOD=DIR with METHOD one of {LATENT_METHODS}")
        if not (Path(folder) / "pipeline.json").is_file():
            raise ValueError(f"--quality-model {item!r}: {folder}/pipeline.json not found (export a pipeline first)")
        models[method] = Path(folder)
    return models


def check_tiny_autoencoders(models: dict[str, Path], args: BenchmarkJob) -> None:
    """Every scoring pipeline of a benchmarked method holds a tiny autoencoder when the grid has tiny rows.

    Raises:
        ValueError: Naming the pipelines without one and how to add it.
    """
    wanted = [m for m in models if args.methods is None or m in args.methods]
    lacking = [
        str(models[m])
        for m in wanted
        if "tiny_autoencoder" not in json.loads((models[m] / "pipeline.json").read_text())
    ]
    if lacking:
        raise ValueError(
            f"--autoencoders {','.join(args.autoencoders)}: {', '.join(lacking)} hold no tiny autoencoder; add one "
            "with `python -m experiments.tiny_vae` or `experiments.export tiny-vae` (docs/TINY_VAE.md), or drop the "
            "tiny rows"
        )


def sampler_settings(args: BenchmarkJob) -> tuple:
    """The sampler file's content (or None) and the ``sampler_set`` fields.

    Raises:
        ValueError: An unreadable or invalid file or a bad ``KEY=VALUE``.
    """
    return (None if args.sampler is None else load_sampler_file(args.sampler)), parse_sampler_sets(args.sampler_set)


def parse_args(argv: list[str] | None = None) -> BenchmarkJob:
    """Command-line arguments as a :class:`BenchmarkJob` (the sampler settings are checked here)."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.benchmark",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--methods",
        type=_csv(str, METHODS),
        default=None,
        help=f"comma-separated subset of {','.join(METHODS)} (default: every available one)",
    )
    p.add_argument("--config", choices=tuple(CONFIGS), default="paper", help="model sizes (default: paper)")
    p.add_argument(
        "--precision",
        type=_csv(str, tuple(DTYPES)),
        default=None,
        help="comma-separated autocast precisions (default: fp32,bf16 where the device computes bf16 natively, "
        "else fp32: emulated bf16 is ~20x slower)",
    )
    p.add_argument("--batch-sizes", type=_csv(int), default=[1, 8], help="comma-separated batch sizes (default: 1,8)")
    p.add_argument("--device", default=_default_device(), help="cpu or cuda[:N]")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch.get_num_threads())")
    p.add_argument(
        "--max-seconds",
        type=float,
        default=30.0,
        help="time budget per measurement; a full restore runs only when its estimate fits it (default 30)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed calls before each measurement (default 1)")
    p.add_argument(
        "--extrapolate",
        choices=EXTRAPOLATE_MODES,
        default="auto",
        help="auto: measure full restores that fit --max-seconds; always / never (default auto)",
    )
    p.add_argument("--train-batch", type=int, default=8, help="batch size of the training throughput (default 8)")
    p.add_argument(
        "--training",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="measure denoiser training throughput (default on)",
    )
    p.add_argument(
        "--peak-size", type=int, default=None, help="matmul side for the peak (default 2048 on CPU, 8192 on CUDA)"
    )
    p.add_argument("--json", type=Path, default=None, help="write every record to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--sampler",
        type=Path,
        metavar="FILE",
        help="sampler settings file for the diffusion methods (experiments/configs/sampler/*.yaml)",
    )
    p.add_argument(
        "--sampler-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set one SamplerConfig field (YAML value) of the diffusion methods; wins over --sampler",
    )
    p.add_argument(
        "--grid",
        action="store_true",
        help="time and score the latent methods under every --schedulers x --grid-steps x --crops row",
    )
    p.add_argument(
        "--schedulers",
        type=_csv(str, scheduler_names()),
        default=list(speed_quality.SCHEDULERS),
        help=f"schedulers of the grid (default {','.join(speed_quality.SCHEDULERS)})",
    )
    p.add_argument(
        "--grid-steps",
        type=_csv(int),
        default=list(speed_quality.STEPS),
        help=f"sampling steps of the grid (default {','.join(map(str, speed_quality.STEPS))})",
    )
    p.add_argument(
        "--crops",
        type=_csv(str, speed_quality.CROPS),
        default=list(speed_quality.CROPS),
        help="crop settings of the grid: off (whole tile), window (crop), decode (crop_decode) (default all three)",
    )
    p.add_argument(
        "--autoencoders",
        type=_csv(str, speed_quality.AUTOENCODERS),
        default=["full"],
        help="autoencoders of the grid: full (the VAE), tiny (distilled encoder + decoder), tiny-decoder (VAE "
        "encoder, tiny decoder); the tiny ones need --quality-model pipelines with a tiny_vae/ (default full)",
    )
    p.add_argument(
        "--quality-model",
        action="append",
        default=[],
        metavar="METHOD=DIR",
        help="trained pipeline scoring a latent method's grid rows (default: the demo's two exports)",
    )
    p.add_argument(
        "--quality-data",
        type=Path,
        default=DEMO_QUALITY_DATA,
        help=f"evaluation set scoring the grid rows; its tiles and masks are also timed (default {DEMO_QUALITY_DATA})",
    )
    p.add_argument("--quality-tiles", type=int, default=16, help="tiles scored per grid row (default 16)")
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="convolution weights in channels_last (NHWC) memory format for every method",
    )
    p.add_argument(
        "--check-nfe",
        type=lambda text: [] if text.strip() in ("", "none") else _csv(int)(text),
        default=[10, 40],
        help="NFE of measured restores that validate every extrapolated figure, or 'none' (default 10,40)",
    )
    p.add_argument(
        "--grid-precision",
        type=_csv(str, tuple(DTYPES)),
        default=None,
        help="precisions of the grid rows (default: bf16 when --precision has it, else --precision)",
    )
    ns = p.parse_args(argv)
    if ns.precision is None:
        ns.precision = default_precisions(ns.device)
    args = from_namespace(BenchmarkJob, ns)
    try:
        sampler_settings(args)
        if args.grid:
            models = quality_models(args)
            if set(args.autoencoders) - {"full"}:
                check_tiny_autoencoders(models, args)
    except ValueError as err:
        p.error(str(err))
    if args.grid and args.quality_tiles < 1:
        p.error("--quality-tiles must be >= 1")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be positive")
    if args.max_seconds < 0 or args.warmup < 0 or args.train_batch < 1:
        p.error("--max-seconds and --warmup must be >= 0 and --train-batch >= 1")
    return args


def run(args: BenchmarkJob) -> list[dict]:
    """Run every measurement the arguments ask for and return the records (see ``benchmarking/records.py``)."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda asked for, but CUDA is not available")
    torch.manual_seed(args.seed)
    geometry = CONFIGS[args.config]
    records: list[dict] = [{"record": "machine", **machine_info(device)}]

    peak_size = args.peak_size or (8192 if device.type == "cuda" else 2048)
    peak_seconds = min(2.0, max(args.max_seconds, 0.2))
    first = measure_peaks(args.precision, device, peak_size, peak_seconds, "start")

    methods, skipped = available_methods(args.methods)
    records += [{"record": "skipped", "method": m, "reason": why} for m, why in skipped.items()]
    total = len(methods) * len(args.precision) * len(args.batch_sizes)
    done = 0
    for method in methods:
        start = time.perf_counter()
        bench = build_bench(method, geometry, device)
        if args.channels_last:
            if getattr(bench, "pipeline", None) is not None:
                bench.pipeline.accelerate(channels_last=True)
            else:
                bench.network.to(memory_format=torch.channels_last)
        sampler = apply_sampler_file(bench, args)
        flops = bench.count_flops()
        log.info(
            "%s (%s): built and counted in %.1f s; NFE %d, %.3g GFLOP/eval, %.3g GFLOP VAE per tile",
            method,
            args.config,
            time.perf_counter() - start,
            bench.nfe,
            flops["eval"] / 1e9,
            (flops["encode"] + flops["decode"]) / 1e9,
        )
        for precision in args.precision:
            for batch_size in args.batch_sizes:
                done += 1
                start = time.perf_counter()
                record = restore_record(
                    bench,
                    config=args.config,
                    precision=precision,
                    batch_size=batch_size,
                    flops=flops,
                    max_seconds=args.max_seconds,
                    warmup=args.warmup,
                    extrapolate=args.extrapolate,
                    check_nfe=args.check_nfe,
                )
                record["channels_last"] = args.channels_last
                records.append({**record, "sampler_file": sampler} if sampler is not None else record)
                log.info(
                    "[%d/%d] %s %s batch %d: %.4g s/tile (%s, NFE %d) in %.1f s",
                    done,
                    total,
                    method,
                    precision,
                    batch_size,
                    record["seconds_per_tile"],
                    record["measured_or_extrapolated"],
                    record["nfe"],
                    time.perf_counter() - start,
                )
        if args.grid and method in LATENT_METHODS:
            records += grid_records(bench, method, args)
        del bench
    add_batch_speedups(records)
    records += ratio_records(records)
    records += speed_quality.target_records(records)

    if args.training:
        common = {
            "config": args.config,
            "precisions": args.precision,
            "batch_size": args.train_batch,
            "max_seconds": args.max_seconds,
            "warmup": args.warmup,
        }
        if "latent" in methods:
            records += training_records(geometry, device, **common)
        if "latent-conditional" in methods:
            records += conditional_training_records(geometry, device, **common)
        if not {"latent", "latent-conditional"} & set(methods):
            log.info("training throughput is measured for the latent denoisers only; --methods has neither")

    # The peak is measured before and after the work and the higher value used, so that a load burst from another
    # process during one of the two measurements does not inflate the utilisations.
    last = measure_peaks(args.precision, device, peak_size, peak_seconds, "end")
    peaks = {p: max(first[p]["flops_per_second"], last[p]["flops_per_second"]) for p in args.precision}
    records += [*first.values(), *last.values()]
    records[0].update(peaks_flops_per_second=peaks, peak_matmul_size=peak_size)
    add_utilisation(records, peaks)
    return records


def grid_records(bench, method: str, args: BenchmarkJob) -> list[dict]:
    """``sampler_row`` records of one latent method: every grid row timed on the bench, scored by a trained pipeline.

    The bench takes the trained pipeline's sampler settings, default scheduler and pixel refiner, so the timed
    restore is the scored one at the bench's model sizes. Without a trained pipeline or evaluation set the rows are
    timed on the benchmark's synthetic band masks and carry no quality columns (logged).
    """
    from lightning_modules.components.pipeline import RestorationPipeline

    model = quality_models(args).get(method)
    tiles = scores = trained = None
    quality_from = None
    if model is not None and (args.quality_data / "corrupted").is_dir():
        tiles = speed_quality.load_quality_tiles(args.quality_data, args.quality_tiles)
        trained = RestorationPipeline.from_pretrained(model)
        if trained.conditional != (method == "latent-conditional"):
            raise SystemExit(f"error: --quality-model {method}={model}: that pipeline is not a {method} one")
    own_steps = (trained or bench.pipeline).sampler_config.num_steps
    rows = speed_quality.grid_rows(
        args.schedulers, args.grid_steps, args.crops, default_steps=own_steps, autoencoders=args.autoencoders
    )
    if set(args.autoencoders) - {"full"} and bench.pipeline.tiny_vae is None:
        attach_bench_tiny_autoencoder(bench)
    if trained is not None:
        scores = speed_quality.score_rows(trained, tiles, rows, seed=args.seed)
        quality_from = (
            f"trained pipeline {model} on {args.quality_data} ({len(tiles.names)} tiles, fp32 on the CPU)"
            f"; the timing is of random {args.config}-config weights with the same sampler settings"
        )
        bench.pipeline.sampler_config = trained.sampler_config
        bench.pipeline.scheduler_name = trained.scheduler_name
        bench.pipeline.refiner = trained.refiner
    else:
        log.warning("%s: no trained pipeline or %s; grid rows are timed only", method, args.quality_data)
    size = bench.geometry.image_size
    precisions = args.grid_precision or (["bf16"] if "bf16" in args.precision else args.precision)
    out = []
    for precision in precisions:
        for batch_size in args.batch_sizes:
            if tiles is not None and tiles.corrupted.shape[-1] == size:
                x, mask = speed_quality.take(tiles, batch_size)
            else:
                x, mask = example_batch(batch_size, size, bench.device)
            x, mask = x.to(bench.device), mask.to(bench.device)
            for i, row in enumerate(rows):
                # the rows share the batch's shapes: warm up once per (precision, batch), before the first row
                timed = speed_quality.time_row(
                    bench, row, x, mask, precision, max_seconds=args.max_seconds, warmup=args.warmup if i == 0 else 0
                )
                record = {
                    "record": "sampler_row",
                    "method": method,
                    "config": args.config,
                    "precision": precision,
                    "batch": batch_size,
                    "batch_size": batch_size,
                    "device": str(bench.device),
                    "row": row.label,
                    "sampler": row.as_dict(),
                    "nfe": timed["nfe"],
                    "seconds_per_tile": timed["seconds_per_batch"] / batch_size,
                    "reps": timed["reps"],
                    "how": "measured",
                    "measured_or_extrapolated": "measured",
                    "timed_on": "evaluation tiles" if tiles is not None else "synthetic band masks",
                    "channels_last": args.channels_last,
                }
                if scores is not None:
                    record.update(speed_quality.quality_fields(scores, row, quality_from))
                out.append(record)
                log.info(
                    "grid %s %s batch %d %s: %.4g s/tile, NFE %d, PSNR delta %s",
                    method,
                    precision,
                    batch_size,
                    row.label,
                    record["seconds_per_tile"],
                    record["nfe"],
                    "-" if scores is None else f"{record['psnr_artifact_delta']:+.3f}",
                )
    reference = {(r["precision"], r["batch"]): r["seconds_per_tile"] for r in out if r["row"] == rows[0].label}
    for r in out:
        r["speedup_vs_reference"] = reference[(r["precision"], r["batch"])] / r["seconds_per_tile"]
    return out


def attach_bench_tiny_autoencoder(bench) -> None:
    """Give the bench's (random-weight) pipeline a tiny autoencoder of its config's size (``Geometry.tiny_vae``)."""
    from lightning_modules.components.tiny_autoencoder import build_tiny_autoencoder

    tiny = build_tiny_autoencoder(bench.geometry.tiny_vae, latent_channels=bench.pipeline.codec.latent_channels)
    bench.pipeline.tiny_vae = tiny.eval().requires_grad_(False).to(bench.device)
    if bench.pipeline.performance["channels_last"]:
        bench.pipeline.tiny_vae.to(memory_format=torch.channels_last)


def apply_sampler_file(bench, args: BenchmarkJob) -> dict | None:
    """Give a diffusion bench's pipeline the ``--sampler`` / ``--sampler-set`` settings; returns their record.

    ``None`` when neither is given or the method has no sampler (CycleGAN). The NFE is recomputed from the new
    settings. A scheduler from the file becomes the pipeline's default (a ``reference``-preset pipeline samples
    with DDPM whatever its default, as ``RestorationPipeline.make_sampler`` does).

    Raises:
        SystemExit: The settings are refused for this method (e.g. RePaint jumps with DPM-Solver++).
    """
    try:
        spec, fields = sampler_settings(args)
    except ValueError as err:
        raise SystemExit(f"error: {' '.join(str(err).split())}") from None
    pipeline = getattr(bench, "pipeline", None)
    if (spec is None and not fields) or pipeline is None:
        if spec is not None or fields:
            log.info("%s has no sampler: --sampler/--sampler-set do not apply to it", bench.name)
        return None
    try:
        config, scheduler = apply_sampler(pipeline.sampler_config, spec, fields)
        pipeline.sampler_config = config
        pipeline.scheduler_name = scheduler or pipeline.scheduler_name
        bench.nfe = pipeline.make_sampler().expected_nfe()
    except ValueError as err:
        raise SystemExit(f"error: {bench.name}: sampler settings refused ({' '.join(str(err).split())})") from None
    log.info("%s: sampler %s (NFE %d)", bench.name, config, bench.nfe)
    return sampler_record(args.sampler, spec, sampler_kwargs(spec, fields))


def measure_peaks(precisions: list[str], device: torch.device, size: int, seconds: float, when: str) -> dict[str, dict]:
    """``"peak"`` records (matmul FLOP/s) of every precision, keyed by precision; ``when`` labels the moment."""
    out = {}
    for precision in precisions:
        log.info("matmul peak (%s of run): %s %dx%d on %s", when, precision, size, size, device)
        out[precision] = {
            "record": "peak",
            "when": when,
            "precision": precision,
            "size": size,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "flops_per_second": matmul_peak(precision, device, size=size, max_seconds=seconds),
        }
    return out


def report(records: list[dict]) -> str:
    """The markdown report of a run: machine line, then the restore, ratio, training and peak tables."""
    parts = [machine_line(records), "", "## Restore (seconds per tile, random weights)", "", restore_table(records)]
    if any(r.get("record") == "ratio" for r in records):
        parts += ["", "## Pixel ArtiFusion / latent (seconds per tile)", "", ratio_table(records)]
    if any(r.get("record") == "sampler_row" for r in records):
        parts += ["", "## Sampler grid: speed and quality per row", "", sampler_grid_table(records)]
    if any(r.get("record") == "speed_target" for r in records):
        parts += ["", "## Fastest row within 0.3 dB of the 50-step whole-tile restore", "", speed_target_table(records)]
    if any(r.get("record") == "training" for r in records):
        parts += ["", "## Denoiser training throughput", "", training_table(records)]
    parts += ["", "## Matmul peak (same run)", "", peak_table(records)]
    skipped = [r for r in records if r.get("record") == "skipped"]
    if skipped:
        parts += ["", *(f"skipped {r['method']}: {r['reason']}" for r in skipped)]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run, print the tables, write ``--json``."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", stream=sys.stderr
    )
    args = parse_args(argv)
    records = run(args)
    print(report(records), flush=True)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        tmp = args.json.with_name(args.json.name + ".tmp")
        tmp.write_text(json.dumps(records, indent=2))
        tmp.replace(args.json)
        print(f"\nwrote {len(records)} records to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
