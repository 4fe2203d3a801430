"""Two-process DDP fit on CPU (gloo) of one training recipe on real bundled tiles; run by tests/test_ddp_cpu.py.

Usage: python tests/ddp_train_script.py OUT_DIR RECIPE

Recipes (tiny networks, 3 optimiser steps): ``latent`` (the paper's denoiser on clean tiles), ``conditional``
(``latent-conditional`` on restoration batches with artifacts synthesised online: each rank corrupts its own share),
``vae`` (the autoencoder), ``artifusion`` (the pixel Swin-UNet), ``cyclegan`` (manual optimisation, two
optimisers), ``segmenter`` (the artifact segmenter) and ``classifier`` (the downstream tissue classifier).

Each rank writes OUT_DIR/rank{r}.pt with its state dict (weights, EMA copies, buffers except BatchNorm statistics),
the per-device batch size and the global step, so the test can check that the ranks stayed identical without a
collective of its own.
"""

import os
import sys

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from datamodules.classification import BundledTissueDataModule  # noqa: E402
from datamodules.restoration import ArtifactRestorationDataModule, CleanTileDataModule  # noqa: E402
from lightning_modules.autoencoder_module import AutoencoderModule  # noqa: E402
from lightning_modules.classifier import TissueClassifierModule  # noqa: E402
from lightning_modules.components.autoencoders import build_autoencoder  # noqa: E402
from lightning_modules.components.classifiers import build_classifier  # noqa: E402
from lightning_modules.components.denoisers import build_unet  # noqa: E402
from lightning_modules.components.segmenters import build_segmenter  # noqa: E402
from lightning_modules.components.swin_unet import build_swin_unet  # noqa: E402
from lightning_modules.conditional_latent import ConditionalLatentDiffusionModule  # noqa: E402
from lightning_modules.cyclegan import CycleGANModule  # noqa: E402
from lightning_modules.latent_diffusion import LatentDiffusionModule  # noqa: E402
from lightning_modules.pixel_diffusion import PixelDiffusionModule  # noqa: E402
from lightning_modules.segmenter import ArtifactSegmenterModule  # noqa: E402


def build(recipe: str, vae_dir: str):
    """``(module, datamodule)`` of one recipe."""
    optimizer = lambda params: torch.optim.AdamW(params, lr=1e-3)  # noqa: E731
    data = {"tile_size": 64, "stride": 64, "batch_size": 4, "num_workers": 0, "max_tiles": {"train": 16, "val": 4}}
    if recipe == "conditional":
        model = ConditionalLatentDiffusionModule(
            denoiser=build_unet("tiny", sample_size=8, in_channels=9, out_channels=4),
            autoencoder=vae_dir,
            ema_decay=0.9,
            optimizer=optimizer,
        )
        return model, ArtifactRestorationDataModule(**data)
    if recipe == "latent":
        model = LatentDiffusionModule(
            denoiser=build_unet("tiny", sample_size=8), autoencoder=vae_dir, ema_decay=0.9, optimizer=optimizer
        )
        return model, CleanTileDataModule(**data)
    if recipe == "vae":
        return AutoencoderModule(vae="tiny", optimizer=optimizer, kl_weight=1e-6), CleanTileDataModule(**data)
    if recipe == "artifusion":
        return PixelDiffusionModule(build_swin_unet("tiny"), ema_decay=0.9), CleanTileDataModule(**data)
    if recipe == "cyclegan":
        return CycleGANModule(ngf=8, n_blocks=2, ndf=8, n_layers=3), ArtifactRestorationDataModule(**data)
    if recipe == "segmenter":
        model = ArtifactSegmenterModule(build_segmenter("tiny"), optimizer=optimizer)
        return model, ArtifactRestorationDataModule(**data)
    if recipe == "classifier":
        spec = {"name": "test_efficientnet", "num_classes": 5, "pretrained": False, "stain_norm": True}
        model = TissueClassifierModule(build_classifier(**spec), num_classes=5, net_spec=spec, optimizer=optimizer)
        return model, BundledTissueDataModule(image_size=32, batch_size=4, max_per_class={"train": 4, "val": 2})
    raise SystemExit(f"unknown recipe {recipe!r}")


def main(out: str, recipe: str = "latent") -> None:
    torch.set_num_threads(1)
    vae_dir = os.path.join(out, "vae")
    if "LOCAL_RANK" not in os.environ:  # the launcher process (rank 0) writes the frozen VAE before ranks start
        torch.manual_seed(0)
        build_autoencoder("tiny").save_pretrained(vae_dir)
    L.seed_everything(0, workers=True)
    model, dm = build(recipe, vae_dir)
    # CycleGAN's alternating G/D steps each leave the other networks unused (CycleGANModule.setup checks this)
    strategy = "ddp_find_unused_parameters_true" if recipe == "cyclegan" else "ddp"
    trainer = L.Trainer(
        accelerator="cpu",
        strategy=strategy,
        devices=2,
        max_steps=3,
        max_epochs=4,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=1,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    rank = trainer.global_rank
    record = {
        # BatchNorm running statistics are rank-local between forwards (DDP broadcasts rank 0's at the start of the
        # next forward), so after the last step they legitimately differ; everything else must be identical
        "state": {
            k: v.detach().cpu()
            for k, v in model.state_dict().items()
            if not k.endswith(("running_mean", "running_var", "num_batches_tracked"))
        },
        "batch_size_per_device": dm.batch_size_per_device,
        "global_step": trainer.global_step,
        "world_size": trainer.world_size,
    }
    if recipe in ("latent", "conditional"):
        record |= {"n_averaged": int(model.denoiser_ema.n_averaged), "codec_training": model.codec.training}
    torch.save(record, os.path.join(out, f"rank{rank}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # avoids an occasional abort at exit (ENVIRONMENT.md)


if __name__ == "__main__":
    main(*sys.argv[1:3])
