r"""Evaluate restoration methods with standard region-wise metrics and write a comparison report.

Two modes:

    # score folders you already have (any method, any tool)
    python -m experiments.evaluate --clean C/ --masks M/ --restored latent=R1/ telea=R2/ --out OUT
    # run registered methods on an evaluation set (a `datamodules.synthesize` output or real triplets), then score
    python -m experiments.evaluate --data EVALSET --methods identity,telea,latent \
        --model outputs/demo/pipeline --out OUT

Writes ``OUT/metrics.csv`` (long form: method,image,region,metric,value; regions whole/artifact/clean/boundary,
metrics l2/mse/psnr/ssim/fsim), ``OUT/summary.json`` (means, 95 % bootstrap intervals, paired differences against
the first method, seconds per tile and NFE, skipped files), ``OUT/report.md`` and ``OUT/grid.png`` (worst and best
tiles per method). Metrics are the standard ones (float, data range 255 on the 0-255 scale); ``--paper-compatible``
adds the authors' data-range variants as separate, ``paper_``-prefixed rows (docs/METHOD.md section 7). ``--wandb``
also logs a table and the grid (offline unless the user has a key and sets WANDB_MODE=online).

In run mode ``--sampler FILE`` (``experiments/configs/sampler/*.yaml``) and ``--sampler-set KEY=VALUE`` are forwarded
to every method that restores with a pipeline (the others are named in a log line); ``summary.json`` records the
file, its content and each method's effective overrides under ``sampler_file``.
"""

import argparse
import csv
import json
import logging
import math
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from experiments.cli_errors import (
    CLIError,
    check_device,
    check_input_folder,
    check_output_folder,
    check_range,
    run_main,
)
from experiments.jobs import from_namespace
from experiments.report import (
    by_artifact_type,
    comparison_grid,
    markdown_tables,
    summarize,
    type_tables,
    verdict_table,
    write_json_atomic,
)
from experiments.scoring import iter_scores, match_names
from lightning_modules.components.restorer import parse_method_specs
from lightning_modules.components.sampler_files import load_sampler_file, parse_sampler_sets
from lightning_modules.methods import available_restorers

log = logging.getLogger("experiments.evaluate")


@dataclass
class EvaluateJob:
    """One evaluation: the flags of ``python -m experiments.evaluate`` as typed values (same names and defaults).

    Run mode sets ``data`` and ``methods``; score mode sets ``clean``, ``masks`` and ``restored``.

    Attributes:
        out: Report folder (``metrics.csv``, ``summary.json``, ``report.md``, ``grid.png``, ``restored/``).
        clean: Score mode: folder of clean references.
        masks: Score mode: folder of masks.
        restored: Score mode: ``NAME=DIR`` items, one per restored folder.
        data: Run mode: evaluation set with ``clean/``, ``corrupted/``, ``masks/``.
        methods: Run mode: comma list of method names, ``NAME=DIR`` giving one its own model folder.
        model: Model folder for the methods listed without ``=DIR``.
        steps: Sampling steps of the methods with a sampler.
        sampler: Sampler settings file for every method with a sampler.
        sampler_set: ``KEY=VALUE`` overrides of single ``SamplerConfig`` fields.
        batch_size: Tiles per model call.
        seed: Seed of restoration noise and of the bootstrap.
        device: Torch device.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        mask_convention: ``"artifact"`` (255 = artifact) or ``"keep"``.
        paper_compatible: Also score with the authors' data-range variants (``paper_`` rows).
        wandb: Log a table and the grid to wandb.
        title: Report title.
        references: Comma list of the methods every other one is paired against.
        no_kid: Skip the KID realism score.
        force: Redo restored outputs already in ``out``.
        debug: Raise instead of skipping a failing batch.
    """

    out: Path
    clean: Path | None = None
    masks: Path | None = None
    restored: list[str] = field(default_factory=list)
    data: Path | None = None
    methods: str = ""
    model: Path | None = None
    steps: int | None = None
    sampler: Path | None = None
    sampler_set: list[str] = field(default_factory=list)
    batch_size: int = 4
    seed: int = 0
    device: str = "cpu"
    precision: str = "fp32"
    mask_convention: str = "artifact"
    paper_compatible: bool = False
    wandb: bool = False
    title: str = "Restoration comparison"
    references: str = "identity,telea"
    no_kid: bool = False
    force: bool = False
    debug: bool = False


def parse_args(argv: list[str] | None = None) -> EvaluateJob:
    """Command-line arguments as an :class:`EvaluateJob`."""
    p = argparse.ArgumentParser(prog="python -m experiments.evaluate", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--clean", type=Path, help="folder of clean references (score mode)")
    p.add_argument("--masks", type=Path, help="folder of masks (score mode)")
    p.add_argument("--restored", nargs="+", default=[], metavar="NAME=DIR", help="restored folders (score mode)")
    p.add_argument("--data", type=Path, help="evaluation set with clean/, corrupted/, masks/ (run mode)")
    p.add_argument(
        "--methods",
        default="",
        help="comma list of registered methods to run on --data; NAME=DIR gives a method its own model "
        "folder, e.g. identity,telea,latent,artifusion=runs/af/pipeline,cyclegan=runs/cg/generator",
    )
    p.add_argument("--model", type=Path, help="model folder for methods listed without =DIR (the latent pipeline)")
    p.add_argument("--steps", type=int, help="sampling steps for diffusion methods, >= 1")
    p.add_argument(
        "--sampler",
        type=Path,
        metavar="FILE",
        help="sampler settings file (experiments/configs/sampler/*.yaml) for every method with a sampler; "
        "--steps and --sampler-set win over it",
    )
    p.add_argument(
        "--sampler-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set one SamplerConfig field (YAML value) for every method with a sampler; repeatable",
    )
    p.add_argument("--batch-size", type=int, default=4, help="tiles per model call, >= 1")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--mask-convention", default="artifact", choices=("artifact", "keep"))
    p.add_argument("--paper-compatible", action="store_true", help="also write the authors' data-range variants")
    p.add_argument("--wandb", action="store_true", help="log a table and the grid to wandb (offline by default)")
    p.add_argument("--title", default="Restoration comparison")
    p.add_argument(
        "--references",
        default="identity,telea",
        help="methods every other method is paired against (those present among the methods)",
    )
    p.add_argument("--no-kid", action="store_true", help="skip the KID realism score (needs the offline weights)")
    p.add_argument("--force", action="store_true", help="redo the restored outputs of --data runs already in --out")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors (or LAF_DEBUG=1)")
    return from_namespace(EvaluateJob, p.parse_args(argv))


def validate_args(args: EvaluateJob) -> tuple[dict, dict]:
    """Check every value before any model loads; returns ``{method: model}`` (run mode) and ``{name: folder}``."""
    check_range("--steps", args.steps, low=1)
    check_range("--batch-size", args.batch_size, low=1)
    check_device(args.device)
    methods, restored = {}, {}
    if args.data is not None:
        if not args.methods:
            raise CLIError("--data needs --methods (e.g. identity,telea,latent)")
        check_input_folder(args.data, "--data")
        lacking = [sub for sub in ("clean", "corrupted", "masks") if not (args.data / sub).is_dir()]
        if lacking:
            raise CLIError(
                f"--data {args.data} has no {', '.join(f'{sub}/' for sub in lacking)}; pass an evaluation "
                "set with clean/, corrupted/ and masks/ (python -m datamodules.synthesize writes one)"
            )
        try:
            methods = parse_method_specs(args.methods, args.model)
        except ValueError as err:
            raise CLIError(f"--methods: {err}") from None
        known = available_restorers()
        unknown = [m for m in methods if m not in known]
        if unknown:
            raise CLIError(f"--methods: unknown method(s) {', '.join(unknown)}; choose from {', '.join(known)}")
        from experiments.restore import uses_model

        for method, model in methods.items():
            if uses_model(method):
                if model is None:
                    raise CLIError(f"--methods: {method} needs a model folder: pass --model DIR or {method}=DIR")
                check_input_folder(model, f"--methods {method}: model folder")
        check_sampler_args(args, methods)
    else:
        if args.sampler is not None or args.sampler_set:
            raise CLIError(
                "--sampler and --sampler-set are for run mode (--data/--methods); score mode only reads folders"
            )
        if args.clean is None or args.masks is None or not args.restored:
            raise CLIError("score mode needs --clean, --masks and --restored NAME=DIR (or use --data/--methods)")
        check_input_folder(args.clean, "--clean")
        check_input_folder(args.masks, "--masks")
        for item in args.restored:
            name, sep, folder = item.partition("=")
            if not sep or not name or not folder:
                raise CLIError(f"--restored expects NAME=DIR, got {item!r}")
            if name in restored and restored[name] != Path(folder):
                raise CLIError(
                    f"--restored names {name!r} twice ({restored[name]} and {folder}); give each folder its own name"
                )
            if name in restored:
                log.warning("--restored %s=%s is given twice; scoring it once", name, folder)
            restored[name] = check_input_folder(Path(folder), f"--restored {name}=")
    check_output_folder(args.out)
    return methods, restored


def sampler_methods(methods: dict) -> list[str]:
    """The methods that restore with a pipeline, so that ``--sampler`` / ``--sampler-set`` apply to them."""
    from experiments.restore import has_sampler

    return [m for m, model in methods.items() if has_sampler(m, model)]


def check_sampler_args(args: EvaluateJob, methods: dict) -> None:
    """Validate ``--sampler`` / ``--sampler-set`` before any model loads and say which methods they apply to."""
    if args.sampler is None and not args.sampler_set:
        return
    try:
        if args.sampler is not None:
            load_sampler_file(args.sampler)
        parse_sampler_sets(args.sampler_set)
    except ValueError as err:
        raise CLIError(str(err)) from None
    applied = sampler_methods(methods)
    if not applied:
        raise CLIError(
            f"--sampler/--sampler-set: none of --methods {args.methods} has a diffusion sampler (a "
            "pipeline folder); drop them or add a latent or artifusion method"
        )
    others = [m for m in methods if m not in applied]
    log.warning(
        "sampler settings %s apply to %s%s",
        args.sampler or "from --sampler-set",
        ", ".join(applied),
        f"; not to {', '.join(others)} (no sampler)" if others else "",
    )


def run_methods(args: EvaluateJob) -> tuple[dict[str, Path], dict[str, dict]]:
    """Restore ``data/corrupted`` with every method into ``out/restored/NAME``; returns folders and timings."""
    from experiments.restore import RestoreJob, restore_folder

    folders, timings = {}, {}
    methods = parse_method_specs(args.methods, args.model)
    with_sampler = sampler_methods(methods)
    for method, model in methods.items():
        out = args.out / "restored" / method
        sampled = method in with_sampler
        job = RestoreJob(
            images=args.data / "corrupted",
            masks=args.data / "masks",
            out=out,
            method=method,
            model=model,
            steps=args.steps if sampled else None,
            sampler=args.sampler if sampled else None,
            sampler_set=list(args.sampler_set) if sampled else [],
            batch_size=args.batch_size,
            seed=args.seed,
            device=args.device,
            precision=args.precision,
            mask_convention=args.mask_convention,
            force=args.force,
            debug=args.debug,
        )
        stats = restore_folder(job)
        folders[method] = out
        if stats["done"] + stats["resumed"] == 0:
            print(f"warning: {method} restored none of the {stats['pairs']} paired tiles (reasons above)")
        # resumed outputs come from earlier runs with the same settings (the restore manifest checks that), so
        # their time counts: seconds per tile over every run of these settings
        timed = stats["timing"]
        timings[method] = {
            "seconds_per_tile": timed["seconds"] / timed["tiles"] if timed["tiles"] else None,
            "tiles_timed": timed["tiles"],
            "already_done": stats["resumed"],
            "nfe_per_tile": stats["nfe"],
            "device": args.device,
            "precision": args.precision,
            "batch_size": args.batch_size,
            "sampler_file": stats["sampler"] if sampled else None,
        }
    return folders, timings


def main(argv: list[str] | None = None) -> int:
    """Run the evaluation; returns the exit code (0 done, 1 a method scored nothing, 2 bad arguments)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_main(_main, argv)


def _main(argv: list[str]) -> int:
    evaluate(parse_args(argv))
    return 0


def evaluate(args: EvaluateJob) -> dict:
    """Score (and in run mode first restore) as ``args`` says; writes the report files and returns the summary.

    Raises:
        CLIError: A bad value (code 2), nothing to score, or a method that scored no image (code 1; the report of
            the other methods is written first).
    """
    _, restored = validate_args(args)
    timings: dict[str, dict] = {}
    if args.data is not None:
        clean, masks, corrupted = args.data / "clean", args.data / "masks", args.data / "corrupted"
        restored, timings = run_methods(args)
    else:
        clean, masks, corrupted = args.clean, args.masks, None

    try:
        names, skipped = match_names(clean, masks, restored)
    except ValueError as err:
        raise CLIError(str(err)) from None
    if not names:
        raise CLIError(
            f"nothing to score: no image in {clean} has a mask with the same relative path in {masks}", code=1
        )
    rows = []
    tmp_csv = args.out / "metrics.csv.tmp"
    with tmp_csv.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["method", "image", "region", "metric", "value"])
        writer.writeheader()
        modes = ("standard", "paper") if args.paper_compatible else ("standard",)
        for mode in modes:
            for row in iter_scores(
                clean,
                masks,
                restored,
                names=names,
                batch_size=8,
                mode=mode,
                mask_convention=args.mask_convention,
                skipped=skipped if mode == "standard" else [],
            ):
                writer.writerow(row)
                rows.append(row)
    scored = {m: len({r["image"] for r in rows if r["method"] == m}) for m in restored}
    _print_skipped(skipped)
    if not rows:
        tmp_csv.unlink()
        raise CLIError(
            f"nothing scored: none of the {len(names)} images could be scored for any method (reasons above)", code=1
        )
    os.replace(tmp_csv, args.out / "metrics.csv")

    methods = list(restored)
    references = [r.strip() for r in args.references.split(",") if r.strip() in methods]
    summary = summarize(rows, methods, seed=args.seed, references=references)
    summary.update(
        {
            "timings": timings,
            "sampler_file": sampler_summary(args, timings),
            "skipped": [{"file": f, "reason": r} for f, r in skipped],
            "images": len(names),
            "mode": "standard" + (" + paper-compatible" if args.paper_compatible else ""),
        }
    )
    manifest = (args.data / "manifest.json") if args.data is not None else args.clean.parent / "manifest.json"
    types_by_image: dict[str, list[str]] = {}
    if manifest.is_file():
        items = json.loads(manifest.read_text()).get("items", [])
        keys = {Path(it["name"]).with_suffix("").as_posix(): it for it in items}
        types_by_image = {k: it.get("types", []) for k, it in keys.items() if k in names}
        summary["by_type_markdown"] = by_artifact_type(rows, types_by_image, methods)
        summary["type_tables_markdown"], summary["by_type"] = type_tables(
            rows, types_by_image, methods, references=references, seed=args.seed
        )
    if not args.no_kid:
        summary["realism"] = realism_scores(
            clean, masks, restored, names, types_by_image, mask_convention=args.mask_convention
        )
    write_json_atomic(args.out / "summary.json", summary)
    shown = comparison_grid(
        args.out / "grid.png",
        clean=clean,
        masks=masks,
        corrupted=corrupted,
        restored=restored,
        rows=rows,
        mask_convention=args.mask_convention,
    )
    (args.out / "report.md").write_text(render_report(args.title, summary, shown))
    if args.wandb:
        log_to_wandb(args.out, rows, summary)
    counts = ", ".join(f"{m} {n}/{len(names)}" for m, n in scored.items())
    print(
        f"scored {max(scored.values())} of {len(names)} images x {len(methods)} methods ({counts}) -> "
        f"{args.out / 'report.md'}"
    )
    empty = [m for m, n in scored.items() if n == 0]
    if empty:
        raise CLIError(
            f"method(s) {', '.join(empty)} scored none of the {len(names)} images (reasons above); the "
            "report covers the others",
            code=1,
        )
    return summary


def sampler_summary(args: EvaluateJob, timings: dict[str, dict]) -> dict | None:
    """The sampler file (path and content), the ``--sampler-set`` fields and each method's effective overrides."""
    if args.sampler is None and not args.sampler_set:
        return None
    records = {m: t["sampler_file"] for m, t in timings.items() if t.get("sampler_file")}
    spec = next((r["spec"] for r in records.values()), None)
    return {
        "file": None if args.sampler is None else str(args.sampler),
        "spec": spec,
        "set": parse_sampler_sets(args.sampler_set),
        "applied_to": list(records),
        "overrides": {m: r["overrides"] for m, r in records.items()},
    }


def realism_scores(
    clean: Path,
    masks: Path,
    restored: dict[str, Path],
    names: list[str],
    types_by_image: dict[str, list[str]],
    *,
    mask_convention: str = "artifact",
) -> dict:
    """KID of each method's restored artifact patches against the clean patches at the same places.

    Overall and per artifact group (``metrics/realism.py``: semi-transparent vs occluding tiles, from the manifest).
    Returns ``{}`` (with a warning) when the offline EfficientNet-Lite0 weights are missing.
    """
    import torch

    from datamodules.datasets import to_mask_tensor, to_tensor
    from datamodules.imageio import ImageReadError, read_image, read_mask
    from experiments.scoring import index_images
    from lightning_modules.components.features import PooledFeatures
    from lightning_modules.metrics.realism import PATCH_SIZE, artifact_group, artifact_patches, kid, patches_at

    try:
        feature = PooledFeatures()
    except FileNotFoundError as err:
        log.warning("KID skipped: %s", err)
        return {}
    groups: dict[str, list[str]] = {"all": list(names)}
    for name in names:
        if name in types_by_image:
            groups.setdefault(artifact_group(types_by_image[name]), []).append(name)
    clean_index, mask_index = index_images(clean), index_images(masks)
    out: dict[str, dict] = {}
    for method, folder in restored.items():
        out[method] = {}
        restored_index = index_images(folder)
        for group, members in groups.items():
            fake, real = [], []
            for name in members:
                try:
                    target = read_image(clean_index[name])
                    mask = to_mask_tensor(
                        read_mask(mask_index[name], convention=mask_convention, shape=target.shape[:2])
                    )[None]
                    pred = to_tensor(read_image(restored_index[name]))[None]
                except (ImageReadError, ValueError, KeyError):
                    continue  # already reported as skipped by the scoring pass
                if pred.shape[-2:] != mask.shape[-2:] or min(pred.shape[-2:]) < PATCH_SIZE:
                    continue  # mismatched (reported by scoring) or smaller than one KID patch
                patches, index = artifact_patches(pred, mask)
                fake.append(patches)
                real.append(patches_at(to_tensor(target)[None], index, patches.shape[-1]))
            if fake:
                out[method][group] = kid(torch.cat(fake), torch.cat(real), feature=feature)
    return out


def realism_markdown(realism: dict) -> str:
    """Table of KID (x 1000) per method and artifact group."""
    if not realism:
        return ""
    groups = sorted({g for scores in realism.values() for g in scores}, key=lambda g: (g != "all", g))
    lines = [
        "#### realism: KID x 1000 of restored artifact patches vs clean tissue (lower is better)",
        "",
        "| method | " + " | ".join(groups) + " |",
        "|---|" + "---|" * len(groups),
    ]
    for method, scores in realism.items():
        cells = []
        for g in groups:
            e = scores.get(g)
            cells.append(
                "n/a"
                if not e or math.isnan(e["kid"])
                else f"{1000 * e['kid']:.2f} ± {1000 * e['kid_std']:.2f} ({e['patches']} patches)"
            )
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "64 px patches whose artifact share is at least 25 %, against the clean patches at the same places; "
        "features: pooled ImageNet EfficientNet-Lite0 pre-logits (no Inception weights offline). PSNR rewards "
        "blurry fills on occluding artifacts; KID rewards plausible tissue. Compare within this table only.",
    ]
    return "\n".join(lines)


def _print_skipped(skipped: list[tuple[str, str]], limit: int = 30) -> None:
    """Print every skipped item with its reason (the first ``limit``; all are in summary.json)."""
    if not skipped:
        return
    print(f"skipped {len(skipped)} item(s):")
    for file, why in skipped[:limit]:
        print(f"  {file}: {why}")
    if len(skipped) > limit:
        print(f"  ... and {len(skipped) - limit} more in summary.json")


def render_report(title: str, summary: dict, shown: list[str]) -> str:
    """The markdown report: per-type tables, the paired verdict, tables per region, realism, timings, the grid."""
    lines = [
        f"# {title}",
        "",
        f"{summary['images']} images, methods: {', '.join(summary['methods'])}. "
        "Standard metrics on the 0-255 scale (data range 255); L2 = per-image sum of squared errors.",
        "",
    ]
    refs = summary.get("references") or []
    verdicts = [verdict_table(summary, m, refs) for m in summary["methods"] if m not in refs]
    verdicts = [v for v in verdicts if v]
    if verdicts:
        lines += ["#### paired differences against the baselines (artifact region, 95 % bootstrap intervals)", ""]
        lines += sum(([v, ""] for v in verdicts), [])
    if summary.get("type_tables_markdown"):
        lines += ["### Quality per artifact type", "", summary["type_tables_markdown"], ""]
    lines += ["### All tiles", ""]
    lines.append(markdown_tables(summary))
    if summary.get("realism"):
        lines += ["", realism_markdown(summary["realism"])]
    if summary.get("by_type_markdown"):
        lines += ["", summary["by_type_markdown"]]
    if summary.get("timings"):
        lines += [
            "",
            "#### speed",
            "",
            "| method | s / tile | NFE / tile | device | precision | batch |",
            "|---|---|---|---|---|---|",
        ]
        for m, t in summary["timings"].items():
            spt = "n/a" if t["seconds_per_tile"] is None else f"{t['seconds_per_tile']:.3f}"
            lines.append(
                f"| {m} | {spt} | {t['nfe_per_tile']} | {t['device']} | {t['precision']} | {t['batch_size']} |"
            )
    if summary.get("skipped"):
        lines += ["", f"#### skipped ({len(summary['skipped'])})", ""]
        lines += [f"- `{s['file']}`: {s['reason']}" for s in summary["skipped"]]
    if shown:
        lines += ["", "#### worst and best tiles per method (artifact-region PSNR)", "", "![grid](grid.png)"]
    return "\n".join(lines) + "\n"


def log_to_wandb(out: Path, rows: list[dict], summary: dict) -> None:
    """Log the long-form table, the summary means and the grid to a wandb run (offline unless configured)."""
    import wandb

    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "latent-artifusion"),
        job_type="evaluate",
        mode=os.environ.get("WANDB_MODE", "offline"),
        dir=str(out),
    )
    try:
        run.log({"evaluate/metrics": wandb.Table(columns=list(rows[0]), data=[list(r.values()) for r in rows])})
        flat = {
            f"evaluate/{m}/{reg}/{met}": e["mean"]
            for m, regs in summary["metrics"].items()
            for reg, mets in regs.items()
            for met, e in mets.items()
        }
        run.log(flat)
        if (out / "grid.png").exists():
            run.log({"evaluate/grid": wandb.Image(str(out / "grid.png"))})
    finally:
        run.finish()


if __name__ == "__main__":
    sys.exit(main())
