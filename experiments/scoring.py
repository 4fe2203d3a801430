"""Score restored folders against clean references, one batch of files at a time (never the whole set in memory).

Rows are long-form records ``{"method", "image", "region", "metric", "value"}``, the schema of ``metrics.csv``.
Every problem with one file (unreadable, size mismatch, non-binary mask, missing restored output) is recorded in the
returned ``skipped`` list and the run goes on. Empty masks are scored: their artifact/boundary values are NaN and
counted in the report.
"""

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from tqdm.auto import tqdm

from datamodules.datasets import to_mask_tensor, to_tensor
from datamodules.imageio import ImageReadError, list_images, read_image, read_mask
from lightning_modules.metrics.functional import per_image_metrics

log = logging.getLogger(__name__)

REGIONS = ("whole", "artifact", "clean", "boundary")
METRICS = ("l2", "mse", "psnr", "ssim", "fsim")


def match_names(clean: Path, masks: Path, restored: Mapping[str, Path]) -> tuple[list[str], list[tuple[str, str]]]:
    """Stems present in clean/ and masks/ (sorted), plus ``(file, reason)`` for every unmatched file."""
    clean_stems = {p.stem for p in list_images(clean)}
    mask_stems = {p.stem for p in list_images(masks)}
    skipped = [(str(clean / s), "no mask with this name") for s in sorted(clean_stems - mask_stems)]
    skipped += [(str(masks / s), "no clean image with this name") for s in sorted(mask_stems - clean_stems)]
    names = sorted(clean_stems & mask_stems)
    for method, folder in restored.items():
        have = {p.stem for p in list_images(folder)} if Path(folder).is_dir() else set()
        missing = [n for n in names if n not in have]
        if missing:
            skipped.append((str(folder), f"{method}: {len(missing)} restored file(s) missing, e.g. {missing[0]}"))
    return names, skipped


def find_image(folder: Path, stem: str) -> Path:
    """The image file named ``stem`` (any supported suffix) in ``folder``; ImageReadError when there is none."""
    for suffix in (".png", ".tif", ".tiff", ".jpg", ".jpeg", ".bmp"):
        if (folder / f"{stem}{suffix}").exists():
            return folder / f"{stem}{suffix}"
    raise ImageReadError(f"{folder}/{stem}.*: file not found")


def iter_scores(
    clean: Path,
    masks: Path,
    restored: Mapping[str, Path],
    *,
    names: list[str],
    batch_size: int = 8,
    mode: str = "standard",
    mask_convention: str = "artifact",
    skipped: list[tuple[str, str]] | None = None,
    progress: bool = True,
) -> Iterator[dict]:
    """Yield long-form metric rows for every (method, image, region, metric).

    Args:
        clean: Folder of clean references.
        masks: Folder of masks (nonzero = artifact, or the ``keep`` convention).
        restored: ``{method: folder}`` of restored images named like the clean ones.
        names: File stems to score (from :func:`match_names`).
        batch_size: Images per metric batch.
        mode: ``"standard"`` or ``"paper"`` (the authors' data ranges; keys prefixed ``paper_``).
        mask_convention: ``"artifact"`` or ``"keep"``.
        skipped: List that receives ``(file, reason)`` for each file that could not be scored.
        progress: Show a progress bar.
    """
    skipped = skipped if skipped is not None else []
    folders = {method: Path(folder) for method, folder in restored.items()}
    bar = tqdm(total=len(names) * len(folders), desc="scoring", unit="tile", disable=not progress)
    for start in range(0, len(names), batch_size):
        # each reference and mask is read once per batch and shared by every method
        references: dict[str, tuple] = {}
        for name in names[start : start + batch_size]:
            try:
                target = read_image(find_image(clean, name))
                mask = read_mask(find_image(masks, name), convention=mask_convention, shape=target.shape[:2])
            except (ImageReadError, ValueError) as err:
                skipped.append((name, str(err)))
                continue
            references[name] = (target, to_tensor(target), to_mask_tensor(mask))
        for method, folder in folders.items():
            kept, preds = [], []
            for name, (target, _, _) in references.items():
                try:
                    pred = read_image(find_image(folder, name))
                    if pred.shape != target.shape:
                        raise ImageReadError(
                            f"{folder}/{name}: restored size {pred.shape[1]}x{pred.shape[0]} differs from the clean "
                            f"image ({target.shape[1]}x{target.shape[0]})"
                        )
                except (ImageReadError, ValueError) as err:
                    skipped.append((f"{method}:{name}", str(err)))
                    continue
                kept.append(name)
                preds.append(to_tensor(pred))
            bar.update(len(names[start : start + batch_size]))
            yield from _score(method, kept, preds, [references[k][1] for k in kept],
                              [references[k][2] for k in kept], mode)
    bar.close()


def _score(method: str, names: list[str], preds: list, targets: list, masks: list, mode: str) -> Iterator[dict]:
    """Long-form rows for one method on one batch; images of different sizes are scored in separate groups."""
    shapes = sorted({tuple(t.shape) for t in targets})
    for shape in shapes:
        idx = [i for i, t in enumerate(targets) if tuple(t.shape) == shape]
        values = per_image_metrics(
            torch.stack([preds[i] for i in idx]),
            torch.stack([targets[i] for i in idx]),
            torch.stack([masks[i] for i in idx]),
            regions=REGIONS,
            metrics=METRICS,
            mode=mode,
        )
        for key, vals in values.items():
            region, metric = key.split("/")
            for j, i in enumerate(idx):
                yield {"method": method, "image": names[i], "region": region, "metric": metric,
                       "value": float(vals[j])}
