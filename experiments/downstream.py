r"""Downstream study: does restoring artifacts give a tissue classifier back its accuracy? (docs/METHOD.md section 8).

Trains (or loads) a tissue classifier on clean tiles through the same LightningCLI recipe as ``experiments.train``
(``configs/base.yaml`` + ``configs/model/classifier_cpu.yaml`` + ``configs/data/bundled_tissue.yaml`` or
``crc_imagefolder.yaml``, with the job's values as overrides; ``downstream.json`` records them under
``config.recipe``), keeping the checkpoint with the best VALIDATION accuracy (the authors selected on test, which
overstates results). Then, on the held-out test tiles, it
measures accuracy and macro-F1 on (1) the clean tiles, (2) the same tiles with synthesised artifacts (an
``ArtifactSynthesizer`` seeded per image, 1-2 artifacts each, at the classifier's input size so they cover a large
share of the tile) and (3) those tiles restored by each method (``build_restorer``; a method failing on an image
reports and skips that image, the rest goes on).

Usage::

    # offline proxy task on the bundled H&E (5 classes: which image a tile comes from), a few minutes on 2 CPU cores
    python -m experiments.downstream --out outputs/downstream --methods identity,telea,ns
    # with a trained latent restoration pipeline
    python -m experiments.downstream --out outputs/downstream --methods identity,telea,latent --model outputs/pipe
    # the paper's data (densenet121, 50 epochs; a GPU is advisable)
    python -m experiments.downstream --out outputs/crc --data train=NCT-CRC-HE-100K,test=CRC-VAL-HE-7K \
        --classifier densenet121 --pretrained true --image-size 224 --epochs 50 --device cuda
    # the latent pipeline with the settings of one sampler ablation row
    python -m experiments.downstream --out outputs/d4 --methods identity,latent --model outputs/pipe \
        --sampler experiments/configs/sampler/steps_4.yaml
    # reuse a trained classifier
    python -m experiments.downstream --out outputs/d2 --classifier-checkpoint CKPT  # the "checkpoint" of a result

Writes ``OUT/downstream.json`` (``{"clean": {"accuracy", "macro_f1", "ci95", ...}, "artifact": {...},
"restored": {METHOD: {...}}, "checkpoint", "selected_on": "val", "labels", "n_test", ...}``; ``ci95`` is the
percentile-bootstrap 95 % interval of the accuracy and ``macro_f1_ci95`` that of the macro-F1), ``OUT/downstream.md``
and ``OUT/confusion_<condition>.png``. ``--wandb`` logs the fit and the results (offline unless WANDB_MODE=online).
"""

import argparse
import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from experiments.jobs import from_namespace

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

log = logging.getLogger("experiments.downstream")

QUICK = {"epochs": 3, "image_size": 64, "caps": {"train": 24, "val": 6, "test": 6}}


@dataclass
class DownstreamJob:
    """One downstream study: the flags of ``python -m experiments.downstream`` as typed values (same names, defaults).

    Attributes:
        out: Output folder (``downstream.json``, ``downstream.md``, confusion matrices, checkpoints, logs).
        data: ``"bundled"`` (offline proxy task) or ``"train=DIR,test=DIR[,val=DIR]"`` (one folder per class).
        classifier_checkpoint: Evaluate this checkpoint instead of training.
        methods: Comma list of restoration methods, ``NAME=DIR`` giving one its own model folder.
        model: Pipeline folder for the methods listed without ``=DIR``.
        steps: Sampling steps of the methods with a sampler.
        sampler: Sampler settings file for the methods with a sampler.
        sampler_set: ``KEY=VALUE`` overrides of single ``SamplerConfig`` fields.
        epochs: Training epochs (``None``: 4, or 3 with ``quick``).
        quick: Tiny run for tests and smoke checks.
        classifier_config: Model config of the classifier recipe (``None``: ``configs/model/classifier_cpu.yaml``).
        classifier: timm model name (``None``: the config's).
        pretrained: ``"auto"`` (the config's weights for its own classifier, none for another), ``"none"``,
            ``"bundled-efficientnet-lite0"``, a .pth path or ``"true"``.
        no_stain_norm: Drop the learnable Lab stain layer.
        image_size: Classifier input side (``None``: 96 bundled, 224 folders).
        batch_size: Training and restoration batch.
        lr: AdamW learning rate (``None``: the config's).
        weight_decay: AdamW weight decay (``None``: the config's).
        artifact_resolution: Side at which artifacts are synthesised (0: at input size).
        max_test: Evaluate only the first N test images.
        seed: Seed of training, synthesis, restoration and bootstrap.
        device: ``"cpu"`` or ``"cuda"``.
        precision: Lightning precision of the fit.
        num_workers: DataLoader workers.
        n_boot: Bootstrap resamples of the intervals.
        wandb: Log to wandb.
    """

    out: Path
    data: str = "bundled"
    classifier_checkpoint: Path | None = None
    methods: str = "identity,telea,ns"
    model: Path | None = None
    steps: int | None = None
    sampler: Path | None = None
    sampler_set: list[str] = field(default_factory=list)
    epochs: int | None = None
    quick: bool = False
    classifier_config: Path | None = None
    classifier: str | None = None
    pretrained: str = "auto"
    no_stain_norm: bool = False
    image_size: int | None = None
    batch_size: int = 16
    lr: float | None = None
    weight_decay: float | None = None
    artifact_resolution: int = 256
    max_test: int | None = None
    seed: int = 0
    device: str = "cpu"
    precision: str = "32-true"
    num_workers: int = 0
    n_boot: int = 2000
    wandb: bool = False


def parse_args(argv: list[str] | None = None) -> DownstreamJob:
    """Command-line arguments as a :class:`DownstreamJob` (sampler settings checked here, before any model loads)."""
    p = argparse.ArgumentParser(prog="python -m experiments.downstream", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--data",
        default="bundled",
        help="'bundled' (offline proxy task) or 'train=DIR,test=DIR[,val=DIR]' (one folder per class)",
    )
    p.add_argument("--classifier-checkpoint", type=Path, help="evaluate this checkpoint instead of training")
    p.add_argument(
        "--methods",
        default="identity,telea,ns",
        help="comma list of registered restoration methods; NAME=DIR gives one its own model folder",
    )
    p.add_argument("--model", type=Path, help="pipeline folder for the latent methods")
    p.add_argument("--steps", type=int, help="sampling steps for diffusion methods (default: the pipeline's)")
    p.add_argument(
        "--sampler",
        type=Path,
        metavar="FILE",
        help="sampler settings file (experiments/configs/sampler/*.yaml) for the methods with a sampler; "
        "--steps and --sampler-set win over it",
    )
    p.add_argument(
        "--sampler-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set one SamplerConfig field (YAML value) for the methods with a sampler; repeatable",
    )
    p.add_argument("--epochs", type=int, help="training epochs (default 4; 3 with --quick)")
    p.add_argument("--quick", action="store_true", help="tiny run for tests and smoke checks (about a minute)")
    p.add_argument(
        "--classifier-config",
        type=Path,
        help="model config of the classifier recipe (default experiments/configs/model/classifier_cpu.yaml; "
        "classifier_paper.yaml is the paper's densenet121)",
    )
    p.add_argument("--classifier", help="timm model name (default: the config's, tf_efficientnet_lite0)")
    p.add_argument(
        "--pretrained",
        default="auto",
        help="'auto' (the config's bundled ImageNet weights for tf_efficientnet_lite0, else none), 'none', "
        "'bundled-efficientnet-lite0', a .pth path, or 'true' (timm download: needs network)",
    )
    p.add_argument("--no-stain-norm", action="store_true", help="drop the learnable Lab stain layer")
    p.add_argument("--image-size", type=int, help="classifier input side (default 96 bundled, 224 folders)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, help="AdamW learning rate (default: the config's, 1e-3)")
    p.add_argument("--weight-decay", type=float, help="AdamW weight decay (default: the config's, 1e-5)")
    p.add_argument(
        "--artifact-resolution",
        type=int,
        default=256,
        help="synthesise artifacts on the image resized to this side, then resize back, so artifact sizes "
        "match the synthesizer's 256 px design whatever the classifier input size (0: at input size)",
    )
    p.add_argument("--max-test", type=int, help="evaluate only the first N test images")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precision", default="32-true", help="Lightning precision for the fit, e.g. bf16-mixed")
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--wandb", action="store_true", help="log to wandb (offline unless WANDB_MODE=online)")
    job = from_namespace(DownstreamJob, p.parse_args(argv))
    try:
        resolve_sampler(job)
    except ValueError as err:
        p.error(str(err))
    return job


def resolve_sampler(args: DownstreamJob):
    """``(--sampler file content or None, effective restore keyword arguments)`` for the methods with a sampler.

    Raises:
        ValueError: A bad sampler file or ``--sampler-set``, or sampler settings but no method with a sampler.
    """
    from lightning_modules.components.restorer import parse_method_specs
    from lightning_modules.components.sampler_files import (
        load_sampler_file,
        merge_cli_overrides,
        parse_sampler_sets,
        sampler_kwargs,
    )

    spec = None if args.sampler is None else load_sampler_file(args.sampler)
    fields = merge_cli_overrides({"num_steps": args.steps or None}, parse_sampler_sets(args.sampler_set))
    if spec is not None or args.sampler_set:
        from experiments.restore import has_sampler

        if not any(has_sampler(m, model) for m, model in parse_method_specs(args.methods, args.model).items()):
            raise ValueError(
                f"--sampler/--sampler-set: none of --methods {args.methods} has a diffusion sampler "
                "(a pipeline folder); drop them or add a latent or artifusion method"
            )
    return spec, sampler_kwargs(spec, fields)


# ------------------------------------------------------------------------------------------------------ recipe

CONFIGS = Path(__file__).resolve().parent / "configs"
DATA_CONFIGS = {"bundled": "bundled_tissue.yaml", "folders": "crc_imagefolder.yaml"}


def data_roots(args: DownstreamJob) -> dict[str, str]:
    """``{}`` for ``data="bundled"``, else the ``train`` / ``val`` / ``test`` folders of ``train=DIR,test=DIR``.

    Raises:
        SystemExit: A malformed value, or no test folder (or no train folder when a classifier is to be trained).
    """
    if args.data == "bundled":
        return {}
    roots = {}
    for part in args.data.split(","):
        key, _, value = part.partition("=")
        if key.strip() not in ("train", "val", "test") or not value:
            raise SystemExit(f"--data: expected 'bundled' or 'train=DIR,test=DIR[,val=DIR]', got {args.data!r}")
        roots[key.strip()] = value.strip()
    if "test" not in roots or ("train" not in roots and args.classifier_checkpoint is None):
        raise SystemExit(f"--data needs test=DIR and (unless --classifier-checkpoint) train=DIR, got {args.data!r}")
    return roots


def recipe_args(args: DownstreamJob) -> list[str]:
    """LightningCLI arguments of the classifier recipe: the configs ``experiments.train`` composes + the job's values.

    ``base.yaml`` + ``model/classifier_cpu.yaml`` (or ``args.classifier_config``) + ``data/bundled_tissue.yaml`` or
    ``data/crc_imagefolder.yaml``; the job overrides only what it sets (seed, epochs, precision, sizes, folders, the
    classifier name, weights and optimiser values), so ``python -m experiments.train fit`` with the same files trains
    the same classifier.
    """
    roots = data_roots(args)
    model_config = args.classifier_config or CONFIGS / "model" / "classifier_cpu.yaml"
    data_config = CONFIGS / "data" / DATA_CONFIGS["folders" if roots else "bundled"]
    out = [
        f"--config={CONFIGS / 'base.yaml'}",
        f"--config={model_config}",
        f"--config={data_config}",
        f"--seed_everything={args.seed}",
        f"--trainer.default_root_dir={args.out}",
        f"--trainer.precision={args.precision}",
        "--trainer.devices=1",
        f"--trainer.accelerator={'gpu' if args.device.startswith('cuda') else 'cpu'}",
    ]
    if args.wandb:
        out += [
            f"--trainer.logger.init_args.save_dir={args.out}",
            f"--trainer.logger.init_args.name=downstream-{args.out.name}",
        ]
    else:
        out += [
            "--trainer.logger=lightning.pytorch.loggers.CSVLogger",
            f"--trainer.logger.init_args.save_dir={args.out}",
            "--trainer.logger.init_args.name=logs",
        ]
    epochs = args.epochs or (QUICK["epochs"] if args.quick else None)
    if epochs:
        out.append(f"--trainer.max_epochs={epochs}")
    net = "--model.init_args.net.init_args"
    if args.classifier is not None:
        out.append(f"{net}.name={args.classifier}")
    pretrained = _pretrained(args)
    if pretrained is not None:
        out.append(f"{net}.pretrained={str(pretrained).lower() if isinstance(pretrained, bool) else pretrained}")
    if args.no_stain_norm:
        out.append(f"{net}.stain_norm=false")
    optim = "--model.init_args.optimizer.init_args"
    out += [f"{optim}.lr={args.lr}"] if args.lr is not None else []
    out += [f"{optim}.weight_decay={args.weight_decay}"] if args.weight_decay is not None else []
    data = "--data.init_args"
    out += [
        f"{data}.batch_size={args.batch_size}",
        f"{data}.num_workers={args.num_workers}",
        f"{data}.seed={args.seed}",
    ]
    size = args.image_size or (QUICK["image_size"] if args.quick and not roots else None)
    if size:
        out.append(f"{data}.image_size={size}")
    if roots:
        classes = folder_classes(Path(roots.get("train", roots["test"])))
        out += [
            f"{data}.root_train={roots.get('train', roots['test'])}",
            f"{data}.root_test={roots['test']}",
            f"--model.init_args.num_classes={len(classes)}",
            f"{net}.num_classes={len(classes)}",
            f"--model.init_args.class_names={json.dumps(classes)}",
        ]
        out += [f"{data}.root_val={roots['val']}"] if "val" in roots else []
    elif args.quick:
        out.append(f"{data}.max_per_class={json.dumps(QUICK['caps'])}")
    return out


def folder_classes(root: Path) -> list[str]:
    """The class names of a class-folder dataset: its immediate, non-hidden sub-folders, sorted."""
    if not root.is_dir():
        raise SystemExit(f"--data: {root} is not a folder")
    return sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))


def build_recipe(args: DownstreamJob):
    """The instantiated LightningCLI (``cli.model``, ``cli.datamodule`` set up for fit, ``cli.trainer``); nothing runs.

    The classifier is built under ``seed_everything(args.seed)`` right before, so it does not depend on what drew from
    the global RNG earlier (building the restorers does).
    """
    from experiments.train import cli_main

    cli = cli_main(recipe_args(args), run=False)
    cli.datamodule.setup("fit")
    if cli.model.hparams.num_classes != cli.datamodule.num_classes:
        raise SystemExit(
            f"the classifier has {cli.model.hparams.num_classes} classes but the data "
            f"{cli.datamodule.num_classes} ({cli.datamodule.class_names}); fix num_classes in the config"
        )
    return cli


def _pretrained(args: DownstreamJob) -> str | bool | None:
    """The ``pretrained`` value to set (``None``: keep the config's)."""
    value = args.pretrained
    if value == "auto":
        # the config's weights belong to its classifier; another timm model starts from random init (no network)
        return None if args.classifier in (None, "tf_efficientnet_lite0") else False
    return {"none": False, "false": False, "true": True}.get(value.lower(), value)


def train_classifier(cli) -> tuple[Any, str, dict[str, float]]:
    """Fit the recipe's classifier on the train split; returns (best module by val accuracy, checkpoint, val)."""
    from lightning_modules.classifier import TissueClassifierModule

    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    checkpoint = cli.trainer.checkpoint_callback
    best = checkpoint.best_model_path if checkpoint is not None else ""
    if not best:
        raise RuntimeError("training produced no checkpoint (does the config's ModelCheckpoint monitor val/acc?)")
    return TissueClassifierModule.load_for_eval(best), best, {"accuracy": float(checkpoint.best_model_score)}


def load_classifier(path: Path, dm):
    """Load a trained classifier and check its classes against the data's."""
    from lightning_modules.classifier import TissueClassifierModule

    if not path.is_file():
        raise SystemExit(f"--classifier-checkpoint {path} does not exist")
    module = TissueClassifierModule.load_for_eval(str(path))
    if list(module.class_names) != list(dm.class_names):
        raise SystemExit(f"{path} was trained on classes {module.class_names}, but the data has {dm.class_names}")
    return module


# ------------------------------------------------------------------------------------------------------ statistics


def macro_f1(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> float:
    """Macro-F1 (torchmetrics) over the classes that occur in labels or predictions; NaN for no images."""
    from torchmetrics.functional.classification import multiclass_f1_score

    labels, preds = np.asarray(labels, np.int64), np.asarray(preds, np.int64)
    present = np.union1d(labels, preds)
    if not len(present):
        return float("nan")
    per_class = multiclass_f1_score(
        torch.from_numpy(preds), torch.from_numpy(labels), num_classes, average="none", validate_args=False
    )
    return float(per_class[torch.from_numpy(present)].mean())


def confusion(labels: np.ndarray, preds: np.ndarray, num_classes: int) -> np.ndarray:
    """(K, K) counts (torchmetrics), rows = true class, columns = predicted class."""
    from torchmetrics.functional.classification import multiclass_confusion_matrix

    labels, preds = np.asarray(labels, np.int64), np.asarray(preds, np.int64)
    return multiclass_confusion_matrix(
        torch.from_numpy(preds), torch.from_numpy(labels), num_classes, validate_args=False
    ).numpy()


def condition_metrics(labels: np.ndarray, preds: np.ndarray, num_classes: int, *, n_boot: int, seed: int) -> dict:
    """Accuracy and macro-F1 with percentile-bootstrap 95 % intervals (images resampled with replacement)."""
    from lightning_modules.metrics.statistics import bootstrap_ci

    labels, preds = np.asarray(labels, np.int64), np.asarray(preds, np.int64)
    correct = (labels == preds).astype(np.float64)
    acc, lo, hi, n = bootstrap_ci(correct, n_boot=n_boot, seed=seed)
    rng = np.random.default_rng(seed)
    f1s = [macro_f1(labels[idx], preds[idx], num_classes) for idx in rng.integers(0, n, size=(n_boot, n))] if n else []
    f1_lo, f1_hi = np.nanquantile(f1s, [0.025, 0.975]).tolist() if n > 1 else [float("nan")] * 2
    return {
        "accuracy": acc,
        "macro_f1": macro_f1(labels, preds, num_classes) if n else float("nan"),
        "ci95": [lo, hi],
        "macro_f1_ci95": [float(f1_lo), float(f1_hi)],
        "n": n,
        "confusion_matrix": confusion(labels, preds, num_classes).tolist() if n else [],
    }


# ------------------------------------------------------------------------------------------------------ evaluation


def synthesize_at(image: np.ndarray, synthesizer, rng: np.random.Generator, resolution: int):
    """Synthesise artifacts at ``resolution`` px and bring them back to the image's size.

    Restoration methods also run at ``resolution`` (the tile size their models were trained for), so the
    full-resolution corrupted tile and mask are returned too.

    Args:
        image: uint8 (S, S, 3) clean RGB.
        synthesizer: An ``ArtifactSynthesizer``.
        rng: The image's generator.
        resolution: Side at which to synthesise (0 or S: directly on the image).

    Returns:
        ``(corrupted uint8 (S, S, 3), mask bool (S, S), corrupted_big uint8 (R, R, 3), mask_big bool (R, R))`` with
        R = ``resolution`` (or S); pixels outside the mask equal ``image`` exactly, and the mask holds every pixel an
        artifact touched.
    """
    import cv2

    size = image.shape[0]
    if resolution in (0, size):
        res = synthesizer(image, rng)
        return res.corrupted, res.mask, res.corrupted, res.mask
    big = cv2.resize(image, (resolution, resolution), interpolation=cv2.INTER_CUBIC)
    res = synthesizer(big, rng)
    interp = cv2.INTER_AREA if resolution > size else cv2.INTER_LINEAR
    bad = cv2.resize(res.corrupted, (size, size), interpolation=interp)
    mask = cv2.resize(res.mask.astype(np.float32), (size, size), interpolation=interp) > 0
    return np.where(mask[..., None], bad, image), mask, res.corrupted, res.mask


def to_input_size(restored: torch.Tensor, corrupted: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Resize restored tiles (B, 3, R, R) to the classifier's (B, 3, S, S) and keep ``corrupted`` outside ``mask``.

    The resize is the one :func:`synthesize_at` uses (8-bit, OpenCV area/linear), so the ``identity`` restorer gives
    back exactly the artifact condition's images.

    Args:
        restored: Restorer output at the synthesis resolution, in [-1, 1].
        corrupted: The corrupted tiles at input size S, in [-1, 1].
        mask: (B, 1, S, S), 1 = artifact.
    """
    import cv2

    from datamodules.datasets import to_tensor, to_uint8

    size = corrupted.shape[-1]
    if restored.shape[-1] != size:
        interp = cv2.INTER_AREA if restored.shape[-1] > size else cv2.INTER_LINEAR
        restored = torch.stack(
            [to_tensor(cv2.resize(img, (size, size), interpolation=interp)) for img in to_uint8(restored)]
        )
    return torch.where(mask.bool(), restored.float().clamp(-1, 1), corrupted.float())


def _restore_batch(restorer, corrupted: torch.Tensor, mask: torch.Tensor, names: list[str], generator, **kwargs):
    """Restore a batch; on failure retry image by image. Returns (restored or None per image, failures)."""
    try:
        out = restorer.restore(corrupted, mask, generator=generator, **kwargs)
        return [out[i] for i in range(len(names))], []
    except Exception as err:  # any method may fail; one bad batch must not stop the study
        log.warning("%s failed on a batch (%s); retrying image by image", restorer.name, err)
    results, failures = [], []
    for i, name in enumerate(names):
        try:
            results.append(restorer.restore(corrupted[i : i + 1], mask[i : i + 1], generator=generator, **kwargs)[0])
        except Exception as err:  # report the image and go on
            log.warning("%s failed on %s: %s", restorer.name, name, err)
            results.append(None)
            failures.append({"method": restorer.name, "image": name, "error": f"{type(err).__name__}: {err}"})
    return results, failures


@torch.no_grad()
def evaluate(
    module, dataset, restorers: dict, *, args: DownstreamJob, sampler_kwargs: dict | None = None
) -> dict[str, Any]:
    """Predictions for clean, artifact and restored versions of every test image (streamed in batches)."""
    from tqdm.auto import tqdm

    from datamodules.artifacts import ArtifactSynthesizer
    from datamodules.datasets import sample_rng, to_mask_tensor, to_tensor
    from lightning_modules.components.restorer import takes_sampler

    device = torch.device(args.device)
    module = module.to(device).eval()
    synthesizer = ArtifactSynthesizer(min_artifacts=1, max_artifacts=2)
    n = len(dataset) if args.max_test is None else min(args.max_test, len(dataset))
    labels, names, coverage = [], [], []
    preds: dict[str, list] = {"clean": [], "artifact": []}
    restored = {m: {"labels": [], "preds": []} for m in restorers}
    failures: list[dict] = []
    examples: dict[str, np.ndarray] = {}

    def predict(x: torch.Tensor) -> list[int]:
        return module(x.to(device)).argmax(-1).cpu().tolist()

    bs = args.batch_size
    for start in tqdm(range(0, n, bs), desc="downstream test", unit="batch"):
        idx = range(start, min(n, start + bs))
        clean, corrupted, masks, batch_labels, batch_names, big, big_masks = [], [], [], [], [], [], []
        for i in idx:
            image, label, meta = dataset.read(i)
            bad, mask, bad_big, mask_big = synthesize_at(
                image, synthesizer, sample_rng(args.seed, "test", i), args.artifact_resolution
            )
            clean.append(to_tensor(image))
            corrupted.append(to_tensor(bad))
            masks.append(to_mask_tensor(mask))
            big.append(to_tensor(bad_big))
            big_masks.append(to_mask_tensor(mask_big))
            coverage.append(float(mask.mean()))
            batch_labels.append(label)
            batch_names.append(meta["name"])
        clean_t, corrupted_t, mask_t = torch.stack(clean), torch.stack(corrupted), torch.stack(masks)
        big_t, big_mask_t = torch.stack(big), torch.stack(big_masks)
        labels += batch_labels
        names += batch_names
        preds["clean"] += predict(clean_t)
        preds["artifact"] += predict(corrupted_t)
        if start == 0:
            examples = {"clean": clean_t[:4], "artifact": corrupted_t[:4]}
        for method, restorer in restorers.items():
            generator = torch.Generator(device="cpu").manual_seed(args.seed * 100003 + start)
            extra = dict(sampler_kwargs or {}) if takes_sampler(restorer) else {}
            # restorers run at the synthesis resolution (their models' tile size), the classifier at its input size
            outs, fails = _restore_batch(
                restorer, big_t.to(device), big_mask_t.to(device), batch_names, generator, **extra
            )
            failures += fails
            ok = [i for i, o in enumerate(outs) if o is not None]
            if ok:
                batch = to_input_size(torch.stack([outs[i].cpu() for i in ok]), corrupted_t[ok], mask_t[ok])
                restored[method]["preds"] += predict(batch)
                restored[method]["labels"] += [batch_labels[i] for i in ok]
                if start == 0 and len(ok) == len(outs):
                    examples[method] = batch[:4].cpu()
    return {
        "labels": labels,
        "names": names,
        "preds": preds,
        "restored": restored,
        "failures": failures,
        "coverage": coverage,
        "examples": examples,
    }


# --------------------------------------------------------------------------------------------------------- outputs


def plot_confusion(cm: list[list[int]], class_names: list[str], title: str, path: Path) -> None:
    """Write a confusion-matrix PNG (rows = true class, columns = predicted; counts annotated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = np.asarray(cm) if cm else np.zeros((len(class_names),) * 2, int)
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(1.0 + 0.6 * k, 0.8 + 0.6 * k), dpi=120)
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(k), class_names, rotation=45, ha="right", fontsize=7)
    ax.set_yticks(range(k), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=8)
    top = cm.max() if cm.size else 0
    for r in range(k):
        for c in range(k):
            ax.text(
                c,
                r,
                str(cm[r, c]),
                ha="center",
                va="center",
                fontsize=7,
                color="white" if top and cm[r, c] > top / 2 else "black",
            )
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_examples(examples: dict[str, torch.Tensor], path: Path) -> None:
    """Rows = conditions (clean, artifact, each method), columns = the first test images."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from datamodules.datasets import to_uint8

    rows = list(examples)
    cols = min(len(v) for v in examples.values())
    fig, axes = plt.subplots(len(rows), cols, figsize=(1.6 * cols, 1.6 * len(rows)), dpi=100, squeeze=False)
    for r, name in enumerate(rows):
        images = to_uint8(examples[name][:cols])
        for c in range(cols):
            axes[r][c].imshow(images[c])
            axes[r][c].set_xticks([])
            axes[r][c].set_yticks([])
        axes[r][0].set_ylabel(name, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _fmt(m: dict) -> tuple[str, str]:
    acc = f"{m['accuracy']:.3f} [{m['ci95'][0]:.3f}, {m['ci95'][1]:.3f}]"
    f1 = f"{m['macro_f1']:.3f} [{m['macro_f1_ci95'][0]:.3f}, {m['macro_f1_ci95'][1]:.3f}]"
    return acc, f1


def write_markdown(result: dict, path: Path) -> None:
    """The report table with bootstrap 95 % intervals."""
    lines = [
        "# Downstream tissue classification: clean vs artifact vs restored",
        "",
        f"Classifier checkpoint `{result['checkpoint']}`, selected on **{result['selected_on']}** accuracy "
        f"(val accuracy {result.get('val', {}).get('accuracy', float('nan')):.3f}).",
        f"Test images: {result['n_test']}; artifacts per image: 1-2 (mean coverage "
        f"{result['artifact_coverage']:.1%} of the tile). Intervals: percentile bootstrap, 95 %, "
        f"{result['n_boot']} resamples of the test images.",
        "",
        f"Labels: {result['labels']}",
        "",
        "| condition | n | accuracy [95 % CI] | macro-F1 [95 % CI] |",
        "|---|---:|---|---|",
    ]
    rows = [("clean", result["clean"]), ("artifact", result["artifact"])]
    rows += [(f"restored: {m}", v) for m, v in result["restored"].items()]
    for name, m in rows:
        lines.append(f"| {name} | {m['n']} | {' | '.join(_fmt(m))} |")
    if result["failures"]:
        lines += ["", f"Restoration failures ({len(result['failures'])} images skipped for their method):", ""]
        lines += [f"- {f['method']} on {f['image']}: {f['error']}" for f in result["failures"][:50]]
    lines += ["", "Confusion matrices: " + ", ".join(f"`{p}`" for p in result["figures"]), ""]
    path.write_text("\n".join(lines))


def _json_safe(obj):
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def run(args: DownstreamJob) -> dict[str, Any]:
    """The whole study; returns the content of ``downstream.json``.

    Raises:
        ValueError: Bad sampler settings, or sampler settings but no method with a sampler (before any model loads).
    """
    from lightning_modules.components.restorer import parse_method_specs
    from lightning_modules.methods import build_restorer

    spec, sampler_kwargs = resolve_sampler(args)
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    specs = parse_method_specs(args.methods, args.model)
    methods = list(specs)
    restorers = {}
    for m, model in specs.items():  # build first: a bad method name or missing --model fails before any training
        restorers[m] = build_restorer(m, model=model, device=args.device)
    sampler = _sampler_config(args, restorers, spec, sampler_kwargs)
    cli = build_recipe(args)
    dm, logger = cli.datamodule, cli.trainer.logger
    try:
        if args.classifier_checkpoint is not None:
            module, ckpt, val = load_classifier(args.classifier_checkpoint, dm), str(args.classifier_checkpoint), {}
        else:
            module, ckpt, val = train_classifier(cli)
        start = time.perf_counter()
        raw = evaluate(module, dm.datasets["test"], restorers, args=args, sampler_kwargs=sampler_kwargs)
        eval_seconds = time.perf_counter() - start
        k, stats = dm.num_classes, {"n_boot": args.n_boot, "seed": args.seed}
        spec = cli.model.hparams.net_spec or {}  # what the recipe built (build_classifier records it)
        labels = np.asarray(raw["labels"])
        result: dict[str, Any] = {
            "clean": condition_metrics(labels, raw["preds"]["clean"], k, **stats),
            "artifact": condition_metrics(labels, raw["preds"]["artifact"], k, **stats),
            "restored": {m: condition_metrics(r["labels"], r["preds"], k, **stats) for m, r in raw["restored"].items()},
            "checkpoint": ckpt,
            "selected_on": "val",
            "labels": dm.labels_description,
            "n_test": len(labels),
            "class_names": dm.class_names,
            "val": val,
            "artifact_coverage": float(np.mean(raw["coverage"])) if raw["coverage"] else float("nan"),
            "failures": raw["failures"],
            "n_boot": args.n_boot,
            "eval_seconds": eval_seconds,
            "config": {
                "data": args.data,
                "classifier": spec.get("name"),
                "recipe": recipe_args(args),
                "pretrained": str(spec.get("pretrained")),
                "stain_norm": spec.get("stain_norm"),
                "image_size": dm.image_size,
                "methods": methods,
                "quick": args.quick,
                "seed": args.seed,
                "sampler_file": sampler,
            },
            "figures": [],
        }
        conditions = [("clean", result["clean"]), ("artifact", result["artifact"])]
        conditions += [(f"restored_{m}", v) for m, v in result["restored"].items()]
        for name, m in conditions:
            fig = args.out / f"confusion_{name}.png"
            title = f"{name}: acc {m['accuracy']:.3f}, macro-F1 {m['macro_f1']:.3f} (n={m['n']})"
            plot_confusion(m["confusion_matrix"], dm.class_names, title, fig)
            result["figures"].append(fig.name)
        if raw["examples"]:
            plot_examples(raw["examples"], args.out / "examples.png")
        write_markdown(result, args.out / "downstream.md")
        result = _json_safe(result)
        (args.out / "downstream.json").write_text(json.dumps(result, indent=2))
        if args.wandb and logger is not None:
            _log_wandb(logger, result, args.out)
        return result
    finally:
        if args.wandb and logger is not None:
            import wandb

            wandb.finish()


def _sampler_config(args: DownstreamJob, restorers: dict, spec, sampler_kwargs: dict) -> dict:
    """Log which methods take the sampler settings; returns the sampler file record (with ``applied_to``)."""
    from lightning_modules.components.restorer import takes_sampler
    from lightning_modules.components.sampler_files import sampler_record

    applied = [m for m, r in restorers.items() if takes_sampler(r)]
    if args.sampler is not None or args.sampler_set:
        others = [m for m in restorers if m not in applied]
        log.info(
            "sampler settings %s apply to %s%s",
            args.sampler or "from --sampler-set",
            ", ".join(applied),
            f"; not to {', '.join(others)} (no sampler)" if others else "",
        )
    return {**sampler_record(args.sampler, spec, sampler_kwargs), "applied_to": applied}


def _log_wandb(logger, result: dict, out: Path) -> None:
    import wandb

    rows = [
        ["clean", result["clean"]["accuracy"], result["clean"]["macro_f1"], result["clean"]["n"]],
        ["artifact", result["artifact"]["accuracy"], result["artifact"]["macro_f1"], result["artifact"]["n"]],
    ]
    rows += [[f"restored/{m}", v["accuracy"], v["macro_f1"], v["n"]] for m, v in result["restored"].items()]
    run = logger.experiment
    run.log(
        {
            "downstream/table": wandb.Table(columns=["condition", "accuracy", "macro_f1", "n"], data=rows),
            **{f"downstream/{fig}": wandb.Image(str(out / fig)) for fig in result["figures"]},
        }
    )


def main(argv: list[str] | None = None) -> int:
    """Entry point; returns the process exit code."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    result = run(args)
    rows = {"clean": result["clean"], "artifact": result["artifact"], **result["restored"]}
    summary = ", ".join(
        f"{k} {'n/a' if v['accuracy'] is None else format(v['accuracy'], '.3f')}" for k, v in rows.items()
    )
    log.info("accuracy on %d test images: %s; wrote %s", result["n_test"], summary, args.out / "downstream.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
