"""`python -m datamodules.synthesize` and the gallery command on the bundled real H&E."""

import json
import re

import cv2
import numpy as np

from datamodules import gallery, synthesize


def _tree_bytes(root):
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthesize_is_byte_identical_and_exact(tmp_path):
    args = ["--bundled", "--count", "6", "--seed", "3", "--size", "128"]
    assert synthesize.main([*args, "--out", str(tmp_path / "a")]) == 0
    assert synthesize.main([*args, "--out", str(tmp_path / "b")]) == 0
    a, b = _tree_bytes(tmp_path / "a"), _tree_bytes(tmp_path / "b")
    assert a == b
    names = sorted(p.name for p in (tmp_path / "a" / "clean").iterdir())
    assert len(names) == 6
    for sub in ("corrupted", "masks"):
        assert sorted(p.name for p in (tmp_path / "a" / sub).iterdir()) == names
    for name in names:
        clean = cv2.imread(str(tmp_path / "a" / "clean" / name), cv2.IMREAD_UNCHANGED)
        corrupted = cv2.imread(str(tmp_path / "a" / "corrupted" / name), cv2.IMREAD_UNCHANGED)
        mask = cv2.imread(str(tmp_path / "a" / "masks" / name), cv2.IMREAD_UNCHANGED)
        assert clean.shape == (128, 128, 3) and mask.shape == (128, 128) and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255} and (mask == 255).any()
        assert np.array_equal((clean != corrupted).any(-1), mask == 255), name
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["mask_convention"] == "255 = artifact" and len(manifest["items"]) == 6


def test_different_seed_different_corruptions(tmp_path):
    synthesize.main(["--bundled", "--count", "2", "--seed", "0", "--size", "128", "--out", str(tmp_path / "a")])
    synthesize.main(["--bundled", "--count", "2", "--seed", "1", "--size", "128", "--out", str(tmp_path / "b")])
    assert _tree_bytes(tmp_path / "a" / "masks") != _tree_bytes(tmp_path / "b" / "masks")


def test_synthesize_from_folder_and_type_subset(tmp_path, he_templates):
    src = tmp_path / "clean_tiles"
    src.mkdir()
    for i, t in enumerate(he_templates[:2]):
        cv2.imwrite(str(src / f"t{i}.png"), t[:256, :256, ::-1])
    out = tmp_path / "out"
    synthesize.main(["--images", str(src), "--count", "3", "--types", "thread,ink", "--out", str(out)])
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(set(item["types"]) <= {"thread", "ink"} for item in manifest["items"])
    assert len(list((out / "masks").iterdir())) == 3


def test_unknown_type_is_a_clear_error(tmp_path, capsys):
    assert synthesize.main(["--bundled", "--types", "fold,smudge", "--out", str(tmp_path)]) == 2
    assert re.search(r"error: unknown artifact type.*'smudge'", capsys.readouterr().err)


def test_gallery_renders_every_type(tmp_path):
    out = tmp_path / "g.png"
    assert gallery.main(["--out", str(out), "--columns", "2", "--size", "96"]) == 0
    img = cv2.imread(str(out))
    from datamodules.artifacts import ARTIFACT_TYPES

    rows = 1 + 2 * len(ARTIFACT_TYPES)
    assert img.shape[0] == rows * (96 + 4) and img.shape[1] == 2 * (96 + 4)


def test_balanced_sets_take_the_types_in_turn_one_artifact_each(tmp_path):
    types = ["ink", "blur", "thread"]
    assert (
        synthesize.main(
            [
                "--bundled",
                "--count",
                "6",
                "--seed",
                "0",
                "--size",
                "128",
                "--balanced",
                "--types",
                ",".join(types),
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert [item["types"] for item in manifest["items"]] == [[t] for t in types * 2]
    assert manifest["balanced"] and manifest["max_artifacts"] == 1


def test_unseen_split_takes_only_images_without_train_tiles(tmp_path):
    from datamodules.sources import bundled_sources
    from datamodules.splits import assign_regions

    sources = bundled_sources()
    unseen = {s.name for s, r in zip(sources, assign_regions(sources), strict=True) if not r["train"]}
    assert unseen == {"template1.png", "template3.png"}
    assert (
        synthesize.main(["--bundled", "--split", "unseen", "--count", "8", "--seed", "0", "--out", str(tmp_path)]) == 0
    )
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    sources_used = [item["source"] for item in manifest["items"]]
    assert set(sources_used) == unseen, "the triplets are spread over every unseen image"


def test_pen_type_uses_real_outlines(tmp_path):
    assert (
        synthesize.main(
            ["--bundled", "--split", "unseen", "--types", "pen", "--count", "2", "--seed", "0", "--out", str(tmp_path)]
        )
        == 0
    )
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert all(set(item["types"]) == {"pen"} for item in manifest["items"])
