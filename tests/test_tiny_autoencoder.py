"""The distilled tiny autoencoder: presets, codec, distillation recipe, export into a pipeline, restore with it."""

import json

import pytest
import torch

from experiments import export as export_cmd
from experiments.train import cli_main
from lightning_modules.components.autoencoders import LatentCodec, build_autoencoder
from lightning_modules.components.pipeline import RestorationPipeline, attach_tiny_autoencoder
from lightning_modules.components.regional_sampler import SamplerConfig
from lightning_modules.components.tiny_autoencoder import (
    TinyCodec,
    build_tiny_autoencoder,
    load_tiny_autoencoder,
    make_codec,
    save_tiny_autoencoder,
    teacher_fingerprint,
)
from lightning_modules.tiny_autoencoder_module import TinyAutoencoderModule
from tests.tiny_data import real_crops, write_tiny_pipeline

CONFIGS = "experiments/configs"


def _count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_presets_have_factor_8_and_shrink_in_size():
    sizes = {name: build_tiny_autoencoder(name, latent_channels=16) for name in ("taesd", "cpu", "tiny")}
    assert _count(sizes["taesd"]) > _count(sizes["cpu"]) > _count(sizes["tiny"])
    codec = TinyCodec(sizes["cpu"])
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (2, 16, 8, 6) and codec.factor == 8
    out = codec.decode(z)
    assert out.shape == x.shape and out.min() >= -1 and out.max() <= 1
    with pytest.raises(ValueError, match="divisible by 8"):
        codec.encode(x[..., :44])
    with pytest.raises(ValueError, match="unknown tiny autoencoder size 'huge'"):
        build_tiny_autoencoder("huge")


def test_tiny_decoder_mode_encodes_with_the_full_vae():
    torch.manual_seed(0)
    vae = LatentCodec(build_autoencoder("tiny"))
    tiny = build_tiny_autoencoder("tiny", latent_channels=vae.latent_channels)
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    hybrid = make_codec("tiny-decoder", vae, tiny)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(hybrid.encode(x, generator=g1), vae.encode(x, generator=g2))
    z = vae.encode(x, sample=False)
    assert torch.equal(hybrid.decode(z), TinyCodec(tiny).decode(z))
    assert make_codec("full", vae, None) is vae
    with pytest.raises(ValueError, match="has none; distil one"):
        make_codec("tiny", vae, None)
    with pytest.raises(ValueError, match="latent channels"):
        TinyCodec(build_tiny_autoencoder("tiny", latent_channels=2), encoder=vae)


def test_save_load_round_trip_and_missing_facts(tmp_path):
    tiny = build_tiny_autoencoder("tiny")
    with pytest.raises(ValueError, match="teacher_fingerprint"):
        save_tiny_autoencoder(tiny, tmp_path / "t", {})
    save_tiny_autoencoder(tiny, tmp_path / "t", {"teacher_fingerprint": "abc"})
    loaded, facts = load_tiny_autoencoder(tmp_path / "t")
    assert facts["teacher_fingerprint"] == "abc"
    assert all(torch.equal(a, b) for a, b in zip(tiny.state_dict().values(), loaded.state_dict().values(), strict=True))
    (tmp_path / "t" / "distillation.json").unlink()
    with pytest.raises(FileNotFoundError, match="distillation.json is missing"):
        load_tiny_autoencoder(tmp_path / "t")


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "vae"
    build_autoencoder("tiny").save_pretrained(path)
    return path


def test_distillation_learns_the_teacher_latents_and_the_image(teacher_dir):
    torch.manual_seed(0)
    module = TinyAutoencoderModule(str(teacher_dir), size="tiny")
    x = real_crops(4, 32)
    opt = torch.optim.Adam(module.student.parameters(), lr=3e-3)
    first = {k: v.item() for k, v in module.model_step(x, sample=False).items() if v.ndim == 0}
    for _ in range(60):
        loss = module.model_step(x)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = {k: v.item() for k, v in module.model_step(x, sample=False).items() if v.ndim == 0}
    assert last["latent_mse"] < 0.5 * first["latent_mse"]
    assert last["rec"] < 0.7 * first["rec"]
    assert not any(p.requires_grad for p in module.teacher.parameters())
    assert not any(k.startswith("teacher.") for k in module.state_dict())


def test_cli_fit_checkpoint_and_export_into_the_teachers_pipeline(tmp_path, teacher_dir):
    cli = cli_main(
        [
            "fit", "--config", f"{CONFIGS}/base.yaml", "--config", f"{CONFIGS}/model/tiny_vae_cpu.yaml",
            "--model.init_args.teacher", str(teacher_dir), "--model.init_args.size", "tiny",
            "--data.class_path", "tests.tiny_data.TinyTileDataModule",
            "--trainer.max_steps=2", "--trainer.limit_val_batches=1", "--trainer.precision=32-true",
            "--trainer.default_root_dir", str(tmp_path),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "wandb"),
        ]
    )  # fmt: skip
    assert cli.trainer.global_step == 2
    assert {"val/psnr", "val/ssim", "val/psnr_vs_teacher", "val/latent_mse"} <= set(cli.trainer.callback_metrics)
    ckpt = cli.trainer.checkpoint_callback.last_model_path
    # a pipeline of another VAE refuses the student
    other = write_tiny_pipeline(tmp_path / "other", 64)
    with pytest.raises(SystemExit, match="distilled from another VAE"):
        export_cmd.main(["tiny-vae", "--ckpt", ckpt, "--out", str(other)])
    assert "tiny_autoencoder" not in json.loads((other / "pipeline.json").read_text())
    # the teacher's pipeline takes it
    pipe_dir = write_tiny_pipeline(tmp_path / "pipe", 64)
    teacher = RestorationPipeline.from_pretrained(pipe_dir).codec.vae
    cli = cli_main(
        [
            "fit", "--config", f"{CONFIGS}/base.yaml", "--config", f"{CONFIGS}/model/tiny_vae_cpu.yaml",
            "--model.init_args.teacher", str(pipe_dir / "vae"), "--model.init_args.size", "tiny",
            "--data.class_path", "tests.tiny_data.TinyTileDataModule", "--trainer.fast_dev_run=1",
            "--trainer.default_root_dir", str(tmp_path / "run2"),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "wandb"),
        ]
    )  # fmt: skip
    ckpt2 = tmp_path / "student.ckpt"
    cli.trainer.save_checkpoint(ckpt2)
    assert export_cmd.main(["tiny-vae", "--ckpt", str(ckpt2), "--out", str(pipe_dir)]) == 0
    meta = json.loads((pipe_dir / "pipeline.json").read_text())
    assert meta["tiny_autoencoder"] == "tiny_vae" and not list(pipe_dir.glob("tmp*"))
    facts = json.loads((pipe_dir / "tiny_vae" / "distillation.json").read_text())
    assert facts["teacher_fingerprint"] == teacher_fingerprint(teacher) and facts["checkpoint"] == str(ckpt2)


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    pipe_dir = write_tiny_pipeline(tmp_path_factory.mktemp("pipe") / "pipeline", 64)
    vae = RestorationPipeline.from_pretrained(pipe_dir).codec.vae
    torch.manual_seed(1)
    student = tmp_path_factory.mktemp("student") / "tiny"
    save_tiny_autoencoder(
        build_tiny_autoencoder("tiny", latent_channels=vae.config.latent_channels),
        student,
        {"teacher_fingerprint": teacher_fingerprint(vae)},
    )
    return attach_tiny_autoencoder(pipe_dir, student)


def test_restore_with_the_tiny_autoencoder_keeps_clean_pixels(tiny_pipeline, tmp_path):
    pipe = RestorationPipeline.from_pretrained(tiny_pipeline)
    assert pipe.tiny_vae is not None
    x = real_crops(2, 64)
    m = torch.zeros(2, 1, 64, 64)
    m[:, :, 10:30, 20:50] = 1
    outs = {}
    for mode in ("full", "tiny", "tiny-decoder"):
        outs[mode] = pipe.restore(x, m, generator=torch.Generator().manual_seed(0), autoencoder=mode)
        keep = (m == 0).expand_as(x)
        assert torch.equal(outs[mode][keep], x[keep]), mode
    assert not torch.equal(outs["full"], outs["tiny"]) and not torch.equal(outs["tiny"], outs["tiny-decoder"])
    crop = pipe.restore(x, m, generator=torch.Generator().manual_seed(0), autoencoder="tiny", crop_decode=True)
    assert torch.isfinite(crop).all()
    # the pipeline's own default can be the tiny autoencoder, and saving keeps it
    pipe.sampler_config = SamplerConfig.from_dict({**pipe.sampler_config.to_dict(), "autoencoder": "tiny"})
    again = RestorationPipeline.from_pretrained(pipe.save_pretrained(tmp_path / "copy"))
    assert again.sampler_config.autoencoder == "tiny"
    torch.testing.assert_close(again.restore(x, m, generator=torch.Generator().manual_seed(0)), outs["tiny"])


def test_pipeline_without_a_tiny_autoencoder_says_how_to_add_one(tmp_path):
    pipe = RestorationPipeline.from_pretrained(write_tiny_pipeline(tmp_path / "p", 64))
    x, m = real_crops(1, 64), torch.ones(1, 1, 64, 64)
    with pytest.raises(ValueError, match="experiments.export tiny-vae"):
        pipe.restore(x, m, autoencoder="tiny")


def test_a_damaged_or_foreign_tiny_folder_fails_at_load(tiny_pipeline, tmp_path):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_pipeline, copy)
    facts_file = copy / "tiny_vae" / "distillation.json"
    facts_file.write_text(json.dumps({"teacher_fingerprint": "0" * 64, "teacher": "elsewhere/vae"}))
    with pytest.raises(ValueError, match="distilled from another VAE \\(elsewhere/vae\\)"):
        RestorationPipeline.from_pretrained(copy)
    facts_file.unlink()
    with pytest.raises(FileNotFoundError, match="damaged"):
        RestorationPipeline.from_pretrained(copy)


def test_tiny_vae_command_refuses_bad_folders_before_training(tmp_path, teacher_dir):
    from experiments import tiny_vae

    with pytest.raises(SystemExit, match="is not a VAE folder"):
        tiny_vae.run(tiny_vae.TinyVaeJob(teacher=tmp_path / "none", pipelines=[], out=tmp_path / "o"))
    with pytest.raises(SystemExit, match="is not a pipeline folder"):
        tiny_vae.run(tiny_vae.TinyVaeJob(teacher=teacher_dir, pipelines=[tmp_path / "p"], out=tmp_path / "o"))
    with pytest.raises(SystemExit, match="--report-only needs"):
        tiny_vae.run(tiny_vae.TinyVaeJob(teacher=teacher_dir, pipelines=[], out=tmp_path / "o", report_only=True))
    with pytest.raises(SystemExit):
        tiny_vae.parse_args(["--tile", "60"])


def test_tiny_vae_report_scores_and_times_each_autoencoder(teacher_dir):
    from experiments import tiny_vae

    torch.manual_seed(0)
    from lightning_modules.components.autoencoders import load_autoencoder

    teacher = load_autoencoder(teacher_dir)
    student = build_tiny_autoencoder("tiny", latent_channels=teacher.config.latent_channels)
    tiles = {"seen": real_crops(3, 32), "unseen": real_crops(2, 32)}
    records = tiny_vae.score(teacher, student, tiles)
    assert [(r["tissue"], r["autoencoder"]) for r in records] == [
        (t, a) for t in ("seen", "unseen") for a in ("full", "tiny", "tiny-decoder")
    ]
    assert records[0]["tiles"] == 3 and "psnr_vs_full" not in records[0] and "psnr_vs_full" in records[1]
    speed = tiny_vae.time_codecs(
        tiny_vae._codec_fns(teacher, student), batch=1, precisions=["fp32"], max_seconds=0.01, label="trained"
    )
    assert {(r["autoencoder"], r["part"]) for r in speed} == {
        (a, p) for a in ("full", "tiny") for p in ("encode", "decode")
    }
    assert all(r["seconds_per_tile"] > 0 and r["gflop_per_tile"] > 0 for r in speed)
    machine = {"record": "machine", "cpu_model": "test CPU", "threads": 1, "distillation": {"size": "tiny", "steps": 0}}
    text = tiny_vae.markdown([machine, *records, *speed])
    assert "| seen | tiny |" in text and "| trained | tiny | decode | fp32 |" in text and "1.00x" in text
