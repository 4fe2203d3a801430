r"""Crop-only VAE passes against full-tile restores: artifact-region PSNR difference and speed, one interleaved run.

Usage:
    python -m experiments.crop_bound --pipelines outputs/demo/pipeline_conditional,outputs/demo/pipeline \
        --data outputs/demo/evalset,outputs/demo/evalset_unseen --margins 16,32,64 --json outputs/crop_bound.json

For every pipeline and every batch of evaluation tiles it restores the batch with the full-tile path, with the full
path under another seed (how far two seeds of the same restore lie apart: the noise floor of the comparison) and with
``crop=true`` at each margin, in an order that alternates between batches, and times every call. All calls of one
batch share the seed (the other-seed row excepted). Outputs are rounded to 8 bits as ``experiments.restore`` writes
them, then scored against the clean tile inside the artifact mask (PSNR, 0-255 scale).

Records (``--json``) follow ``experiments.benchmark``'s: ``record: "crop"``, ``method``, ``config`` (``full``,
``full, other seed``, ``crop, margin M``), ``precision``, ``batch_size``, ``nfe``, ``seconds_per_tile``, ``how``
(always ``measured``), and ``psnr_artifact_delta`` (mean over tiles of crop minus full), its largest absolute value
``psnr_artifact_delta_max_abs``, ``speedup`` (full s/tile over this row's), ``fallback_share`` (tiles whose window
was the whole tile), ``window_fraction`` (mean share of the tile encoded) and ``tiles``; ``record: "crop_tile"``
holds every tile's numbers. Quote ratios: absolute seconds depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from datamodules.datasets import to_mask_tensor, to_tensor, to_uint8
from datamodules.imageio import read_image, read_mask
from experiments.benchmarking.tables import markdown_table
from experiments.benchmarking.timing import machine_info, synchronize
from lightning_modules.components.crop import plan_windows
from lightning_modules.components.pipeline import RestorationPipeline
from lightning_modules.metrics.functional import per_image_metrics

log = logging.getLogger("experiments.crop_bound")
FULL, OTHER_SEED = "full", "full, other seed"


@dataclass
class EvalTiles:
    """One evaluation set in memory: names, and (N, 3, H, W) clean / corrupted in [-1, 1], (N, 1, H, W) masks."""

    name: str
    names: list[str]
    clean: torch.Tensor
    corrupted: torch.Tensor
    masks: torch.Tensor


def load_evalset(root: Path) -> EvalTiles:
    """Read ``root/{clean,corrupted,masks}/NAME.png`` (masks 255 = artifact) for every name in ``corrupted/``.

    Raises:
        FileNotFoundError: ``root/corrupted`` holds no PNG.
    """
    names = sorted(p.name for p in (root / "corrupted").glob("*.png"))
    if not names:
        raise FileNotFoundError(
            f"{root}/corrupted holds no PNG tiles; expected an evaluation set (python -m datamodules.synthesize)"
        )
    clean = torch.stack([to_tensor(read_image(root / "clean" / n)) for n in names])
    corrupted = torch.stack([to_tensor(read_image(root / "corrupted" / n)) for n in names])
    masks = torch.stack([to_mask_tensor(read_mask(root / "masks" / n)) for n in names])
    return EvalTiles(root.name, names, clean, corrupted, masks)


def configs(margins: list[int]) -> list[tuple[str, dict, int]]:
    """``(config name, restore overrides, seed offset)`` of every compared row, the full-tile path first."""
    rows = [(FULL, {"crop": False}, 0), (OTHER_SEED, {"crop": False}, 1)]
    return rows + [(f"crop, margin {m}", {"crop": True, "crop_margin": m}, 0) for m in margins]


def timed_restore(
    pipe: RestorationPipeline, x: torch.Tensor, mask: torch.Tensor, seed: int, overrides: dict
) -> tuple[torch.Tensor, float]:
    """One restore call: ``(outputs rounded to 8 bits as (B, 3, H, W) in [-1, 1], seconds)``."""
    device = next(pipe.unet.parameters()).device
    synchronize(device)
    start = time.perf_counter()
    out = pipe.restore(x, mask, generator=torch.Generator(device).manual_seed(seed), **overrides)
    synchronize(device)
    seconds = time.perf_counter() - start
    return torch.stack([to_tensor(rgb) for rgb in to_uint8(out)]), seconds


def compare(
    pipe: RestorationPipeline,
    tiles: EvalTiles,
    rows: list[tuple[str, dict, int]],
    *,
    batch_size: int,
    seed: int,
    max_fraction: float,
) -> list[dict]:
    """Per-tile ``crop_tile`` records of every row on one evaluation set (rows interleaved, order alternating)."""
    device = next(pipe.unet.parameters()).device
    out = []
    first = slice(0, batch_size)
    for _, overrides, _ in rows:  # warm-up: one untimed call per row
        pipe.restore(
            tiles.corrupted[first].to(device),
            tiles.masks[first].to(device),
            generator=torch.Generator(device).manual_seed(seed),
            crop_max_fraction=max_fraction,
            **overrides,
        )
    for b, start in enumerate(range(0, len(tiles.names), batch_size)):
        part = slice(start, start + batch_size)
        x, mask, clean = tiles.corrupted[part].to(device), tiles.masks[part].to(device), tiles.clean[part]
        order = rows if b % 2 == 0 else rows[::-1]
        for config, overrides, offset in order:
            restored, seconds = timed_restore(
                pipe, x, mask, seed + b + offset, {**overrides, "crop_max_fraction": max_fraction}
            )
            psnr = per_image_metrics(restored.cpu(), clean, mask.cpu(), regions=("artifact",), metrics=("psnr",))
            windows = (
                plan_windows(
                    mask,
                    margin=overrides.get("crop_margin", 0),
                    unit=pipe.unit,
                    factor=pipe.factor,
                    max_fraction=max_fraction,
                )
                if overrides["crop"]
                else [None] * len(restored)
            )
            for i, name in enumerate(tiles.names[part]):
                window = windows[i]
                out.append(
                    {
                        "record": "crop_tile",
                        "method": pipe.name,
                        "config": config,
                        "evalset": tiles.name,
                        "tile": name,
                        "psnr_artifact": float(psnr["artifact/psnr"][i]),
                        "seconds_per_tile": seconds / len(restored),
                        "nfe": pipe.nfe,
                        "window_fraction": 1.0 if window is None else window.area / mask[i].numel(),
                        "fallback": window is not None and window.area == mask[i].numel(),
                    }
                )
    return out


def border_profile(pipe: RestorationPipeline, tiles: EvalTiles, *, window: int, bin_px: int) -> list[dict]:
    """How far into a crop the VAE's reconstruction feels the crop's border: ``vae_border`` records.

    Every tile's centre ``window`` px square and the whole tile are encoded (posterior mean) and decoded; inside the
    square the two reconstructions are compared (mean absolute difference on the 0-255 scale) in bands of ``bin_px``
    pixels by distance to the square's border. The distance at which the difference stops falling is the effective
    context the VAE needs, i.e. the crop margin that buys nothing more.
    """
    height, width = tiles.corrupted.shape[-2:]
    if pipe.codec is None or window >= min(height, width) or window % pipe.factor:
        return []
    device = next(pipe.unet.parameters()).device
    top, left = (height - window) // 2 // pipe.factor * pipe.factor, (width - window) // 2 // pipe.factor * pipe.factor
    ys, xs = torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")
    distance = torch.minimum(torch.minimum(ys, xs), torch.minimum(window - 1 - ys, window - 1 - xs))
    totals: dict[int, list[float]] = {}
    with torch.no_grad():
        for x in tiles.corrupted.split(8):
            x = x.to(device)
            full = pipe.codec.decode(pipe.codec.encode(x, sample=False))[..., top : top + window, left : left + window]
            crop = x[..., top : top + window, left : left + window]
            part = pipe.codec.decode(pipe.codec.encode(crop, sample=False))
            diff = ((full - part).abs().float() * 127.5).mean(dim=1).cpu()  # (b, window, window)
            for band in range(0, window // 2, bin_px):
                inside = (distance >= band) & (distance < band + bin_px)
                totals.setdefault(band, []).extend(diff[:, inside].mean(dim=1).tolist())
    return [
        {
            "record": "vae_border",
            "method": pipe.name,
            "evalset": tiles.name,
            "window": window,
            "distance_px": [band, band + bin_px],
            "mean_abs_diff_255": statistics.fmean(v),
            "tiles": len(v),
        }
        for band, v in sorted(totals.items())
    ]


def summarise(tile_records: list[dict], *, precision: str, batch_size: int) -> list[dict]:
    """One ``crop`` record per (method, config): mean PSNR delta to the full path, speed-up, fallback share."""
    full = {(r["method"], r["evalset"], r["tile"]): r for r in tile_records if r["config"] == FULL}
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in tile_records:
        groups.setdefault((r["method"], r["config"]), []).append(r)
    out = []
    for (method, config), rs in groups.items():
        base = [full[(method, r["evalset"], r["tile"])] for r in rs]
        deltas = [r["psnr_artifact"] - f["psnr_artifact"] for r, f in zip(rs, base, strict=True)]
        seconds = statistics.fmean(r["seconds_per_tile"] for r in rs)
        full_seconds = statistics.fmean(f["seconds_per_tile"] for f in base)
        out.append(
            {
                "record": "crop",
                "method": method,
                "config": config,
                "precision": precision,
                "batch_size": batch_size,
                "nfe": max(r["nfe"] for r in rs),
                "seconds_per_tile": seconds,
                "how": "measured",
                "measured_or_extrapolated": "measured",
                "speedup": full_seconds / seconds,
                "psnr_artifact": statistics.fmean(r["psnr_artifact"] for r in rs),
                "psnr_artifact_delta": statistics.fmean(deltas),
                "psnr_artifact_delta_max_abs": max(map(abs, deltas)),
                "fallback_share": statistics.fmean(r["fallback"] for r in rs) if config.startswith("crop") else None,
                "window_fraction": statistics.fmean(r["window_fraction"] for r in rs),
                "tiles": len(rs),
                "evalsets": sorted({r["evalset"] for r in rs}),
            }
        )
    return out


def table(records: list[dict]) -> str:
    """Markdown table of the ``crop`` records."""
    rows = []
    for r in records:
        if r.get("record") != "crop":
            continue
        fallback = "-" if r["fallback_share"] is None else f"{100 * r['fallback_share']:.0f} %"
        rows.append(
            [
                r["method"],
                r["config"],
                r["precision"],
                str(r["batch_size"]),
                str(r["nfe"]),
                f"{r['seconds_per_tile']:.4g}",
                r["how"],
                f"{r['speedup']:.2f}",
                f"{r['psnr_artifact']:.2f}",
                f"{r['psnr_artifact_delta']:+.3f}",
                f"{r['psnr_artifact_delta_max_abs']:.3f}",
                fallback,
                f"{100 * r['window_fraction']:.0f} %",
                str(r["tiles"]),
            ]
        )
    header = [
        "method",
        "config",
        "precision",
        "batch",
        "NFE",
        "s/tile",
        "how",
        "full/this",
        "PSNR artifact",
        "Δ PSNR vs full (mean)",
        "max |Δ|",
        "whole-tile fallback",
        "area encoded",
        "tiles",
    ]
    return markdown_table(header, rows)


def profile_table(records: list[dict]) -> str:
    """Markdown table of ``vae_border`` records: one row per method and evaluation set, one column per band."""
    bands = sorted({tuple(r["distance_px"]) for r in records})
    rows: dict[tuple[str, str], dict] = {}
    for r in records:
        rows.setdefault((r["method"], r["evalset"]), {})[tuple(r["distance_px"])] = r["mean_abs_diff_255"]
    header = ["VAE of", "evalset", *(f"{a}-{b} px" for a, b in bands)]
    return markdown_table(
        header, [[m, e, *(f"{v.get(b, float('nan')):.2f}" for b in bands)] for (m, e), v in rows.items()]
    )


def _ints(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 0:
        raise argparse.ArgumentTypeError(f"expected comma-separated non-negative integers, got {text!r}")
    return values


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(
        prog="python -m experiments.crop_bound",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--pipelines", required=True, help="comma-separated exported latent pipeline folders")
    p.add_argument("--data", required=True, help="comma-separated evaluation sets (clean/, corrupted/, masks/)")
    p.add_argument("--margins", type=_ints, default=[32], help="comma-separated crop margins in px (default 32)")
    p.add_argument("--max-fraction", type=float, default=0.6, help="crop_max_fraction of every crop row (0.6)")
    p.add_argument("--batch-size", type=int, default=1, help="tiles per restore call (default 1)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--border-window",
        type=int,
        default=128,
        help="side of the centre square of the VAE border profile; 0 skips it (default 128)",
    )
    p.add_argument("--json", type=Path, default=None, help="write every record to this JSON file")
    args = p.parse_args(argv)
    if args.batch_size < 1 or not 0 < args.max_fraction <= 1:
        p.error("--batch-size must be >= 1 and --max-fraction in (0, 1]")
    return args


def write_records(
    path: Path | None, device: torch.device, tile_records: list[dict], profiles: list[dict], args: argparse.Namespace
) -> list[dict]:
    """Every record so far (machine, summaries, profiles, tiles), written to ``path`` (atomically) when given.

    Called after each pipeline and evaluation set, so a long run that is stopped keeps what it measured.
    """
    records = [
        {"record": "machine", **machine_info(device)},
        *summarise(tile_records, precision=args.precision, batch_size=args.batch_size),
        *profiles,
        *tile_records,
    ]
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(records, indent=2))
        tmp.replace(path)
    return records


def main(argv: list[str] | None = None) -> int:
    """Entry point: compare, print the table, write ``--json``."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    evalsets = [load_evalset(Path(d)) for d in args.data.split(",") if d]
    tile_records: list[dict] = []
    profiles: list[dict] = []
    for folder in (f for f in args.pipelines.split(",") if f):
        pipe = RestorationPipeline.from_pretrained(folder, device=device, precision=args.precision)
        log.info("%s (%s): unit %d px, sampler %s", pipe.name, folder, pipe.unit, pipe.sampler_config)
        for tiles in evalsets:
            start = time.perf_counter()
            tile_records += compare(
                pipe,
                tiles,
                configs(args.margins),
                batch_size=args.batch_size,
                seed=args.seed,
                max_fraction=args.max_fraction,
            )
            log.info(
                "%s on %s: %d tiles in %.0f s", pipe.name, tiles.name, len(tiles.names), time.perf_counter() - start
            )
            if args.border_window:
                profiles += border_profile(pipe, tiles, window=args.border_window, bin_px=pipe.factor)
            write_records(args.json, device, tile_records, profiles, args)
    records = write_records(args.json, device, tile_records, profiles, args)
    print(f"{records[0].get('cpu_model', device)}, {torch.get_num_threads()} threads\n\n{table(records)}", flush=True)
    if profiles:
        print(f"\n{profile_table(profiles)}", flush=True)
    if args.json is not None:
        print(f"\nwrote {len(records)} records to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
