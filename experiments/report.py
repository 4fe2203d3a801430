"""Turn long-form metric rows into ``summary.json``, ``report.md`` and a comparison grid PNG."""

import glob
import json
import math
import os
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np

from datamodules.gallery import label, mask_overlay
from datamodules.imageio import IMAGE_SUFFIXES, read_image, read_mask, write_image_atomic
from lightning_modules.metrics.statistics import bootstrap_ci, paired_comparison

HIGHER_IS_BETTER = {"psnr": True, "ssim": True, "fsim": True, "l2": False, "mse": False}
REGION_TEXT = {
    "whole": "whole tile",
    "artifact": "artifact region (what was regenerated)",
    "clean": "clean region (stain preservation: identical to the input means untouched)",
    "boundary": "boundary band (seams), 3 px either side of the mask edge",
}


def table_of(rows: Iterable[Mapping]) -> dict[tuple[str, str, str], dict[str, float]]:
    """Group rows into ``{(method, region, metric): {image: value}}``."""
    out: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    for r in rows:
        out[(r["method"], r["region"], r["metric"])][r["image"]] = r["value"]
    return out


def summarize(
    rows: Sequence[Mapping], methods: Sequence[str], *, seed: int = 0, references: Sequence[str] = ()
) -> dict:
    """Means with 95 % bootstrap intervals per method/region/metric, and paired differences.

    Args:
        rows: Long-form metric rows.
        methods: Method order (the first is the default paired reference).
        seed: Bootstrap seed.
        references: Extra methods every other method is paired against (``entry["paired"][ref]``), e.g. identity
            and Telea: the baselines a restoration method has to beat.
    """
    table = table_of(rows)
    summary: dict = {
        "methods": list(methods),
        "metrics": {},
        "paired_vs": methods[0] if methods else None,
        "references": [r for r in references if r in methods],
    }
    for (method, region, metric), by_image in sorted(table.items()):
        values = np.array(list(by_image.values()), np.float64)
        mean, low, high, n = bootstrap_ci(values, seed=seed)
        entry = {"mean": mean, "ci95": [low, high], "n": n, "n_empty": int(np.isnan(values).sum())}
        for ref_name in dict.fromkeys([methods[0], *summary["references"]] if methods else []):
            ref = table.get((ref_name, region, metric))
            if ref is None or method == ref_name:
                continue
            names = sorted(set(ref) & set(by_image))
            comparison = paired_comparison([ref[k] for k in names], [by_image[k] for k in names], seed=seed)
            entry.setdefault("paired", {})[ref_name] = comparison
            if ref_name == methods[0]:
                entry["paired_vs_first"] = comparison
        summary["metrics"].setdefault(method, {}).setdefault(region, {})[metric] = entry
    return summary


def subset_rows(rows: Sequence[Mapping], images: Iterable[str]) -> list[Mapping]:
    """The rows of the given images only."""
    keep = set(images)
    return [r for r in rows if r["image"] in keep]


def _cell(e: Mapping | None, metric: str, ref: str | None = None) -> str:
    """``mean [low, high]`` plus ``(Δ d [low, high]*)`` against ``ref`` when that pairing exists."""
    if e is None:
        return ""
    cell = f"{_fmt(e['mean'], metric)} [{_fmt(e['ci95'][0], metric)}, {_fmt(e['ci95'][1], metric)}]"
    pv = (e.get("paired") or {}).get(ref) if ref else None
    if pv and pv["n"] >= 2:
        star = "*" if not math.isnan(pv["p_wilcoxon"]) and pv["p_wilcoxon"] < 0.05 else ""
        cell += f" (Δ {pv['mean_diff']:+.3g} [{pv['low']:+.3g}, {pv['high']:+.3g}]{star})"
    return cell


def type_tables(
    rows: Sequence[Mapping],
    types_by_image: Mapping[str, Sequence[str]],
    methods: Sequence[str],
    *,
    references: Sequence[str] = (),
    region: str = "artifact",
    metrics: Sequence[str] = ("psnr", "ssim", "fsim", "l2"),
    seed: int = 0,
) -> tuple[str, dict]:
    """One table per artifact type (tiles carrying the type): methods x metrics with paired 95 % intervals.

    Args:
        rows: Long-form metric rows.
        types_by_image: ``{image stem: [artifact types]}`` (from a ``datamodules.synthesize`` manifest).
        methods: Row order.
        references: Methods the others are paired against; the first reference appears in the cells, every
            reference in the JSON.
        region: Region to tabulate.
        metrics: Columns.
        seed: Bootstrap seed.

    Returns:
        ``(markdown, {type: summary})``.
    """
    types = sorted({t for ts in types_by_image.values() for t in ts})
    ref = next((r for r in references if r in methods), methods[0] if methods else None)
    lines, out = [], {}
    for kind in types:
        images = [k for k, ts in types_by_image.items() if kind in ts]
        summary = summarize(subset_rows(rows, images), methods, seed=seed, references=references)
        out[kind] = {"n": len(images), "metrics": {m: summary["metrics"].get(m, {}).get(region, {}) for m in methods}}
        lines += [
            f"#### {kind} ({len(images)} tiles): {region} region",
            "",
            "| method | " + " | ".join(f"{m} {'↑' if HIGHER_IS_BETTER.get(m, True) else '↓'}" for m in metrics) + " |",
            "|---|" + "---|" * len(metrics),
        ]
        for method in methods:
            entries = summary["metrics"].get(method, {}).get(region, {})
            lines.append(f"| {method} | " + " | ".join(_cell(entries.get(m), m, ref) for m in metrics) + " |")
        lines.append("")
    if lines:
        lines.append(
            "Cells: mean [95 % bootstrap interval] over the tiles carrying the type; (Δ d [low, high]) is "
            f"the paired difference against `{ref}` on the same tiles, * when a Wilcoxon signed-rank test "
            "gives p < 0.05. A tile with two artifact types counts for both."
        )
    return "\n".join(lines), out


def verdict_table(
    summary: Mapping,
    method: str,
    references: Sequence[str],
    *,
    region: str = "artifact",
    metrics: Sequence[str] = ("psnr", "ssim"),
) -> str:
    """Paired differences of ``method`` against each reference (the quality bar: intervals above zero)."""
    rows = []
    for ref in references:
        cells = []
        for metric in metrics:
            pv = (summary["metrics"].get(method, {}).get(region, {}).get(metric, {}).get("paired") or {}).get(ref)
            if not pv:
                cells.append("n/a")
                continue
            sign = "above zero" if pv["low"] > 0 else "below zero" if pv["high"] < 0 else "spans zero"
            cells.append(f"{pv['mean_diff']:+.3g} [{pv['low']:+.3g}, {pv['high']:+.3g}] ({sign})")
        rows.append(f"| {method} - {ref} | " + " | ".join(cells) + " |")
    if not rows:
        return ""
    return "\n".join(
        [
            f"| {region} region, paired over tiles | " + " | ".join(f"Δ {m}" for m in metrics) + " |",
            "|---|" + "---|" * len(metrics),
            *rows,
        ]
    )


def _fmt(x: float, metric: str) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if metric in ("l2",):
        return f"{x:.4g}"
    if metric in ("mse",):
        return f"{x:.2f}"
    if metric == "psnr":
        return f"{x:.2f}"
    return f"{x:.4f}"


def markdown_tables(summary: Mapping, *, metrics: Sequence[str] = ("l2", "psnr", "ssim", "fsim")) -> str:
    """One markdown table per region: methods x metrics, ``mean [95 % CI]`` and the paired difference's sign."""
    lines = []
    for region, text in REGION_TEXT.items():
        present = [m for m in summary["methods"] if region in summary["metrics"].get(m, {})]
        if not present:
            continue
        lines += [
            f"#### {region}: {text}",
            "",
            "| method | "
            + " | ".join(f"{m} {'↑' if HIGHER_IS_BETTER.get(m, True) else '↓'}" for m in metrics)
            + " | n (empty) |",
            "|---|" + "---|" * (len(metrics) + 1),
        ]
        for method in present:
            cells = []
            for metric in metrics:
                e = summary["metrics"][method][region].get(metric)
                if e is None:
                    cells.append("")
                    continue
                cell = f"{_fmt(e['mean'], metric)} [{_fmt(e['ci95'][0], metric)}, {_fmt(e['ci95'][1], metric)}]"
                pv = e.get("paired_vs_first")
                if pv and not math.isnan(pv["p_wilcoxon"]):
                    star = "*" if pv["p_wilcoxon"] < 0.05 else ""
                    cell += f" (Δ {pv['mean_diff']:+.3g}{star})"
                cells.append(cell)
            any_e = next(iter(summary["metrics"][method][region].values()))
            lines.append(f"| {method} | " + " | ".join(cells) + f" | {any_e['n']} ({any_e['n_empty']}) |")
        lines.append("")
    lines.append(
        f"Cells: mean [95 % bootstrap interval] over images; (Δ d*) is the paired mean difference against "
        f"`{summary['paired_vs']}` on the same images, * when a Wilcoxon signed-rank test gives p < 0.05. "
        "Empty regions (no artifact pixels) are excluded and counted in the last column. PSNR of a bit-exact region "
        "is capped at 148.13 dB (MSE floor 1e-10)."
    )
    return "\n".join(lines)


def by_artifact_type(
    rows: Sequence[Mapping],
    types_by_image: Mapping[str, Sequence[str]],
    methods: Sequence[str],
    *,
    region: str = "artifact",
    metric: str = "psnr",
) -> str:
    """Markdown table of ``region/metric`` means per artifact type (a tile counts for every type it carries).

    Args:
        rows: Long-form metric rows.
        types_by_image: ``{image stem: [artifact types]}`` (from a ``datamodules.synthesize`` manifest).
        methods: Column order.
        region: Region to tabulate.
        metric: Metric to tabulate.
    """
    table = table_of(rows)
    types = sorted({t for ts in types_by_image.values() for t in ts})
    if not types:
        return ""
    lines = [
        f"#### {region}-region {metric} by artifact type (mean over tiles carrying the type)",
        "",
        "| type | n | " + " | ".join(methods) + " |",
        "|---|---|" + "---|" * len(methods),
    ]
    for kind in types:
        images = [k for k, ts in types_by_image.items() if kind in ts]
        cells = []
        for method in methods:
            values = [table.get((method, region, metric), {}).get(k, math.nan) for k in images]
            finite = [v for v in values if np.isfinite(v)]
            cells.append(_fmt(float(np.mean(finite)), metric) if finite else "n/a")
        lines.append(f"| {kind} | {len(images)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def comparison_grid(
    out_path: Path,
    *,
    clean: Path,
    masks: Path,
    corrupted: Path | None,
    restored: Mapping[str, Path],
    rows: Sequence[Mapping],
    per_method: int = 2,
    mask_convention: str = "artifact",
) -> list[str]:
    """Grid PNG: for each method its worst and best tiles by artifact-region PSNR.

    Columns are corrupted | mask | every method | clean. Returns the image names shown.
    """
    table = table_of(rows)
    picks: list[str] = []
    for method in restored:
        scores = {k: v for k, v in table.get((method, "artifact", "psnr"), {}).items() if np.isfinite(v)}
        ordered = sorted(scores, key=scores.get)
        for name in ordered[: per_method // 2] + ordered[::-1][: per_method - per_method // 2]:
            if name not in picks:
                picks.append(name)
    if not picks:
        return []
    rows_img = []
    for name in picks:
        target = read_image(_path(clean, name))
        mask = read_mask(_path(masks, name), convention=mask_convention, shape=target.shape[:2])
        cells = []
        if corrupted is not None:
            cells.append(label(read_image(_path(corrupted, name)), "corrupted"))
        cells.append(label(mask_overlay(target, mask), "mask"))
        for method, folder in restored.items():
            try:
                img = read_image(_path(folder, name))
            except (OSError, ValueError):
                img = np.zeros_like(target)
            psnr = table.get((method, "artifact", "psnr"), {}).get(name, math.nan)
            cells.append(label(img, f"{method} {psnr:.1f}dB"))
        cells.append(label(target, "clean"))
        gap = np.full((target.shape[0], 4, 3), 255, np.uint8)
        rows_img.append(np.concatenate(sum(([c, gap] for c in cells), [])[:-1], 1))
    width = max(r.shape[1] for r in rows_img)
    rows_img = [
        cv2.copyMakeBorder(r, 0, 4, 0, width - r.shape[1], cv2.BORDER_CONSTANT, value=(255, 255, 255)) for r in rows_img
    ]
    write_image_atomic(out_path, np.concatenate(rows_img, 0))
    return picks


def _path(folder: Path, stem: str) -> Path:
    for p in sorted(Path(folder).glob(f"{glob.escape(stem)}.*")):  # names may hold [ ] * ?
        if p.suffix.lower() in IMAGE_SUFFIXES and p.stem == Path(stem).name:
            return p
    raise FileNotFoundError(f"{folder}/{stem}.*")


def write_json_atomic(path: Path, obj) -> None:
    """JSON dump via a temp file and rename."""
    tmp = Path(str(path) + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=float, allow_nan=True))
    os.replace(tmp, path)
