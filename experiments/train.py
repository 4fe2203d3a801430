r"""Train any LightningModule of this suite with LightningCLI (the denoiser, the autoencoder, baselines).

Configs compose by repeating ``--config`` (later files override earlier ones); every key is validated against the
constructors' signatures and ``--print_config`` shows the dotted names that sweeps and overrides use.

Usage::

    # 1. train (or fine-tune) the autoencoder on clean tiles, then export it with AutoencoderModule.export
    python -m experiments.train fit --config experiments/configs/base.yaml \
        --config experiments/configs/model/vae_cpu.yaml --config experiments/configs/data/bundled.yaml
    # 2. train the latent denoiser on the exported autoencoder
    python -m experiments.train fit --config experiments/configs/base.yaml \
        --config experiments/configs/model/latent_cpu.yaml --config experiments/configs/data/bundled.yaml \
        --model.init_args.autoencoder outputs/vae_cpu
    # resume exactly (optimizer, EMA, step counters) from the last checkpoint
    python -m experiments.train fit --config ... --ckpt_path outputs/checkpoints/last.ckpt

On a CPU without native bf16 (AVX2 only) a ``bf16-mixed`` run trains in ``32-true`` instead and says so: there
bf16 is emulated and about 20x slower (``components/hardware.py``). ``LAF_KEEP_PRECISION=1`` keeps the value asked for.

Run as a command, a failure of the known kinds (a data source that does not exist, an unreadable folder, a bad value)
ends with one ``error:`` line and exit status 1; ``--debug`` (or ``LAF_DEBUG=1``) shows the traceback.
"""

import os
import sys

from lightning.pytorch import LightningDataModule, LightningModule
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.utilities import rank_zero_warn

from experiments.cli_errors import run_main
from lightning_modules.callbacks.wandb_config import ConfigToWandb
from lightning_modules.components.hardware import trainer_precision


class SuiteCLI(LightningCLI):
    """LightningCLI that trains bf16 runs in fp32 on CPUs without native bf16 (where bf16 is ~20x slower)."""

    def before_instantiate_classes(self) -> None:
        """Swap ``bf16-*`` for ``32-true`` on such a CPU (unless ``LAF_KEEP_PRECISION=1``), with one warning."""
        config = self.config[self.subcommand] if self.subcommand else self.config
        trainer = config.get("trainer")
        if trainer is None or os.environ.get("LAF_KEEP_PRECISION") == "1":
            return
        asked = trainer.get("precision")
        chosen = trainer_precision(asked, trainer.get("accelerator"))
        if chosen != asked:
            rank_zero_warn(
                f"trainer.precision={asked} on a CPU without native bf16 (no AVX-512 BF16 / AMX) is emulated and "
                f"about 20x slower than fp32: training in {chosen} (LAF_KEEP_PRECISION=1 keeps {asked})"
            )
            trainer["precision"] = chosen


def cli_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """Build (and by default run) the suite's LightningCLI.

    Args:
        args: Command-line arguments (``None`` reads ``sys.argv``), e.g. ``["fit", "--config", "base.yaml"]``.
        run: Run the subcommand; False only instantiates (then ``args`` must not name a subcommand).

    Returns:
        The CLI object (``cli.model``, ``cli.datamodule``, ``cli.trainer``).
    """
    return SuiteCLI(
        LightningModule,
        LightningDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=ConfigToWandb,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"parser_mode": "omegaconf"},
        auto_configure_optimizers=False,
        args=args,
        run=run,
    )


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point: :func:`cli_main` with one-line errors (``--debug`` is taken out of the arguments)."""
    argv = list(sys.argv[1:] if argv is None else argv)

    def run(args: list[str]) -> int:
        cli_main([a for a in args if a != "--debug"])
        return 0

    return run_main(run, argv)


if __name__ == "__main__":
    sys.exit(main())
