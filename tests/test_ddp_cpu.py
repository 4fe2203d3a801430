"""DDP on 2 CPU processes: per-device batch from the global batch, ranks stay identical (weights and EMA)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


RECIPES = ["latent", "conditional", "vae", "artifusion", "cyclegan", "segmenter", "classifier"]


@pytest.mark.slow
@pytest.mark.parametrize("recipe", RECIPES)
def test_ddp_two_cpu_processes_keep_ranks_identical(tmp_path, recipe):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "ddp_train_script.py"), str(tmp_path), recipe],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert r0["world_size"] == 2
    assert r0["batch_size_per_device"] == r1["batch_size_per_device"] == 2, "global batch 4 over 2 devices"
    assert r0["global_step"] == r1["global_step"] > 0
    assert r0["state"].keys() == r1["state"].keys() and r0["state"]
    for key in r0["state"]:
        assert torch.equal(r0["state"][key], r1["state"][key]), f"{recipe}: {key} differs between the ranks"
    if recipe in ("latent", "conditional"):
        assert r0["global_step"] == 3
        assert r0["n_averaged"] == r1["n_averaged"] == 3, "EMA stepped once per optimiser step on every rank"
        assert not r0["codec_training"] and not r1["codec_training"], "the frozen VAE stays in eval mode"
