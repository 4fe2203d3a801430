"""Latent cache: encoded once, reused when nothing changed, rebuilt when the VAE or the tiles change."""

import json

import pytest
import torch

from datamodules.datasets import TileDataset
from datamodules.latents import LatentCacheDataModule, LatentCacheDataset, build_latent_cache, dihedral
from datamodules.restoration import CleanTileDataModule
from lightning_modules.components.autoencoders import LatentCodec, build_autoencoder


@pytest.fixture(scope="module")
def tiles() -> TileDataset:
    dm = CleanTileDataModule(tile_size=64, stride=64, augment=False, num_workers=0, max_tiles={"train": 6})
    return dm.make_dataset("train")


@pytest.fixture
def codec() -> LatentCodec:
    torch.manual_seed(0)
    return LatentCodec(build_autoencoder("tiny"))


def test_dihedral_group_has_eight_distinct_members():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    variants = [dihedral(x, k) for k in range(8)]
    assert len({tuple(v.flatten().tolist()) for v in variants}) == 8
    assert torch.equal(variants[0], x)


def test_cache_is_built_once_and_reused(tiles, codec, tmp_path):
    path = build_latent_cache(codec, tiles, tmp_path / "c", variants=2, batch_size=4, progress=False)
    payload = torch.load(path / "latents.pt")
    assert payload["mean"].shape == (len(tiles), 2, 4, 8, 8) and payload["std"].shape == payload["mean"].shape
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["count"] == len(tiles) and manifest["variants"] == 2
    mtime = (path / "latents.pt").stat().st_mtime_ns
    build_latent_cache(codec, tiles, path, variants=2, batch_size=4, progress=False)
    assert (path / "latents.pt").stat().st_mtime_ns == mtime, "unchanged VAE and tiles: cache reused"
    # the cached mean equals a fresh encode of the same (rotated) tile
    x = tiles[1]["clean"].unsqueeze(0)
    mean, _ = codec.encode_dist(dihedral(x, 1))
    assert torch.allclose(payload["mean"][1, 1].float(), mean[0], atol=2e-2)


def test_cache_rebuilds_when_vae_or_tiles_change(tiles, codec, tmp_path):
    path = build_latent_cache(codec, tiles, tmp_path / "c", variants=1, progress=False)
    first = json.loads((path / "manifest.json").read_text())
    with torch.no_grad():
        next(codec.vae.parameters()).add_(0.01)
    build_latent_cache(codec, tiles, path, variants=1, progress=False)
    second = json.loads((path / "manifest.json").read_text())
    assert first["vae"] != second["vae"] and first["tiles"] == second["tiles"]
    fewer = TileDataset(tiles.sources, tiles.tiles[:3], split="train")
    build_latent_cache(codec, fewer, path, variants=1, progress=False)
    third = json.loads((path / "manifest.json").read_text())
    assert third["tiles"] != second["tiles"] and third["count"] == 3


def test_cache_dataset_samples_are_seeded_by_epoch(tiles, codec, tmp_path):
    path = build_latent_cache(codec, tiles, tmp_path / "c", variants=2, progress=False)
    ds = LatentCacheDataset(path, seed=0)
    assert len(ds) == len(tiles) * 2
    a, b, c = ds[(0, 3)], ds[(0, 3)], ds[(1, 3)]
    assert torch.equal(a["latent"], b["latent"]) and not torch.equal(a["latent"], c["latent"])
    assert a["meta"]["variant"] == 1
    means = LatentCacheDataset(path, sample=False, variants=1)
    assert len(means) == len(tiles) and torch.equal(means[0]["latent"], means[(5, 0)]["latent"])


def test_datamodule_prepares_caches_from_an_exported_vae(tmp_path, codec):
    codec.vae.save_pretrained(tmp_path / "vae")
    dm = LatentCacheDataModule(
        autoencoder=str(tmp_path / "vae"),
        cache_dir=str(tmp_path / "cache"),
        tile_size=64,
        stride=64,
        variants=2,
        batch_size=4,
        max_tiles={"train": 4, "val": 2},
    )
    dm.prepare_data()
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["latent"].shape == (4, 4, 8, 8)
    assert len(dm.datasets["val"]) == 2, "val keeps one variant per tile"
