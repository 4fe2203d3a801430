"""The report of an ablation run: per-tile CSV, summary with paired bootstrap intervals, plots and ABLATIONS.md.

Statistics come from ``lightning_modules.metrics.statistics`` (the helpers behind ``experiments.evaluate`` and
``experiments.report``): means with 95 % percentile bootstrap intervals over tiles, and paired differences
``row - reference`` over the tiles both have, per method and evaluation set.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from experiments.ablation_suite import Row, Suite
from experiments.report import write_json_atomic
from lightning_modules.metrics.functional import PSNR_MSE_FLOOR
from lightning_modules.metrics.statistics import bootstrap_ci, paired_comparison

Key = tuple[str, str, str]  # (row, method, evalset)
BIT_EXACT_PSNR = 10 * math.log10(255**2 / PSNR_MSE_FLOOR)
_FIRST_COLUMNS = (
    "row",
    "group",
    "level",
    "method",
    "evalset",
    "tile",
    "types",
    "nfe",
    "seconds_per_tile",
    "true_pixels",
    "mask_pixels",
)


def by_key(records: Sequence[Mapping[str, Any]]) -> dict[Key, list[Mapping[str, Any]]]:
    """Records grouped by ``(row, method, evalset)``, in first-seen order."""
    out: dict[Key, list[Mapping[str, Any]]] = {}
    for r in records:
        out.setdefault((r["row"], r["method"], r["evalset"]), []).append(r)
    return out


def row_means(records: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """``{"METHOD/EVALSET/region/metric": mean}`` over the finite per-tile values (NFE and seconds included)."""
    out = {}
    for (_, method, evalset), group in by_key(records).items():
        for key in group[0]:
            if key in ("nfe", "seconds_per_tile") or "/" in key:
                values = np.asarray([g[key] for g in group], float)
                out[f"{method}/{evalset}/{key}"] = float(np.nanmean(values)) if np.isfinite(values).any() else math.nan
    return out


def summarise(
    records: Sequence[Mapping[str, Any]], metrics: Sequence[str], reference: str, *, seed: int = 0
) -> dict[Key, dict[str, Any]]:
    """Mean, 95 % interval and the paired difference against the reference row, per (row, method, evalset).

    Args:
        records: per-tile records (``tiles.csv`` lines).
        metrics: ``region/metric`` keys to summarise.
        reference: the reference row's name (``""`` = no paired differences).
        seed: bootstrap seed.

    Returns:
        ``{key: {"tiles", "nfe", "seconds_per_tile", metric: {"mean", "low", "high", "n"},
        "delta/" + metric: paired comparison or None}}``.
    """
    groups = by_key(records)
    out: dict[Key, dict[str, Any]] = {}
    for key, group in groups.items():
        ref = {r["tile"]: r for r in groups.get((reference, key[1], key[2]), [])}
        entry: dict[str, Any] = {
            "tiles": len(group),
            "nfe": float(np.mean([g["nfe"] for g in group])),
            "seconds_per_tile": float(np.mean([g["seconds_per_tile"] for g in group])),
        }
        for metric in metrics:
            mean, low, high, n = bootstrap_ci([g.get(metric, math.nan) for g in group], seed=seed)
            entry[metric] = {"mean": mean, "low": low, "high": high, "n": n}
            paired = [g for g in group if g["tile"] in ref]
            entry[f"delta/{metric}"] = (
                None
                if key[0] == reference or not paired
                else paired_comparison(
                    [ref[g["tile"]].get(metric, math.nan) for g in paired],
                    [g.get(metric, math.nan) for g in paired],
                    seed=seed,
                )
            )
        out[key] = entry
    return out


def write_csv(path: Path, records: Sequence[Mapping[str, Any]]) -> None:
    """Per-tile records as CSV (fixed leading columns, then the metrics in sorted order), atomically."""
    metric_cols = sorted({k for r in records for k in r} - set(_FIRST_COLUMNS))
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=[*_FIRST_COLUMNS, *metric_cols])
        writer.writeheader()
        writer.writerows(records)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------------------------------------ plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _errorbar(ax, xs: list[float], entries: list[Mapping], label: str) -> None:
    means = np.asarray([e["mean"] for e in entries], float)
    low = means - np.asarray([e["low"] for e in entries], float)
    high = np.asarray([e["high"] for e in entries], float) - means
    ax.errorbar(xs, means, yerr=[np.nan_to_num(low), np.nan_to_num(high)], marker="o", capsize=3, label=label)


def plot_robustness(
    path: Path,
    suite: Suite,
    rows: Sequence[Row],
    summary: Mapping[Key, Mapping],
    evalset: str,
    metrics: Sequence[str] = ("artifact/psnr", "clean/psnr"),
) -> bool:
    """Metric against severity, one column per perturbation kind, one line per method (severity 0 = true mask).

    Returns:
        Whether anything was plotted (the PNG is written only then).
    """
    groups = [g for g in dict.fromkeys(r.group for r in rows) if g != "reference"]
    methods = list(dict.fromkeys(k[1] for k in summary if k[2] == evalset))
    if not groups or not methods:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(len(metrics), len(groups), figsize=(3.2 * len(groups), 2.8 * len(metrics)), squeeze=False)
    for col, group in enumerate(groups):
        members = [r for r in rows if r.group == group]
        for line, metric in enumerate(metrics):
            ax = axes[line][col]
            for method in methods:
                points = [(0.0, summary.get((suite.reference, method, evalset)))]
                points += [(float(r.level), summary.get((r.name, method, evalset))) for r in members]
                points = [(x, e[metric]) for x, e in points if e is not None]
                if points:
                    _errorbar(ax, [p[0] for p in points], [p[1] for p in points], method)
            ax.set_title(f"{group}" if line == 0 else "")
            ax.set_xlabel("severity" if line == len(metrics) - 1 else "")
            ax.set_ylabel(metric if col == 0 else "")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(
        f"{suite.name} on {evalset}: restored with the perturbed mask, scored on the true regions "
        f"(mean, 95 % bootstrap interval; {BIT_EXACT_PSNR:.1f} dB = bit-exact)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_sampler(
    path: Path,
    suite: Suite,
    summary: Mapping[Key, Mapping],
    evalset: str,
    metrics: Sequence[str] = ("artifact/psnr", "artifact/ssim"),
) -> bool:
    """Quality against NFE and against measured seconds per tile, one marker per row, one colour per method.

    Returns:
        Whether anything was plotted (the PNG is written only then).
    """
    keys = [k for k in summary if k[2] == evalset]
    if not keys:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(len(metrics), 2, figsize=(11, 3.6 * len(metrics)), squeeze=False)
    methods = list(dict.fromkeys(k[1] for k in keys))
    for line, metric in enumerate(metrics):
        for col, cost in enumerate(("nfe", "seconds_per_tile")):
            ax = axes[line][col]
            for i, method in enumerate(methods):
                mine = [k for k in keys if k[1] == method]
                xs = [max(summary[k][cost], 1e-3) for k in mine]
                ys = [summary[k][metric]["mean"] for k in mine]
                ax.scatter(xs, ys, color=f"C{i}", label=method, s=18)
                for k, x, y in zip(mine, xs, ys, strict=True):
                    ax.annotate(k[0], (x, y), fontsize=6, alpha=0.8, xytext=(2, 2), textcoords="offset points")
            ax.set_xscale("log")
            ax.set_xlabel("network evaluations per tile" if cost == "nfe" else "seconds per tile (measured)")
            ax.set_ylabel(metric)
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"{suite.name} on {evalset}: quality against cost (mean over tiles)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# --------------------------------------------------------------------------------------------------------- markdown


def _cell(entry: Mapping | None, signed: bool = False) -> str:
    if not entry:
        return "-"
    mean = entry.get("mean", entry.get("mean_diff"))
    if mean is None or not math.isfinite(mean):
        return "n/a"
    digits = 3 if abs(mean) < 1 and mean != 0 else 2
    fmt = f"{{:{'+' if signed else ''}.{digits}f}}"
    return f"{fmt.format(mean)} [{fmt.format(entry['low'])}, {fmt.format(entry['high'])}]"


def table(
    summary: Mapping[Key, Mapping], rows: Sequence[Row], metrics: Sequence[str], evalset: str, reference: str
) -> list[str]:
    """Markdown table of one evaluation set: NFE, s/tile, each metric and its paired Δ against the reference."""
    head = ["row", "method", "tiles", "NFE", "s/tile"]
    for metric in metrics:
        head += [metric, f"Δ {metric}"] if reference else [metric]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        for key in [k for k in summary if k[0] == row.name and k[2] == evalset]:
            e = summary[key]
            cells = [row.name, key[1], str(e["tiles"]), f"{e['nfe']:.0f}", f"{e['seconds_per_tile']:.3f}"]
            for metric in metrics:
                cells.append(_cell(e[metric]))
                if reference:
                    cells.append(_cell(e[f"delta/{metric}"], signed=True))
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(
    suite: Suite,
    rows: Sequence[Row],
    summary: Mapping[Key, Mapping],
    notes: Sequence[str],
    plots: Sequence[str],
    *,
    quick: bool,
    models: Mapping[str, Path],
    evalsets: Mapping[str, tuple[Path, int]],
    options: Any,
) -> str:
    """The text of ABLATIONS.md."""
    metrics = rows[0].metrics if rows else ()
    lines = [
        f"# Ablation suite `{suite.name}`{' (quick)' if quick else ''}",
        "",
        suite.description,
        "",
        f"Command: `python -m experiments.ablate --suite {suite.name}{' --quick' if quick else ''}`; seed "
        f"{options.seed}, {options.device}, {options.precision}, batch {options.batch_size}.",
        "",
    ]
    if options.untrained:
        lines += [
            "**The models are untrained**: tiny random-weight stand-ins built because the demo's exports were "
            "missing; the numbers show that the suite runs, not how the methods behave. Run `make demo` "
            "first for real figures.",
            "",
        ]
    lines += [
        "Models: " + (", ".join(f"{m} = `{p}`" for m, p in sorted(models.items())) or "none") + ".",
        "Evaluation sets: " + ", ".join(f"{e} = `{p}` ({n} tiles)" for e, (p, n) in evalsets.items()) + ".",
        "",
    ]
    if suite.reference:
        lines += [
            f"Cells: mean [95 % bootstrap interval] over tiles; Δ = paired difference against row "
            f"`{suite.reference}` of the same method on the same tiles [95 % bootstrap interval]. "
            "Metrics use the TRUE mask's regions (artifact, clean) whatever mask the restorer got. "
            "A clean-region PSNR of "
            f"{BIT_EXACT_PSNR:.2f} dB means bit-exact (MSE 0, clamped); read clean/mse alongside.",
            "",
        ]
    for evalset in evalsets:
        lines += [f"## {evalset}", "", *table(summary, rows, metrics, evalset, suite.reference), ""]
    if notes:
        lines += ["## Skipped", "", *[f"- {n}" for n in dict.fromkeys(notes)], ""]
    if plots:
        lines += ["## Plots", "", *[f"![{p}]({p})" for p in plots], ""]
    lines += ["Per-tile values: `tiles.csv`; per-row results (resumable): `rows/*.json`; summary: `summary.json`.", ""]
    return "\n".join(lines)


def write_report(
    out: Path,
    suite: Suite,
    rows: Sequence[Row],
    results: Mapping[str, Mapping],
    notes: Sequence[str],
    *,
    quick: bool,
    models: Mapping[str, Path],
    evalsets: Mapping[str, tuple[Path, int]],
    options: Any,
) -> Path:
    """Write ``tiles.csv``, ``summary.json``, the plots and ``ABLATIONS.md`` from the row results.

    Returns:
        The path of ``ABLATIONS.md``.
    """
    records = [r for name in results for r in results[name]["records"]]
    metrics = sorted({m for row in rows for m in row.metrics if "/" in m})
    summary = summarise(records, metrics, suite.reference, seed=options.seed)
    write_csv(out / "tiles.csv", records)
    write_json_atomic(out / "summary.json", {f"{k[0]}|{k[1]}|{k[2]}": v for k, v in summary.items()})
    plots = []
    for evalset in evalsets:
        name = f"{suite.name}_{evalset}.png"
        drawn = (
            plot_robustness(out / name, suite, rows, summary, evalset)
            if suite.kind == "robustness"
            else plot_sampler(out / name, suite, summary, evalset)
        )
        if drawn:
            plots.append(name)
    text = render(
        suite,
        [r for r in rows if r.name in results],
        summary,
        notes,
        plots,
        quick=quick,
        models=models,
        evalsets=evalsets,
        options=options,
    )
    tmp = out / "ABLATIONS.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "ABLATIONS.md")
    return out / "ABLATIONS.md"
