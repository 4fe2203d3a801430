"""Speed against quality of the latent samplers: each (scheduler, steps, crop, autoencoder) row timed and scored.

Speed needs the benchmark's networks (the paper sizes; random weights time the same as trained ones), quality needs
trained weights, which on this machine only the CPU-scale pipelines have. So every row of the grid is measured twice
with the same sampler settings:

1. **speed**: seconds per tile of the full ``RestorationPipeline.restore`` of the ``--config`` bench, always run and
   timed (never extrapolated), on the first tiles and masks of the quality evaluation set: the masks decide what
   ``crop=true`` saves, so random bands would misstate it;
2. **quality**: the trained pipeline of the same method restores the evaluation set with the row's settings; outputs
   are rounded to 8 bits as ``experiments.restore`` writes them and scored inside the artifact mask (PSNR, SSIM)
   against the clean tiles. ``psnr_artifact_delta`` is the paired mean over tiles of the row's PSNR minus that of the
   reference row (50 steps, whole tile, the pipeline's own scheduler), with a 95 % bootstrap interval.

Records (``record: "sampler_row"``) carry the fields the speed issue asks for: ``method``, ``config``,
``precision``, ``batch`` (and ``batch_size``), ``nfe``, ``seconds_per_tile``, ``how`` (``measured``), ``sampler``
(scheduler, steps, crop), ``psnr_artifact_delta`` and ``quality_from`` (which trained pipeline and evaluation set the
quality columns come from). :func:`target_records` picks, per precision and batch, the fastest row within a quality
tolerance of the reference and divides pixel ArtiFusion's and the reference row's seconds by its seconds.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from experiments.benchmarking.timing import autocast, measure
from experiments.crop_bound import EvalTiles, load_evalset, timed_restore
from lightning_modules.metrics.functional import per_image_metrics
from lightning_modules.metrics.statistics import bootstrap_ci

log = logging.getLogger(__name__)

SCHEDULERS = ("ddim", "dpmsolver++", "unipc")
STEPS = (4, 8, 10, 20, 50)
CROPS = ("off", "window", "decode")
CROP_LABELS = {"off": "", "window": ", crop", "decode": ", decode crop"}
AUTOENCODERS = ("full", "tiny", "tiny-decoder")
AUTOENCODER_LABELS = {"full": "", "tiny": ", tiny AE", "tiny-decoder": ", tiny decoder"}
REFERENCE_STEPS = 50
TOLERANCE_DB = 0.3
"""A row counts as quality-preserving when its mean artifact-PSNR delta to the reference is at least ``-TOLERANCE``."""


@dataclass(frozen=True)
class GridRow:
    """One sampler setting of the grid.

    Attributes:
        scheduler: diffusers scheduler name (``None``: the pipeline's own default).
        num_steps: Sampling steps.
        crop: ``"off"`` (whole tile), ``"window"`` (``crop``: encode, sample and decode a window around each tile's
            mask, ``components/crop.py``) or ``"decode"`` (``crop_decode``: whole-tile encode and sampling, only the
            window decoded).
        autoencoder: ``"full"`` (the pipeline's VAE), ``"tiny"`` (its distilled tiny autoencoder) or
            ``"tiny-decoder"`` (VAE encoder, tiny decoder); ``components/tiny_autoencoder.py``.
    """

    scheduler: str | None
    num_steps: int
    crop: str = "off"
    autoencoder: str = "full"

    def __post_init__(self) -> None:
        if self.crop not in CROPS:
            raise ValueError(f"crop must be one of {CROPS}, got {self.crop!r}")
        if self.autoencoder not in AUTOENCODERS:
            raise ValueError(f"autoencoder must be one of {AUTOENCODERS}, got {self.autoencoder!r}")

    @property
    def label(self) -> str:
        """Short name, e.g. ``"ddim 10, decode crop, tiny AE"``."""
        return (
            f"{self.scheduler or 'default'} {self.num_steps}{CROP_LABELS[self.crop]}"
            f"{AUTOENCODER_LABELS[self.autoencoder]}"
        )

    def restore_kwargs(self) -> dict:
        """Keyword arguments of ``RestorationPipeline.restore`` for this row."""
        return {
            "scheduler": self.scheduler,
            "num_steps": self.num_steps,
            "crop": self.crop == "window",
            "crop_decode": self.crop == "decode",
            "autoencoder": self.autoencoder,
        }

    def as_dict(self) -> dict:
        """The row's settings as stored in records."""
        return {
            "scheduler": self.scheduler,
            "num_steps": self.num_steps,
            "crop": self.crop,
            "autoencoder": self.autoencoder,
        }


REFERENCE = GridRow(None, REFERENCE_STEPS, "off")


def grid_rows(
    schedulers: tuple[str, ...] | list[str] = SCHEDULERS,
    steps: tuple[int, ...] | list[int] = STEPS,
    crops: tuple[str, ...] | list[str] = CROPS,
    default_steps: int | None = None,
    autoencoders: tuple[str, ...] | list[str] = ("full",),
) -> list[GridRow]:
    """The grid's rows: the reference first, then the pipeline's own steps, then every combination.

    The pipeline's own row (``default_steps`` with its own scheduler) comes under every crop and autoencoder
    setting; duplicates are dropped.
    """
    rows = [REFERENCE]
    own = list(itertools.product([None], [default_steps], crops, autoencoders)) if default_steps else []
    for scheduler, n, crop, ae in [*own, *itertools.product(schedulers, steps, crops, autoencoders)]:
        row = GridRow(scheduler, int(n), crop, ae)
        if row not in rows:
            rows.append(row)
    return rows


def take(tiles: EvalTiles, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` corrupted tiles and masks of ``tiles``, cycling through the set when it holds fewer."""
    index = torch.arange(n) % len(tiles.names)
    return tiles.corrupted[index], tiles.masks[index]


def load_quality_tiles(root: Path, limit: int | None = None) -> EvalTiles:
    """The first ``limit`` tiles (by name) of an evaluation set that carry an artifact.

    The set holds ``clean/``, ``corrupted/`` and ``masks/``; tiles with an empty mask have no region to score.

    Raises:
        FileNotFoundError: The folder holds no tiles with an artifact.
    """
    tiles = load_evalset(root)
    keep = [i for i in range(len(tiles.names)) if tiles.masks[i].any()][:limit]
    if not keep:
        raise FileNotFoundError(f"{root}: no tile with a non-empty artifact mask to score")
    index = torch.tensor(keep)
    return EvalTiles(
        root.name, [tiles.names[i] for i in keep], tiles.clean[index], tiles.corrupted[index], tiles.masks[index]
    )


def time_row(bench, row: GridRow, x: torch.Tensor, mask: torch.Tensor, precision: str, **timing) -> dict:
    """Median seconds of one full restore of ``x`` with the row's settings on the bench's pipeline (end to end).

    Args:
        bench: A diffusion bench of ``benchmarking/methods.py`` (random weights at the benchmark's config).
        row: The sampler setting.
        x: (B, 3, S, S) corrupted tiles in [-1, 1] on the bench's device.
        mask: (B, 1, S, S) artifact masks in {0, 1}.
        precision: Autocast precision.
        **timing: ``max_seconds`` and ``warmup`` of :func:`~experiments.benchmarking.timing.measure`.

    Returns:
        ``{"seconds_per_batch", "reps", "nfe"}`` (NFE of the last call: 0 when crop found every mask empty).
    """
    pipe = bench.pipeline
    pipe.precision = precision
    g = torch.Generator(device=x.device)

    def run() -> None:
        pipe.restore(x, mask, generator=g.manual_seed(0), **row.restore_kwargs())

    with torch.no_grad(), autocast(bench.device, precision):
        result = measure(run, bench.device, **timing)
    return {"seconds_per_batch": result.median, "reps": result.reps, "nfe": pipe.nfe}


def score_rows(pipe, tiles: EvalTiles, rows: list[GridRow], *, batch_size: int = 8, seed: int = 0) -> dict:
    """Per-tile artifact-region PSNR and SSIM of the trained pipeline under every row, and its seconds.

    All rows of one batch share the seed, so the reference and a row differ only by their settings. A tiny
    autoencoder row whose full-VAE twin (same settings, ``autoencoder="full"``) is in ``rows`` is also scored
    against the twin's restoration (the quality cost of the swap on the same restored tiles).

    Returns:
        ``{row: {"psnr": [...], "ssim": [...], "seconds": float}}`` in tile order, plus ``"vs_full_psnr"`` and
        ``"vs_full_ssim"`` lists for tiny autoencoder rows with a twin.
    """
    device = next(pipe.unet.parameters()).device
    out = {row: {"psnr": [], "ssim": [], "seconds": 0.0} for row in rows}
    twins = {row: replace(row, autoencoder="full") for row in rows if row.autoencoder != "full"}
    twins = {row: twin for row, twin in twins.items() if twin in out}
    for row in twins:
        out[row] |= {"vs_full_psnr": [], "vs_full_ssim": []}
    batches = list(range(0, len(tiles.names), batch_size))
    with tqdm(total=len(rows) * len(batches), desc=f"quality ({pipe.name}, {tiles.name})", unit="batch") as bar:
        for b, start in enumerate(batches):
            part = slice(start, start + batch_size)
            x, mask = tiles.corrupted[part].to(device), tiles.masks[part].to(device)
            restored = {}
            for row in rows:
                restored[row], seconds = timed_restore(pipe, x, mask, seed + b, row.restore_kwargs())
                out[row]["seconds"] += seconds
                scores = per_image_metrics(
                    restored[row], tiles.clean[part], mask.cpu(), regions=("artifact",), metrics=("psnr", "ssim")
                )
                out[row]["psnr"] += [float(v) for v in scores["artifact/psnr"]]
                out[row]["ssim"] += [float(v) for v in scores["artifact/ssim"]]
                bar.update()
            for row, twin in twins.items():
                scores = per_image_metrics(
                    restored[row], restored[twin], mask.cpu(), regions=("artifact",), metrics=("psnr", "ssim")
                )
                out[row]["vs_full_psnr"] += [float(v) for v in scores["artifact/psnr"]]
                out[row]["vs_full_ssim"] += [float(v) for v in scores["artifact/ssim"]]
    return out


def quality_fields(scores: dict, row: GridRow, quality_from: str) -> dict:
    """The quality columns of one row's record, paired against :data:`REFERENCE` on the same tiles."""
    mine, ref = scores[row], scores[REFERENCE]
    deltas = [a - b for a, b in zip(mine["psnr"], ref["psnr"], strict=True)]
    mean, low, high, n = bootstrap_ci(deltas)
    versus_full = {}
    if "vs_full_psnr" in mine:
        versus_full = {
            "psnr_vs_full_autoencoder": sum(mine["vs_full_psnr"]) / n,
            "ssim_vs_full_autoencoder": sum(mine["vs_full_ssim"]) / n,
        }
    return {
        **versus_full,
        "psnr_artifact": sum(mine["psnr"]) / len(mine["psnr"]),
        "ssim_artifact": sum(mine["ssim"]) / len(mine["ssim"]),
        "psnr_artifact_delta": mean,
        "psnr_artifact_delta_ci": [low, high],
        "psnr_artifact_delta_worst": min(deltas),
        "quality_tiles": n,
        "quality_seconds_per_tile": mine["seconds"] / len(mine["psnr"]),
        "quality_from": quality_from,
    }


def target_records(records: list[dict], tolerance: float = TOLERANCE_DB) -> list[dict]:
    """``speed_target`` records: per (method, config, precision, batch) the fastest quality-preserving grid row.

    Quality-preserving: ``psnr_artifact_delta >= -tolerance``. The record holds its speed-ups over the reference row,
    over the method's own ``restore`` record at the same precision and batch (the benchmark's default sampler: 50
    steps at strength 1 for the paper method, as the paper samples) and over the fastest pixel ArtiFusion restore
    record of the same config (any precision and batch: the pixel method's best case).
    """
    pixel = [r for r in records if r.get("record") == "restore" and r["method"] == "artifusion"]
    default = {
        (r["method"], r["config"], r.get("precision"), r.get("batch_size")): r
        for r in records
        if r.get("record") == "restore"
    }
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r.get("record") == "sampler_row":
            groups.setdefault((r["method"], r["config"], r["precision"], r["batch"]), []).append(r)
    out = []
    for (method, config, precision, batch), rows in groups.items():
        ok = [r for r in rows if r.get("psnr_artifact_delta") is not None and r["psnr_artifact_delta"] >= -tolerance]
        reference = next((r for r in rows if r["sampler"] == REFERENCE.as_dict()), None)
        if not ok:
            continue
        best = min(ok, key=lambda r: r["seconds_per_tile"])
        same_config = [p for p in pixel if p["config"] == config]
        fastest_pixel = min(same_config, key=lambda p: p["seconds_per_tile"]) if same_config else None
        own = default.get((method, config, precision, batch))
        out.append(
            {
                "record": "speed_target",
                "method": method,
                "config": config,
                "precision": precision,
                "batch": batch,
                "tolerance_db": tolerance,
                "row": best["row"],
                "sampler": best["sampler"],
                "seconds_per_tile": best["seconds_per_tile"],
                "psnr_artifact_delta": best["psnr_artifact_delta"],
                "speedup_vs_reference": (
                    reference["seconds_per_tile"] / best["seconds_per_tile"] if reference is not None else None
                ),
                "default_restore_nfe": own["nfe"] if own else None,
                "default_restore_how": own["measured_or_extrapolated"] if own else None,
                "speedup_vs_default_restore": own["seconds_per_tile"] / best["seconds_per_tile"] if own else None,
                "artifusion_seconds_per_tile": fastest_pixel["seconds_per_tile"] if fastest_pixel else None,
                "artifusion_how": fastest_pixel["measured_or_extrapolated"] if fastest_pixel else None,
                "speedup_vs_artifusion": (
                    fastest_pixel["seconds_per_tile"] / best["seconds_per_tile"] if fastest_pixel else None
                ),
            }
        )
    return out
