"""Restore a folder of tiles with an exported pipeline (or any registered method).

Example:
    python -m experiments.restore --model outputs/demo/pipeline --images tiles/ --masks masks/ --out restored/
    python -m experiments.restore --model DIR --images tiles/ --masks authors_masks/ --mask-convention keep ...

Masks pair with images by file name (stem); nonzero = artifact by default, ``--mask-convention keep`` reads the
authors' RePaint-style masks (255 = keep, 0 = artifact). Outputs are same-named PNGs, each written atomically; a
rerun skips finished outputs, so an interrupted run resumes where it stopped. A bad image or mask is reported and
skipped; the run goes on and lists the skipped files at the end (and in ``OUT/skipped.tsv``).

Determinism: one ``torch.Generator`` seeded with ``--seed`` drives each batch, so the same inputs, seed and batch
size give the same outputs; a resumed run batches the remaining files differently and so draws different noise.
"""

import argparse
import logging
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from datamodules.datasets import to_mask_tensor, to_tensor, to_uint8
from datamodules.imageio import ImageReadError, list_images, read_image, read_mask, write_image_atomic
from lightning_modules.components.restorer import available_restorers, build_restorer

log = logging.getLogger("experiments.restore")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line arguments."""
    p = argparse.ArgumentParser(prog="python -m experiments.restore", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="exported pipeline folder (methods latent, latent-reference, ...)")
    p.add_argument("--method", default="latent", help=f"restoration method: {', '.join(available_restorers())}")
    p.add_argument("--images", type=Path, required=True, help="folder of corrupted tiles (recursive)")
    p.add_argument("--masks", type=Path, required=True, help="folder of masks with the same file names")
    p.add_argument("--out", type=Path, required=True, help="output folder (same-named PNGs)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the pipeline's)")
    p.add_argument("--preset", choices=("repaint", "reference"), help="sampler preset (default: the pipeline's)")
    p.add_argument("--scheduler", choices=("ddpm", "ddim", "dpmsolver++"), help="sampling scheduler")
    p.add_argument("--strength", type=float, help="start at strength x T (1 = full regeneration)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="autocast precision")
    p.add_argument("--mask-convention", choices=("artifact", "keep"), default="artifact",
                   help="artifact: nonzero = artifact (this suite); keep: 255 = keep, 0 = artifact (the authors')")
    return p.parse_args(argv)


def pair_files(images: Path, masks: Path) -> tuple[list[tuple[Path, Path]], list[tuple[str, str]]]:
    """Pair images with masks by stem; returns the pairs and ``(file, reason)`` for unmatched files."""
    mask_by_stem = {p.stem: p for p in list_images(masks)}
    pairs, skipped = [], []
    for img in list_images(images):
        if img.stem in mask_by_stem:
            pairs.append((img, mask_by_stem.pop(img.stem)))
        else:
            skipped.append((str(img), f"no mask named {img.stem}.* in {masks}"))
    skipped += [(str(m), "mask without an image of the same name") for m in mask_by_stem.values()]
    return pairs, skipped


def load_pair(img_path: Path, mask_path: Path, convention: str, factor: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one image and its mask as tensors; raises ImageReadError with the file name for any problem."""
    img = read_image(img_path)
    mask = read_mask(mask_path, convention=convention, shape=img.shape[:2])
    h, w = img.shape[:2]
    if h % factor or w % factor:
        raise ImageReadError(f"{img_path}: size {w}x{h} is not a multiple of {factor}; crop or tile it first")
    return to_tensor(img), to_mask_tensor(mask)


def restore_folder(args: argparse.Namespace) -> dict:
    """Restore every paired file not yet in ``args.out``.

    Returns:
        ``{"done": tiles restored now, "skipped": [(file, reason)], "seconds": wall time, "nfe": NFE per tile}``.
    """
    for folder in (args.images, args.masks):
        if not folder.is_dir():
            raise SystemExit(f"{folder} is not a folder")
    restorer = build_restorer(args.method, model=args.model, device=args.device, precision=args.precision)
    factor = getattr(restorer, "factor", 1)
    pairs, skipped = pair_files(args.images, args.masks)
    args.out.mkdir(parents=True, exist_ok=True)
    todo = [(i, m) for i, m in pairs if not (args.out / f"{i.stem}.png").exists()]
    if len(todo) < len(pairs):
        print(f"resuming: {len(pairs) - len(todo)} outputs already in {args.out}")
    overrides = {"num_steps": args.steps, "strength": args.strength, "preset": args.preset, "scheduler": args.scheduler}
    overrides = {k: v for k, v in overrides.items() if v is not None}
    generator = torch.Generator().manual_seed(args.seed)
    done, start = 0, time.perf_counter()
    bar = tqdm(total=len(todo), desc=f"restoring ({args.method})", unit="tile")
    pending: list[tuple[Path, torch.Tensor, torch.Tensor]] = []

    def flush() -> None:
        nonlocal done
        by_shape: dict[tuple, list] = {}
        for item in pending:
            by_shape.setdefault(tuple(item[1].shape), []).append(item)
        for group in by_shape.values():
            x = torch.stack([g[1] for g in group])
            m = torch.stack([g[2] for g in group])
            kwargs = overrides if hasattr(restorer, "make_sampler") else {}
            out = restorer.restore(x, m, generator=generator, **kwargs)
            for (path, _, _), rgb in zip(group, to_uint8(out), strict=True):
                write_image_atomic(args.out / f"{path.stem}.png", rgb)
            done += len(group)
            bar.update(len(group))
        pending.clear()

    for img_path, mask_path in todo:
        try:
            x, m = load_pair(img_path, mask_path, args.mask_convention, factor)
        except ImageReadError as err:
            skipped.append((str(img_path), str(err)))
            bar.update(1)
            continue
        pending.append((img_path, x, m))
        if len(pending) == args.batch_size:
            flush()
    if pending:
        flush()
    bar.close()
    elapsed = time.perf_counter() - start
    rate = done / elapsed if elapsed > 0 else float("nan")
    print(f"restored {done} tiles in {elapsed:.1f} s ({rate:.3f} tiles/s, {getattr(restorer, 'nfe', 0)} NFE per tile)")
    if skipped:
        print(f"skipped {len(skipped)} file(s):")
        for path, why in skipped:
            print(f"  {path}: {why}")
        (args.out / "skipped.tsv").write_text("".join(f"{p}\t{w}\n" for p, w in skipped))
    return {"done": done, "skipped": skipped, "seconds": elapsed, "nfe": getattr(restorer, "nfe", 0)}


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    restore_folder(parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
