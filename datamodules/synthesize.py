"""Build an evaluation set of (clean, corrupted, mask) triplets from clean tiles.

Examples:
    python -m datamodules.synthesize --bundled --count 16 --seed 0 --out outputs/evalset
    python -m datamodules.synthesize --images my_clean_tiles/ --count 200 --types fold,thread,ink --out my_evalset

Writes ``OUT/clean/``, ``OUT/corrupted/`` and ``OUT/masks/`` with the same file names (masks are 8-bit PNG with
255 = artifact, 0 = clean) and ``OUT/manifest.json`` (arguments and per-image artifact types). The same arguments
give byte-identical files. ``--bundled`` takes tiles from the TEST split of the offline sample slides (spatially
disjoint from the tiles the demo trains on); ``--split unseen`` instead takes the whole bundled images that hold no
train tile at all (tissue no model of the suite trains on: with the default seed the HistoQC templates 1 and 3);
``--images`` tiles every image of a folder. When ``--count`` exceeds the number of tiles, tiles are reused with
different corruptions; when it is smaller, the triplets are spread evenly over the tile list. Images smaller than
``--size`` give no tile and are listed in a warning. ``--balanced`` gives every tile exactly one artifact, the types
taken in turn, so that a per-type table compares like with like. Bad input (a missing or empty folder, an unwritable
``--out``) ends with one ``error:`` line; ``--debug`` (or ``LAF_DEBUG=1``) shows the traceback.
"""

import argparse
import json
import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from tqdm.auto import tqdm

from datamodules.artifacts import ARTIFACT_TYPES, DEFAULT_TYPES, ArtifactSynthesizer
from datamodules.datasets import sample_rng
from datamodules.imageio import write_image_atomic, write_mask_atomic
from datamodules.sources import bundled_sources, sources_from_spec
from datamodules.splits import assign_regions, tiles_for_split
from datamodules.tiling import grid_tiles
from experiments.cli_errors import CLIError, check_input_folder, check_output_folder, run_main
from experiments.jobs import from_namespace

log = logging.getLogger("datamodules.synthesize")


@dataclass
class SynthesisJob:
    """One evaluation set: the flags of ``python -m datamodules.synthesize`` as typed values (same names, defaults).

    Attributes:
        out: Output folder (``clean/``, ``corrupted/``, ``masks/``, ``manifest.json``).
        bundled: Take tiles from the offline sample slides (``split``); otherwise from ``images``.
        images: Folder (recursive) of clean tiles or larger clean images.
        count: Number of triplets.
        seed: Seed of the per-triplet synthesis streams.
        size: Tile edge in pixels.
        types: Artifact type names (``datamodules.artifacts.ARTIFACT_TYPES``).
        max_artifacts: Artifacts per tile are drawn from 1..this.
        split: Bundled split: ``train``, ``val``, ``test`` or ``unseen`` (whole images that hold no train tile).
        balanced: One artifact per tile, the types in turn.
        min_tissue: Minimum tissue fraction of a tile.
        stride: Tiling stride (``None``: size // 2 bundled, size // 4 unseen, size for folders).
        debug: Show tracebacks (read by ``run_main``).
    """

    out: Path
    bundled: bool = False
    images: Path | None = None
    count: int = 16
    seed: int = 0
    size: int = 256
    types: tuple[str, ...] = DEFAULT_TYPES
    max_artifacts: int = 2
    split: str = "test"
    balanced: bool = False
    min_tissue: float = 0.5
    stride: int | None = None
    debug: bool = False


def parse_args(argv: list[str] | None = None) -> SynthesisJob:
    """Command-line arguments as a :class:`SynthesisJob`."""
    p = argparse.ArgumentParser(prog="python -m datamodules.synthesize", description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--bundled", action="store_true", help="tiles from the offline sample slides (test split)")
    src.add_argument("--images", type=Path, help="folder (recursive) of clean tiles or larger clean images")
    p.add_argument("--count", type=int, default=16, help="number of triplets to write")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--size", type=int, default=256, help="tile edge in pixels")
    p.add_argument(
        "--types",
        default=",".join(DEFAULT_TYPES),
        help=f"comma list of {','.join(ARTIFACT_TYPES)} (default: every synthetic type; pen uses real "
        "HistoQC pen-mark and coverslip-edge outlines and is held out of training)",
    )
    p.add_argument("--max-artifacts", type=int, default=2, help="artifacts per tile are drawn from 1..this")
    p.add_argument(
        "--split",
        default="test",
        choices=("train", "val", "test", "unseen"),
        help="bundled split to draw from; unseen = whole images that hold no train tile",
    )
    p.add_argument(
        "--balanced", action="store_true", help="one artifact per tile, the --types in turn (equal counts per type)"
    )
    p.add_argument("--min-tissue", type=float, default=0.5, help="minimum tissue fraction of a tile")
    p.add_argument("--stride", type=int, help="tiling stride (default: size // 2 for --bundled, size for --images)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors (or LAF_DEBUG=1)")
    ns = p.parse_args(argv)
    return from_namespace(SynthesisJob, ns, types=tuple(t.strip() for t in ns.types.split(",") if t.strip()))


def collect_tiles(args: SynthesisJob) -> tuple[list, list]:
    """Sources and ``(source index, TileRef)`` pairs the triplets are cut from."""
    if args.bundled and args.split == "unseen":
        sources = bundled_sources()
        stride = args.stride or args.size // 4
        tiles = []
        for i, (src, regions) in enumerate(zip(sources, assign_regions(sources), strict=True)):
            if not regions["train"]:
                refs = grid_tiles(
                    src.tissue(),
                    size=args.size,
                    stride=stride,
                    min_tissue=args.min_tissue,
                    source=src.name,
                    scale=src.tissue_scale,
                    shape=src.shape(),
                )
                tiles += [(i, ref) for ref in refs]
    elif args.bundled:
        sources = bundled_sources()
        stride = args.stride or args.size // 2
        tiles = tiles_for_split(sources, args.split, size=args.size, stride=stride, min_tissue=args.min_tissue)
    else:
        sources = sources_from_spec(check_input_folder(args.images, "--images"))
        small = [f"{s.name} ({s.shape()[1]}x{s.shape()[0]})" for s in sources if min(s.shape()) < args.size]
        if small:
            log.warning(
                "%d of %d image(s) are smaller than --size %d px and give no tile: %s%s",
                len(small),
                len(sources),
                args.size,
                ", ".join(small[:5]),
                ", ..." if len(small) > 5 else "",
            )
        tiles = []
        for i, src in enumerate(sources):
            refs = grid_tiles(
                src.tissue(),
                size=args.size,
                stride=args.stride or args.size,
                min_tissue=args.min_tissue,
                source=src.name,
                scale=src.tissue_scale,
                shape=src.shape(),
            )
            tiles += [(i, ref) for ref in refs]
    if not tiles:
        raise SystemExit(
            f"no {args.size}px tiles with >= {args.min_tissue:.0%} tissue found; lower --min-tissue or --size"
        )
    return sources, tiles


def main(argv: list[str] | None = None) -> int:
    """Write ``--count`` triplets; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return run_main(_main, argv)


def _main(argv: list[str]) -> int:
    synthesize(parse_args(argv))
    return 0


def synthesize(args: SynthesisJob) -> dict:
    """Write ``args.count`` triplets and the manifest into ``args.out``; returns the manifest.

    Raises:
        CLIError: Unknown types, a count below 1, no source (neither ``bundled`` nor ``images``), or a bad folder.
        SystemExit: No tile with enough tissue (the message says what to lower).
    """
    types = tuple(args.types)
    unknown = [t for t in types if t not in ARTIFACT_TYPES]
    if unknown:
        raise CLIError(f"unknown artifact type(s) {unknown}; choose from {list(ARTIFACT_TYPES)}")
    if args.count < 1:
        raise CLIError(f"--count must be >= 1, got {args.count}")
    if args.bundled == (args.images is not None):
        raise CLIError("pass exactly one tile source: --bundled or --images DIR")
    synth = ArtifactSynthesizer(types=types, min_artifacts=1, max_artifacts=args.max_artifacts)
    per_type = {t: ArtifactSynthesizer(types=[t], min_artifacts=1, max_artifacts=1) for t in types}
    check_output_folder(args.out)
    sources, tiles = collect_tiles(args)
    for sub in ("clean", "corrupted", "masks"):
        (args.out / sub).mkdir(parents=True, exist_ok=True)
    records = []
    for i in tqdm(range(args.count), desc="synthesising", unit="tile"):
        # fewer triplets than tiles: spread them evenly over the tile list (every source gets its share)
        src_idx, ref = tiles[(i * len(tiles)) // args.count if args.count <= len(tiles) else i % len(tiles)]
        source = sources[src_idx]
        clean = source.read_region(ref.x, ref.y, ref.size, ref.size)
        res = (per_type[types[i % len(types)]] if args.balanced else synth)(clean, sample_rng(args.seed, "test", i))
        name = f"{i:04d}_{Path(source.name).stem}_x{ref.x:05d}_y{ref.y:05d}.png"
        write_image_atomic(args.out / "clean" / name, clean)
        write_image_atomic(args.out / "corrupted" / name, res.corrupted)
        write_mask_atomic(args.out / "masks" / name, res.mask)
        records.append(
            {
                "name": name,
                "source": source.name,
                "x": ref.x,
                "y": ref.y,
                "types": res.types,
                "artifact_fraction": round(float(res.mask.mean()), 6),
            }
        )
    manifest = {
        "seed": args.seed,
        "size": args.size,
        "types": list(types),
        "max_artifacts": 1 if args.balanced else args.max_artifacts,
        "balanced": args.balanced,
        "split": args.split if args.bundled else None,
        "mask_convention": "255 = artifact",
        "synthesizer": synth.to_config(),
        "items": records,
    }
    tmp = args.out / "manifest.json.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str))
    os.replace(tmp, args.out / "manifest.json")
    print(f"wrote {args.count} triplets from {len(tiles)} distinct tiles to {args.out}")
    return manifest


if __name__ == "__main__":
    sys.exit(main())
