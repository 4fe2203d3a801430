"""Crop-only VAE passes (SamplerConfig.crop): window planning, bit-exact paste-back, empty masks, batches, CLI."""

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from datamodules.imageio import read_image, read_mask, write_image_atomic, write_mask_atomic
from lightning_modules.components.autoencoders import build_autoencoder
from lightning_modules.components.crop import Window, group_by_size, mask_window, plan_windows, restore_windows
from lightning_modules.components.denoisers import build_unet
from lightning_modules.components.pipeline import RestorationPipeline, attach_refiner, save_pipeline
from lightning_modules.components.refiner import build_refiner
from lightning_modules.components.regional_sampler import SamplerConfig
from lightning_modules.latent_diffusion import PAPER_SCHEDULER
from tests.tiny_data import real_crops

SIZE = 64
WINDOW = {"margin": 32, "unit": 64, "factor": 8, "max_fraction": 0.6}


def _mask(size: int, *boxes: tuple[int, int, int, int]) -> torch.Tensor:
    """``(1, size, size)`` mask with ones in every ``(top, left, height, width)`` box."""
    mask = torch.zeros(1, size, size)
    for top, left, h, w in boxes:
        mask[:, top : top + h, left : left + w] = 1
    return mask


# ------------------------------------------------------------------------------------------------ window planning


def test_window_is_the_grown_box_rounded_to_the_unit_centred_and_clamped():
    # rows 100-119 + 32 px -> [68, 152) -> factor grid [64, 152), 88 px -> 128 px centred: [48, 176)
    # cols 40-59 + 32 px -> [8, 92) -> [8, 96) -> 128 px centred at -8 -> clamped to [0, 128)
    assert mask_window(_mask(256, (100, 40, 20, 20)), **WINDOW) == Window(48, 0, 128, 128)
    # bottom-right corner: clamped to end at the tile's edge
    assert mask_window(_mask(256, (250, 250, 6, 6)), **WINDOW) == Window(192, 192, 64, 64)
    # a margin of 0 and unit 8: the bounding box snapped to the 8 px grid
    tight = {**WINDOW, "margin": 0, "unit": 8}
    assert mask_window(_mask(256, (9, 17, 5, 30)), **tight) == Window(8, 16, 8, 32)


def test_window_falls_back_to_the_whole_tile_and_an_empty_mask_has_none():
    band = _mask(256, (100, 0, 30, 256))  # a fold across the tile: a 128 x 256 px window, 50 % of it
    assert mask_window(band, **WINDOW) == Window(56, 0, 128, 256)
    assert mask_window(band, **{**WINDOW, "max_fraction": 0.4}) == Window(0, 0, 256, 256)
    assert mask_window(_mask(256, (0, 0, 200, 10)), **WINDOW).size == (256, 64)
    assert mask_window(_mask(256), **WINDOW) is None
    with pytest.raises(ValueError, match="multiple of factor"):
        mask_window(_mask(256, (0, 0, 4, 4)), **{**WINDOW, "unit": 12})
    with pytest.raises(ValueError, match="factor 8"):
        mask_window(_mask(60, (0, 0, 4, 4)), **WINDOW)


def test_every_window_holds_the_grown_mask_on_the_grid_inside_the_tile():
    rng = np.random.default_rng(0)
    for _ in range(200):
        top, left = rng.integers(0, 250, 2)
        h, w = rng.integers(1, 120, 2)
        margin = int(rng.integers(0, 40))
        mask = _mask(256, (int(top), int(left), int(h), int(w)))
        window = mask_window(mask, margin=margin, unit=64, factor=8, max_fraction=1.0)
        rows, cols = mask[0].any(1).nonzero(), mask[0].any(0).nonzero()
        assert window.top <= max(0, int(rows[0]) - margin) and window.left <= max(0, int(cols[0]) - margin)
        assert window.top + window.height >= min(256, int(rows[-1]) + 1 + margin)
        assert window.left + window.width >= min(256, int(cols[-1]) + 1 + margin)
        assert window.top % 8 == 0 and window.left % 8 == 0 and window.height % 64 == 0 and window.width % 64 == 0
        assert window.top + window.height <= 256 and window.left + window.width <= 256


def test_windows_group_by_size_in_order_of_first_appearance():
    windows = [Window(0, 0, 64, 64), None, Window(0, 0, 128, 64), Window(8, 8, 64, 64)]
    assert group_by_size(windows) == [[0, 3], [2]]
    masks = torch.stack([_mask(256, (0, 0, 8, 8)), _mask(256)])
    assert plan_windows(masks, **WINDOW) == [Window(0, 0, 64, 64), None]


def test_restore_windows_pastes_each_window_back_and_calls_once_per_size():
    x = torch.rand(3, 3, 32, 32) * 2 - 1
    mask = torch.zeros(3, 1, 32, 32)
    windows = [Window(8, 8, 16, 16), None, Window(0, 16, 16, 16)]
    calls = []

    def negate(xs, ms):
        calls.append(xs.shape[0])
        return -xs

    out = restore_windows(negate, x, mask, windows)
    assert calls == [2]
    assert torch.equal(out[1], x[1]) and torch.equal(out[0, :, 8:24, 8:24], -x[0, :, 8:24, 8:24])
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[8:24, 8:24] = False
    assert torch.equal(out[0][:, outside], x[0][:, outside])


def test_sampler_config_validates_the_crop_fields():
    assert not SamplerConfig().crop and SamplerConfig().crop_margin == 32
    with pytest.raises(ValueError, match="crop_max_fraction"):
        SamplerConfig(crop_max_fraction=0)
    with pytest.raises(ValueError, match="crop_margin"):
        SamplerConfig(crop_margin=-1)
    with pytest.raises(ValueError, match="crop must be"):
        SamplerConfig(crop="yes")
    assert SamplerConfig.from_preset("reference", crop=True).crop, "kept, but ignored without paste_back"


# ------------------------------------------------------------------------------------------------ the pipeline


@pytest.fixture(scope="module")
def crop_pipeline(tmp_path_factory):
    """A tiny latent-conditional pipeline folder (4-channel VAE, 64 px tiles, unit 16, 2 DDIM steps, crop on)."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("crop") / "pipeline"
    save_pipeline(
        path,
        unet=build_unet("tiny", sample_size=SIZE // 8, in_channels=9, out_channels=4),
        scheduler=DDPMScheduler(**{**PAPER_SCHEDULER, "prediction_type": "v_prediction"}),
        sampler=SamplerConfig(num_steps=2, decode="delta", feather=2, crop=True, crop_margin=8),
        vae=build_autoencoder("tiny"),
        image_size=SIZE,
        scheduler_name="ddim",
        conditional=True,
        residual=True,
    )
    return path


@pytest.fixture(scope="module")
def refined_pipeline(crop_pipeline, tmp_path_factory):
    """``crop_pipeline`` with a tiny pixel refiner whose output head is not zero."""
    path = tmp_path_factory.mktemp("crop_refined") / "pipeline"
    shutil.copytree(crop_pipeline, path)
    torch.manual_seed(1)
    refiner = build_refiner("tiny")
    with torch.no_grad():
        refiner.head.weight.normal_(std=0.5)
    attach_refiner(path, refiner.eval())
    return path


def _batch(*masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Real crops with a dark translucent band inside each mask."""
    mask = torch.stack(masks)
    clean = real_crops(len(masks), SIZE)
    return torch.where(mask.bool(), clean * 0.5 - 0.4, clean), mask


def _restore(pipe: RestorationPipeline, x: torch.Tensor, mask: torch.Tensor, **kwargs) -> torch.Tensor:
    return pipe.restore(x, mask, generator=torch.Generator().manual_seed(0), **kwargs)


def _count_calls(module: torch.nn.Module) -> list[int]:
    """Batch sizes of every forward call of ``module`` from now on."""
    calls: list[int] = []
    module.register_forward_hook(lambda _m, args, _out: calls.append(args[0].shape[0]))
    return calls


def test_pipeline_unit_is_the_factor_times_the_unet_downsampling(crop_pipeline):
    from experiments.restore import tile_geometry

    pipe = RestorationPipeline.from_pretrained(crop_pipeline)
    assert pipe.sampler_config.crop and pipe.unit == 16 and tile_geometry(pipe) == (16, SIZE)


def test_crop_keeps_clean_pixels_bit_exact_and_restores_the_mask(refined_pipeline):
    pipe = RestorationPipeline.from_pretrained(refined_pipeline)
    x, mask = _batch(_mask(SIZE, (4, 6, 10, 12)), _mask(SIZE, (40, 30, 16, 20)))
    for refine in (False, True):
        out = _restore(pipe, x, mask, refine=refine)
        keep = (mask == 0).expand_as(x)
        assert torch.equal(out[keep], x[keep]), f"clean pixels bit-exact (refine={refine})"
        assert not torch.equal(out[~keep], x[~keep])
    assert torch.equal(_restore(pipe, x, mask), _restore(pipe, x, mask)), "same seed, same output"


def test_an_empty_mask_costs_nothing_and_comes_back_unchanged(refined_pipeline):
    pipe = RestorationPipeline.from_pretrained(refined_pipeline)
    unet, encoder, refiner = _count_calls(pipe.unet), _count_calls(pipe.codec.vae.encoder), _count_calls(pipe.refiner)
    x, mask = _batch(_mask(SIZE), _mask(SIZE))
    assert torch.equal(_restore(pipe, x, mask), x)
    assert unet == encoder == refiner == [] and pipe.nfe == 0
    x, mask = _batch(_mask(SIZE), _mask(SIZE, (20, 20, 8, 8)))
    out = _restore(pipe, x, mask)
    assert torch.equal(out[0], x[0]) and not torch.equal(out[1], x[1])
    assert encoder == [1] and refiner == [1] and len(unet) == 2 and pipe.nfe == 2


@pytest.mark.parametrize("refine", [False, True])
def test_crop_equals_the_full_tile_path_when_every_window_is_the_whole_tile(refined_pipeline, refine):
    pipe = RestorationPipeline.from_pretrained(refined_pipeline)
    x, mask = _batch(_mask(SIZE, (4, 6, 10, 12)), _mask(SIZE, (40, 30, 16, 20)))
    full = _restore(pipe, x, mask, crop=False, refine=refine)
    assert torch.equal(_restore(pipe, x, mask, crop_max_fraction=0.01, refine=refine), full)
    assert torch.equal(_restore(pipe, x, mask, crop_margin=64, refine=refine), full)


def test_a_mixed_batch_matches_restoring_each_tile_alone(crop_pipeline):
    pipe = RestorationPipeline.from_pretrained(crop_pipeline)
    channels = pipe.codec.latent_channels
    with torch.no_grad():  # a near-zero posterior std: encoding is deterministic, so tiles can be compared
        pipe.codec.vae.quant_conv.weight[channels:].zero_()
        pipe.codec.vae.quant_conv.bias[channels:].fill_(-30)
    masks = [
        _mask(SIZE, (2, 2, 6, 6)),
        _mask(SIZE, (40, 20, 20, 30)),
        _mask(SIZE),
        _mask(SIZE, (0, 0, 60, 60)),
        _mask(SIZE, (56, 56, 8, 8)),
    ]
    x, mask = _batch(*masks)
    windows = plan_windows(mask, margin=8, unit=16, factor=8, max_fraction=0.6)
    assert len(group_by_size(windows)) == 3 and windows[2] is None and windows[3] == Window(0, 0, SIZE, SIZE)
    settings = {"start": "z0", "known": "clean"}  # no start noise: the sampler is deterministic too (float error only)
    batch = _restore(pipe, x, mask, **settings)
    for i in range(len(masks)):
        torch.testing.assert_close(
            batch[i : i + 1], _restore(pipe, x[i : i + 1], mask[i : i + 1], **settings), atol=1e-4, rtol=0
        )


def test_restore_command_with_crop(crop_pipeline, tmp_path, he_tiles):
    from experiments import restore as restore_cli

    boxes = [(10, 5, 20, 12), None]
    for i, (tile, box) in enumerate(zip(he_tiles, boxes, strict=False)):
        mask = np.zeros((SIZE, SIZE), bool)
        if box is not None:
            top, left, h, w = box
            mask[top : top + h, left : left + w] = True
        corrupted = tile[:SIZE, :SIZE].copy()
        corrupted[mask] = 20
        write_image_atomic(tmp_path / "img" / f"t{i}.png", corrupted)
        write_mask_atomic(tmp_path / "msk" / f"t{i}.png", mask)
    argv = [
        "--model",
        str(crop_pipeline),
        "--images",
        str(tmp_path / "img"),
        "--masks",
        str(tmp_path / "msk"),
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        "--sampler-set",
        "crop=true",
        "--sampler-set",
        "crop_margin=8",
    ]
    assert restore_cli.main(argv) == 0
    for i in range(2):
        out, inp = read_image(tmp_path / "out" / f"t{i}.png"), read_image(tmp_path / "img" / f"t{i}.png")
        mask = read_mask(tmp_path / "msk" / f"t{i}.png")
        assert np.array_equal(out[~mask], inp[~mask]), "clean pixels are identical"
        assert np.array_equal(out, inp) if i else not np.array_equal(out[mask], inp[mask])
    manifest = json.loads((tmp_path / "out" / "restore_manifest.json").read_text())
    assert "crop" in json.dumps(manifest)


def test_crop_bound_command_compares_crop_with_the_full_path(crop_pipeline, tmp_path, he_tiles):
    from experiments import crop_bound

    for i, box in enumerate([(4, 4, 10, 10), (30, 20, 30, 40)]):
        clean = he_tiles[i][:SIZE, :SIZE]
        mask = _mask(SIZE, box)[0].numpy().astype(bool)
        corrupted = clean.copy()
        corrupted[mask] = 20
        write_image_atomic(tmp_path / "set" / "clean" / f"t{i}.png", clean)
        write_image_atomic(tmp_path / "set" / "corrupted" / f"t{i}.png", corrupted)
        write_mask_atomic(tmp_path / "set" / "masks" / f"t{i}.png", mask)
    out = tmp_path / "bound.json"
    assert (
        crop_bound.main(
            [
                "--pipelines",
                str(crop_pipeline),
                "--data",
                str(tmp_path / "set"),
                "--margins",
                "8",
                "--batch-size",
                "2",
                "--border-window",
                "32",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    rows = {r["config"]: r for r in json.loads(out.read_text()) if r["record"] == "crop"}
    assert set(rows) == {"full", "full, other seed", "crop, margin 8"}
    crop, tiles = rows["crop, margin 8"], [r for r in json.loads(out.read_text()) if r["record"] == "crop_tile"]
    assert rows["full"]["psnr_artifact_delta"] == 0 and crop["fallback_share"] == 0.5, "the large mask falls back"
    assert crop["window_fraction"] == (0.25 + 1) / 2 and crop["how"] == "measured" and len(tiles) == 6
    border = [r for r in json.loads(out.read_text()) if r["record"] == "vae_border"]
    assert [r["distance_px"] for r in border] == [[0, 8], [8, 16]] and border[0]["mean_abs_diff_255"] > 0


def test_crop_is_ignored_without_paste_back(crop_pipeline):
    pipe = RestorationPipeline.from_pretrained(crop_pipeline)
    x, mask = _batch(_mask(SIZE, (4, 6, 10, 12)), _mask(SIZE))
    reference = _restore(pipe, x, mask, paste_back=False, crop=False)
    assert torch.equal(_restore(pipe, x, mask, paste_back=False), reference), "the whole tile, as without crop"


# ------------------------------------------------------------------------------------------------ decode-only crop


def _local_decode(z: torch.Tensor) -> torch.Tensor:
    """A decoder with no spatial context: each latent cell becomes an 8x8 block of its first three channels."""
    return torch.tanh(z[:, :3]).repeat_interleave(8, -2).repeat_interleave(8, -1)


@pytest.mark.parametrize("mode", ["full", "adaptive"])
def test_decode_windows_equals_the_whole_decode_for_a_context_free_decoder_and_decodes_less(mode):
    from lightning_modules.components.regional_sampler import decode_latents, decode_windows

    torch.manual_seed(0)
    z, z0 = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    mask = torch.stack([_mask(SIZE, (4, 6, 10, 12)), _mask(SIZE), _mask(SIZE, (40, 30, 6, 20))])
    shapes: list[tuple] = []

    def decode(latent):
        shapes.append(tuple(latent.shape))
        return _local_decode(latent)

    config = SamplerConfig(decode=mode, crop_decode=True, crop_margin=8)
    out = decode_windows(decode, z, z0, x, mask, config, 8)
    whole = decode_latents(_local_decode, z, z0, x, mode)
    inside = mask.bool().expand_as(x)
    # the mask's pixels are the whole-tile decode's (the adaptive mode's Gaussian runs on a smaller image: rounding)
    torch.testing.assert_close(out[inside], whole[inside], atol=1e-6, rtol=0)
    assert torch.equal(out[1], x[1]), "an empty mask is not decoded"
    # boxes + 8 px on the 8 px grid: 3x4 and 3x6 cells instead of the tile's 8x8, one call per window size
    per_tile = 1 if mode == "full" else 2  # the delta modes also decode the input's latent
    assert shapes == [(per_tile, 4, 3, 4), (per_tile, 4, 3, 6)]
    # a tile's decode does not depend on the tiles beside it in the batch
    alone = decode_windows(_local_decode, z[2:], z0[2:], x[2:], mask[2:], config, 8)
    assert torch.equal(alone[0], out[2])


def test_crop_decode_keeps_clean_pixels_bit_exact_and_decodes_the_windows_in_one_call(crop_pipeline):
    pipe = RestorationPipeline.from_pretrained(crop_pipeline)
    x, mask = _batch(_mask(SIZE, (4, 6, 10, 12)), _mask(SIZE, (40, 30, 16, 20)))
    decoder = _count_calls(pipe.codec.vae.decoder)
    out = _restore(pipe, x, mask, crop=False, crop_decode=True)
    keep = (mask == 0).expand_as(x)
    assert torch.equal(out[keep], x[keep])
    assert decoder == [2, 2], "one decoder call per window size: restored + reconstruction (delta decode)"
    full = _restore(pipe, x, mask, crop=False)
    # a random tiny VAE says nothing about how close the window decode is: the benchmark grid measures that with
    # trained weights (docs/METHOD.md section 11); here only that the window decode is a different computation
    assert not torch.equal(out, full)
    wide = _restore(pipe, x, mask, crop=False, crop_decode=True, crop_margin=64)
    # a window grown to the whole tile is the whole-tile decode (up to float rounding of the re-stacked batch)
    torch.testing.assert_close(wide, full, atol=1e-5, rtol=0)
    assert SamplerConfig.from_preset("reference", crop_decode=True).crop_decode, "kept, but ignored without paste_back"
    with pytest.raises(ValueError, match="crop_decode must be"):
        SamplerConfig(crop_decode=1)


def test_order_mask_size_batches_the_largest_masks_first_and_is_part_of_the_settings(crop_pipeline, tmp_path, he_tiles):
    from experiments import restore as restore_cli

    boxes = {"a": (2, 2, 6, 6), "b": (4, 4, 40, 40), "c": None, "d": (10, 10, 20, 30)}
    for (name, box), tile in zip(boxes.items(), he_tiles, strict=False):
        mask = np.zeros((SIZE, SIZE), bool)
        if box is not None:
            top, left, h, w = box
            mask[top : top + h, left : left + w] = True
        write_image_atomic(tmp_path / "img" / f"{name}.png", tile[:SIZE, :SIZE])
        write_mask_atomic(tmp_path / "msk" / f"{name}.png", mask)
    pairs = restore_cli.pair_files(tmp_path / "img", tmp_path / "msk")[0]
    ordered = restore_cli.order_by_mask_size(pairs, "artifact")
    assert [key for key, *_ in ordered] == ["b", "d", "a", "c"]

    pipe = RestorationPipeline.from_pretrained(crop_pipeline)
    job = restore_cli.RestoreJob(
        images=tmp_path / "img",
        masks=tmp_path / "msk",
        out=tmp_path / "out",
        model=crop_pipeline,
        method="latent-conditional",
        batch_size=2,
        order="mask-size",
        device="cpu",
    )
    result = restore_cli.restore_folder(job, restorer=pipe)
    assert result["done"] == 4
    manifest = json.loads((tmp_path / "out" / "restore_manifest.json").read_text())
    assert manifest["order"] == "mask-size"
    with pytest.raises(restore_cli.CLIError, match="other settings"):
        restore_cli.restore_folder(dataclasses.replace(job, order="name"), restorer=pipe)
    with pytest.raises(restore_cli.CLIError, match="--order"):
        restore_cli.validate_args(dataclasses.replace(job, order="size"))
