"""Precision follows the hardware: bf16 only where it is native (emulated bf16 on AVX2 CPUs is ~20x slower)."""

import pytest
import torch

from experiments.train import cli_main
from lightning_modules.components import hardware
from lightning_modules.components.pipeline import RestorationPipeline
from tests.tiny_data import real_crops, write_tiny_pipeline

CONFIGS = "experiments/configs"
ARGS = [
    "--config", f"{CONFIGS}/base.yaml", "--config", f"{CONFIGS}/model/latent_tiny.yaml",
    "--data.class_path", "tests.tiny_data.TinyLatentDataModule", "--trainer.logger=false",
]  # fmt: skip


@pytest.fixture(params=[False, True], ids=["avx2-only", "native-bf16"])
def native(request, monkeypatch):
    monkeypatch.setattr(hardware, "_cpu_native_bf16", lambda: request.param)
    return request.param


def test_auto_resolves_to_bf16_only_where_native(native):
    assert hardware.resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert hardware.resolve_precision("bf16", "cpu") == "bf16" and hardware.resolve_precision("fp32") == "fp32"


def test_trainer_precision_swaps_bf16_on_a_cpu_without_it(native):
    expected = "bf16-mixed" if native else "32-true"
    assert hardware.trainer_precision("bf16-mixed", "cpu") == expected
    assert hardware.trainer_precision("16-mixed", "cpu") == "16-mixed"
    assert hardware.trainer_precision("32-true", "cpu") == "32-true"
    assert hardware.trainer_precision("bf16-mixed", "gpu") == "bf16-mixed"


def test_cli_trains_in_fp32_on_such_a_cpu_unless_told_to_keep(native, monkeypatch):
    if native:
        assert cli_main(ARGS, run=False).trainer.precision == "bf16-mixed"
        return
    with pytest.warns(UserWarning, match="without native bf16.*training in 32-true"):
        assert cli_main(ARGS, run=False).trainer.precision == "32-true"
    monkeypatch.setenv("LAF_KEEP_PRECISION", "1")
    assert cli_main(ARGS, run=False).trainer.precision == "bf16-mixed"


def test_pipeline_auto_precision_restores_like_the_resolved_one(native, tmp_path):
    pipe = RestorationPipeline.from_pretrained(write_tiny_pipeline(tmp_path / "p", 64), precision="auto")
    x, m = real_crops(1, 64), torch.zeros(1, 1, 64, 64)
    m[..., 16:40, 16:40] = 1
    auto = pipe.restore(x, m, generator=torch.Generator().manual_seed(0))
    pipe.precision = "bf16" if native else "fp32"
    assert torch.equal(auto, pipe.restore(x, m, generator=torch.Generator().manual_seed(0)))
    with pytest.raises(ValueError, match="or 'auto'"):
        RestorationPipeline.from_pretrained(tmp_path / "p", precision="fp8")
