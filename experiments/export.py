"""Export a trained checkpoint to the folder the other commands load (no training code needed afterwards).

    python -m experiments.export vae --ckpt runs/.../best.ckpt --out outputs/vae_klf8 [--sources bundled]
    python -m experiments.export latent --ckpt runs/.../last.ckpt --out outputs/pipeline [--steps 50 --feather 2]
    python -m experiments.export conditional --ckpt runs/.../last.ckpt --out outputs/pipeline_conditional
    python -m experiments.export artifusion --ckpt runs/.../last.ckpt --out outputs/artifusion [--paper-sampler]
    python -m experiments.export cyclegan --ckpt runs/.../last.ckpt --out outputs/cyclegan
    python -m experiments.export segmenter --ckpt runs/.../best.ckpt --out outputs/artifact_segmenter
    python -m experiments.export refiner --ckpt runs/.../last.ckpt --out outputs/pipeline_conditional
    python -m experiments.export tiny-vae --ckpt runs/.../last.ckpt --out outputs/demo/pipeline

- ``vae``: re-estimates the latent scaling factor once on clean validation tiles of ``--sources`` (1 / std of the
  latents) and writes a diffusers ``AutoencoderKL`` folder for ``--model.init_args.autoencoder``.
- ``latent``: writes a restoration pipeline (EMA denoiser when trained with EMA, the training noise schedule, the
  VAE the checkpoint was trained with, sampler defaults) for ``experiments.restore --model``.
- ``conditional``: the same for the mask-conditioned restorer (``latent-conditional``), with its own sampler defaults
  (``--steps``/``--decode`` default to the measured best, docs/METHOD.md section 9).
- ``artifusion``: a pixel pipeline; ``--paper-sampler`` stores the paper's RePaint preset (250 steps, jump 10,
  10 resamples: 2410 network evaluations), otherwise ``--steps`` plain steps.
- ``cyclegan``: the artifact -> clean generator for the ``cyclegan`` restorer.
- ``segmenter``: the artifact segmenter for ``restore_slide --masks auto --mask-model``.
- ``refiner``: the pixel refiner of ``latent-conditional``, ADDED to the existing pipeline folder ``--out``
  (``refiner/`` + a ``refiner`` entry in its ``pipeline.json``).
- ``tiny-vae``: the distilled tiny autoencoder; ADDED (``tiny_vae/``) to ``--out`` when it is a pipeline folder whose
  VAE is the teacher (refused otherwise), else written as a folder of its own (docs/TINY_VAE.md).
"""

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from experiments.jobs import from_namespace
from lightning_modules.components.schedulers import scheduler_names

KINDS = ("vae", "latent", "conditional", "artifusion", "cyclegan", "segmenter", "refiner", "tiny-vae")


@dataclass
class ExportJob:
    """One export: the flags of ``python -m experiments.export`` as typed values (same names and defaults).

    Attributes:
        kind: One of :data:`KINDS`.
        ckpt: Lightning checkpoint written by ``experiments.train``.
        out: Export folder (for ``refiner``: the pipeline folder it is added to; for ``tiny-vae``: a pipeline folder
            of the teacher VAE it is added to, or a new folder for the tiny autoencoder alone).
        steps: Default sampling steps stored in a pipeline (``None``: latent/artifusion 50, conditional measured).
        decode: How sampled latents become pixels (``None``: the method's default).
        feather: Paste-back seam width in pixels.
        scheduler: Default scheduler stored in a latent pipeline.
        image_size: Tile side of the pipeline (segmenter: its tile size).
        paper_sampler: ArtiFusion: store the 2410-NFE RePaint preset.
        sources: VAE: tiles for the latent scaling factor.
        scale_tiles: VAE: number of tiles for the scaling factor.
    """

    kind: str
    ckpt: Path
    out: Path
    steps: int | None = None
    decode: str | None = None
    feather: int = 2
    scheduler: str = "ddim"
    image_size: int = 256
    paper_sampler: bool = False
    sources: str = "bundled"
    scale_tiles: int = 64


def parse_args(argv: list[str] | None = None) -> ExportJob:
    """Command-line arguments as an :class:`ExportJob`."""
    p = argparse.ArgumentParser(prog="python -m experiments.export", description=__doc__.split("\n\n")[0])
    p.add_argument("kind", choices=KINDS)
    p.add_argument("--ckpt", type=Path, required=True, help="Lightning checkpoint written by experiments.train")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument(
        "--steps",
        type=int,
        help="default sampling steps stored in the pipeline (latent/artifusion: 50, conditional: the measured default)",
    )
    p.add_argument(
        "--decode",
        choices=("full", "delta", "od-delta", "adaptive"),
        help="how sampled latents become pixels (latent: full, conditional: the measured default)",
    )
    p.add_argument("--feather", type=int, default=2, help="paste-back seam width in pixels (into the artifact)")
    p.add_argument("--scheduler", default="ddim", choices=scheduler_names())
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--paper-sampler", action="store_true", help="artifusion: store the 2410-NFE RePaint preset")
    p.add_argument("--sources", default="bundled", help="vae: tiles for the scaling factor (bundled, folder, slide)")
    p.add_argument("--scale-tiles", type=int, default=64, help="vae: number of tiles for the scaling factor")
    return from_namespace(ExportJob, p.parse_args(argv))


def export(args: ExportJob) -> Path:
    """Load the checkpoint for ``args.kind`` and write its export folder."""
    if not args.ckpt.is_file():
        raise SystemExit(f"{args.ckpt} is not a file: pass a checkpoint written by experiments.train")
    from lightning_modules.components.regional_sampler import SamplerConfig
    from lightning_modules.conditional_latent import CONDITIONAL_SAMPLER

    defaults = CONDITIONAL_SAMPLER if args.kind == "conditional" else {"num_steps": 50, "decode": "full"}
    chosen = {"num_steps": args.steps, "decode": args.decode}
    sampler = SamplerConfig.from_preset(
        "repaint", feather=args.feather, **{**defaults, **{k: v for k, v in chosen.items() if v is not None}}
    )
    if args.kind == "vae":
        from datamodules.restoration import CleanTileDataModule
        from lightning_modules.autoencoder_module import AutoencoderModule

        module = AutoencoderModule.load_from_checkpoint(args.ckpt, map_location="cpu", weights_only=False)
        dm = CleanTileDataModule(
            sources=args.sources,
            tile_size=args.image_size,
            stride=args.image_size,
            augment=False,
            num_workers=0,
            max_tiles={"val": args.scale_tiles},
        )
        val = dm.make_dataset("val")
        images = torch.stack([val[i]["clean"] for i in range(len(val))])
        return Path(module.export(args.out, images=images))
    if args.kind in ("latent", "conditional"):
        from lightning_modules.conditional_latent import ConditionalLatentDiffusionModule
        from lightning_modules.latent_diffusion import LatentDiffusionModule

        cls = ConditionalLatentDiffusionModule if args.kind == "conditional" else LatentDiffusionModule
        module = cls.load_from_checkpoint(args.ckpt, map_location="cpu", weights_only=False)
        try:
            return module.export(
                args.out,
                sampler=sampler,
                image_size=args.image_size,
                scheduler_name=args.scheduler,
                extra={"checkpoint": str(args.ckpt)},
            )
        except ValueError as err:
            raise SystemExit(f"{args.ckpt}: {err}") from err
    if args.kind == "artifusion":
        from lightning_modules.pixel_diffusion import PixelDiffusionModule

        module = PixelDiffusionModule.load_from_checkpoint(args.ckpt, map_location="cpu", weights_only=False)
        return module.export(args.out, sampler=None if args.paper_sampler else sampler, image_size=args.image_size)
    if args.kind == "refiner":
        from lightning_modules.components.pipeline import attach_refiner
        from lightning_modules.refiner_module import RefinerModule

        if not (args.out / "pipeline.json").is_file():
            raise SystemExit(
                f"{args.out} is not a pipeline folder (no pipeline.json); the refiner is added to the "
                "exported latent-conditional pipeline it was trained on"
            )
        module = RefinerModule.load_for_export(args.ckpt)
        return attach_refiner(args.out, module.net, {"checkpoint": str(args.ckpt)})
    if args.kind == "tiny-vae":
        return _export_tiny_vae(args)
    if args.kind == "segmenter":
        from lightning_modules.segmenter import ArtifactSegmenterModule

        module = ArtifactSegmenterModule.load_for_export(args.ckpt)
        return module.export(args.out, extra={"checkpoint": str(args.ckpt), "tile_size": args.image_size})
    from lightning_modules.cyclegan import CycleGANModule

    module = CycleGANModule.load_from_checkpoint(args.ckpt, map_location="cpu", weights_only=False)
    return module.export(args.out)


def _export_tiny_vae(args: ExportJob) -> Path:
    """Write the distilled tiny autoencoder; into ``args.out``'s pipeline (``tiny_vae/``) when it is one."""
    import tempfile

    from lightning_modules.components.pipeline import attach_tiny_autoencoder
    from lightning_modules.tiny_autoencoder_module import TinyAutoencoderModule

    try:
        module = TinyAutoencoderModule.load_from_checkpoint(args.ckpt, map_location="cpu", weights_only=False)
    except FileNotFoundError as err:
        raise SystemExit(f"{args.ckpt}: its teacher VAE cannot be loaded ({err})") from err
    extra = {"checkpoint": str(args.ckpt)}
    if not (args.out / "pipeline.json").is_file():
        return Path(module.export(args.out, extra=extra))
    with tempfile.TemporaryDirectory(dir=args.out) as tmp:
        folder = module.export(Path(tmp) / "tiny_vae", extra=extra)
        try:
            return attach_tiny_autoencoder(args.out, folder)
        except (FileNotFoundError, ValueError) as err:
            raise SystemExit(str(err)) from err


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    out = export(parse_args(argv))
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
