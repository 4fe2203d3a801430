"""Two-process DDP fit on CPU (gloo) of a latent denoiser on real bundled tiles; run by tests/test_ddp_cpu.py.

Usage: python tests/ddp_train_script.py OUT_DIR [latent|conditional]

``latent`` trains the paper's denoiser on clean tiles; ``conditional`` trains ``latent-conditional`` on restoration
batches with artifacts synthesised online (each rank corrupts its own share of the tiles).

Each rank writes OUT_DIR/rank{r}.pt with its denoiser and EMA weights, EMA counter, per-device batch size and the
global step, so the test can check that the ranks stayed identical without any collective in the test itself.
"""

import os
import sys

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from datamodules.restoration import ArtifactRestorationDataModule, CleanTileDataModule  # noqa: E402
from lightning_modules.components.autoencoders import build_autoencoder  # noqa: E402
from lightning_modules.components.denoisers import build_unet  # noqa: E402
from lightning_modules.conditional_latent import ConditionalLatentDiffusionModule  # noqa: E402
from lightning_modules.latent_diffusion import LatentDiffusionModule  # noqa: E402


def main(out: str, recipe: str = "latent") -> None:
    torch.set_num_threads(1)
    vae_dir = os.path.join(out, "vae")
    if "LOCAL_RANK" not in os.environ:  # the launcher process (rank 0) writes the frozen VAE before ranks start
        torch.manual_seed(0)
        build_autoencoder("tiny").save_pretrained(vae_dir)
    L.seed_everything(0, workers=True)
    optimizer = lambda params: torch.optim.AdamW(params, lr=1e-3)  # noqa: E731
    data = {"tile_size": 64, "stride": 64, "batch_size": 4, "num_workers": 0, "max_tiles": {"train": 16, "val": 4}}
    if recipe == "conditional":
        model = ConditionalLatentDiffusionModule(
            denoiser=build_unet("tiny", sample_size=8, in_channels=9, out_channels=4), autoencoder=vae_dir,
            ema_decay=0.9, optimizer=optimizer,
        )
        dm = ArtifactRestorationDataModule(**data)
    else:
        model = LatentDiffusionModule(
            denoiser=build_unet("tiny", sample_size=8), autoencoder=vae_dir, ema_decay=0.9, optimizer=optimizer
        )
        dm = CleanTileDataModule(**data)
    trainer = L.Trainer(
        accelerator="cpu", strategy="ddp", devices=2, max_steps=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=1, num_sanity_val_steps=0,
    )
    trainer.fit(model, datamodule=dm)
    rank = trainer.global_rank
    torch.save({
        "denoiser": {k: v.detach().cpu() for k, v in model.denoiser.state_dict().items()},
        "ema": {k: v.detach().cpu() for k, v in model.denoiser_ema.state_dict().items()},
        "n_averaged": int(model.denoiser_ema.n_averaged),
        "batch_size_per_device": dm.batch_size_per_device,
        "global_step": trainer.global_step,
        "world_size": trainer.world_size,
        "codec_training": model.codec.training,
    }, os.path.join(out, f"rank{rank}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()  # avoids an occasional abort at exit (ENVIRONMENT.md)


if __name__ == "__main__":
    main(*sys.argv[1:3])
