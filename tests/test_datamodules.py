"""The restoration and clean-tile DataModules on the bundled real H&E: batch contract, seeding, splits, batch sizes."""

import numpy as np
import pytest
import torch

from datamodules.base import per_device_batch_size
from datamodules.datasets import EpochIndexSampler, TripletFolderDataset
from datamodules.imageio import write_image_atomic, write_mask_atomic
from datamodules.restoration import ArtifactRestorationDataModule, CleanTileDataModule

SMALL = {"tile_size": 64, "stride": 64, "num_workers": 0, "batch_size": 4, "max_tiles": {"train": 16, "val": 8}}


@pytest.fixture(scope="module")
def restoration_dm() -> ArtifactRestorationDataModule:
    dm = ArtifactRestorationDataModule(**SMALL)
    dm.setup("fit")
    return dm


def test_restoration_batch_contract(restoration_dm):
    batch = next(iter(restoration_dm.train_dataloader()))
    assert set(batch) == {"clean", "corrupted", "artifact_mask", "meta"}
    assert batch["clean"].shape == batch["corrupted"].shape == (4, 3, 64, 64)
    assert batch["artifact_mask"].shape == (4, 1, 64, 64)
    for key in ("clean", "corrupted", "artifact_mask"):
        assert batch[key].dtype == torch.float32
    assert batch["clean"].min() >= -1 and batch["clean"].max() <= 1
    assert set(torch.unique(batch["artifact_mask"]).tolist()) <= {0.0, 1.0}
    assert batch["artifact_mask"].flatten(1).sum(1).min() > 0, "every tile carries an artifact"
    keep = batch["artifact_mask"] == 0
    assert torch.equal(
        batch["clean"].masked_select(keep.expand_as(batch["clean"])),
        batch["corrupted"].masked_select(keep.expand_as(batch["clean"])),
    ), "clean region untouched"
    changed = (batch["clean"] != batch["corrupted"]).any(1, keepdim=True)
    assert torch.equal(changed.float(), batch["artifact_mask"]), "mask is exactly the changed pixels"
    assert len(batch["meta"]["types"]) == 4 and all(batch["meta"]["types"])


def test_val_corruptions_fixed_train_corruptions_change_per_epoch(restoration_dm):
    val = restoration_dm.datasets["val"]
    a, b = val[0], val[0]
    assert torch.equal(a["corrupted"], b["corrupted"])
    train = restoration_dm.datasets["train"]
    e0, e0_again, e1 = train[(0, 3)], train[(0, 3)], train[(1, 3)]
    assert torch.equal(e0["corrupted"], e0_again["corrupted"])
    assert not torch.equal(e0["artifact_mask"], e1["artifact_mask"])


def test_val_identical_across_datamodule_instances(restoration_dm):
    other = ArtifactRestorationDataModule(**SMALL)
    other.setup("validate")
    assert torch.equal(other.datasets["val"][2]["corrupted"], restoration_dm.datasets["val"][2]["corrupted"])


def test_splits_are_spatially_disjoint(restoration_dm):
    boxes = {}
    for split in ("train", "val", "test"):
        tiles = restoration_dm.tiles(split)
        boxes[split] = [(restoration_dm.sources[s].name, r.x, r.y, r.size) for s, r in tiles]
        assert boxes[split], f"{split} is empty"

    def overlap(p, q):
        return p[0] == q[0] and abs(p[1] - q[1]) < p[3] and abs(p[2] - q[2]) < p[3]

    for s1, s2 in (("train", "val"), ("train", "test"), ("val", "test")):
        assert not any(overlap(p, q) for p in boxes[s1] for q in boxes[s2]), f"{s1} overlaps {s2}"


def test_clean_datamodule_yields_clean_only():
    dm = CleanTileDataModule(**SMALL)
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"clean", "meta"}
    assert batch["clean"].shape == (4, 3, 64, 64)


def test_per_device_batch_size():
    assert per_device_batch_size(16, 2) == 8
    with pytest.raises(ValueError, match="not divisible by the 3 devices"):
        per_device_batch_size(16, 3)


def test_epoch_index_sampler_reseeds_by_epoch():
    s = EpochIndexSampler(10, seed=1)
    s.set_epoch(0)
    first = list(s)
    s.set_epoch(0)
    assert list(s) == first
    assert all(e == 0 for e, _ in first) and sorted(i for _, i in first) == list(range(10))
    s.set_epoch(5)
    fifth = list(s)
    assert all(e == 5 for e, _ in fifth) and [i for _, i in fifth] != [i for _, i in first]


def test_triplet_folder_skips_bad_files(tmp_path, he_tile):
    for sub in ("clean", "corrupted", "masks"):
        (tmp_path / sub).mkdir()
    mask = np.zeros(he_tile.shape[:2], bool)
    mask[10:20, 10:40] = True
    for name in ("a", "b"):
        write_image_atomic(tmp_path / "clean" / f"{name}.png", he_tile)
        write_image_atomic(tmp_path / "corrupted" / f"{name}.png", he_tile)
        write_mask_atomic(tmp_path / "masks" / f"{name}.png", mask)
    (tmp_path / "corrupted" / "broken.png").write_bytes(b"not a png")
    write_mask_atomic(tmp_path / "masks" / "broken.png", mask)
    write_image_atomic(tmp_path / "corrupted" / "nomask.png", he_tile)
    write_mask_atomic(tmp_path / "masks" / "b.png", np.zeros((10, 10), bool))  # wrong size
    ds = TripletFolderDataset(tmp_path)
    assert len(ds) == 1 and ds[0]["meta"]["name"] == "a"
    reasons = dict(ds.skipped)
    assert any("nomask" in p for p in reasons)
    assert any("broken" in p for p in reasons)
    assert any(p.endswith("b.png") for p in reasons)
    assert ds[0]["artifact_mask"].sum() == mask.sum()


def test_triplets_replace_a_split(tmp_path, he_tile):
    for sub in ("clean", "corrupted", "masks"):
        (tmp_path / sub).mkdir()
    mask = np.zeros((256, 256), bool)
    mask[:, 100:120] = True
    write_image_atomic(tmp_path / "clean" / "t.png", he_tile)
    write_image_atomic(tmp_path / "corrupted" / "t.png", he_tile)
    write_mask_atomic(tmp_path / "masks" / "t.png", mask)
    dm = ArtifactRestorationDataModule(**SMALL, triplets={"test": str(tmp_path)})
    dm.setup("test")
    batch = next(iter(dm.test_dataloader()))
    assert batch["clean"].shape == (1, 3, 256, 256)
    assert batch["artifact_mask"].sum() == mask.sum()
