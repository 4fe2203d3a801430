"""CycleGAN baseline: networks, image pool, manual-optimisation recipe, LR schedule, export and the restorer."""

import pytest
import torch
from lightning.pytorch import Callback, LightningDataModule, Trainer
from torch.utils.data import DataLoader, Dataset

from experiments.train import cli_main
from lightning_modules.baselines.cyclegan import CycleGANRestorer
from lightning_modules.components.gan_networks import ImagePool, PatchDiscriminator, ResnetGenerator
from lightning_modules.components.restorer import Restorer
from lightning_modules.cyclegan import CycleGANModule, linear_decay_factor
from lightning_modules.methods import available_restorers, build_restorer
from tests.tiny_data import real_crops

TINY = {"ngf": 8, "n_blocks": 2, "ndf": 8, "n_layers": 3}
CONFIGS = "experiments/configs"


def band_corruption(clean: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A dark fold-like horizontal band on a (3, H, W) [-1, 1] tile; returns (corrupted, mask (1, H, W) in {0, 1})."""
    mask = torch.zeros(1, *clean.shape[1:])
    top = 8 + 4 * (index % 8)
    mask[:, top : top + 10] = 1
    fold = torch.tensor([-0.2, -0.8, 0.1]).view(3, 1, 1)
    return clean * (1 - mask) + fold * mask, mask


class _RestorationSet(Dataset):
    def __init__(self, clean: torch.Tensor) -> None:
        self.clean = clean

    def __len__(self) -> int:
        return len(self.clean)

    def __getitem__(self, index: int) -> dict:
        corrupted, mask = band_corruption(self.clean[index], index)
        meta = {"source": "histoqc-template", "index": index}
        return {"clean": self.clean[index], "corrupted": corrupted, "artifact_mask": mask, "meta": meta}


class TinyRestorationDataModule(LightningDataModule):
    """Restoration batches of real 64x64 H&E crops with a synthetic dark band (the suite's batch dict)."""

    def __init__(self, batch_size: int = 2, n_train: int = 4, n_val: int = 2) -> None:
        super().__init__()
        self.batch_size, self.n_train, self.n_val = batch_size, n_train, n_val

    def setup(self, stage: str) -> None:
        crops = real_crops(self.n_train + self.n_val)
        self.train_set, self.val_set = _RestorationSet(crops[: self.n_train]), _RestorationSet(crops[self.n_train :])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


@pytest.fixture(autouse=True)
def one_thread():
    """Run these tiny convolutions on one thread: two OpenMP threads on a busy 2-core machine are up to 100x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_trainer(tmp_path, **kwargs) -> Trainer:
    defaults = {"accelerator": "cpu", "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
                "enable_model_summary": False, "default_root_dir": str(tmp_path), "limit_val_batches": 0}  # fmt: skip
    return Trainer(**(defaults | kwargs))


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------------- networks


def test_generator_shapes_range_and_mask_channel():
    torch.manual_seed(0)
    x = real_crops(2)
    mask = torch.zeros(2, 1, 64, 64)
    mask[..., 10:20, :] = 1
    out = ResnetGenerator(3, 3, ngf=8, n_blocks=2)(x)
    assert out.shape == (2, 3, 64, 64) and out.abs().max() <= 1
    aware = ResnetGenerator(4, 3, ngf=8, n_blocks=2)
    assert aware.uses_mask and aware(x, mask).shape == (2, 3, 64, 64)
    assert not torch.allclose(aware(x, mask), aware(x, 1 - mask))  # the mask channel is really read
    with pytest.raises(ValueError, match="pass artifact_mask"):
        aware(x)
    with pytest.raises(ValueError, match="divisible by 4"):
        aware(x[..., :62, :62], mask[..., :62, :62])
    with pytest.raises(ValueError, match="n_blocks"):
        ResnetGenerator(ngf=0)


def test_paper_parameter_counts_and_patch_map_size():
    g, d = ResnetGenerator(3, 3, ngf=64, n_blocks=9), PatchDiscriminator(3, ndf=64, n_layers=3)
    assert n_params(g) == 11_378_179  # Zhu et al. 2017 report 11.378 M
    assert n_params(d) == 2_764_737  # and 2.765 M for the 70x70 PatchGAN
    assert n_params(ResnetGenerator(4, 3)) - n_params(g) == 64 * 7 * 7  # the mask channel adds one 7x7 input plane
    with torch.no_grad():
        assert d(torch.zeros(1, 3, 256, 256)).shape == (1, 1, 30, 30)
    assert PatchDiscriminator(3, ndf=8)(torch.zeros(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    weights = torch.cat([m.weight.flatten() for m in g.modules() if isinstance(m, torch.nn.Conv2d)])
    assert abs(weights.std().item() - 0.02) < 1e-3 and abs(weights.mean().item()) < 1e-3  # N(0, 0.02) init


def test_image_pool_fills_then_swaps_with_probability_half_and_is_seeded():
    def run(seed: int) -> tuple[list[torch.Tensor], ImagePool]:
        pool, g = ImagePool(4), torch.Generator().manual_seed(seed)
        # image k of the whole stream is a constant k, so every returned image tells where it came from
        batches = [torch.arange(2 * i, 2 * i + 2.0).view(2, 1, 1, 1).expand(2, 1, 2, 2) for i in range(50)]
        return [pool.query(batch, g) for batch in batches], pool

    outs, pool = run(0)
    assert outs[0].flatten().unique().tolist() == [0, 1] and outs[1][:, 0, 0, 0].tolist() == [2, 3]  # filling
    assert len(pool) == 4  # capacity reached after two batches, never exceeded
    # After the fill, each returned image is the new one (value k) or an older stored one (value < k).
    pairs = [(2 * i + j, outs[i][j, 0, 0, 0].item()) for i in range(2, 50) for j in range(2)]
    assert all(v <= k for k, v in pairs)
    assert 0.3 < sum(v < k for k, v in pairs) / len(pairs) < 0.7  # a swap with probability 1/2
    stored = {img[0, 0, 0, 0].item() for img in pool.images}
    assert len(stored) == 4 and min(stored) > 3  # newer images replaced the first four
    again, _ = run(0)
    other, _ = run(1)
    assert all(torch.equal(a, b) for a, b in zip(outs, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(outs, other, strict=True))
    x = torch.randn(3, 3, 4, 4, requires_grad=True)
    passthrough = ImagePool(0).query(x)
    assert torch.equal(passthrough, x) and not passthrough.requires_grad
    with pytest.raises(ValueError, match="pool size"):
        ImagePool(-1)


# --------------------------------------------------------------------------------------------------------- module


def test_unpaired_batch_never_aligns_clean_and_corrupted():
    module = CycleGANModule(**TINY)
    clean = real_crops(3)
    batch = {"clean": clean, "corrupted": -clean, "artifact_mask": torch.rand(3, 1, 64, 64).round()}
    pair = module.unpaired_batch(batch)
    assert torch.equal(pair["artifact"], -clean) and torch.equal(pair["clean"], clean.roll(1, 0))
    assert torch.equal(pair["clean_mask"], batch["artifact_mask"].roll(1, 0))  # each clean tile keeps its own mask
    single = [{k: v[i : i + 1] for k, v in batch.items()} for i in range(3)]
    fresh = CycleGANModule(**TINY)
    assert fresh.unpaired_batch(single[0]) is None  # batch size 1: nothing unpaired yet
    assert torch.equal(fresh.unpaired_batch(single[1])["clean"], clean[:1])  # the previous batch's clean tile


class _RecordLR(Callback):
    def __init__(self) -> None:
        self.lrs: list[tuple[float, float]] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        opt_g, opt_d = pl_module.optimizers()
        self.lrs.append((opt_g.param_groups[0]["lr"], opt_d.param_groups[0]["lr"]))


@pytest.mark.parametrize("mask_channel", [False, True])
def test_one_manual_step_updates_generators_and_discriminators(tmp_path, mask_channel):
    torch.manual_seed(0)
    module = CycleGANModule(**TINY, mask_channel=mask_channel)
    assert module.G.config.in_channels == module.F.config.in_channels == (4 if mask_channel else 3)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    trainer = tiny_trainer(tmp_path, max_epochs=1, limit_train_batches=1, limit_val_batches=1)
    trainer.fit(module, TinyRestorationDataModule(batch_size=2))
    after = module.state_dict()
    for net in ("G", "F", "D_clean", "D_artifact"):
        changed = [k for k in before if k.startswith(net + ".") and not torch.equal(before[k], after[k])]
        assert changed, f"{net} was not updated"
    assert len(trainer.optimizers) == 2
    for opt in trainer.optimizers:
        assert {int(s["step"]) for s in opt.state.values()} == {1}  # each optimiser stepped exactly once
        assert opt.defaults["lr"] == 2e-4 and opt.defaults["betas"] == (0.5, 0.999)
    assert len(module.pool_clean) == len(module.pool_artifact) == 2
    metrics = trainer.callback_metrics
    assert {"train/loss_G", "train/loss_D", "train/cycle", "train/identity", "val/l1", "val/l1_clean"} <= set(metrics)
    assert metrics["train/cycle"] > 0 and 0 < metrics["val/l1"] < 2


def test_lr_constant_for_half_the_epochs_then_linear_to_zero(tmp_path):
    assert [linear_decay_factor(e, 2, 2) for e in range(5)] == pytest.approx([1, 1, 2 / 3, 1 / 3, 0])
    module, record = CycleGANModule(**TINY, pool_size=0), _RecordLR()
    trainer = tiny_trainer(tmp_path, max_epochs=4, limit_train_batches=1, callbacks=[record])
    trainer.fit(module, TinyRestorationDataModule(batch_size=2, n_train=2))
    expected = [2e-4 * f for f in (1, 1, 2 / 3, 1 / 3)]  # max_epochs 4: 2 constant + 2 decaying
    assert [g for g, _ in record.lrs] == pytest.approx(expected)
    assert [d for _, d in record.lrs] == pytest.approx(expected)
    assert [c.scheduler.get_last_lr()[0] for c in trainer.lr_scheduler_configs] == pytest.approx([0, 0])
    with pytest.raises(ValueError, match="lambda_cycle"):
        CycleGANModule(lambda_cycle=-1)


# ------------------------------------------------------------------------------------------------ export/restorer


@pytest.mark.parametrize("mask_channel", [False, True])
def test_export_restorer_round_trip_translates_the_whole_tile(tmp_path, mask_channel):
    torch.manual_seed(0)
    module = CycleGANModule(**TINY, mask_channel=mask_channel).eval()
    folder = module.export(tmp_path / "generator")
    assert (folder / "config.json").is_file()
    restorer = build_restorer("cyclegan", model=str(folder), device="cpu", precision="fp32", steps=50)
    assert isinstance(restorer, Restorer) and restorer.name == "cyclegan" and restorer.nfe == 1
    assert isinstance(restorer, CycleGANRestorer) and "cyclegan" in available_restorers()
    clean = real_crops(2)
    corrupted, mask = map(torch.stack, zip(*(band_corruption(c, i) for i, c in enumerate(clean)), strict=True))
    restored = restorer.restore(corrupted, mask, generator=torch.Generator().manual_seed(0))
    assert torch.equal(restored, module.restore(corrupted, mask))
    assert restored.shape == corrupted.shape and restored.abs().max() <= 1
    outside = (mask == 0).expand_as(corrupted)
    assert (restored - corrupted)[outside].abs().mean() > 1e-3  # no paste-back: clean tissue is rewritten too
    with pytest.raises(ValueError, match="artifact_mask"):
        restorer.restore(corrupted, mask[:, :, :32])


def test_restorer_factory_errors(tmp_path):
    with pytest.raises(ValueError, match="needs --model"):
        build_restorer("cyclegan")
    with pytest.raises(FileNotFoundError, match="config.json"):
        build_restorer("cyclegan", model=str(tmp_path))
    with pytest.raises(ValueError, match="precision"):
        CycleGANRestorer(ResnetGenerator(ngf=8, n_blocks=1), precision="int8")


# ------------------------------------------------------------------------------------------------------- configs


def test_cli_configs_disable_clipping_monitor_val_l1_and_fit(tmp_path):
    for name, ngf, batch in (("cyclegan_paper", 64, 1), ("cyclegan_cpu", 16, 4)):
        cli = cli_main(
            ["--config", f"{CONFIGS}/base.yaml", "--config", f"{CONFIGS}/model/{name}.yaml",
             "--config", f"{CONFIGS}/data/bundled_restoration.yaml", "--trainer.logger=false",
             "--trainer.default_root_dir", str(tmp_path)],
            run=False,
        )  # fmt: skip
        assert cli.config["trainer"]["gradient_clip_val"] is None
        assert cli.trainer.checkpoint_callback.monitor == "val/l1"
        assert cli.model.hparams.ngf == ngf and cli.config["data"]["init_args"]["batch_size"] == batch
    cli = cli_main(
        ["fit", "--config", f"{CONFIGS}/base.yaml", "--config", f"{CONFIGS}/model/cyclegan_cpu.yaml",
         "--data.class_path", "tests.test_cyclegan.TinyRestorationDataModule", "--model.init_args.ngf", "8",
         "--model.init_args.n_blocks", "1", "--trainer.fast_dev_run=1", "--trainer.precision=32-true",
         "--trainer.default_root_dir", str(tmp_path)],
    )  # fmt: skip
    assert cli.trainer.global_step == 2  # manual optimisation: one step of each optimiser


def test_plain_ddp_is_refused_with_the_strategy_to_use():
    """The G step leaves the discriminators unused and the D step the generators: plain DDP would fail mid-step."""
    import types

    from lightning.pytorch.strategies import DDPStrategy

    module = CycleGANModule(**TINY)
    module._trainer = types.SimpleNamespace(strategy=DDPStrategy())
    with pytest.raises(ValueError, match="ddp_find_unused_parameters_true"):
        module.setup("fit")
    module._trainer = types.SimpleNamespace(strategy=DDPStrategy(find_unused_parameters=True))
    module.setup("fit")
