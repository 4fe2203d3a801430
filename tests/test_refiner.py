"""Pixel refiner of latent-conditional: contract, start state, learning, pool, training + export, pipeline, CLI."""

import functools
import json

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

from datamodules.imageio import read_image, read_mask, write_image_atomic, write_mask_atomic
from datamodules.refiner_pool import RefinerPoolDataModule, RefinerPoolDataset
from lightning_modules.components.autoencoders import build_autoencoder
from lightning_modules.components.denoisers import build_unet
from lightning_modules.components.inpaint import opencv_inpaint
from lightning_modules.components.pipeline import RestorationPipeline, attach_refiner
from lightning_modules.components.refiner import build_refiner, load_refiner, save_refiner, unsharp
from lightning_modules.components.regional_sampler import SamplerConfig
from lightning_modules.conditional_latent import ConditionalLatentDiffusionModule
from lightning_modules.refiner_module import (
    RefinerModule,
    artifact_psnr,
    best_candidate,
    gate_cross_entropy,
    masked_errors,
)
from tests.tiny_data import real_crops

ADAMW = functools.partial(torch.optim.AdamW, lr=3e-3)


def _pair(n: int = 2, size: int = 64):
    """Real crops, a translucent dark band (ink-like: the tissue shows through) across them, its mask."""
    clean = real_crops(n, size)
    mask = torch.zeros(n, 1, size, size)
    mask[:, :, size // 3 : size // 3 + 16] = 1
    corrupted = torch.where(mask.bool(), clean * 0.5 - 0.4, clean)
    return clean, corrupted, mask


def test_output_is_a_candidate_blend_plus_a_residual_and_starts_as_the_even_blend():
    torch.manual_seed(0)
    net = build_refiner("tiny").eval()
    assert net.config.candidates == ("corrupted", "coarse", "telea") and net.config.in_channels == 10
    _, corrupted, mask = _pair()
    coarse = torch.zeros_like(corrupted)
    telea = opencv_inpaint(corrupted, mask, "telea")
    with torch.no_grad():
        out = net(corrupted, coarse, mask)
        residual, logits = net.heads(torch.cat([corrupted, coarse, telea, mask], 1))
    assert out.shape == corrupted.shape
    torch.testing.assert_close(out, (corrupted + coarse + telea) / 3)  # zero residual head, even logits at the start
    assert residual.abs().max() == 0 and logits.abs().max() == 0
    assert not torch.allclose(telea, corrupted)  # the fill candidate really is the inpainted input


def test_candidates_are_configurable_and_checked():
    torch.manual_seed(0)
    _, corrupted, mask = _pair()
    coarse = torch.zeros_like(corrupted)
    pixel_only = build_refiner("tiny", candidates=["corrupted", "telea"]).eval()
    with torch.no_grad():
        out = pixel_only(corrupted, coarse, mask)
    torch.testing.assert_close(out, (corrupted + opencv_inpaint(corrupted, mask)) / 2)  # coarse is not looked at
    biased = build_refiner("tiny", gate_bias=2.0, candidates=["corrupted", "coarse"]).eval()
    with torch.no_grad():
        g = torch.sigmoid(torch.tensor(2.0))
        torch.testing.assert_close(biased(corrupted, coarse, mask), corrupted + g * (coarse - corrupted))
    towards_input = build_refiner("tiny", input_bias=2.0, candidates=["corrupted", "coarse"]).eval()
    assert towards_input.config.input_bias == 2.0
    with torch.no_grad():
        torch.testing.assert_close(towards_input(corrupted, coarse, mask), coarse + g * (corrupted - coarse))
    for bad in ([], ["corrupted", "corrupted"], ["median"]):
        with pytest.raises(ValueError, match="candidates"):
            build_refiner("tiny", candidates=bad)


def test_a_format_1_refiner_folder_loads_as_the_two_candidate_blend(tmp_path):
    """Folders exported before the Telea candidate: a sigmoid gate on coarse, ``refiner.json`` format 1."""
    torch.manual_seed(0)
    new = build_refiner("tiny", candidates=["corrupted", "coarse"])
    with torch.no_grad():
        for p in new.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    save_refiner(new, tmp_path / "r")
    state = {k: v.clone() for k, v in new.state_dict().items()}
    gate_w, gate_b = state["head.weight"][4] - state["head.weight"][3], state["head.bias"][4] - state["head.bias"][3]
    state["head.weight"] = torch.cat([state["head.weight"][:3], gate_w[None]])
    state["head.bias"] = torch.cat([state["head.bias"][:3], gate_b[None]])
    torch.save(state, tmp_path / "r" / "weights.pt")
    meta = json.loads((tmp_path / "r" / "refiner.json").read_text())
    meta["format_version"] = 1
    del meta["candidates"]
    (tmp_path / "r" / "refiner.json").write_text(json.dumps(meta))
    old = load_refiner(tmp_path / "r")
    _, corrupted, mask = _pair()
    coarse = torch.rand_like(corrupted) * 2 - 1
    with torch.no_grad():
        residual, logits = new.eval().heads(torch.cat([corrupted, coarse, mask], 1))
        g = torch.sigmoid(logits[:, 1:] - logits[:, :1])
        torch.testing.assert_close(
            old(corrupted, coarse, mask), corrupted + g * (coarse - corrupted) + residual, atol=1e-5, rtol=1e-5
        )


def test_any_size_is_padded_and_cropped_and_bad_shapes_are_refused():
    net = build_refiner("tiny").eval()
    x = torch.rand(1, 3, 40, 56) * 2 - 1
    with torch.no_grad():
        assert net(x, x, torch.zeros(1, 1, 40, 56)).shape == (1, 3, 40, 56)
    with pytest.raises(ValueError, match="disagree"):
        net(x, x[..., :32], torch.zeros(1, 1, 40, 56))


def test_loss_terms_and_psnr():
    clean = torch.zeros(2, 3, 8, 8)
    out = clean.clone()
    out[1] += 0.5
    mask = torch.ones(2, 1, 8, 8)
    l1, mse = masked_errors(out, clean, mask)
    torch.testing.assert_close(l1, torch.tensor([0.0, 0.5]))
    torch.testing.assert_close(artifact_psnr(mse[1:]), torch.tensor([10 * np.log10(4 / 0.25)], dtype=torch.float32))
    empty = masked_errors(out, clean, torch.zeros(2, 1, 8, 8))[1]
    assert torch.equal(empty, torch.zeros(2)), "an empty mask contributes no error"
    with pytest.raises(ValueError):
        RefinerModule(build_refiner("tiny"), log_weight=-1)


def test_a_trained_refiner_restores_better_than_the_latent_stage_it_refines():
    """The refiner sees the tissue under the translucent band; a blurry coarse guess it must improve on."""
    torch.manual_seed(0)
    clean, corrupted, mask = _pair(2)
    coarse = torch.where(mask.bool(), torch.nn.functional.avg_pool2d(clean, 9, 1, 4), corrupted)
    module = RefinerModule(build_refiner("tiny"))
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    before = masked_errors(coarse, clean, mask)[1].mean()
    for _ in range(60):
        loss = module.loss(module(corrupted, coarse, mask), clean, mask)
        opt.zero_grad()
        loss.backward()
        opt.step()
    module.eval()
    with torch.no_grad():
        after = masked_errors(module(corrupted, coarse, mask).clamp(-1, 1), clean, mask)[1].mean()
    assert after < 0.5 * before, (float(before), float(after))


def test_the_best_candidate_is_the_nearest_to_the_clean_tile_in_its_neighbourhood():
    clean = torch.zeros(1, 3, 16, 16)
    near_left = clean + 0.1
    near_left[..., 8:] = 1.0  # close on the left half, far on the right
    near_right = clean + 0.3  # a little off everywhere
    best = best_candidate([near_left, near_right], clean, window=1)
    assert (best[..., :8] == 0).all() and (best[..., 8:] == 1).all()
    speck = near_right.clone()
    speck[..., 3, 3] = 0.0  # one exact pixel inside the region where near_left wins on average
    assert best_candidate([near_left, speck], clean, window=1)[0, 3, 3] == 1
    assert best_candidate([near_left, speck], clean, window=5)[0, 3, 3] == 0, "the box average ignores the speck"
    logits = torch.zeros(1, 2, 16, 16)
    logits[:, 0, :, :8] = 20.0  # confident and right on the left half, unsure on the right
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., :8] = 1
    assert gate_cross_entropy(logits, best, mask) < 1e-6, "only the pixels inside the mask count"
    mask[..., 8:] = 1
    half = torch.tensor([np.log(2) / 2], dtype=torch.float32)  # the unsure half costs ln 2
    torch.testing.assert_close(gate_cross_entropy(logits, best, mask), half)
    with pytest.raises(ValueError, match="gate_window"):
        RefinerModule(build_refiner("tiny"), gate_weight=1.0, gate_window=4)


def test_the_unsharp_candidate_undoes_part_of_a_gaussian_blur_and_keeps_flat_tissue():
    import cv2

    flat = torch.full((1, 3, 32, 32), 0.2)
    torch.testing.assert_close(unsharp(flat), flat)
    sharp = real_crops(1, 64)
    rgb = ((sharp[0].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.float32)
    blurred = torch.from_numpy(cv2.GaussianBlur(rgb, (0, 0), 2.0) / 127.5 - 1).permute(2, 0, 1)[None].float()
    inner = (..., slice(8, -8), slice(8, -8))
    before = (blurred - sharp)[inner].pow(2).mean()
    after = (unsharp(blurred) - sharp)[inner].pow(2).mean()
    assert after < 0.9 * before, (float(before), float(after))
    net = build_refiner("tiny", candidates=["corrupted", "coarse", "telea", "unsharp"])
    assert net.config.in_channels == 13


def _train_gate(gate_weight: float, steps: int = 40) -> float:
    """Mean softmax weight of the ``corrupted`` candidate inside a blur-like mask after a few steps."""
    torch.manual_seed(0)
    clean = real_crops(2, 64)
    mask = torch.zeros(2, 1, 64, 64)
    mask[..., 16:48, 16:48] = 1
    corrupted = torch.where(mask.bool(), torch.nn.functional.avg_pool2d(clean, 3, 1, 1), clean)  # mild blur
    coarse = torch.where(mask.bool(), clean.mean((2, 3), keepdim=True).expand_as(clean), clean)  # a flat guess
    module = RefinerModule(build_refiner("tiny"), gate_weight=gate_weight)
    opt = torch.optim.AdamW(module.parameters(), lr=3e-3)
    batch = {"clean": clean, "corrupted": corrupted, "coarse": coarse, "artifact_mask": mask}
    module.log = lambda *a, **k: None  # no trainer attached
    for _ in range(steps):
        loss = module._step(batch, "train")
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        _, logits, _ = module.net.parts(corrupted, coarse, mask)
        weight = torch.softmax(logits, 1)[:, 0:1]
    return float((weight * mask).sum() / mask.sum())


def test_supervising_the_gate_teaches_the_refiner_to_keep_a_blurred_input():
    """Under a mild blur the input is the best candidate; the gate loss makes the blend choose it."""
    plain, supervised = _train_gate(0.0), _train_gate(1.0)
    assert supervised > 0.6 and supervised > plain + 0.1, (plain, supervised)


def test_save_load_round_trip_and_damaged_folders(tmp_path):
    torch.manual_seed(0)
    net = build_refiner("tiny")
    with torch.no_grad():
        net.head.weight.normal_()
    net.eval()
    save_refiner(net, tmp_path / "r", {"steps": 3})
    loaded = load_refiner(tmp_path / "r")
    _, corrupted, mask = _pair(1)
    with torch.no_grad():
        torch.testing.assert_close(loaded(corrupted, corrupted, mask), net(corrupted, corrupted, mask))
    assert json.loads((tmp_path / "r" / "refiner.json").read_text())["extra"]["steps"] == 3
    (tmp_path / "r" / "weights.pt").write_bytes(b"broken")
    with pytest.raises(ValueError, match="weights.pt"):
        load_refiner(tmp_path / "r")
    with pytest.raises(FileNotFoundError, match="refiner.json"):
        load_refiner(tmp_path / "missing")


# -------------------------------------------------------------------------------------- pipeline with a refiner


@pytest.fixture(scope="module")
def conditional_pipeline(tmp_path_factory):
    """A tiny exported latent-conditional pipeline (4-channel VAE, 64 px tiles, 2 DDIM steps)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("refiner")
    build_autoencoder("tiny").save_pretrained(root / "vae")
    net = build_unet("tiny", sample_size=8, in_channels=9, out_channels=4)
    module = ConditionalLatentDiffusionModule(net, autoencoder=str(root / "vae"), optimizer=ADAMW)
    module.get_codec()
    module.export(root / "pipeline", sampler=SamplerConfig(num_steps=2, decode="delta", feather=2), image_size=64)
    return root / "pipeline"


def _with_refiner(src, dst):
    import shutil

    shutil.copytree(src, dst)
    torch.manual_seed(1)
    refiner = build_refiner("tiny")
    with torch.no_grad():
        refiner.head.weight.normal_(std=0.5)
    attach_refiner(dst, refiner.eval(), {"note": "test"})
    return dst


def test_pipeline_runs_its_refiner_keeps_clean_pixels_and_can_skip_it(conditional_pipeline, tmp_path):
    path = _with_refiner(conditional_pipeline, tmp_path / "p")
    assert json.loads((path / "pipeline.json").read_text())["refiner"] == "refiner"
    plain = RestorationPipeline.from_pretrained(conditional_pipeline)
    pipe = RestorationPipeline.from_pretrained(path)
    assert plain.refiner is None and pipe.refiner is not None
    _, corrupted, mask = _pair(2)

    def run(p, **kw):
        return p.restore(corrupted, mask, generator=torch.Generator().manual_seed(0), **kw)

    refined, coarse = run(pipe), run(pipe, refine=False)
    torch.testing.assert_close(coarse, run(plain))
    keep = (mask == 0).expand_as(corrupted)
    assert torch.equal(refined[keep], corrupted[keep]), "clean pixels stay bit-exact through the refiner"
    assert not torch.equal(refined[~keep], coarse[~keep]), "the refiner changed the artifact region"
    with torch.no_grad():
        expected = pipe.refiner(corrupted, coarse, mask).clamp(-1, 1)
    torch.testing.assert_close(refined[~keep], expected[~keep])
    saved = pipe.save_pretrained(tmp_path / "resaved")
    torch.testing.assert_close(run(RestorationPipeline.from_pretrained(saved)), refined)


def test_a_damaged_refiner_names_the_folder(conditional_pipeline, tmp_path):
    path = _with_refiner(conditional_pipeline, tmp_path / "p")
    (path / "refiner" / "refiner.json").unlink()
    with pytest.raises(FileNotFoundError, match="damaged"):
        RestorationPipeline.from_pretrained(path)


def test_restore_command_uses_the_refiner(conditional_pipeline, tmp_path, he_tiles):
    from experiments import restore as restore_cli

    path = _with_refiner(conditional_pipeline, tmp_path / "p")
    for i, tile in enumerate(he_tiles[:2]):
        mask = np.zeros((64, 64), bool)
        mask[10:30, 5 + 10 * i : 40 + 10 * i] = True
        corrupted = tile[:64, :64].copy()
        corrupted[mask] = corrupted[mask] // 2
        write_image_atomic(tmp_path / "img" / f"t{i}.png", corrupted)
        write_mask_atomic(tmp_path / "msk" / f"t{i}.png", mask)
    outs = {}
    for name, model in (("plain", conditional_pipeline), ("refined", path)):
        assert (
            restore_cli.main(
                [
                    "--model",
                    str(model),
                    "--method",
                    "latent-conditional",
                    "--images",
                    str(tmp_path / "img"),
                    "--masks",
                    str(tmp_path / "msk"),
                    "--out",
                    str(tmp_path / name),
                    "--device",
                    "cpu",
                ]
            )
            == 0
        )
        outs[name] = [read_image(tmp_path / name / f"t{i}.png") for i in range(2)]
    for i in range(2):
        inp, mask = read_image(tmp_path / "img" / f"t{i}.png"), read_mask(tmp_path / "msk" / f"t{i}.png")
        assert np.array_equal(outs["refined"][i][~mask], inp[~mask])
        assert not np.array_equal(outs["refined"][i][mask], outs["plain"][i][mask])


# ------------------------------------------------------------------------------- pool, LightningCLI recipe, export


def _pool_dm(pipeline, tmp_path, **kwargs) -> RefinerPoolDataModule:
    args = {
        "pipeline": str(pipeline),
        "cache_dir": str(tmp_path / "pool"),
        "tile_size": 64,
        "stride": 256,
        "variants": 2,
        "crop": 32,
        "batch_size": 4,
        "precision": "fp32",
        "max_tiles": {"train": 3, "val": 2},
    }
    return RefinerPoolDataModule(**{**args, **kwargs})


def test_pool_is_built_once_deterministic_and_rebuilt_when_the_pipeline_changes(conditional_pipeline, tmp_path):
    dm = _pool_dm(conditional_pipeline, tmp_path)
    dm.prepare_data()
    pool = tmp_path / "pool" / "train" / "pool.pt"
    first = torch.load(pool)
    assert first["clean"].shape == (6, 64, 64, 3) and first["coarse"].dtype == torch.uint8 and len(first["types"]) == 6
    keep = ~first["mask"]
    assert torch.equal(first["coarse"][keep], first["corrupted"][keep]), "coarse = the pasted-back latent stage"
    stamp = pool.stat().st_mtime_ns
    _pool_dm(conditional_pipeline, tmp_path).prepare_data()
    assert pool.stat().st_mtime_ns == stamp, "an up-to-date pool is reused"
    changed = _with_refiner(conditional_pipeline, tmp_path / "p2")
    unet = RestorationPipeline.from_pretrained(changed)
    with torch.no_grad():
        next(unet.unet.parameters()).add_(0.1)
    unet.refiner = None
    unet.save_pretrained(changed)
    _pool_dm(changed, tmp_path).prepare_data()
    assert pool.stat().st_mtime_ns != stamp, "new denoiser weights rebuild the pool"


def test_pool_dataset_crops_near_the_artifact_and_is_seeded_by_epoch(conditional_pipeline, tmp_path):
    dm = _pool_dm(conditional_pipeline, tmp_path)
    dm.prepare_data()
    ds = RefinerPoolDataset(tmp_path / "pool" / "train", crop=32)
    a, b, c = ds[(0, 1)], ds[(0, 1)], ds[(1, 1)]
    assert a["clean"].shape == (3, 32, 32) and a["artifact_mask"].shape == (1, 32, 32)
    assert torch.equal(a["coarse"], b["coarse"])
    assert not (torch.equal(a["coarse"], c["coarse"]) and torch.equal(a["artifact_mask"], c["artifact_mask"]))
    val = RefinerPoolDataset(tmp_path / "pool" / "val", split="val")
    assert val[0]["clean"].shape == (3, 64, 64)
    with pytest.raises(ValueError, match="crop"):
        RefinerPoolDataset(tmp_path / "pool" / "train", crop=128)


def test_pool_needs_a_conditional_pipeline(tmp_path):
    from lightning_modules.latent_diffusion import LatentDiffusionModule

    build_autoencoder("tiny").save_pretrained(tmp_path / "vae")
    module = LatentDiffusionModule(build_unet("tiny", sample_size=8), autoencoder=str(tmp_path / "vae"))
    module.export(tmp_path / "paper", sampler=SamplerConfig(num_steps=2), image_size=64)
    with pytest.raises(ValueError, match="latent-conditional"):
        _pool_dm(tmp_path / "paper", tmp_path).prepare_data()


def test_cli_recipe_trains_and_export_attaches_the_refiner(conditional_pipeline, tmp_path):
    from experiments import export
    from experiments.train import cli_main

    configs = "experiments/configs"
    cli = cli_main(
        [
            "fit",
            "--config",
            f"{configs}/base.yaml",
            "--config",
            f"{configs}/model/refiner_tiny.yaml",
            "--config",
            f"{configs}/data/refiner_pool.yaml",
            f"--data.init_args.pipeline={conditional_pipeline}",
            f"--data.init_args.cache_dir={tmp_path / 'pool'}",
            "--data.init_args.tile_size=64",
            "--data.init_args.stride=256",
            "--data.init_args.crop=32",
            "--data.init_args.batch_size=2",
            "--data.init_args.variants=1",
            "--data.init_args.precision=fp32",
            "--data.init_args.max_tiles={train: 2, val: 2}",
            "--trainer.max_steps=2",
            "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path / 'runs'}",
            "--trainer.enable_progress_bar=false",
        ]
    )
    metrics = cli.trainer.callback_metrics
    assert {"val/artifact_psnr", "val/artifact_psnr_gain", "val/loss"} <= set(metrics)
    ckpt = next((tmp_path / "runs").rglob("last.ckpt"))
    import shutil

    shutil.copytree(conditional_pipeline, tmp_path / "p")
    assert export.main(["refiner", "--ckpt", str(ckpt), "--out", str(tmp_path / "p")]) == 0
    pipe = RestorationPipeline.from_pretrained(tmp_path / "p")
    state = cli.model.net.state_dict()
    assert all(torch.equal(v, state[k]) for k, v in pipe.refiner.state_dict().items())
    with pytest.raises(SystemExit, match="pipeline.json"):
        export.main(["refiner", "--ckpt", str(ckpt), "--out", str(tmp_path / "nowhere")])


def test_trainer_resume_continues_the_refiner_run(conditional_pipeline, tmp_path):
    dm = _pool_dm(conditional_pipeline, tmp_path, variants=1)
    module = RefinerModule(build_refiner("tiny"))
    kwargs = {
        "accelerator": "cpu",
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "limit_val_batches": 1,
        "default_root_dir": str(tmp_path / "run"),
    }
    Trainer(max_steps=2, **kwargs).fit(module, datamodule=dm)
    ckpt = next((tmp_path / "run").rglob("*.ckpt"))
    resumed = RefinerModule(build_refiner("tiny"))
    trainer = Trainer(max_steps=3, **kwargs)
    trainer.fit(resumed, datamodule=_pool_dm(conditional_pipeline, tmp_path, variants=1), ckpt_path=str(ckpt))
    assert trainer.global_step == 3


def test_every_refiner_parameter_gets_a_gradient_and_older_folders_with_unused_blocks_load(tmp_path):
    """timm keeps encoder blocks past the last feature; unused, they would make DDP fail and cost time."""
    net = build_refiner("cpu")
    assert len(net.encoder.blocks) == 5, "tf_efficientnet_lite0 stages 0-3 end in block 4"
    clean, corrupted, mask = _pair(1)
    net(corrupted, clean, mask).sum().backward()
    assert not [n for n, p in net.named_parameters() if p.grad is None]
    folder = save_refiner(net, tmp_path / "r")
    state = torch.load(folder / "weights.pt", weights_only=True)
    state["encoder.blocks.5.0.conv_pw.weight"] = torch.zeros(1)  # what a folder from before the cut holds
    torch.save(state, folder / "weights.pt")
    loaded = load_refiner(folder)
    with torch.no_grad():
        torch.testing.assert_close(loaded(corrupted, clean, mask), net.eval()(corrupted, clean, mask))
