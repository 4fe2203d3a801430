"""An exported restoration pipeline: one folder that restores tiles without the training code's checkpoint.

Layout (diffusers ``save_pretrained`` formats plus one JSON file)::

    PIPELINE_DIR/
      pipeline.json     # kind ("latent" or "pixel"), conditional (bool), denoiser class, sampler settings,
                        # scheduler name, image size
      unet/             # the denoiser in diffusers format (UNet2DModel, or any ModelMixin+ConfigMixin such as the
                        # pixel baseline's Swin-UNet); EMA weights when training used EMA
      scheduler/        # the training noise schedule (diffusers DDPMScheduler config)
      vae/              # diffusers AutoencoderKL (latent pipelines only)
      refiner/          # optional pixel refiner (components/refiner.py), named by pipeline.json's "refiner"
      tiny_vae/         # optional distilled tiny autoencoder (components/tiny_autoencoder.py), named by
                        # pipeline.json's "tiny_autoencoder"; used when SamplerConfig.autoencoder asks for it

``RestorationPipeline.from_pretrained(dir)`` loads it; ``restore(corrupted, artifact_mask)`` runs the regional
sampler (docs/METHOD.md sections 3-4) with the stored settings, any of which can be overridden per call (preset, step
count, scheduler, strength, ...). The same class serves pixel-space models (``kind="pixel"``: no VAE, factor 1) and
the mask-conditioned restorer (``conditional: true``: the denoiser also takes the latent mask and the corrupted
latent, see ``components/conditioning.py``). A pipeline with a ``refiner/`` runs it on the pasted-back restoration
and pastes its output back again (``SamplerConfig.refine=False`` skips it); :func:`attach_refiner` adds one to an
exported folder. With ``SamplerConfig.crop`` only a window around each tile's mask goes through the VAE and the
denoiser (``components/crop.py``); the refiner still sees the whole tile. ``SamplerConfig.autoencoder`` =
``"tiny"`` / ``"tiny-decoder"`` swaps in the folder's tiny autoencoder (:func:`attach_tiny_autoencoder`).
"""

import contextlib
import importlib
import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL, AutoencoderTiny, DDPMScheduler, UNet2DModel

from lightning_modules.components.autoencoders import LatentCodec
from lightning_modules.components.crop import RestoreFn, plan_windows, restore_windows
from lightning_modules.components.denoisers import predict
from lightning_modules.components.hardware import resolve_precision
from lightning_modules.components.refiner import PixelRefiner, load_refiner, save_refiner
from lightning_modules.components.regional_sampler import RegionalSampler, SamplerConfig, composite, restore
from lightning_modules.components.restorer import check_batch
from lightning_modules.components.schedulers import build_scheduler
from lightning_modules.components.tiny_autoencoder import (
    load_tiny_autoencoder,
    make_codec,
    save_tiny_autoencoder,
    teacher_fingerprint,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
REFINER_DIR = "refiner"
TINY_VAE_DIR = "tiny_vae"


def unet_callable(unet: torch.nn.Module) -> callable:
    """Wrap a denoiser (diffusers output with ``.sample`` or a plain tensor) as ``denoiser(x_t, t) -> output``."""

    def fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return predict(unet, x, t)

    return fn


def denoiser_downsampling(unet: torch.nn.Module) -> int:
    """How many input cells one cell of the denoiser's coarsest level covers along a side.

    diffusers' ``UNet2DModel`` halves ``len(block_out_channels) - 1`` times; the Swin-UNet needs
    ``patch_size * 2 ** (levels - 1)`` tokens times its window on every level; other networks count as 1.
    """
    cfg = getattr(unet, "config", None) or {}
    if "block_out_channels" in cfg:
        return 2 ** (len(cfg["block_out_channels"]) - 1)
    if "patch_size" in cfg and "depths" in cfg:
        return cfg["patch_size"] * 2 ** (len(cfg["depths"]) - 1) * cfg.get("window_size", 1)
    return 1


def class_path(obj) -> str:
    """``module.ClassName`` of an object's class."""
    return f"{type(obj).__module__}.{type(obj).__qualname__}"


def import_class(path: str) -> type:
    """Import ``module.ClassName``; errors name the path."""
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as err:
        raise ImportError(f"cannot import denoiser class {path!r} named in pipeline.json: {err}") from err


def save_pipeline(
    path: str | Path,
    *,
    unet: UNet2DModel,
    scheduler: DDPMScheduler,
    sampler: SamplerConfig,
    vae: AutoencoderKL | None = None,
    image_size: int = 256,
    scheduler_name: str = "ddpm",
    conditional: bool = False,
    residual: bool = False,
    refiner: PixelRefiner | None = None,
    extra: dict | None = None,
) -> Path:
    """Write a pipeline folder (atomically: built in a temp folder, then renamed over ``path``).

    Args:
        path: Output folder.
        unet: The denoiser (pass the EMA copy when training used EMA).
        scheduler: The training noise scheduler (its config defines the betas).
        sampler: Default sampler settings stored in ``pipeline.json``.
        vae: The autoencoder for latent pipelines; None for pixel-space pipelines.
        image_size: Tile edge in pixels the pipeline was trained for.
        scheduler_name: Default sampling scheduler (``"ddpm"``, ``"ddim"``, ``"dpmsolver++"``).
        conditional: The denoiser is a mask-conditioned restorer (input ``[z_t, mask, z_corrupted]``).
        residual: The conditional denoiser generates the latent change ``z - z_corrupted`` rather than ``z``.
        refiner: Optional pixel refiner, written to ``refiner/``.
        extra: Extra JSON-serialisable facts (training run, metrics) stored under ``"extra"``.

    Returns:
        The pipeline folder.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        _rmtree(tmp)
    tmp.mkdir(parents=True)
    unet.save_pretrained(tmp / "unet")
    scheduler.save_pretrained(tmp / "scheduler")
    if vae is not None:
        vae.save_pretrained(tmp / "vae")
    if refiner is not None:
        save_refiner(refiner, tmp / REFINER_DIR)
    meta = {
        "format_version": FORMAT_VERSION,
        "kind": "latent" if vae is not None else "pixel",
        "conditional": bool(conditional),
        "residual": bool(residual),
        "denoiser_class": class_path(unet),
        "image_size": image_size,
        "scheduler_name": scheduler_name,
        "sampler": sampler.to_dict(),
        "extra": extra or {},
    }
    if refiner is not None:
        meta["refiner"] = REFINER_DIR
    (tmp / "pipeline.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    if path.exists():
        _rmtree(path)
    os.replace(tmp, path)
    return path


def attach_refiner(path: str | Path, refiner: PixelRefiner, extra: dict | None = None) -> Path:
    """Add (or replace) the pixel refiner of an exported pipeline folder.

    The refiner is written to ``refiner.tmp`` and renamed over ``refiner/``, then ``pipeline.json`` is rewritten
    through a temporary file: an interrupted call leaves either the old pipeline or the new one.

    Raises:
        FileNotFoundError: ``path`` holds no ``pipeline.json``.
    """
    path = Path(path)
    meta_file = path / "pipeline.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a restoration pipeline (no pipeline.json); export it first")
    meta = json.loads(meta_file.read_text())
    save_refiner(refiner, path / REFINER_DIR, extra)
    meta["refiner"] = REFINER_DIR
    tmp = meta_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, meta_file)
    return path


def attach_tiny_autoencoder(path: str | Path, tiny_folder: str | Path) -> Path:
    """Copy a distilled tiny autoencoder into an exported latent pipeline folder (``tiny_vae/``), atomically.

    Args:
        path: The pipeline folder (must hold the VAE the tiny autoencoder was distilled from).
        tiny_folder: A folder written by ``save_tiny_autoencoder``.

    Raises:
        FileNotFoundError: ``path`` holds no ``pipeline.json`` or no ``vae/``, or ``tiny_folder`` is incomplete.
        ValueError: The tiny autoencoder was distilled from another VAE (its teacher fingerprint differs).
    """
    path = Path(path)
    meta_file = path / "pipeline.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{path} is not a restoration pipeline (no pipeline.json); export it first")
    if not (path / "vae").is_dir():
        raise FileNotFoundError(f"{path} has no vae/: a tiny autoencoder only goes into a latent pipeline")
    tiny, facts = load_tiny_autoencoder(tiny_folder)
    vae = AutoencoderKL.from_pretrained(path / "vae", local_files_only=True, low_cpu_mem_usage=False)
    _check_teacher(facts, vae, tiny_folder, path)
    save_tiny_autoencoder(tiny, path / TINY_VAE_DIR, facts)
    meta = json.loads(meta_file.read_text())
    meta["tiny_autoencoder"] = TINY_VAE_DIR
    tmp = meta_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp, meta_file)
    return path


def _check_teacher(facts: dict, vae: AutoencoderKL, tiny_folder: str | Path, pipeline: str | Path) -> None:
    """Refuse a tiny autoencoder whose recorded teacher is not this VAE (its latents would mean something else)."""
    if facts.get("teacher_fingerprint") != teacher_fingerprint(vae):
        raise ValueError(
            f"{tiny_folder} was distilled from another VAE ({facts.get('teacher', 'unknown teacher')}) than "
            f"{pipeline}'s vae/; distil it from this pipeline's VAE (--model.init_args.teacher {pipeline}/vae)"
        )


def _rmtree(path: Path) -> None:
    import shutil

    shutil.rmtree(path)


class RestorationPipeline(torch.nn.Module):
    """Regional restoration with an exported denoiser (and VAE); implements the ``Restorer`` interface.

    ``takes_sampler`` is True: :meth:`restore` takes SamplerConfig overrides and :meth:`make_sampler` builds the
    sampler they give.

    Args:
        unet: Denoiser predicting epsilon (or epsilon + variance channels).
        scheduler: Training noise scheduler (betas); sampling schedulers are derived from its config.
        sampler: Default sampler settings.
        vae: Autoencoder for latent pipelines (frozen); None for pixel space.
        scheduler_name: Default sampling scheduler name.
        precision: ``"fp32"``, ``"bf16"`` (fast on AMX / AVX-512 BF16 CPUs and recent GPUs), ``"fp16"`` (GPU) autocast,
            or ``"auto"`` (bf16 where the device computes it natively, else fp32; ``components/hardware.py``).
        name: Method name used in reports.
        image_size: Tile edge in pixels the pipeline was trained for.
        conditional: The denoiser takes ``[z_t, latent_mask, z_corrupted]`` (``components/conditioning.py``).
        residual: The conditional denoiser generates the latent change, not the clean latent.
        refiner: Optional pixel refiner run on the pasted-back restoration (``components/refiner.py``).
        tiny_vae: Optional tiny autoencoder distilled from ``vae`` (``components/tiny_autoencoder.py``), used when
            ``SamplerConfig.autoencoder`` is ``"tiny"`` or ``"tiny-decoder"``.
    """

    takes_sampler = True

    def __init__(
        self,
        unet: torch.nn.Module,
        scheduler: DDPMScheduler,
        sampler: SamplerConfig,
        vae: AutoencoderKL | None = None,
        *,
        scheduler_name: str = "ddpm",
        precision: str = "fp32",
        name: str = "latent",
        image_size: int = 256,
        conditional: bool = False,
        residual: bool = False,
        refiner: PixelRefiner | None = None,
        tiny_vae: AutoencoderTiny | None = None,
    ) -> None:
        super().__init__()
        if precision not in (*PRECISIONS, "auto"):
            raise ValueError(f"precision must be one of {sorted(PRECISIONS)} or 'auto', got {precision!r}")
        self.unet = unet.eval().requires_grad_(False)
        self.codec = LatentCodec(vae) if vae is not None else None
        self.noise_scheduler = scheduler
        self.sampler_config = sampler
        self.scheduler_name = scheduler_name
        self.precision = precision
        self.name = name
        self.image_size = image_size
        self.conditional = bool(conditional)
        self.residual = bool(residual)
        if self.residual and not self.conditional:
            raise ValueError("a residual pipeline needs a conditional denoiser")
        self.refiner = refiner.eval().requires_grad_(False) if refiner is not None else None
        if tiny_vae is not None and self.codec is None:
            raise ValueError("a tiny autoencoder needs a latent pipeline (a VAE)")
        self.tiny_vae = tiny_vae.eval().requires_grad_(False) if tiny_vae is not None else None
        self.nfe = 0
        self._compiled_unet: torch.nn.Module | None = None
        self.performance = {"channels_last": False, "compile": None}

    def accelerate(self, *, channels_last: bool = False, compile: str | None = None) -> "RestorationPipeline":
        """Performance options that leave the restoration's definition unchanged (floating-point rounding aside).

        Args:
            channels_last: Store the convolution weights of the denoiser, the autoencoders and the refiner in
                ``torch.channels_last`` (NHWC), the layout oneDNN on CPUs and cuDNN tensor cores prefer.
            compile: ``torch.compile`` the denoiser with this backend (``"inductor"``, the default one; ``"eager"``
                only traces, for tests); ``None`` = off. Crop windows of new sizes trigger recompiles.

        Returns:
            ``self``.
        """
        if channels_last:
            for module in (self.unet, self.codec, self.tiny_vae, self.refiner):
                if module is not None:
                    module.to(memory_format=torch.channels_last)
        # a plain attribute, not a submodule: the compiled wrapper shares the denoiser's parameters
        object.__setattr__(self, "_compiled_unet", torch.compile(self.unet, backend=compile) if compile else None)
        self.performance = {"channels_last": bool(channels_last), "compile": compile}
        return self

    @property
    def factor(self) -> int:
        """Pixels per latent cell (8 for the kl-f8 VAE, 1 in pixel space)."""
        return self.codec.factor if self.codec is not None else 1

    @property
    def unit(self) -> int:
        """Pixels every side of a restored tile (or crop window) must be a multiple of: factor x UNet downsampling."""
        return self.factor * denoiser_downsampling(self.unet)

    @classmethod
    def from_pretrained(
        cls, path: str | Path, *, device: str | torch.device = "cpu", precision: str = "fp32", name: str | None = None
    ) -> "RestorationPipeline":
        """Load a folder written by :func:`save_pipeline`; errors name the missing or damaged file.

        Raises:
            FileNotFoundError: No ``pipeline.json``, or a part (``unet/``, ``scheduler/``, ``vae/``) or its weights
                missing.
            ValueError: ``pipeline.json`` is not valid JSON, lacks a key or has another format version, or a part's
                files cannot be loaded (truncated weights, bad config).
        """
        path = Path(path)
        meta_file = path / "pipeline.json"
        fix = "re-export it with `python -m experiments.export` (or `make demo`)"
        if not meta_file.is_file():
            raise FileNotFoundError(
                f"{path} is not a restoration pipeline (no pipeline.json); export one with "
                "`python -m experiments.export` or the demo (`make demo`)"
            )
        try:
            meta = json.loads(meta_file.read_text())
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise ValueError(f"{meta_file} is not valid JSON ({err}); the pipeline folder is damaged: {fix}") from err
        missing = [k for k in ("kind", "sampler") if not isinstance(meta, dict) or k not in meta]
        if missing:
            raise ValueError(f"{meta_file} lacks {', '.join(missing)}; the pipeline folder is damaged: {fix}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_file}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")

        def load(part: str, loader, **kwargs):
            folder = path / part
            if not any((folder / name).is_file() for name in ("config.json", "scheduler_config.json")):
                raise FileNotFoundError(f"{folder} is missing or has no config, so the pipeline is incomplete: {fix}")
            try:
                return loader(folder, local_files_only=True, **kwargs)
            except Exception as err:  # diffusers and safetensors raise OSError, ValueError or their own types
                text = " ".join(str(err).split())[:300] or type(err).__name__
                kind = FileNotFoundError if "no file named" in text.lower() else ValueError
                raise kind(f"{folder}: cannot load ({text}); {fix}") from err

        unet_cls = import_class(meta.get("denoiser_class", "diffusers.UNet2DModel"))
        # low_cpu_mem_usage=False: the fast path needs `accelerate`, which the suite does not depend on
        unet = load("unet", unet_cls.from_pretrained, low_cpu_mem_usage=False)
        scheduler = load("scheduler", DDPMScheduler.from_pretrained)
        vae = None
        if meta["kind"] == "latent":
            vae = load("vae", AutoencoderKL.from_pretrained, low_cpu_mem_usage=False)
        conditional = bool(meta.get("conditional", False))
        tiny_vae = None
        if meta.get("tiny_autoencoder") and vae is not None:
            try:
                tiny_vae, facts = load_tiny_autoencoder(path / meta["tiny_autoencoder"])
            except (FileNotFoundError, ValueError) as err:
                raise type(err)(f"{err}; the pipeline folder is damaged: {fix}") from err
            _check_teacher(facts, vae, path / meta["tiny_autoencoder"], path)
        refiner = None
        if meta.get("refiner"):
            try:
                refiner = load_refiner(path / meta["refiner"])
            except (FileNotFoundError, ValueError, KeyError) as err:
                raise type(err)(f"{err}; the pipeline folder is damaged: {fix}") from err
        try:
            sampler = SamplerConfig.from_dict(meta["sampler"])
        except (TypeError, ValueError) as err:
            raise ValueError(f"{meta_file}: bad sampler settings ({err}); {fix}") from err
        pipe = cls(
            unet,
            scheduler,
            sampler,
            vae,
            scheduler_name=meta.get("scheduler_name", "ddpm"),
            precision=precision,
            name=name or ("pixel" if meta["kind"] != "latent" else "latent-conditional" if conditional else "latent"),
            image_size=meta.get("image_size", 256),
            conditional=conditional,
            residual=bool(meta.get("residual", False)),
            refiner=refiner,
            tiny_vae=tiny_vae,
        )
        return pipe.to(device)

    def save_pretrained(self, path: str | Path) -> Path:
        """Write this pipeline to a folder (see :func:`save_pipeline`), its tiny autoencoder included."""
        out = save_pipeline(
            path,
            unet=self.unet,
            scheduler=self.noise_scheduler,
            sampler=self.sampler_config,
            vae=self.codec.vae if self.codec is not None else None,
            image_size=self.image_size,
            scheduler_name=self.scheduler_name,
            conditional=self.conditional,
            residual=self.residual,
            refiner=self.refiner,
        )
        if self.tiny_vae is not None:
            tmp = Path(out) / (TINY_VAE_DIR + ".src")
            save_tiny_autoencoder(self.tiny_vae, tmp, {"teacher_fingerprint": teacher_fingerprint(self.codec.vae)})
            attach_tiny_autoencoder(out, tmp)
            _rmtree(tmp)
        return out

    def _autocast(self, device: torch.device):
        dtype = PRECISIONS[resolve_precision(self.precision, device)]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=dtype)

    def make_sampler(self, *, preset: str | None = None, scheduler: str | None = None, **overrides) -> RegionalSampler:
        """A sampler with the stored settings, optionally switched to another preset/scheduler or overridden."""
        config = self.sampler_config
        if preset is not None and preset != config.preset:
            config = SamplerConfig.from_preset(preset)
        overrides = {k: v for k, v in overrides.items() if v is not None}
        if overrides:
            config = replace(config, **overrides)
        name = scheduler or ("ddpm" if config.preset == "reference" else self.scheduler_name)
        return RegionalSampler(build_scheduler(name, dict(self.noise_scheduler.config)), config)

    @torch.no_grad()
    def restore(
        self,
        corrupted: torch.Tensor,
        artifact_mask: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
        preset: str | None = None,
        scheduler: str | None = None,
        **overrides,
    ) -> torch.Tensor:
        """Restore a batch of tiles.

        Args:
            corrupted: (B, 3, H, W) in [-1, 1]; H and W divisible by the VAE factor.
            artifact_mask: (B, 1, H, W) in {0, 1}, 1 = artifact.
            generator: Seeds every random draw (same seed, same output on CPU).
            preset: ``"repaint"`` or ``"reference"`` to switch presets for this call.
            scheduler: Sampling scheduler name for this call.
            **overrides: SamplerConfig fields, e.g. ``num_steps=25``, ``strength=0.8``, ``refine=False``,
                ``crop=True`` (restore only a window around each mask, ``components/crop.py``: tiles with an empty
                mask come back unchanged without a model call, and :attr:`nfe` is 0 when no tile needed one).

        Returns:
            (B, 3, H, W) in [-1, 1].
        """
        check_batch(corrupted, artifact_mask)
        device = next(self.unet.parameters()).device
        corrupted, artifact_mask = corrupted.to(device), artifact_mask.to(device)
        sampler = self.make_sampler(preset=preset, scheduler=scheduler, **overrides)
        config = sampler.config
        with self._autocast(device):
            if config.crop and config.paste_back:
                windows = plan_windows(
                    artifact_mask,
                    margin=config.crop_margin,
                    unit=self.unit,
                    factor=self.factor,
                    max_fraction=config.crop_max_fraction,
                )
                out = restore_windows(self._latent_stage(sampler, generator), corrupted, artifact_mask, windows)
                active = [i for i, window in enumerate(windows) if window is not None]
            else:
                out = self._latent_stage(sampler, generator)(corrupted, artifact_mask)
                active = list(range(corrupted.shape[0]))
            if self.refiner is not None and config.refine and active:
                out = self._refine_tiles(corrupted, out, artifact_mask, config, active)
        self.nfe = sampler.nfe
        return out.float()

    def _latent_stage(self, sampler: RegionalSampler, generator: torch.Generator | None) -> RestoreFn:
        """The regional sampler's restore with this pipeline's VAE (identity in pixel space) and denoiser bound.

        Returns:
            ``fn(corrupted (B, 3, h, w) in [-1, 1], mask (B, 1, h, w) in {0, 1}) -> restored (B, 3, h, w)``.
        """
        if self.codec is not None:
            codec = make_codec(sampler.config.autoencoder, self.codec, self.tiny_vae, f"pipeline {self.name!r}")
            encode = lambda x: codec.encode(x, generator=generator)  # noqa: E731
            decode = codec.decode
        else:
            encode = decode = lambda x: x  # noqa: E731

        def run(corrupted: torch.Tensor, artifact_mask: torch.Tensor) -> torch.Tensor:
            return restore(
                encode,
                decode,
                sampler,
                unet_callable(self.unet if self._compiled_unet is None else self._compiled_unet),
                corrupted,
                artifact_mask,
                factor=self.factor,
                generator=generator,
                conditional=self.conditional,
                residual=self.residual,
            )

        return run

    def _refine_tiles(
        self, corrupted: torch.Tensor, coarse: torch.Tensor, mask: torch.Tensor, config: SamplerConfig, tiles: list[int]
    ) -> torch.Tensor:
        """:meth:`_refine` on the whole tiles listed in ``tiles`` (all of them: one call on the batch as it is)."""
        if len(tiles) == corrupted.shape[0]:
            return self._refine(corrupted, coarse, mask, config)
        index = torch.tensor(tiles, device=corrupted.device)
        out = coarse.clone()
        out[index] = self._refine(corrupted[index], coarse[index], mask[index], config).to(out.dtype)
        return out

    def _refine(
        self, corrupted: torch.Tensor, coarse: torch.Tensor, mask: torch.Tensor, config: SamplerConfig
    ) -> torch.Tensor:
        """Run the refiner on the latent stage's restoration and paste the result back (clean pixels bit-exact).

        The paste is hard (no feather): the refiner sees the input around the mask and is trained to meet it at the
        border, so blending the artifact's own rim back in would only undo part of its work.
        """
        refined = self.refiner(corrupted, coarse, mask).clamp(-1, 1).to(corrupted.dtype)
        if not config.paste_back:
            return refined
        return composite(refined, corrupted, mask, 0)


def _pipeline_factory(preset: str, method: str):
    def factory(*, model: str | Path | None = None, device: str = "cpu", precision: str = "fp32", **_):
        if model is None:
            raise ValueError(f"method {method!r} needs --model PIPELINE_DIR")
        pipe = RestorationPipeline.from_pretrained(model, device=device, precision=precision)
        if pipe.codec is None:
            raise ValueError(
                f"method {method!r} needs a latent pipeline; {model} is a pixel-space one (use method artifusion)"
            )
        if method == "latent-conditional" and not pipe.conditional:
            raise ValueError(
                f"{model} holds the unconditional (paper) denoiser; method 'latent-conditional' needs a pipeline "
                "exported from a conditional run (`python -m experiments.export conditional`, or the demo's "
                "outputs/demo/pipeline_conditional)"
            )
        if preset != pipe.sampler_config.preset:
            pipe.sampler_config = SamplerConfig.from_preset(preset)
        # "latent" is whatever latent pipeline --model holds; its name in reports says which one it is
        pipe.name = pipe.name if method == "latent" else method
        return pipe

    return factory


# the factories of the latent methods, named in the method table (lightning_modules/methods.py)
_latent = _pipeline_factory("repaint", "latent")
_latent_conditional = _pipeline_factory("repaint", "latent-conditional")
_latent_reference = _pipeline_factory("reference", "latent-reference")
