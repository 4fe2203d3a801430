"""Restore a folder of tiles with an exported pipeline (or any registered method).

Example:
    python -m experiments.restore --model outputs/demo/pipeline --images tiles/ --masks masks/ --out restored/
    python -m experiments.restore --model DIR --images tiles/ --masks authors_masks/ --mask-convention keep ...
    python -m experiments.restore --model DIR --images tiles/ --masks auto \
        --mask-model outputs/demo/artifact_segmenter --out restored/

Images and masks pair by relative path without the suffix (``tiles/a/t.png`` with ``masks/a/t.jpg``) and outputs keep
that layout (``restored/a/t.png``); two files that would pair with one mask or write one output are refused. Masks are
binary, 255 (or 1) = artifact and 0 = clean; ``--mask-convention keep`` reads the authors' RePaint-style masks (255 =
keep, 0 = artifact). Every tile's size is checked against what the method takes before it reaches the model: a latent
pipeline needs sides that are multiples of the VAE factor times the UNet's total downsampling, so other sizes are
reflect-padded, restored and cropped back (clean pixels stay bit-exact), images larger than the pipeline's tile size
are restored tile-wise, and tiles too small to pad are skipped with the reason.

``--masks auto --mask-model DIR`` needs no masks: an exported artifact segmenter (``python -m experiments.export
segmenter``; the demo writes ``outputs/demo/artifact_segmenter``) predicts each whole image's mask (probability above
``--mask-threshold``, default the segmenter's), which is written next to its output as ``OUT/<relpath>.mask.png``
(255 = artifact, the pixels the method may change) and used for the restoration.

``--sampler FILE`` takes the sampler settings from a file (``experiments/configs/sampler/*.yaml``: one per preset
and per sampler ablation row, see ``lightning_modules/components/sampler_files.py``); ``--steps``, ``--preset``,
``--scheduler``, ``--strength`` and ``--sampler-set KEY=VALUE`` (any other ``SamplerConfig`` field) win over it.
Methods without a sampler (identity, telea, ns, cyclegan) refuse both.

Outputs are PNGs written atomically. ``OUT/restore_manifest.json`` records the method, the model's fingerprint, the
sampler overrides (and the sampler file's path and content), seed, batch size, mask convention (with ``--masks
auto``: the segmenter's fingerprint and threshold), precision and code version: a rerun with the same settings
resumes (zero-byte or undecodable outputs are redone), other settings are refused unless you pass ``--force`` (redo
every file) or a new ``--out``. A bad image or mask is skipped and the run goes on; the summary counts restored,
resumed and skipped files, with the reasons (also in ``OUT/skipped.tsv``). Exit status: 0 when files were restored or
resumed, 1 when nothing was (no pair, or every file skipped), 2 for bad arguments, 130 for Ctrl-C.

Determinism: pairs (sorted by relative path, or with ``--order mask-size`` by mask bounding-box area, largest first)
are batched in fixed groups of ``--batch-size``, and each model call draws
its noise from a generator seeded with ``--seed`` and the relative paths of the tiles in it, so equal inputs and
settings give byte-identical outputs and a resumed run equals an uninterrupted one (a group with a missing output is
recomputed as a whole; only the missing files are written).
"""

import argparse
import hashlib
import importlib.metadata
import json
import logging
import os
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from datamodules.datasets import to_mask_tensor, to_tensor, to_uint8
from datamodules.imageio import (
    ImageReadError,
    list_images,
    read_image,
    read_mask,
    write_image_atomic,
    write_mask_atomic,
)
from experiments.cli_errors import (
    CLIError,
    check_device,
    check_input_folder,
    check_output_folder,
    check_range,
    debug_requested,
    one_line,
    run_main,
)
from experiments.jobs import from_namespace
from experiments.scoring import index_images
from lightning_modules.components.pipeline import denoiser_downsampling
from lightning_modules.components.restorer import Restorer, takes_sampler
from lightning_modules.components.sampler_files import (
    SamplerSpec,
    check_overrides,
    load_sampler_file,
    merge_cli_overrides,
    parse_sampler_sets,
    sampler_kwargs,
    sampler_record,
)
from lightning_modules.components.schedulers import scheduler_names
from lightning_modules.components.segmenters import load_segmenter, read_segmenter_meta, segment_images
from lightning_modules.methods import available_restorers, build_restorer, method_spec

log = logging.getLogger("experiments.restore")

MANIFEST = "restore_manifest.json"
MANIFEST_FORMAT = 1
ROOT = Path(__file__).resolve().parents[1]


@dataclass
class RestoreJob:
    """One folder restoration: the flags of ``python -m experiments.restore`` as typed values (same names, defaults).

    Attributes:
        images: Folder of corrupted tiles (recursive).
        masks: Folder of masks with the same relative paths, or ``Path("auto")`` to predict them with ``mask_model``.
        out: Output folder (PNGs with the images' relative paths, the manifest, ``skipped.tsv``).
        method: Name in the method table (``lightning_modules/methods.py``).
        model: Model folder of the method (a pipeline folder for the diffusion methods).
        mask_model: Exported artifact segmenter for ``masks=auto``.
        mask_threshold: Probability threshold in (0, 1) for ``masks=auto`` (``None``: the segmenter's).
        steps: Sampling steps (``None``: the pipeline's).
        preset: Sampler preset, ``"repaint"`` or ``"reference"``.
        scheduler: ``"ddpm"``, ``"ddim"`` or ``"dpmsolver++"``.
        strength: In (0, 1]: start at strength x T.
        sampler: Sampler settings file (``experiments/configs/sampler/*.yaml``); the fields above win over it.
        sampler_set: ``KEY=VALUE`` overrides of single ``SamplerConfig`` fields (YAML values), applied last.
        batch_size: Tiles per model call (part of the settings a resume must match).
        channels_last: Pipelines only: convolution weights in ``torch.channels_last`` (part of the settings).
        compile: Pipelines only: ``torch.compile`` backend of the denoiser (``None``: off; part of the settings).
        order: ``"name"`` (relative path) or ``"mask-size"`` (largest mask bounding box first, so tiles of similar
            crop windows share batches; part of the settings).
        seed: Seed of the per-batch noise generators.
        device: Torch device.
        precision: Autocast precision, ``"fp32"``, ``"bf16"`` or ``"fp16"``.
        mask_convention: ``"artifact"`` (255 = artifact) or ``"keep"`` (the authors' 255 = keep).
        force: Redo every output whatever settings made the ones in ``out``.
        debug: Raise on a failing batch instead of skipping its tiles.
    """

    images: Path
    masks: Path
    out: Path
    method: str = "latent"
    model: Path | None = None
    mask_model: Path | None = None
    mask_threshold: float | None = None
    steps: int | None = None
    preset: str | None = None
    scheduler: str | None = None
    strength: float | None = None
    sampler: Path | None = None
    sampler_set: list[str] = field(default_factory=list)
    batch_size: int = 4
    order: str = "name"
    channels_last: bool = False
    compile: str | None = None
    seed: int = 0
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    precision: str = "fp32"
    mask_convention: str = "artifact"
    force: bool = False
    debug: bool = False


def parse_args(argv: list[str] | None = None) -> RestoreJob:
    """Command-line arguments as a :class:`RestoreJob`."""
    p = argparse.ArgumentParser(prog="python -m experiments.restore", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", type=Path, help="exported pipeline folder (methods latent, latent-reference, ...)")
    p.add_argument("--method", default="latent", help=f"restoration method: {', '.join(available_restorers())}")
    p.add_argument("--images", type=Path, required=True, help="folder of corrupted tiles (recursive)")
    p.add_argument(
        "--masks",
        type=Path,
        required=True,
        help="folder of masks with the same relative paths (suffixes may differ), or 'auto' to predict "
        "them with --mask-model (a folder named auto: pass ./auto)",
    )
    p.add_argument("--mask-model", type=Path, help="exported artifact segmenter folder for --masks auto")
    p.add_argument(
        "--mask-threshold",
        type=float,
        help="--masks auto: artifact probability threshold in (0, 1) (default: the segmenter's)",
    )
    p.add_argument("--out", type=Path, required=True, help="output folder (PNGs with the images' relative paths)")
    p.add_argument("--steps", type=int, help="sampling steps, >= 1 (default: the pipeline's)")
    p.add_argument("--preset", choices=("repaint", "reference"), help="sampler preset (default: the pipeline's)")
    p.add_argument("--scheduler", choices=scheduler_names(), help="sampling scheduler")
    p.add_argument("--strength", type=float, help="in (0, 1]: start at strength x T (1 = full regeneration)")
    p.add_argument(
        "--sampler",
        type=Path,
        metavar="FILE",
        help="sampler settings file (experiments/configs/sampler/*.yaml); --steps, --preset, --scheduler, "
        "--strength and --sampler-set win over it",
    )
    p.add_argument(
        "--sampler-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="set one SamplerConfig field (YAML value), e.g. --sampler-set feather=4; repeatable",
    )
    p.add_argument("--batch-size", type=int, default=4, help="tiles per model call, >= 1 (part of the settings)")
    p.add_argument(
        "--channels-last",
        action="store_true",
        help="pipelines: convolution weights in channels_last (NHWC) memory format (part of the settings)",
    )
    p.add_argument(
        "--compile",
        metavar="BACKEND",
        help="pipelines: torch.compile the denoiser with this backend, e.g. inductor (part of the settings)",
    )
    p.add_argument(
        "--order",
        choices=ORDERS,
        default="name",
        help="batch tiles by relative path (name) or largest mask bounding box first (mask-size: with crop or "
        "crop_decode, tiles of equal window size then share one model call); part of the settings",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument(
        "--precision",
        choices=("auto", "fp32", "bf16", "fp16"),
        default="fp32",
        help="autocast precision (auto: bf16 where the device computes it natively, else fp32)",
    )
    p.add_argument(
        "--mask-convention",
        choices=("artifact", "keep"),
        default="artifact",
        help="artifact: 255 (or 1) = artifact, 0 = clean (this suite); keep: 255 = keep, 0 = artifact "
        "(the authors'); masks with any other values are skipped",
    )
    p.add_argument("--force", action="store_true", help="redo every output, whatever settings made the ones in --out")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors (or LAF_DEBUG=1)")
    return from_namespace(RestoreJob, p.parse_args(argv))


def uses_model(method: str) -> bool:
    """Whether a method loads a model folder (its ``needs_model`` in the method table)."""
    return method_spec(method).needs_model


def has_sampler(method: str, model: Path | None) -> bool:
    """Whether a method restores with an exported pipeline (and so takes sampler settings), judged before loading.

    The method takes sampler overrides (``takes_sampler`` in the method table) and ``model`` is a folder with a
    ``pipeline.json`` (``save_pipeline``); classical methods and CycleGAN take none.
    """
    return method_spec(method).takes_sampler and model is not None and (Path(model) / "pipeline.json").is_file()


def sampler_requested(args: RestoreJob) -> bool:
    """Whether ``--sampler`` or ``--sampler-set`` was given."""
    return args.sampler is not None or bool(args.sampler_set)


def resolve_sampler(args: RestoreJob) -> tuple[SamplerSpec | None, dict]:
    """The ``--sampler`` file's content and the effective ``restore`` keyword arguments (file, then the flags).

    Raises:
        CLIError: An unreadable or invalid file, a bad ``--sampler-set``, or settings that contradict each other.
    """
    path = args.sampler
    try:
        spec = None if path is None else load_sampler_file(path)
        fields = merge_cli_overrides(
            {"num_steps": args.steps, "strength": args.strength}, parse_sampler_sets(args.sampler_set)
        )
        kwargs = sampler_kwargs(spec, {"preset": args.preset, "scheduler": args.scheduler, **fields})
        source = "sampler settings" + (f" of {path} and the command line" if path is not None else "")
        check_overrides(
            {k: v for k, v in kwargs.items() if k not in ("preset", "scheduler")},
            source=source,
            base=kwargs.get("preset"),
        )
    except ValueError as err:
        raise CLIError(one_line(err)) from None
    return spec, kwargs


def check_sampler_method(args: RestoreJob) -> None:
    """Refuse ``--sampler`` / ``--sampler-set`` for a method that has no sampler (classical methods, CycleGAN)."""
    if sampler_requested(args) and not has_sampler(args.method, args.model):
        raise CLIError(
            f"--method {args.method} has no diffusion sampler, so --sampler and --sampler-set do not "
            "apply; drop them, or use a method with an exported pipeline (latent, latent-conditional, "
            "latent-reference, artifusion)"
        )


def auto_masks(args: RestoreJob) -> bool:
    """Whether ``--masks auto``: masks are predicted by ``--mask-model`` (``./auto`` is a folder named auto)."""
    return str(args.masks) == "auto"


def check_mask_model(args: RestoreJob) -> None:
    """``--masks auto`` needs ``--mask-model DIR`` holding an exported segmenter, and only it takes one."""
    mask_model, threshold = args.mask_model, args.mask_threshold
    if not auto_masks(args):
        if mask_model is not None or threshold is not None:
            raise CLIError(
                "--mask-model and --mask-threshold are for --masks auto (predicted masks); drop them, or "
                "pass --masks auto instead of a mask folder"
            )
        return
    if mask_model is None:
        raise CLIError(
            "--masks auto needs --mask-model DIR (an artifact segmenter from python -m experiments.export "
            "segmenter, e.g. outputs/demo/artifact_segmenter), or pass a folder of masks"
        )
    if not mask_model.is_dir():
        raise CLIError(
            f"--mask-model {mask_model} is not a folder; pass one written by python -m experiments.export segmenter"
        )
    try:
        read_segmenter_meta(mask_model)
    except (OSError, ValueError) as err:
        raise CLIError(f"--mask-model {mask_model}: {one_line(err)}") from None
    if threshold is not None and not 0 < threshold < 1:
        raise CLIError(f"--mask-threshold must be in (0, 1), got {threshold}")


def validate_args(args: RestoreJob) -> tuple[SamplerSpec | None, dict]:
    """Check every value before a model is loaded; raises CLIError naming the flag and what to pass.

    Returns:
        The ``--sampler`` file's content (or None) and the effective sampler overrides (see :func:`resolve_sampler`).
    """
    methods = available_restorers()
    if args.method not in methods:
        raise CLIError(f"--method {args.method!r} is unknown; choose one of {', '.join(methods)}")
    check_range("--steps", args.steps, low=1)
    check_range("--strength", args.strength, low=0, high=1, low_open=True)
    check_range("--batch-size", args.batch_size, low=1)
    if (args.channels_last or args.compile) and not has_sampler(args.method, args.model):
        raise CLIError(
            f"--method {args.method} does not restore with a pipeline folder, so --channels-last and --compile "
            "do not apply (they need --model PIPELINE_DIR)"
        )
    if args.order not in ORDERS:
        raise CLIError(f"--order {args.order!r} is unknown; choose one of {', '.join(ORDERS)}")
    if args.order == "mask-size" and auto_masks(args):
        raise CLIError("--order mask-size needs mask files; with --masks auto the masks are predicted per batch")
    check_device(args.device)
    check_input_folder(args.images, "--images")
    check_mask_model(args)
    if not auto_masks(args):
        check_input_folder(args.masks, "--masks")
    if uses_model(args.method):
        if args.model is None:
            raise CLIError(f"--method {args.method} needs --model DIR (a folder from python -m experiments.export)")
        if not args.model.is_dir():
            raise CLIError(f"--model {args.model} is not a folder; pass one written by python -m experiments.export")
    out = args.out.resolve()
    for flag, folder in (("--images", args.images), ("--masks", None if auto_masks(args) else args.masks)):
        if folder is not None and out == folder.resolve():
            raise CLIError(f"--out {args.out} is the {flag} folder: outputs would replace inputs; pass another folder")
    sampler = resolve_sampler(args)
    check_sampler_method(args)
    return sampler


def pair_files(
    images: Path, masks: Path | None, *, exclude: Path | None = None
) -> tuple[list[tuple[str, Path, Path | None]], list[tuple[str, str]]]:
    """Pair images with masks by relative path without the suffix.

    Args:
        images: Folder of images (recursive).
        masks: Folder of masks (recursive); ``None`` for predicted masks: every image, with mask ``None``.
        exclude: A folder whose files are ignored (the output folder when it lies inside ``images``).

    Returns:
        ``[(name, image, mask)]`` sorted by name (``a/t`` for ``a/t.png``), and ``(file, reason)`` for every
        unmatched file.

    Raises:
        CLIError: Two files of one folder share a name (``t.png`` and ``t.jpg``); the message lists them.
    """
    try:
        image_index = index_images(images, exclude=exclude)
        if masks is None:
            return [(key, image_index[key], None) for key in sorted(image_index)], []
        mask_index = index_images(masks, exclude=exclude)
    except ValueError as err:
        raise CLIError(str(err)) from None
    by_stem: dict[str, list[str]] = {}
    for key in mask_index:
        by_stem.setdefault(PurePosixPath(key).name, []).append(key)
    pairs, skipped = [], []
    for key in sorted(image_index):
        if key in mask_index:
            pairs.append((key, image_index[key], mask_index[key]))
            continue
        elsewhere = [k for k in by_stem.get(PurePosixPath(key).name, []) if k not in image_index]
        hint = f" (masks pair by relative path; {elsewhere[0]} is in another folder)" if elsewhere else ""
        skipped.append((str(image_index[key]), f"no mask {key}.* in {masks}{hint}"))
    skipped += [
        (str(mask_index[k]), f"mask without an image {k}.* in {images}")
        for k in sorted(set(mask_index) - set(image_index))
    ]
    return pairs, skipped


ORDERS = ("name", "mask-size")


def order_by_mask_size(pairs: list[tuple[str, Path, Path | None]], convention: str) -> list[tuple[str, Path, Path]]:
    """Pairs sorted by their mask's bounding-box area, largest first (ties by relative path).

    With ``crop`` or ``crop_decode`` a tile's window follows its mask's bounding box, and one model call takes one
    window size, so neighbours in this order share calls and the largest (slowest) work starts first. Masks that
    cannot be read sort last; their chunk reports them as usual.
    """

    def area(mask_path: Path) -> int:
        try:
            mask = read_mask(mask_path, convention=convention)
        except ImageReadError:
            return -1
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        return 0 if rows.size == 0 else int((rows[-1] - rows[0] + 1) * (cols[-1] - cols[0] + 1))

    areas = {key: area(mask_path) for key, _, mask_path in pairs}
    return sorted(pairs, key=lambda pair: (-areas[pair[0]], pair[0]))


def load_pair(img_path: Path, mask_path: Path | None, convention: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Read one image (uint8 RGB) and its mask (bool, True = artifact); raises ImageReadError naming the file.

    Without a mask file (``--masks auto``: the mask is predicted later) the mask is ``None``.
    """
    img = read_image(img_path)
    return img, None if mask_path is None else read_mask(mask_path, convention=convention, shape=img.shape[:2])


def mask_output_path(out: Path, key: str) -> Path:
    """Where ``--masks auto`` writes the predicted mask of the image ``key``: ``OUT/<key>.mask.png``."""
    return out / f"{key}.mask.png"


def check_mask_names(pairs: list[tuple[str, Path, Path | None]]) -> None:
    """Refuse an image whose output would be another image's predicted mask (``t.mask.png`` next to ``t.png``)."""
    keys = {key for key, *_ in pairs}
    clash = sorted(key for key in keys if key.endswith(".mask") and key[: -len(".mask")] in keys)
    if clash:
        raise CLIError(
            f"with --masks auto, {clash[0]}.png would overwrite the predicted mask of "
            f"{clash[0][: -len('.mask')]}; rename it (or restore it with a mask folder)"
        )


def load_mask_model(args: RestoreJob):
    """The ``--mask-model`` segmenter on ``--device`` and its threshold; CLIError when it cannot be loaded."""
    try:
        net = load_segmenter(args.mask_model, device=args.device)
    except (OSError, ValueError, RuntimeError, KeyError) as err:
        raise CLIError(f"--mask-model {args.mask_model}: {one_line(err)[:300]}") from None
    return net, (net.config.threshold if args.mask_threshold is None else args.mask_threshold)


def tile_geometry(restorer) -> tuple[int, int | None]:
    """``(unit, tile)``: sides must be multiples of ``unit`` px; images larger than ``tile`` px go window by window.

    For a pipeline the unit is the VAE factor (1 in pixel space) times the denoiser's total downsampling: diffusers'
    ``UNet2DModel`` halves ``len(block_out_channels) - 1`` times, the Swin-UNet needs ``patch_size * 2 ** (levels - 1)``
    tokens times its window on every level. The tile is the size the pipeline was trained for. The CycleGAN generator
    downsamples twice (unit 4); classical methods take any size (unit 1).
    """
    unet = getattr(restorer, "unet", None)
    if unet is not None and hasattr(restorer, "factor"):
        unit = restorer.factor * denoiser_downsampling(unet)
        image_size = getattr(restorer, "image_size", None)
        return unit, (-(-image_size // unit) * unit if image_size else None)
    if type(restorer).__name__ == "CycleGANRestorer":
        return 4, None
    return getattr(restorer, "factor", 1), None


def plan_windows(height: int, width: int, unit: int, tile: int | None) -> list[tuple[int, int, int, int]]:
    """``(y, x, h, w)`` windows covering an image: the whole image, or ``tile``-sized windows for larger images.

    Windows start every ``tile`` px and the last one in each direction ends at the border (overlapping its
    neighbour; in the overlap the later window wins), so no window is smaller than the image or ``tile``.

    Raises:
        ImageReadError: A side is too small to reflect-pad to a multiple of ``unit`` (it needs more than ``unit / 2``
            px, since a reflection adds at most ``side - 1`` px).
    """

    def starts(n: int) -> tuple[list[int], int]:
        if tile is None or n <= tile:
            return [0], n
        s = list(range(0, n - tile + 1, tile))
        return (s if s[-1] == n - tile else [*s, n - tile]), tile

    ys, wh = starts(height)
    xs, ww = starts(width)
    if (-wh % unit) >= wh or (-ww % unit) >= ww:
        raise ImageReadError(
            f"image is {width}x{height} px (WxH), too small for this method: sides are reflect-padded to multiples "
            f"of {unit} px, which needs at least {unit // 2 + 1} px; use larger tiles or a classical method (telea)"
        )
    return [(y, x, wh, ww) for y in ys for x in xs]


@dataclass
class _Item:
    """One window of one image, padded to the method's unit."""

    key: str
    window: tuple[int, int, int, int]
    image: torch.Tensor
    mask: torch.Tensor

    @property
    def id(self) -> str:
        y, x, h, w = self.window
        return f"{self.key}@{y},{x},{h},{w}"


def batch_seed(seed: int, ids: list[str]) -> int:
    """A 63-bit seed from ``--seed`` and the relative paths (window ids) of the tiles restored in one call."""
    digest = hashlib.sha256("\n".join([str(seed), *ids]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def code_version() -> str:
    """``git <HEAD>`` of this checkout, else the installed package version, else pyproject's version."""
    try:
        proc = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=10)
        if proc.returncode == 0 and proc.stdout.strip():
            return f"git {proc.stdout.strip()}"
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return f"package {importlib.metadata.version('latent-artifusion-suite')}"
    except importlib.metadata.PackageNotFoundError:
        pass
    try:
        return f"package {tomllib.loads((ROOT / 'pyproject.toml').read_text())['project']['version']}"
    except (OSError, KeyError, tomllib.TOMLDecodeError):
        return "unknown"


def model_fingerprint(folder: Path) -> str:
    """SHA-256 (first 20 hex digits) of every file's relative path and content in a model folder (hidden ones aside)."""
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        rel = p.relative_to(folder)
        if not p.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        h.update(rel.as_posix().encode() + b"\0")
        with p.open("rb") as f:
            for block in iter(lambda f=f: f.read(1 << 20), b""):
                h.update(block)
        h.update(b"\0")
    return h.hexdigest()[:20]


def run_settings(args: RestoreJob, spec: SamplerSpec | None = None) -> dict:
    """What makes the outputs what they are: a rerun into the same ``--out`` must match all of it to resume.

    With ``--masks auto`` the segmenter's fingerprint and threshold are part of it (both ``None`` with mask files,
    so manifests written before ``--masks auto`` existed still match); so are the ``--sampler`` file's content
    (``spec``) and the ``--sampler-set`` fields (``None`` without them, likewise).
    """
    auto = auto_masks(args)
    threshold = None
    if auto:
        threshold = args.mask_threshold
        threshold = float(read_segmenter_meta(args.mask_model)["threshold"]) if threshold is None else threshold
    return {
        "format": MANIFEST_FORMAT,
        "method": args.method,
        "model_fingerprint": model_fingerprint(args.model) if uses_model(args.method) else None,
        "sampler": {
            "steps": args.steps,
            "strength": args.strength,
            "preset": args.preset,
            "scheduler": args.scheduler,
            "file": None if spec is None else spec.to_dict(),
            "set": parse_sampler_sets(args.sampler_set) or None,
        },
        "seed": args.seed,
        "batch_size": args.batch_size,
        "order": None if args.order == "name" else args.order,
        "channels_last": args.channels_last or None,
        "compile": args.compile,
        "mask_convention": args.mask_convention,
        "mask_model_fingerprint": model_fingerprint(args.mask_model) if auto else None,
        "mask_threshold": threshold,
        "precision": args.precision,
        "code_version": code_version(),
    }


def check_manifest(out: Path, settings: dict, force: bool) -> dict:
    """Refuse to resume into ``out`` unless its manifest has ``settings``; returns the earlier runs' timing."""
    path = out / MANIFEST
    if force:
        return {}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            raise CLIError(f"{path} is unreadable; use a new --out, or --force to redo every file") from None
        before, now = _flat(old), _flat(settings)
        # keys of either side count (a sampler file's fields exist in one manifest only), earlier runs' extras not
        keys = [*now, *(k for k in before if k not in now and k.split(".")[0] in settings)]
        diffs = [f"{k} {before.get(k)!r} -> {now.get(k)!r}" for k in keys if before.get(k) != now.get(k)]
        if diffs:
            raise CLIError(
                f"{out} holds outputs of other settings ({'; '.join(diffs)}); use a new --out, or --force "
                "to redo every file with these settings"
            )
        return old.get("timing", {})
    existing = list_images(out)
    if existing:
        raise CLIError(
            f"{out} already holds {len(existing)} image(s) but no {MANIFEST}, so their settings are "
            "unknown; use a new --out, or --force to redo every file"
        )
    return {}


def _flat(d: dict, prefix: str = "") -> dict:
    """``{"a": {"b": 1}}`` -> ``{"a.b": 1}``."""
    out = {}
    for k, v in d.items() if isinstance(d, dict) else ():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def output_ok(out_path: Path, image_path: Path) -> bool:
    """Whether ``out_path`` is a non-empty, fully decodable image of the input's size."""
    try:
        if out_path.stat().st_size == 0:
            return False
        with Image.open(out_path) as im:
            im.load()
            size = im.size
    except (OSError, ValueError, SyntaxError):
        return False
    try:
        with Image.open(image_path) as src:
            return src.size == size
    except (OSError, ValueError, SyntaxError):
        return True


def _reason(err: Exception, *paths: Path) -> tuple[str, str]:
    """``(file, problem)`` from an ImageReadError, without repeating the file name in the problem."""
    text = str(err)
    for p in map(str, paths):
        if text.startswith(f"{p}: "):
            return p, text[len(p) + 2 :]
    return str(paths[0]), text


def restore_folder(args: RestoreJob, restorer: Restorer | None = None) -> dict:
    """Restore every paired file of ``args.images`` that has no valid output in ``args.out`` yet.

    Args:
        args: What to restore, how and where.
        restorer: An already built restorer to use instead of building ``args.method`` from ``args.model`` (a
            caller restoring several folders with one model); ``args.method`` and ``args.model`` still name it in
            the manifest, so pass the ones it was built from.

    Returns:
        ``{"done": tiles written now, "resumed": tiles already there, "skipped": [(file, reason)], "pairs": paired
        files, "seconds": wall time, "nfe": NFE per tile, "timing": {"seconds", "tiles"} over every run of these
        settings, "sampler": {"file", "spec", "overrides"} (the sampler file and the overrides restore got)}``.

    Raises:
        CLIError: A bad argument, nothing paired, an ambiguous name, an output folder of other settings, or Ctrl-C.
    """
    debug = args.debug or debug_requested([])
    spec, sampler_kw = validate_args(args)
    auto = auto_masks(args)
    pairs, skipped = pair_files(args.images, None if auto else args.masks, exclude=args.out)
    if auto:
        check_mask_names(pairs)
    if not pairs and auto:
        raise CLIError(f"nothing to restore: {args.images} holds no images", code=1)
    if not pairs:
        why = f"; e.g. {skipped[0][0]}: {skipped[0][1]}" if skipped else f" ({args.images} holds no images)"
        raise CLIError(
            f"nothing to restore: no image in {args.images} has a mask with the same relative path in "
            f"{args.masks}{why}",
            code=1,
        )
    if args.order == "mask-size":
        pairs = order_by_mask_size(pairs, args.mask_convention)
    check_output_folder(args.out)
    settings = run_settings(args, spec)
    timing = check_manifest(args.out, settings, args.force)
    if restorer is None:
        restorer = build_restorer(args.method, model=args.model, device=args.device, precision=args.precision)
    segmenter = load_mask_model(args) if auto else None
    if sampler_requested(args) and not takes_sampler(restorer):
        raise CLIError(f"--method {args.method} has no diffusion sampler, so --sampler and --sampler-set do not apply")
    if args.channels_last or args.compile:
        restorer.accelerate(channels_last=args.channels_last, compile=args.compile)
    kwargs = sampler_kw if takes_sampler(restorer) else {}
    nfe = getattr(restorer, "nfe", 0)
    if takes_sampler(restorer):
        try:
            nfe = restorer.make_sampler(**kwargs).expected_nfe()
        except ValueError as err:
            raise CLIError(f"sampler settings rejected: {one_line(err)}") from None
    unit, tile = tile_geometry(restorer)
    timing = {"seconds": float(timing.get("seconds", 0.0)), "tiles": int(timing.get("tiles", 0))}
    record = sampler_record(args.sampler, spec, kwargs)
    manifest = {
        **settings,
        "model": str(args.model) if settings["model_fingerprint"] else None,
        "mask_model": str(args.mask_model) if auto else None,
        "sampler_file": record,
        "timing": timing,
    }
    _write_json(args.out / MANIFEST, manifest)

    stats = {"done": 0, "resumed": 0, "computed": 0, "padded": 0, "windowed": 0}
    start = time.perf_counter()
    bar = tqdm(total=len(pairs), desc=f"restoring ({args.method})", unit="tile")
    try:
        for c in range(0, len(pairs), args.batch_size):
            chunk = pairs[c : c + args.batch_size]
            need = [
                args.force
                or not output_ok(args.out / f"{key}.png", img)
                or (auto and not output_ok(mask_output_path(args.out, key), img))
                for key, img, _ in chunk
            ]
            if any(need):
                _restore_chunk(restorer, chunk, need, args, unit, tile, kwargs, stats, skipped, debug, segmenter)
            else:
                stats["resumed"] += len(chunk)
            bar.update(len(chunk))
    except KeyboardInterrupt:
        raise CLIError(
            f"interrupted after writing {stats['done']} output(s) to {args.out}; finished files are "
            "complete, rerun the same command to resume",
            code=130,
        ) from None
    finally:
        bar.close()
        elapsed = time.perf_counter() - start
        if stats["computed"]:
            timing = {"seconds": timing["seconds"] + elapsed, "tiles": timing["tiles"] + stats["computed"]}
            _write_json(args.out / MANIFEST, {**manifest, "timing": timing})
    _print_summary(args, stats, skipped, elapsed, nfe, unit, tile)
    return {
        "done": stats["done"],
        "resumed": stats["resumed"],
        "skipped": skipped,
        "pairs": len(pairs),
        "seconds": elapsed,
        "nfe": nfe,
        "timing": timing,
        "sampler": record,
    }


def _predict_masks(segmenter, loaded: list, args: RestoreJob, skipped: list, stats: dict, debug: bool) -> list:
    """``--masks auto``: predict the masks of one group's images and write the needed ones to OUT/<key>.mask.png.

    Every loaded image of the group is predicted (not only the needed ones), so that a resumed run restores exactly
    what an uninterrupted one did. Returns ``loaded`` with the predicted masks in place of ``None``.
    """
    net, threshold = segmenter
    try:
        probs = segment_images(net, [rgb for _, _, rgb, *_ in loaded], batch_size=args.batch_size)
    except Exception as err:  # like a failing restoration: costs this group only
        if debug:
            raise
        for _, img_path, *_, needed in loaded:
            if needed:
                skipped.append((str(img_path), f"mask prediction failed ({type(err).__name__}: {one_line(err)[:200]})"))
            else:
                stats["resumed"] += 1
        return []
    out = []
    for (key, img_path, rgb, _, windows, needed), prob in zip(loaded, probs, strict=True):
        mask = prob > threshold
        if needed:
            path = mask_output_path(args.out, key)
            try:
                write_mask_atomic(path, mask)
            except OSError as err:
                raise CLIError(
                    f"cannot write {path} ({err.strerror or one_line(err)}); free space or choose another "
                    "--out, then rerun to resume",
                    code=1,
                ) from None
        out.append((key, img_path, rgb, mask, windows, needed))
    return out


def _restore_chunk(restorer, chunk, need, args, unit, tile, kwargs, stats, skipped, debug, segmenter=None) -> None:
    """Read one fixed group of pairs, restore its windows in batches and write the missing outputs.

    ``segmenter`` (``--masks auto``): ``(network, threshold)`` that predicts the group's masks after reading.
    """
    loaded = []
    for (key, img_path, mask_path), needed in zip(chunk, need, strict=True):
        try:
            rgb, mask = load_pair(img_path, mask_path, args.mask_convention)
            windows = plan_windows(*rgb.shape[:2], unit, tile)
        except ImageReadError as err:
            if needed:
                skipped.append(_reason(err, img_path, *([mask_path] if mask_path is not None else [])))
            else:  # unreadable now, but its output from an earlier run is there
                stats["resumed"] += 1
            continue
        loaded.append((key, img_path, rgb, mask, windows, needed))
    if not any(needed for *_, needed in loaded):
        stats["resumed"] += len(loaded)
        return
    if segmenter is not None:
        loaded = _predict_masks(segmenter, loaded, args, skipped, stats, debug)
    groups: dict[tuple[int, int], list[_Item]] = {}
    for key, _, rgb, mask, windows, _ in loaded:
        for y, x, h, w in windows:
            pad = ((0, -h % unit), (0, -w % unit))
            img = np.pad(rgb[y : y + h, x : x + w], (*pad, (0, 0)), mode="reflect")
            msk = np.pad(mask[y : y + h, x : x + w], pad, mode="reflect")
            groups.setdefault(img.shape[:2], []).append(_Item(key, (y, x, h, w), to_tensor(img), to_mask_tensor(msk)))
    wanted = {key for key, *_, needed in loaded if needed}
    results: dict[str, dict] = {}
    failed: dict[str, str] = {}
    computed: set[str] = set()
    for items in groups.values():
        for s in range(0, len(items), args.batch_size):
            batch = items[s : s + args.batch_size]
            if not any(it.key in wanted for it in batch):
                continue
            generator = torch.Generator().manual_seed(batch_seed(args.seed, [it.id for it in batch]))
            try:
                out = restorer.restore(
                    torch.stack([it.image for it in batch]),
                    torch.stack([it.mask for it in batch]),
                    generator=generator,
                    **kwargs,
                )
            except Exception as err:  # one failing batch must not cost the other tiles
                if debug:
                    raise
                for it in batch:
                    failed[it.key] = f"restoration failed ({type(err).__name__}: {one_line(err)[:200]})"
                continue
            computed.update(it.key for it in batch)
            for it, rgb in zip(batch, to_uint8(out), strict=True):
                results.setdefault(it.key, {})[it.window] = rgb
    for key, img_path, rgb, _, windows, needed in loaded:
        if key in failed:
            if needed:
                skipped.append((str(img_path), failed[key]))
            else:
                stats["resumed"] += 1
            continue
        if not needed:
            stats["resumed"] += 1
            continue
        canvas = np.empty_like(rgb)
        for y, x, h, w in windows:  # in window order: where windows overlap, the later one wins
            canvas[y : y + h, x : x + w] = results[key][(y, x, h, w)][:h, :w]
        try:
            write_image_atomic(args.out / f"{key}.png", canvas)
        except OSError as err:
            raise CLIError(
                f"cannot write {args.out / f'{key}.png'} ({err.strerror or one_line(err)}); free space or "
                "choose another --out, then rerun to resume",
                code=1,
            ) from None
        stats["done"] += 1
        stats["padded"] += any(h % unit or w % unit for _, _, h, w in windows)
        stats["windowed"] += len(windows) > 1
    stats["computed"] += len(computed - set(failed))


def _print_summary(args, stats, skipped, elapsed, nfe, unit, tile) -> None:
    """Console summary: restored, resumed and skipped counts, each skipped file with its reason, ``skipped.tsv``."""
    done, resumed = stats["done"], stats["resumed"]
    rate = done / elapsed if elapsed > 0 else float("nan")
    if resumed:
        print(f"resuming: {resumed} outputs already in {args.out} (same settings) were kept")
    print(
        f"restored {done} tile(s) in {elapsed:.1f} s ({rate:.3f} tiles/s, {nfe} NFE per tile); {resumed} resumed, "
        f"{len(skipped)} skipped"
    )
    if stats["padded"]:
        print(f"  {stats['padded']} tile(s) reflect-padded to multiples of {unit} px for the model and cropped back")
    if stats["windowed"]:
        print(f"  {stats['windowed']} image(s) larger than {tile} px restored in {tile} px windows")
    tsv = args.out / "skipped.tsv"
    if skipped:
        print(f"skipped {len(skipped)} file(s):")
        for path, why in skipped[:50]:
            print(f"  {path}: {why}")
        if len(skipped) > 50:
            print(f"  ... and {len(skipped) - 50} more in {tsv}")
        tsv.write_text("".join(f"{p}\t{w}\n" for p, w in skipped))
    elif tsv.exists():
        tsv.unlink()


def _main(argv: list[str]) -> int:
    args = parse_args(argv)
    stats = restore_folder(args)
    if stats["done"] + stats["resumed"] == 0:
        raise CLIError(
            f"nothing restored: all {stats['pairs']} paired file(s) were skipped (reasons above and in "
            f"{args.out / 'skipped.tsv'})",
            code=1,
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status (0 done, 1 nothing restored, 2 bad arguments, 130 Ctrl-C)."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return run_main(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
