"""Score restored folders against clean references, one batch of files at a time (never the whole set in memory).

Rows are long-form records ``{"method", "image", "region", "metric", "value"}``, the schema of ``metrics.csv``.
Files pair by their relative path without the suffix (``clean/a/t.png`` with ``masks/a/t.png`` and ``R/a/t.png``),
the image name of a row; two files with one such name in a folder make the pairing ambiguous and are refused.
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


def relative_key(root: Path, path: Path) -> str:
    """``path`` relative to ``root`` without its suffix, POSIX style: the name files pair by (``a/t`` for a/t.png)."""
    return Path(path).relative_to(root).with_suffix("").as_posix()


def index_images(root: Path, *, exclude: Path | None = None) -> dict[str, Path]:
    """Every image under ``root`` by :func:`relative_key` (files under ``exclude`` left out).

    Raises:
        ValueError: Two files share a key (``t.png`` and ``t.jpg``); the message lists them.
        FileNotFoundError: ``root`` does not exist.
    """
    root = Path(root)
    skip = Path(exclude).resolve() if exclude is not None else None
    found: dict[str, list[Path]] = {}
    for p in list_images(root):
        if skip is not None and skip in p.resolve().parents:
            continue
        found.setdefault(relative_key(root, p), []).append(p)
    clashes = [files for files in found.values() if len(files) > 1]
    if clashes:
        shown = "; ".join(" and ".join(f.relative_to(root).as_posix() for f in files) for files in clashes[:5])
        more = f" and {len(clashes) - 5} more" if len(clashes) > 5 else ""
        raise ValueError(
            f"{root}: {len(clashes)} name(s) stand for more than one file, so pairing them is ambiguous: "
            f"{shown}{more}; rename or remove all but one of each"
        )
    return {key: files[0] for key, files in found.items()}


def match_names(clean: Path, masks: Path, restored: Mapping[str, Path]) -> tuple[list[str], list[tuple[str, str]]]:
    """Relative names present in clean/ and masks/ (sorted), plus ``(file, reason)`` for every unmatched file.

    Raises:
        ValueError: An ambiguous name in any folder (see :func:`index_images`).
    """
    clean_index, mask_index = index_images(clean), index_images(masks)
    skipped = [(str(clean_index[s]), f"no mask {s}.* in {masks}") for s in sorted(set(clean_index) - set(mask_index))]
    skipped += [
        (str(mask_index[s]), f"no clean image {s}.* in {clean}") for s in sorted(set(mask_index) - set(clean_index))
    ]
    names = sorted(set(clean_index) & set(mask_index))
    for method, folder in restored.items():
        have = set(index_images(folder)) if Path(folder).is_dir() else set()
        missing = [n for n in names if n not in have]
        if missing:
            skipped.append(
                (str(folder), f"{method}: {len(missing)} of {len(names)} restored file(s) missing, e.g. {missing[0]}")
            )
    return names, skipped


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
        names: Relative names to score (from :func:`match_names`).
        batch_size: Images per metric batch.
        mode: ``"standard"`` or ``"paper"`` (the authors' data ranges; keys prefixed ``paper_``).
        mask_convention: ``"artifact"`` or ``"keep"``.
        skipped: List that receives ``(file, reason)`` for each file that could not be scored.
        progress: Show a progress bar.
    """
    skipped = skipped if skipped is not None else []
    folders = {method: Path(folder) for method, folder in restored.items()}
    indexes = {f: index_images(f) if f.is_dir() else {} for f in (Path(clean), Path(masks), *folders.values())}

    def _find(folder: Path, name: str) -> Path:
        found = indexes[Path(folder)].get(name)
        if found is None:
            raise ImageReadError(f"{folder}/{name}.*: file not found")
        return found

    bar = tqdm(total=len(names) * len(folders), desc="scoring", unit="tile", disable=not progress)
    for start in range(0, len(names), batch_size):
        # each reference and mask is read once per batch and shared by every method
        references: dict[str, tuple] = {}
        for name in names[start : start + batch_size]:
            try:
                target = read_image(_find(clean, name))
                mask = read_mask(_find(masks, name), convention=mask_convention, shape=target.shape[:2])
            except (ImageReadError, ValueError) as err:
                skipped.append((name, str(err)))
                continue
            references[name] = (target, to_tensor(target), to_mask_tensor(mask))
        for method, folder in folders.items():
            kept, preds = [], []
            for name, (target, _, _) in references.items():
                try:
                    pred = read_image(_find(folder, name))
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
            yield from _score(
                method, kept, preds, [references[k][1] for k in kept], [references[k][2] for k in kept], mode, skipped
            )
    bar.close()


def _score(
    method: str, names: list[str], preds: list, targets: list, masks: list, mode: str, skipped: list
) -> Iterator[dict]:
    """Long-form rows for one method on one batch; images of different sizes are scored in separate groups.

    A group the metrics reject (e.g. images smaller than the SSIM window) is added to ``skipped``; the others go on.
    """
    shapes = sorted({tuple(t.shape) for t in targets})
    for shape in shapes:
        idx = [i for i, t in enumerate(targets) if tuple(t.shape) == shape]
        try:
            values = per_image_metrics(
                torch.stack([preds[i] for i in idx]),
                torch.stack([targets[i] for i in idx]),
                torch.stack([masks[i] for i in idx]),
                regions=REGIONS,
                metrics=METRICS,
                mode=mode,
            )
        except ValueError as err:
            skipped += [(f"{method}:{names[i]}", f"cannot be scored: {err}") for i in idx]
            continue
        for key, vals in values.items():
            region, metric = key.split("/")
            for j, i in enumerate(idx):
                yield {"method": method, "image": names[i], "region": region, "metric": metric, "value": float(vals[j])}
