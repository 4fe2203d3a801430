r"""Restore the artifacts of a whole slide and write a pyramidal TIFF that OpenSlide (and QuPath) open.

Example:
    python -m experiments.restore_slide --slide S.svs --out R.tif --model outputs/demo/pipeline \\
        --masks pen.geojson --level 0 --tile 256 --overlap 32 --batch-size 8
    python -m experiments.restore_slide --slide S.tif --out R.tif --method telea --masks M.png --mpp 1.0

Only tiles whose window touches the mask are read and restored; tiles with more artifact than
``--max-artifact-fraction`` are flagged and left as they are. Restored tiles overlap by ``--overlap`` pixels and are
blended inside the mask with raised-cosine weights; every pixel outside the mask is copied from the input, so with
the default lossless zlib output those pixels are byte-identical to the input level (``--jpeg`` trades that for
size). Outputs: OUT.tif, OUT.mask.png (which pixels are synthetic), OUT.preview.png, OUT.json (tiles, areas,
timings, settings, versions; Dice with ``--truth-mask``; PSNR and seam-band PSNR with ``--truth-image``), and the
resumable tile store OUT.tiles/ (a rerun restores only the missing tiles; other settings need ``--force``).
``--devices N`` / ``--num-nodes M`` restore through Lightning's predict loop with DDP (docs/SLIDES.md); the output
does not depend on the number of processes. Errors in the inputs exit with code 2 and a one-line message.
"""

import argparse
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from datamodules.imageio import ImageReadError, write_mask_atomic
from datamodules.pyramid import write_pyramid
from datamodules.slide_masks import load_mask
from datamodules.slides import SlideInputError, TileGrid, file_fingerprint, open_slide
from experiments.jobs import from_namespace
from lightning_modules.components.slide_outputs import (
    area_mm2,
    mask_image,
    mask_scale_for,
    package_versions,
    write_preview,
)
from lightning_modules.components.slide_restore import SlideAssembler, TilePlan, plan_tiles, read_tiles, restore_tiles
from lightning_modules.components.slide_store import TileStore, write_json_atomic
from lightning_modules.methods import available_restorers, build_restorer

log = logging.getLogger("experiments.restore_slide")
STORE_FORMAT = 1


@dataclass
class SlideJob:
    """One slide restoration: the flags of ``python -m experiments.restore_slide`` as typed values (same names).

    Attributes:
        slide: Slide (any OpenSlide format) or plain PNG/JPEG/TIFF.
        out: Output pyramidal TIFF (``OUT.tif``); the mask, preview, report and tile store sit beside it.
        masks: Mask image aligned to any level, QuPath GeoJSON, or ``"auto"`` (with ``mask_model``).
        model: Exported pipeline folder of ``method``.
        method: Name in the method table (``lightning_modules/methods.py``).
        mask_model: Exported artifact segmenter for ``masks="auto"``.
        mask_downsample: ``masks="auto"``: predict on the working grid reduced this many times.
        mask_tile: ``masks="auto"``: segmenter tile on the reduced grid.
        mask_threshold: ``masks="auto"``: probability threshold (``None``: the model's).
        level: Pyramid level to restore (``None`` with ``mpp`` unset: 0).
        mpp: Microns per pixel to restore at (resamples the nearest finer level).
        tile: Tile side in pixels.
        overlap: Overlap of neighbouring tiles in pixels (blend width).
        batch_size: Tiles per model call.
        device: Torch device.
        devices: Processes per node (DDP through Lightning when > 1).
        num_nodes: Nodes (SLURM / torchrun).
        workers: DataLoader workers per process (DDP path).
        max_artifact_fraction: Tiles with more artifact are flagged, not restored.
        jpeg: JPEG-compressed output instead of lossless zlib.
        jpeg_quality: JPEG quality.
        seed: Seed of the per-tile noise.
        steps: Sampling steps (``None``: the pipeline's).
        precision: Autocast precision.
        truth_mask: True artifact mask (image or GeoJSON) for the Dice of ``masks``.
        truth_image: Clean slide on the same grid: PSNR and seam-band PSNR in ``OUT.json``.
        seam_band: Half-width of the band around tile borders (seam metric).
        force: Discard a tile store made with other settings.
        no_progress: No progress bars.
        max_tiles: Test hook: stop after this many new tiles.
    """

    slide: Path
    out: Path
    masks: str
    model: Path | None = None
    method: str = "latent"
    mask_model: Path | None = None
    mask_downsample: int = 2
    mask_tile: int = 256
    mask_threshold: float | None = None
    level: int | None = None
    mpp: float | None = None
    tile: int = 256
    overlap: int = 32
    batch_size: int = 8
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    devices: int = 1
    num_nodes: int = 1
    workers: int = 0
    max_artifact_fraction: float = 0.6
    jpeg: bool = False
    jpeg_quality: int = 90
    seed: int = 0
    steps: int | None = None
    precision: str = "fp32"
    truth_mask: str | None = None
    truth_image: Path | None = None
    seam_band: int = 8
    force: bool = False
    no_progress: bool = False
    max_tiles: int | None = None


def parse_args(argv: list[str] | None = None) -> SlideJob:
    """Command-line arguments as a :class:`SlideJob`."""
    p = argparse.ArgumentParser(prog="python -m experiments.restore_slide", description=__doc__.split("\n\n")[0])
    p.add_argument("--slide", type=Path, required=True, help="slide (any OpenSlide format) or plain PNG/JPEG/TIFF")
    p.add_argument("--out", type=Path, required=True, help="output pyramidal TIFF (OUT.tif)")
    p.add_argument("--model", type=Path, help="exported pipeline folder (methods latent, latent-reference, ...)")
    p.add_argument("--method", default="latent", help=f"restoration method: {', '.join(available_restorers())}")
    p.add_argument(
        "--masks",
        required=True,
        help="mask image aligned to any level (nonzero = artifact), QuPath GeoJSON (level-0 pixels), "
        "or 'auto' (segmentation model, with --mask-model)",
    )
    p.add_argument("--mask-model", type=Path, help="exported artifact segmenter folder for --masks auto")
    p.add_argument(
        "--mask-downsample",
        type=int,
        default=2,
        help="--masks auto: predict on the working grid reduced this many times (lower magnification)",
    )
    p.add_argument("--mask-tile", type=int, default=256, help="--masks auto: segmenter tile at the reduced grid")
    p.add_argument("--mask-threshold", type=float, help="--masks auto: probability threshold (default: the model's)")
    level = p.add_mutually_exclusive_group()
    level.add_argument("--level", type=int, help="pyramid level to restore (default 0)")
    level.add_argument("--mpp", type=float, help="microns per pixel to restore at (resamples the nearest finer level)")
    p.add_argument("--tile", type=int, default=256, help="tile side in pixels (the pipeline's training size)")
    p.add_argument("--overlap", type=int, default=32, help="overlap of neighbouring tiles in pixels (blend width)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--devices", type=int, default=1, help="processes per node (DDP through Lightning when > 1)")
    p.add_argument("--num-nodes", type=int, default=1, help="nodes (SLURM / torchrun); see docs/SLIDES.md")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers per process reading tiles (DDP path)")
    p.add_argument(
        "--max-artifact-fraction",
        type=float,
        default=0.6,
        help="flag (do not restore) tiles with a larger artifact fraction",
    )
    p.add_argument("--jpeg", action="store_true", help="JPEG-compressed output (smaller, not lossless)")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="sampling steps (default: the pipeline's)")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast precision")
    p.add_argument("--truth-mask", help="true artifact mask (image or GeoJSON) to report the Dice of --masks against")
    p.add_argument("--truth-image", type=Path, help="clean slide on the same grid: PSNR and seam-band PSNR in OUT.json")
    p.add_argument("--seam-band", type=int, default=8, help="half-width of the band around tile borders (metric)")
    p.add_argument("--force", action="store_true", help="discard a tile store made with other settings")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--max-tiles", type=int, help=argparse.SUPPRESS)  # test hook: stop after this many new tiles
    return from_namespace(SlideJob, p.parse_args(argv))


def derived_paths(out: Path) -> dict[str, Path]:
    """OUT.tif -> the paths of the masks, preview, report and tile store next to it."""
    stem = out.with_suffix("")
    return {
        "mask": Path(f"{stem}.mask.png"),
        "preview": Path(f"{stem}.preview.png"),
        "automask": Path(f"{stem}.automask.png"),
        "json": Path(f"{stem}.json"),
        "store": Path(f"{stem}.tiles"),
    }


def store_manifest(args: SlideJob, info, mask) -> dict:
    """Every input and setting that changes a stored tile's pixels."""
    return {
        "format": STORE_FORMAT,
        "slide": f"{info.path.name}:{file_fingerprint(info.path)}",
        "level": info.level,
        "to_level0": info.to_level0,
        "shape": list(info.shape),
        "mask": f"{mask.kind}:{mask.fingerprint}",
        "method": args.method,
        "model": None if args.model is None else file_fingerprint(args.model),
        "tile": args.tile,
        "overlap": args.overlap,
        "batch_size": args.batch_size,
        "seed": args.seed,
        "max_artifact_fraction": args.max_artifact_fraction,
        "steps": args.steps,
        "precision": args.precision,
    }


def _build_restorer(args: SlideJob, device: str):
    try:
        restorer = build_restorer(args.method, model=args.model, device=device, precision=args.precision)
    except (FileNotFoundError, ValueError, OSError) as err:
        raise SlideInputError(f"--method {args.method} --model {args.model}: {err}") from None
    factor = getattr(restorer, "factor", 1)
    if args.tile % factor:
        raise SlideInputError(f"--tile {args.tile} must be a multiple of the model's {factor} px latent cell")
    size = getattr(restorer, "image_size", args.tile)
    if size != args.tile:
        log.warning("the pipeline was trained on %d px tiles but --tile is %d", size, args.tile)
    return restorer


def restore_local(args: SlideJob, source, mask, plan: TilePlan, store: TileStore) -> int:
    """Restore the unfinished plan batches in this process; returns the number of tiles restored now."""
    store.prepare(force=args.force)
    done = store.done()
    todo = [b for b in plan.batches() if not all(i in done for i in b)]
    if not todo:
        return 0
    restorer = _build_restorer(args, args.device)
    overrides = {"num_steps": args.steps} if args.steps else {}
    remaining = sum(len(b) for b in todo)
    bar = tqdm(
        total=len(plan.restore),
        initial=len(plan.restore) - remaining,
        desc=f"restoring ({args.method})",
        unit="tile",
        disable=args.no_progress,
    )
    written = 0
    for batch_tiles in todo:
        batch = read_tiles(source, mask, plan.grid, batch_tiles)
        for i, rgb in zip(batch_tiles, restore_tiles(restorer, batch, args.seed, overrides), strict=True):
            _, _, w, h = plan.grid.box(i)
            store.write(i, rgb[:h, :w])
        written += len(batch_tiles)
        bar.update(len(batch_tiles))
        if args.max_tiles is not None and written >= args.max_tiles:
            break
    bar.close()
    return written


def restore_distributed(args: SlideJob, source, mask, plan: TilePlan, store: TileStore) -> tuple[bool, int]:
    """Restore through Lightning's predict loop on ``--devices`` x ``--num-nodes`` processes."""
    from lightning_modules.slide_predict import predict_tiles

    restorer = _build_restorer(args, "cpu")  # Lightning moves nn.Module restorers to each rank's device
    accelerator = "cpu" if str(args.device).startswith("cpu") else "gpu"
    return predict_tiles(
        restorer,
        source,
        mask,
        plan,
        store,
        seed=args.seed,
        overrides={"num_steps": args.steps} if args.steps else {},
        accelerator=accelerator,
        devices=args.devices,
        num_nodes=args.num_nodes,
        force=args.force,
        progress=not args.no_progress,
        num_workers=args.workers,
        root=store.root,
    )


def assemble(args: SlideJob, source, info, mask, plan: TilePlan, store: TileStore) -> dict:
    """Write OUT.tif, OUT.mask.png and OUT.preview.png from the input and the stored tiles; returns figures."""
    paths = derived_paths(args.out)
    missing = [i for i in plan.restore if not store.has(i)]
    if missing:
        raise SlideInputError(f"{store.root}: {len(missing)} planned tiles missing (first {missing[0]}); rerun")
    truth_mask = None if args.truth_mask is None else load_mask(args.truth_mask, info, what="--truth-mask")
    truth = None
    if args.truth_image is not None:
        truth, tinfo = open_slide(args.truth_image, level=args.level, mpp=args.mpp)
        if tinfo.shape != info.shape:
            raise SlideInputError(f"--truth-image {args.truth_image}: grid {tinfo.shape} differs from {info.shape}")
    scale = mask_scale_for(info.shape)
    asm = SlideAssembler(
        source, mask, plan, store.read, truth_mask=truth_mask, truth=truth, seam_band=args.seam_band, mask_scale=scale
    )
    bar = tqdm(total=info.shape[0], desc="writing OUT.tif", unit="row", disable=args.no_progress)
    description = (
        f"Restored by experiments.restore_slide (method {args.method}) from {info.path.name}; "
        "synthetic pixels are marked in the .mask.png next to this file"
    )  # no OUT name: same bytes
    pyramid = write_pyramid(
        args.out,
        asm.strip,
        info.shape,
        mpp=info.mpp,
        jpeg=args.jpeg,
        quality=args.jpeg_quality,
        description=description,
        on_strip=bar.update,
    )
    bar.close()
    provenance = asm.provenance_mask()
    write_mask_atomic(paths["mask"], provenance)
    k = pyramid["small_level"]
    boxes = {"flagged": [plan.grid.box(i) for i in plan.flagged]}
    write_preview(paths["preview"], pyramid["small"], provenance, boxes, 0.5**k)
    return {
        "stats": asm.stats,
        "mask_scale": scale,
        "levels": pyramid["levels"],
        "truth": truth is not None,
        "truth_mask": truth_mask is not None,
    }


def run(args: SlideJob) -> dict:
    """Plan, restore (resumably, on one or many processes) and assemble; returns the OUT.json report (rank 0)."""
    start = time.perf_counter()
    if args.out.suffix.lower() not in (".tif", ".tiff"):
        raise SlideInputError(f"--out {args.out}: the output must be a .tif (pyramidal tiled TIFF)")
    if not 0.0 < args.max_artifact_fraction <= 1.0:
        raise SlideInputError(f"--max-artifact-fraction {args.max_artifact_fraction}: must be in (0, 1]")
    if args.batch_size < 1 or args.devices < 1 or args.num_nodes < 1:
        raise SlideInputError("--batch-size, --devices and --num-nodes must be at least 1")
    source, info = open_slide(args.slide, level=args.level, mpp=args.mpp)
    paths = derived_paths(args.out)
    auto = None
    if args.masks == "auto" and args.mask_model is not None:
        from lightning_modules.components.slide_automask import predict_slide_mask

        mask, auto = predict_slide_mask(
            args.mask_model,
            source,
            info,
            downsample=args.mask_downsample,
            out=paths["store"] / "automask.npy",
            tile=args.mask_tile,
            batch_size=args.batch_size,
            threshold=args.mask_threshold,
            device=args.device,
            progress=not args.no_progress,
        )
        auto["png_scale"] = mask_scale_for(info.shape)
        write_mask_atomic(paths["automask"], mask_image(mask, info.shape, auto["png_scale"]))
    else:
        mask = load_mask(args.masks, info)
    grid = TileGrid.build(info.shape, args.tile, args.overlap)
    plan = plan_tiles(grid, mask, args.max_artifact_fraction, args.batch_size)
    store = TileStore(paths["store"], store_manifest(args, info, mask))
    store.check(force=args.force)
    resumed = len(store.done() & set(plan.restore)) if not store.mismatch() else 0
    t0 = time.perf_counter()
    if args.devices * args.num_nodes > 1:
        is_zero, _ = restore_distributed(args, source, mask, plan, store)
        if not is_zero:
            return {}
        restored_now = len(plan.restore) - resumed
    else:
        restored_now = restore_local(args, source, mask, plan, store)
    restore_s = time.perf_counter() - t0
    if args.max_tiles is not None and len(store.done() & set(plan.restore)) < len(plan.restore):
        print(f"stopped after {restored_now} new tiles (--max-tiles); rerun to resume from {store.root}")
        return {"stopped": True, "restored_now": restored_now}
    t1 = time.perf_counter()
    figures = assemble(args, source, info, mask, plan, store)
    assemble_s = time.perf_counter() - t1
    report = make_report(
        args,
        source,
        info,
        mask,
        plan,
        figures,
        resumed,
        restored_now,
        {"total": time.perf_counter() - start, "restore": restore_s, "assemble": assemble_s},
    )
    if auto is not None:
        report["mask"]["auto"] = auto | {"png": str(paths["automask"])}
        if report["tissue_mm2"]:
            report["mask"]["auto"]["seconds_per_mm2_tissue"] = auto["seconds"] / report["tissue_mm2"]
    write_json_atomic(paths["json"], report)
    print(
        f"wrote {args.out} ({info.shape[1]}x{info.shape[0]}, {len(plan.restore)} tiles restored, "
        f"{len(plan.flagged)} flagged) and {paths['json'].name}"
    )
    return report


def make_report(
    args, source, info, mask, plan: TilePlan, figures: dict, resumed: int, restored_now: int, seconds: dict
) -> dict:
    """The OUT.json contents."""
    stats = figures["stats"]
    tissue = source.tissue()
    tissue_px = int(round(float(tissue.mean()) * info.shape[0] * info.shape[1]))
    tissue_mm2 = area_mm2(tissue_px, info.mpp)
    paths = derived_paths(args.out)
    report = {
        "slide": str(info.path),
        "vendor": info.vendor,
        "out": str(args.out),
        "shape": list(info.shape),
        "level": info.level,
        "level0_per_pixel": info.to_level0,
        "mpp": info.mpp,
        "levels_written": figures["levels"],
        "compression": "jpeg" if args.jpeg else "zlib (lossless)",
        "tiles": {
            "grid": len(plan.grid),
            "read": len(plan.fractions),
            "restored": len(plan.restore),
            "restored_now": restored_now,
            "resumed_from_store": resumed,
            "flagged": len(plan.flagged),
            "flagged_boxes_xywh": [plan.grid.box(i) for i in plan.flagged[:1000]],
        },
        "artifact_px": stats.artifact_px,
        "artifact_mm2": area_mm2(stats.artifact_px, info.mpp),
        "synthetic_px": stats.synthetic_px,
        "synthetic_mm2": area_mm2(stats.synthetic_px, info.mpp),
        "tissue_px": tissue_px,
        "tissue_mm2": tissue_mm2,
        "mask": {
            "input": str(args.masks),
            "kind": mask.kind,
            "provenance_png": str(paths["mask"]),
            "provenance_scale": figures["mask_scale"],
            "provenance_note": f"one mask pixel = {figures['mask_scale']}x{figures['mask_scale']} working-grid "
            "pixels; 255 = synthetic (restored) content",
        },
        "seam_step_ratio": stats.seam_step_ratio(),
        "seam_step_note": "mean |neighbour difference| of synthetic pixels across tile borders / elsewhere "
        "(about 1: no visible seam)",
        "seconds": seconds,
        "seconds_per_restored_tile": seconds["restore"] / restored_now if restored_now else None,
        "seconds_per_mm2_tissue": seconds["total"] / tissue_mm2 if tissue_mm2 else None,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "versions": package_versions(),
    }
    if figures["truth_mask"]:
        report["dice_vs_truth_mask"] = stats.dice()
        report["dice_note"] = "Dice of the --masks mask against --truth-mask on the working grid"
    if figures["truth"]:
        report["truth_image"] = stats.truth_report() | {"seam_band_px": args.seam_band}
    return report


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; input errors exit with code 2 and a one-line message."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        run(args)
    except (SlideInputError, ImageReadError) as err:
        print(f"restore_slide: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    sys.exit(main())
