r"""Run an ablation suite of ``experiments/ablations/`` in-process and write a report with paired intervals.

    python -m experiments.ablate --suite robustness --quick               # 7 tiles, one severity per perturbation
    python -m experiments.ablate --suite sampler --out outputs/ablations/sampler
    python -m experiments.ablate --suite paper --dry-run                  # list the rows, load nothing
    python -m experiments.ablate --suite robustness --model latent=runs/p --evalset my=path/to/evalset

Suites (``experiments/ablation_suite.py`` has the schema): ``robustness`` restores with perturbed masks
(``components/mask_perturb.py``) and scores against the true mask; ``sampler`` varies one sampler lever per row.
``paper`` and ``training`` are declared (``--dry-run`` lists them) but not runnable yet: running them fails.

Models: ``--model`` takes ``DIR`` (the method follows from its ``pipeline.json``: ``latent`` or
``latent-conditional``) or ``NAME=DIR``; by default the demo's exports (``outputs/demo/pipeline``,
``outputs/demo/pipeline_conditional``) and evaluation sets (``outputs/demo/evalset``, ``evalset_unseen``) are used.
Without them ``--quick`` builds tiny random-weight pipelines and a 7-tile synthetic evaluation set in
``OUT/untrained/`` (the report says the models are untrained); without ``--quick`` that is an error.

Writes ``OUT/rows/ROW.json`` (one per finished row, atomically; a rerun skips rows whose settings hash matches,
``--force`` redoes them), ``OUT/tiles.csv`` (one line per row, method, evaluation set and tile), ``OUT/*.png`` and
``OUT/ABLATIONS.md`` (default ``OUT = outputs/ablations/SUITE``). ``--wandb`` logs one run per row (offline unless
WANDB_MODE says otherwise).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from experiments.ablation_suite import Row, Suite, SuiteError, load_suite, settings_hash
from experiments.cli_errors import (
    CLIError,
    check_device,
    check_input_folder,
    check_output_folder,
    check_range,
    run_main,
)
from experiments.jobs import from_namespace

log = logging.getLogger("experiments.ablate")
DEMO = Path("outputs/demo")
DEMO_MODELS = {"latent": "pipeline", "latent-conditional": "pipeline_conditional"}
DEMO_EVALSETS = ("evalset", "evalset_unseen")
REGIONS = ("whole", "artifact", "clean")
METRICS = ("mse", "psnr", "ssim")
RESULT_FORMAT = 1


class SuiteNotImplemented(NotImplementedError):
    """A suite (or row) that is declared but cannot be run yet."""


@dataclass(frozen=True)
class RunOptions:
    """How rows run; every field is part of each row's settings hash.

    Attributes:
        seed: seeds the mask perturbations and the samplers (per tile batch).
        device: torch device string.
        precision: ``"fp32"``, ``"bf16"``, ``"fp16"`` or ``"auto"`` (bf16 where native) autocast of the pipelines.
        batch_size: tiles per restore call.
        rows: restrict to these row names (the reference row always runs).
        force: redo finished rows.
        wandb: log one wandb run per row.
        untrained: the models are random-weight stand-ins (said in the report).
        progress: show tqdm bars.
    """

    seed: int = 0
    device: str = "cpu"
    precision: str = "auto"
    batch_size: int = 4
    rows: tuple[str, ...] = ()
    force: bool = False
    wandb: bool = False
    untrained: bool = False
    progress: bool = True

    def hashed(self) -> dict[str, Any]:
        """The fields that change results."""
        from lightning_modules.components.hardware import resolve_precision

        precision = resolve_precision(self.precision, self.device)
        return {"seed": self.seed, "device": self.device, "precision": precision, "batch_size": self.batch_size}


@dataclass
class EvalTile:
    """One evaluation triplet: uint8 ``(H, W, 3)`` clean and corrupted, bool ``(H, W)`` mask (True = artifact)."""

    name: str
    clean: np.ndarray
    corrupted: np.ndarray
    mask: np.ndarray
    types: tuple[str, ...]


# --------------------------------------------------------------------------------------------------- evaluation sets


def read_manifest_types(root: Path) -> dict[str, tuple[str, ...]]:
    """``{file stem: artifact types}`` from ``root/manifest.json`` (empty when missing)."""
    path = root / "manifest.json"
    if not path.is_file():
        return {}
    items = json.loads(path.read_text()).get("items", [])
    return {Path(it["name"]).stem: tuple(it.get("types", [])) for it in items}


def pick_quick(names: list[str], types: Mapping[str, tuple[str, ...]], count: int) -> list[str]:
    """``count`` names, one per artifact type first (in file order), then the rest in order."""
    picked, seen = [], set()
    for name in names:
        key = types.get(name, ())[:1]
        if key and key[0] not in seen and len(picked) < count:
            picked.append(name)
            seen.add(key[0])
    picked += [n for n in names if n not in picked][: count - len(picked)]
    return sorted(picked, key=names.index)


def load_evalset(root: Path, *, limit: int | None = None) -> list[EvalTile]:
    """Read an evaluation set (``clean/``, ``corrupted/``, ``masks/``, optional ``manifest.json``).

    Args:
        root: the folder.
        limit: keep this many tiles, one per artifact type first (``--quick``); None = all.

    Returns:
        Tiles sorted by name.
    """
    from datamodules.datasets import TripletFolderDataset

    dataset = TripletFolderDataset(root)
    types = read_manifest_types(root)
    names = [corrupted.stem for corrupted, _, _ in dataset.items]
    keep = set(pick_quick(names, types, limit) if limit else names)
    tiles = []
    for i, name in enumerate(names):
        if name in keep:
            arrays = dataset.load(i)
            tiles.append(
                EvalTile(
                    name,
                    arrays["clean"],
                    arrays["corrupted"],
                    arrays["artifact_mask"].astype(bool),
                    types.get(name, ()),
                )
            )
    return tiles


# ------------------------------------------------------------------------------------------------ models and masks


def method_of(folder: Path) -> str:
    """``latent-conditional`` or ``latent`` from a pipeline folder's ``pipeline.json``.

    Raises:
        CLIError: the folder holds no pipeline.json.
    """
    meta = folder / "pipeline.json"
    if not meta.is_file():
        raise CLIError(f"--model {folder} has no pipeline.json; pass NAME=DIR for other model folders")
    return "latent-conditional" if json.loads(meta.read_text()).get("conditional") else "latent"


def perturbed_mask(tile: EvalTile, row: Row, seed: int) -> np.ndarray:
    """The mask the restorer gets in ``row``: the true mask perturbed with a generator of (seed, tile, kind).

    The generator does not depend on the severity, so severities of one kind are nested (same direction, same
    first blob). Blobs are centred on the clean tile's tissue.
    """
    from datamodules.tiling import tissue_mask
    from lightning_modules.components.mask_perturb import perturb

    p = row.perturbation
    rng = np.random.default_rng([seed, zlib.crc32(tile.name.encode()), zlib.crc32(p.kind.encode())])
    options = dict(p.options)
    if p.kind == "blobs":
        options["allowed"] = tissue_mask(tile.clean)
    return perturb(tile.mask, p.kind, p.severity, rng, **options)


def applies(row: Row, restorer: Any) -> str:
    """Why ``row`` does not apply to ``restorer`` (``""`` when it does)."""
    from lightning_modules.components.restorer import takes_sampler

    if row.overrides and not takes_sampler(restorer):
        return f"sampler settings do not apply to {restorer.name} (no diffusion sampler)"
    if row.needs == "latent-space" and getattr(restorer, "codec", None) is None:
        return f"{row.group} needs a latent-space pipeline; {restorer.name} has no VAE"
    return ""


# -------------------------------------------------------------------------------------------------------- one row


def restore_batches(
    restorer: Any, tiles: list[EvalTile], masks: list[np.ndarray], row: Row, opts: RunOptions, bar: Any
) -> Iterator[tuple[int, Any, float, int]]:
    """Restore ``tiles`` with ``masks`` in batches; yields ``(start, restored (B, 3, H, W), seconds, nfe)``."""
    import torch

    from datamodules.datasets import to_mask_tensor, to_tensor
    from experiments.restore import batch_seed
    from lightning_modules.components.restorer import takes_sampler

    for start in range(0, len(tiles), opts.batch_size):
        chunk = tiles[start : start + opts.batch_size]
        x = torch.stack([to_tensor(t.corrupted) for t in chunk])
        m = torch.stack([to_mask_tensor(mk) for mk in masks[start : start + opts.batch_size]])
        generator = torch.Generator().manual_seed(batch_seed(opts.seed, [t.name for t in chunk]))
        kwargs = dict(row.overrides) if takes_sampler(restorer) else {}
        began = time.perf_counter()
        out = restorer.restore(x, m, generator=generator, **kwargs)
        seconds = time.perf_counter() - began
        bar.update(len(chunk))
        yield start, out, seconds, int(getattr(restorer, "nfe", 0))


def score_tiles(
    row: Row,
    method: str,
    evalset: str,
    tiles: list[EvalTile],
    masks: list[np.ndarray],
    restorer: Any,
    opts: RunOptions,
    bar: Any,
) -> list[dict[str, Any]]:
    """Per-tile records of one method on one evaluation set: metrics against the TRUE mask, NFE and seconds."""
    import torch

    from datamodules.datasets import to_mask_tensor, to_tensor
    from lightning_modules.metrics.functional import per_image_metrics

    records = []
    for start, out, seconds, nfe in restore_batches(restorer, tiles, masks, row, opts, bar):
        chunk = tiles[start : start + len(out)]
        values = per_image_metrics(
            out.float().clamp(-1, 1).cpu(),
            torch.stack([to_tensor(t.clean) for t in chunk]),
            torch.stack([to_mask_tensor(t.mask) for t in chunk]),
            regions=REGIONS,
            metrics=METRICS,
        )
        for j, tile in enumerate(chunk):
            records.append(
                {
                    "row": row.name,
                    "group": row.group,
                    "level": row.level,
                    "method": method,
                    "evalset": evalset,
                    "tile": tile.name,
                    "types": "+".join(tile.types),
                    "nfe": nfe,
                    "seconds_per_tile": seconds / len(out),
                    "true_pixels": int(tile.mask.sum()),
                    "mask_pixels": int(masks[start + j].sum()),
                    **{key: float(v[j]) for key, v in values.items()},
                }
            )
    return records


def run_row(
    row: Row, restorers: Mapping[str, Any], evalsets: Mapping[str, list[EvalTile]], opts: RunOptions
) -> tuple[list[dict], list[str]]:
    """Run one row for every available method and evaluation set; returns records and skip notes."""
    from tqdm.auto import tqdm

    records, notes = [], []
    for method in row.methods:
        if method not in restorers:
            notes.append(f"{row.name}: {method} skipped (no model; pass --model {method}=DIR)")
            continue
        why = applies(row, restorers[method])
        if why:
            notes.append(f"{row.name}: {method} skipped ({why})")
            continue
        for name in row.evalsets:
            tiles = evalsets[name]
            masks = [perturbed_mask(t, row, opts.seed) for t in tiles]
            with tqdm(
                total=len(tiles),
                desc=f"{row.name} {method} {name}",
                unit="tile",
                leave=False,
                disable=not opts.progress,
            ) as bar:
                try:
                    records += score_tiles(row, method, name, tiles, masks, restorers[method], opts, bar)
                except ValueError as err:  # a setting the method refuses (e.g. RePaint jumps with a multistep solver)
                    notes.append(f"{row.name}: {method} on {name} skipped ({' '.join(str(err).split())})")
    return records, notes


# ----------------------------------------------------------------------------------------------------- the suite


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` via a temp file and ``os.replace``."""
    from experiments.report import write_json_atomic as write

    path.parent.mkdir(parents=True, exist_ok=True)
    write(path, obj)


def finished(path: Path, digest: str) -> dict | None:
    """The stored result of a row when its file exists with the same settings hash, else None."""
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return result if result.get("hash") == digest and result.get("format") == RESULT_FORMAT else None


def context(models: Mapping[str, Path], evalsets: Mapping[str, list[EvalTile]], opts: RunOptions) -> dict:
    """What every row's result depends on besides the row: model fingerprints, tiles, options."""
    from experiments.restore import model_fingerprint

    return {
        "models": {m: model_fingerprint(Path(p)) for m, p in sorted(models.items())},
        "tiles": {e: [t.name for t in tiles] for e, tiles in sorted(evalsets.items())},
        **opts.hashed(),
    }


def load_restorers(methods: set[str], models: Mapping[str, Path], opts: RunOptions) -> dict[str, Any]:
    """Build every method from the method table (model methods only when their folder is given)."""
    from experiments.restore import uses_model
    from lightning_modules.methods import build_restorer

    out = {}
    for method in sorted(methods):
        if uses_model(method) and method not in models:
            continue
        out[method] = build_restorer(method, model=models.get(method), device=opts.device, precision=opts.precision)
    return out


def warm_up(restorers: Mapping[str, Any], tile: EvalTile) -> None:
    """One untimed restore per method, so one-off costs (lazy init, allocations) stay out of the first row's s/tile."""
    import torch

    from datamodules.datasets import to_mask_tensor, to_tensor

    x, m = to_tensor(tile.corrupted)[None], to_mask_tensor(tile.mask)[None]
    for restorer in restorers.values():
        restorer.restore(x, m, generator=torch.Generator().manual_seed(0))


def log_row_to_wandb(out: Path, suite: Suite, row: Row, result: dict) -> None:
    """One wandb run per row: its settings as config, the per-tile table and the mean of every metric."""
    import wandb

    from experiments.ablation_report import row_means

    run = wandb.init(
        project=os.environ.get("WANDB_PROJECT", "latent-artifusion"),
        job_type="ablate",
        name=f"{suite.name}/{row.name}",
        group=suite.name,
        config=result["settings"],
        mode=os.environ.get("WANDB_MODE", "offline"),
        dir=str(out),
        reinit=True,
    )
    try:
        records = result["records"]
        if records:
            run.log({"ablate/tiles": wandb.Table(columns=list(records[0]), data=[list(r.values()) for r in records])})
        run.log({f"ablate/{k}": v for k, v in row_means(records).items()})
    finally:
        run.finish()


def run_suite(
    suite: Suite,
    out: Path,
    *,
    quick: bool,
    models: Mapping[str, Path],
    evalsets: Mapping[str, Path],
    options: RunOptions | None = None,
) -> Path:
    """Run every selected row of ``suite`` (resuming finished ones) and write the report.

    Args:
        suite: a parsed suite (``ablation_suite.load_suite``).
        out: output folder (created).
        quick: run the ``quick`` rows on ``suite.quick_tiles`` tiles of the quick evaluation sets.
        models: ``{method: model folder}`` for the model-based methods (the others need none).
        evalsets: ``{name: evaluation-set folder}``; rows run on the names they list that are here.
        options: see :class:`RunOptions`.

    Returns:
        The path of ``OUT/ABLATIONS.md``.

    Raises:
        SuiteNotImplemented: the suite's kind cannot be run yet.
        ValueError: no row has an evaluation set among ``evalsets``.
    """
    from tqdm.auto import tqdm

    from experiments.ablation_report import write_report

    opts = options or RunOptions()
    if not suite.implemented:
        raise SuiteNotImplemented(
            f"suite {suite.name!r} (kind {suite.kind}) is declared but running it is not "
            "implemented yet; --dry-run lists its rows"
        )
    rows = [
        dataclasses.replace(r, evalsets=tuple(e for e in r.evalsets if e in evalsets))
        for r in suite.selected(quick=quick, names=list(opts.rows))
    ]
    if not any(r.evalsets for r in rows):
        raise ValueError(
            f"no evaluation set of suite {suite.name} is available (wanted "
            f"{sorted({e for r in suite.rows for e in r.evalsets})}, have {sorted(evalsets)})"
        )
    used = sorted({e for r in rows for e in r.evalsets})
    tiles = {e: load_evalset(Path(evalsets[e]), limit=suite.quick_tiles if quick else None) for e in used}
    restorers = load_restorers({m for r in rows for m in r.methods}, models, opts)
    base = context({m: p for m, p in models.items() if m in restorers}, tiles, opts)
    results, notes, warm = {}, [], False
    for row in tqdm(rows, desc=f"{suite.name} rows", unit="row", disable=not opts.progress):
        if row.missing_field:
            notes.append(f"{row.name}: skipped (SamplerConfig has no field {row.needs_field!r} in this checkout)")
            continue
        settings = {"format": RESULT_FORMAT, "suite": suite.name, "quick": quick, "row": row.settings(), **base}
        path, digest = out / "rows" / f"{row.name}.json", settings_hash(settings)
        result = None if opts.force else finished(path, digest)
        if result is None:
            if not warm:
                warm_up(restorers, tiles[used[0]][0])
                warm = True
            began = time.perf_counter()
            records, row_notes = run_row(row, restorers, tiles, opts)
            result = {
                "format": RESULT_FORMAT,
                "hash": digest,
                "settings": settings,
                "records": records,
                "notes": row_notes,
                "seconds": time.perf_counter() - began,
            }
            write_json_atomic(path, result)
            if opts.wandb:
                log_row_to_wandb(out, suite, row, result)
        else:
            log.info("row %s: finished earlier with the same settings, skipped", row.name)
        results[row.name] = result
        notes += result["notes"]
    return write_report(
        out,
        suite,
        rows,
        results,
        notes,
        quick=quick,
        models=models,
        evalsets={e: (Path(evalsets[e]), len(tiles[e])) for e in used},
        options=opts,
    )


# --------------------------------------------------------------------------------------------------- untrained


def build_untrained(root: Path, *, size: int = 256, count: int = 7) -> tuple[dict[str, Path], dict[str, Path]]:
    """Tiny random-weight pipelines and a ``count``-tile synthetic evaluation set under ``root`` (reused if there).

    The stand-ins of ``--quick`` when the demo's exports are missing: ``latent`` (unconditional, 4 DDPM steps) and
    ``latent-conditional`` (residual, v-prediction, 1 step, adaptive decode) on a tiny 4-channel VAE, built as the
    tests build them; the evaluation set comes from ``datamodules.synthesize`` (bundled test split, one artifact
    per tile, types in turn).

    Returns:
        ``({method: pipeline folder}, {"evalset": folder})``.
    """
    import torch
    from diffusers import DDPMScheduler

    from datamodules.synthesize import SynthesisJob, synthesize
    from lightning_modules.components.autoencoders import build_autoencoder
    from lightning_modules.components.denoisers import build_unet
    from lightning_modules.components.pipeline import save_pipeline
    from lightning_modules.components.regional_sampler import SamplerConfig
    from lightning_modules.conditional_latent import CONDITIONAL_SAMPLER, CONDITIONAL_SCHEDULER
    from lightning_modules.latent_diffusion import PAPER_SCHEDULER

    specs = {
        "latent": dict(in_channels=4, scheduler={}, sampler={"num_steps": 4}, name="ddpm", conditional=False),
        "latent-conditional": dict(
            in_channels=9, scheduler=CONDITIONAL_SCHEDULER, sampler=CONDITIONAL_SAMPLER, name="ddim", conditional=True
        ),
    }
    models = {}
    for method, spec in specs.items():
        path = root / DEMO_MODELS[method]
        if not (path / "pipeline.json").is_file():
            torch.manual_seed(0)
            save_pipeline(
                path,
                unet=build_unet("tiny", sample_size=size // 8, in_channels=spec["in_channels"], out_channels=4),
                scheduler=DDPMScheduler(**{**PAPER_SCHEDULER, **spec["scheduler"]}),
                sampler=SamplerConfig.from_preset("repaint", feather=2, **spec["sampler"]),
                vae=build_autoencoder("tiny"),
                image_size=size,
                scheduler_name=spec["name"],
                conditional=spec["conditional"],
                residual=spec["conditional"],
                extra={"untrained": True, "built_by": "experiments.ablate --quick"},
            )
        models[method] = path
    evalset = root / "evalset"
    if not (evalset / "manifest.json").is_file():
        synthesize(SynthesisJob(out=evalset, bundled=True, count=count, balanced=True, seed=0, size=size))
    return models, {"evalset": evalset}


# ----------------------------------------------------------------------------------------------------------- CLI


@dataclass
class AblateJob:
    """One suite run: the flags of ``python -m experiments.ablate`` as typed values (same names and defaults).

    Attributes:
        suite: Suite name in ``experiments/ablations/`` or a YAML path.
        out: Output folder (``None``: ``outputs/ablations/SUITE``).
        quick: Quick rows, few tiles, first evaluation set.
        dry_run: List every row and return without loading models.
        model: ``[NAME=]DIR`` pipeline folders (empty: the demo's exports under ``demo``).
        evalset: ``[NAME=]DIR`` evaluation sets replacing the suite's (empty: the demo's).
        demo: Where the demo's exports are looked for.
        rows: Comma list of row names to run (the reference always runs).
        seed: Seed of the restorations and the bootstrap.
        device: Torch device.
        precision: Autocast precision.
        batch_size: Tiles per restore call.
        force: Redo rows that finished earlier.
        wandb: One wandb run per row.
        debug: Tracebacks instead of one-line errors.
    """

    suite: str
    out: Path | None = None
    quick: bool = False
    dry_run: bool = False
    model: list[str] = field(default_factory=list)
    evalset: list[str] = field(default_factory=list)
    demo: Path = DEMO
    rows: str = ""
    seed: int = 0
    device: str = "cpu"
    precision: str = "auto"
    batch_size: int = 4
    force: bool = False
    wandb: bool = False
    debug: bool = False


def parse_args(argv: list[str] | None = None) -> AblateJob:
    """Command-line arguments as an :class:`AblateJob`."""
    p = argparse.ArgumentParser(prog="python -m experiments.ablate", description=__doc__.split("\n\n")[0])
    p.add_argument("--suite", required=True, help="suite name in experiments/ablations/ (or a YAML path)")
    p.add_argument("--out", type=Path, help="output folder (default outputs/ablations/SUITE)")
    p.add_argument("--quick", action="store_true", help="quick rows, few tiles, first evaluation set")
    p.add_argument("--dry-run", action="store_true", help="list every row and exit without loading models")
    p.add_argument(
        "--model",
        nargs="+",
        default=[],
        metavar="[NAME=]DIR",
        help="pipeline folders (default: the demo's exports under --demo)",
    )
    p.add_argument(
        "--evalset",
        nargs="+",
        default=[],
        metavar="[NAME=]DIR",
        help="evaluation sets replacing the suite's (default: the demo's under --demo)",
    )
    p.add_argument("--demo", type=Path, default=DEMO, help="where the demo's exports are looked for")
    p.add_argument("--rows", default="", help="comma list of row names to run (the reference always runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--batch-size", type=int, default=4, help="tiles per restore call, >= 1")
    p.add_argument("--force", action="store_true", help="redo rows that finished earlier")
    p.add_argument("--wandb", action="store_true", help="one wandb run per row (offline by default)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors (or LAF_DEBUG=1)")
    return from_namespace(AblateJob, p.parse_args(argv))


def named_folders(items: list[str], flag: str, *, infer=None) -> dict[str, Path]:
    """``[NAME=]DIR`` arguments as ``{name: folder}``; a bare DIR is named by ``infer(DIR)`` or its folder name."""
    out: dict[str, Path] = {}
    for item in items:
        name, sep, folder = item.partition("=")
        path = check_input_folder(Path(folder if sep else item), flag)
        name = name if sep else (infer(path) if infer else path.name)
        if name in out:
            raise CLIError(f"{flag}: {name} is given twice ({out[name]} and {path})")
        out[name] = path
    return out


def resolve_inputs(args: AblateJob, suite: Suite) -> tuple[dict[str, Path], dict[str, Path], bool]:
    """Models and evaluation sets from the flags or the demo's exports; ``--quick`` falls back to untrained ones.

    Returns:
        ``(models, evalsets, untrained)``.
    """
    models = named_folders(args.model, "--model", infer=method_of)
    if not args.model:
        models = {m: args.demo / d for m, d in DEMO_MODELS.items() if (args.demo / d / "pipeline.json").is_file()}
    evalsets = named_folders(args.evalset, "--evalset")
    if not args.evalset:
        evalsets = {e: args.demo / e for e in DEMO_EVALSETS if (args.demo / e / "corrupted").is_dir()}
    for name, folder in evalsets.items():
        lacking = [s for s in ("clean", "corrupted", "masks") if not (folder / s).is_dir()]
        if lacking:
            raise CLIError(
                f"--evalset {name}={folder} has no {', '.join(s + '/' for s in lacking)}; pass an "
                "evaluation set (python -m datamodules.synthesize writes one)"
            )
    if models and evalsets:
        return models, evalsets, False
    if not args.quick:
        missing = "trained pipelines" if not models else "evaluation sets"
        raise CLIError(
            f"no {missing} found under {args.demo} and none given: run `make demo`, pass --model/--evalset, "
            "or add --quick for tiny untrained stand-ins"
        )
    made_models, made_evalsets = build_untrained(args.out / "untrained")
    return models or made_models, evalsets or made_evalsets, not models


def list_rows(suite: Suite, *, quick: bool) -> str:
    """Every row of the suite, one block per row: name, settings, methods, metrics, evaluation sets."""
    selected = {r.name for r in suite.selected(quick=quick)}
    state = "runnable" if suite.implemented else "declared only (running it is not implemented yet)"
    lines = [
        f"suite {suite.name} ({suite.kind}, {state}): {len(suite.rows)} rows"
        + (f", {len(selected)} under --quick" if quick else ""),
        suite.description,
        "",
    ]
    for row in suite.rows:
        settings = {
            k: v
            for k, v in {
                "overrides": dict(row.overrides),
                "perturbation": f"{row.perturbation.kind} {row.perturbation.severity}"
                if row.perturbation.kind != "none"
                else "",
                "train_overrides": list(row.train_overrides),
                "needs": row.needs,
            }.items()
            if v
        }
        tags = [
            t
            for t, on in (
                ("reference", row.name == suite.reference),
                ("quick", row.name in selected and quick),
                (f"skipped: SamplerConfig has no {row.needs_field!r}", row.missing_field),
            )
            if on
        ]
        lines.append(
            f"- {row.name}"
            + (f" [{', '.join(tags)}]" if tags else "")
            + (f": {row.description}" if row.description else "")
        )
        lines.append(f"    settings: {json.dumps(settings) if settings else 'defaults'}")
        lines.append(
            f"    methods: {', '.join(row.methods)} | metrics: {', '.join(row.metrics)} | "
            f"evalsets: {', '.join(row.evalsets)}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run or list a suite; returns the exit code (0 done, 1 not implemented or nothing done, 2 bad arguments)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_main(_main, argv)


def _main(argv: list[str]) -> int:
    ablate(parse_args(argv))
    return 0


def ablate(args: AblateJob) -> Path | None:
    """Run a suite (or list its rows with ``dry_run``); returns the written ``ABLATIONS.md`` (None for a dry run).

    Raises:
        CLIError: A bad suite, row name, flag value or input folder, or a suite that cannot run yet.
    """
    try:
        suite = load_suite(args.suite)
        row_names = [r.strip() for r in args.rows.split(",") if r.strip()]
        suite.selected(quick=args.quick, names=row_names)
    except SuiteError as err:
        raise CLIError(str(err)) from None
    check_range("--batch-size", args.batch_size, low=1)
    check_device(args.device)
    if args.evalset:
        suite = suite.with_evalsets(list(named_folders(args.evalset, "--evalset")))
    if args.dry_run:
        named_folders(args.model, "--model", infer=method_of)
        print(list_rows(suite, quick=args.quick))
        return None
    if not suite.implemented:
        raise CLIError(
            f"suite {suite.name} ({suite.kind}) is declared but running it is not implemented yet "
            f"(--dry-run lists its rows)",
            code=1,
        )
    args = replace(args, out=check_output_folder(args.out or Path("outputs/ablations") / suite.name))
    models, evalsets, untrained = resolve_inputs(args, suite)
    options = RunOptions(
        seed=args.seed,
        device=args.device,
        precision=args.precision,
        batch_size=args.batch_size,
        rows=tuple(row_names),
        force=args.force,
        wandb=args.wandb,
        untrained=untrained,
    )
    report = run_suite(suite, args.out, quick=args.quick, models=models, evalsets=evalsets, options=options)
    print(f"wrote {report}")
    return report


if __name__ == "__main__":
    sys.exit(main())
