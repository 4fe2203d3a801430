"""Save the run's full configuration and also push it into the W&B run config when a WandbLogger is used."""

import json

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.loggers import WandbLogger


class ConfigToWandb(SaveConfigCallback):
    """``SaveConfigCallback`` that also copies the resolved config into ``wandb.run.config``.

    The parent writes ``config.yaml`` into the log dir and calls :meth:`save_config` on global rank 0 only, so this
    hook does no collectives. The config is sent as nested dicts to every ``WandbLogger`` of the trainer, so runs can
    be filtered by any dotted key (``model.init_args.ema_decay``) in the W&B UI (Lightning issues #7679, #19728).
    """

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Push the config to every W&B logger of ``trainer`` (rank 0 only)."""
        loggers = [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]
        if not loggers:
            return
        config = json.loads(self.parser.dump(self.config, skip_none=False, format="json"))
        for logger in loggers:
            logger.experiment.config.update(config, allow_val_change=True)
