"""Robust image/mask I/O: every bad input becomes RGB with a warning or a clear ImageReadError."""

import logging
import os

import cv2
import numpy as np
import pytest
import tifffile
from PIL import Image

from datamodules.imageio import (
    ImageReadError,
    list_images,
    read_image,
    read_mask,
    write_image_atomic,
    write_mask_atomic,
)


def _png(path, rgb):
    Image.fromarray(rgb).save(path)
    return path


def test_rgb_png_round_trip_exact(tmp_path, he_tile):
    write_image_atomic(tmp_path / "a.png", he_tile)
    out = read_image(tmp_path / "a.png")
    assert out.dtype == np.uint8 and out.shape == (256, 256, 3)
    np.testing.assert_array_equal(out, he_tile)


@pytest.mark.parametrize(
    ("name", "payload", "needle"),
    [
        ("empty.png", b"", "empty"),
        ("notes.png", b"this is a text file, not an image\n" * 20, "not a recognised image"),
    ],
)
def test_unreadable_files_raise_with_file_name_and_advice(tmp_path, name, payload, needle):
    (tmp_path / name).write_bytes(payload)
    with pytest.raises(ImageReadError, match=needle) as info:
        read_image(tmp_path / name)
    assert name in str(info.value) and "re-export" in str(info.value)


def test_truncated_png_and_jpeg(tmp_path, he_tile):
    _png(tmp_path / "full.png", he_tile)
    cv2.imwrite(str(tmp_path / "full.jpg"), he_tile[..., ::-1])
    for name in ("full.png", "full.jpg"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / f"cut_{name}").write_bytes(data[: len(data) // 2])
        with pytest.raises(ImageReadError, match="truncated") as info:
            read_image(tmp_path / f"cut_{name}")
        assert f"cut_{name}" in str(info.value)


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "nope.png")


def test_grayscale_becomes_rgb_with_warning(tmp_path, he_tile, caplog):
    gray = cv2.cvtColor(he_tile, cv2.COLOR_RGB2GRAY)
    _png(tmp_path / "g.png", gray)
    with caplog.at_level(logging.WARNING, logger="datamodules.imageio"):
        out = read_image(tmp_path / "g.png")
    assert out.shape == (256, 256, 3)
    for c in range(3):
        np.testing.assert_array_equal(out[..., c], gray)
    assert "grayscale" in caplog.text and "g.png" in caplog.text


def test_rgba_and_la_composite_onto_white(tmp_path, caplog):
    rgba = np.zeros((2, 3, 4), np.uint8)
    rgba[..., :3] = (200, 40, 100)
    rgba[..., 3] = [[0, 255, 128], [0, 255, 128]]
    _png(tmp_path / "a.png", rgba)
    with caplog.at_level(logging.WARNING):
        out = read_image(tmp_path / "a.png")
    np.testing.assert_array_equal(out[0, 0], (255, 255, 255))
    np.testing.assert_array_equal(out[0, 1], (200, 40, 100))
    np.testing.assert_allclose(out[0, 2], [228, 147, 177], atol=1)
    assert "alpha composited onto white" in caplog.text
    la = np.stack([np.full((2, 2), 50, np.uint8), np.array([[0, 255], [255, 0]], np.uint8)], axis=-1)
    Image.fromarray(la, "LA").save(tmp_path / "la.png")
    out = read_image(tmp_path / "la.png")
    np.testing.assert_array_equal(out[0, 0], (255, 255, 255))
    np.testing.assert_array_equal(out[0, 1], (50, 50, 50))


def test_16bit_png_rgb_and_gray_scaled(tmp_path, caplog):
    rgb16 = np.zeros((2, 2, 3), np.uint16)
    rgb16[0, 0] = (65535, 0, 257 * 100)  # R, G, B
    cv2.imwrite(str(tmp_path / "c16.png"), rgb16[..., ::-1])
    with caplog.at_level(logging.WARNING):
        out = read_image(tmp_path / "c16.png")
    np.testing.assert_array_equal(out[0, 0], (255, 0, 100))
    assert "16-bit" in caplog.text
    cv2.imwrite(str(tmp_path / "g16.png"), np.array([[0, 65535], [257 * 7, 257 * 200]], np.uint16))
    np.testing.assert_array_equal(read_image(tmp_path / "g16.png")[..., 1], [[0, 255], [7, 200]])


def test_16bit_and_float_tiff(tmp_path, he_tile):
    tifffile.imwrite(tmp_path / "t16.tif", he_tile.astype(np.uint16) * 257)
    np.testing.assert_array_equal(read_image(tmp_path / "t16.tif"), he_tile)
    tifffile.imwrite(tmp_path / "f.tif", he_tile.astype(np.float32) / 255.0)
    np.testing.assert_array_equal(read_image(tmp_path / "f.tif"), he_tile)
    tifffile.imwrite(tmp_path / "bad.tif", np.full((4, 4, 3), -3.0, np.float32))
    with pytest.raises(ImageReadError, match=r"values in \[-3"):
        read_image(tmp_path / "bad.tif")


def test_palette_png(tmp_path, he_tile, caplog):
    pal = Image.fromarray(he_tile).quantize(64)
    pal.save(tmp_path / "p.png")
    with caplog.at_level(logging.WARNING):
        out = read_image(tmp_path / "p.png")
    np.testing.assert_array_equal(out, np.asarray(pal.convert("RGB")))
    assert "palette" in caplog.text


def test_min_size_names_both_sizes(tmp_path, he_tile):
    _png(tmp_path / "small.png", he_tile[:100, :120])
    with pytest.raises(ImageReadError, match="100x120") as info:
        read_image(tmp_path / "small.png", min_size=256)
    assert "256x256" in str(info.value)
    assert read_image(tmp_path / "small.png", min_size=100).shape == (100, 120, 3)


def test_read_mask_values_conventions_and_size(tmp_path):
    m = np.zeros((4, 5), bool)
    m[1:3, 2:4] = True
    write_mask_atomic(tmp_path / "m.png", m)
    assert set(np.unique(np.asarray(Image.open(tmp_path / "m.png"))).tolist()) == {0, 255}
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), m)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png", convention="keep"), ~m)
    _png(tmp_path / "m01.png", m.astype(np.uint8))
    np.testing.assert_array_equal(read_mask(tmp_path / "m01.png", shape=(4, 5)), m)
    _png(tmp_path / "rgb.png", np.repeat(m.astype(np.uint8)[..., None] * 255, 3, axis=2))
    np.testing.assert_array_equal(read_mask(tmp_path / "rgb.png"), m)
    with pytest.raises(ImageReadError, match="is 4x5 .* image is 8x8"):
        read_mask(tmp_path / "m.png", shape=(8, 8))
    soft = np.array([[0, 128, 255]], np.uint8)
    _png(tmp_path / "soft.png", soft)
    with pytest.raises(ImageReadError, match=r"3 values \(0, 128, 255\)"):
        read_mask(tmp_path / "soft.png")
    np.testing.assert_array_equal(read_mask(tmp_path / "soft.png", threshold=127), [[False, True, True]])
    with pytest.raises(ValueError, match="convention"):
        read_mask(tmp_path / "m.png", convention="artefact")


def test_atomic_writes_are_deterministic_and_leave_no_temp(tmp_path, he_tile):
    write_image_atomic(tmp_path / "sub" / "a.png", he_tile)
    first = (tmp_path / "sub" / "a.png").read_bytes()
    write_image_atomic(tmp_path / "sub" / "a.png", he_tile.copy())
    write_image_atomic(tmp_path / "sub" / "b.png", he_tile.copy())
    assert (tmp_path / "sub" / "a.png").read_bytes() == first == (tmp_path / "sub" / "b.png").read_bytes()
    assert sorted(os.listdir(tmp_path / "sub")) == ["a.png", "b.png"]


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path, he_tile, monkeypatch):
    target = tmp_path / "a.png"
    write_image_atomic(target, he_tile)
    before = target.read_bytes()

    def boom(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", boom)
    with pytest.raises(OSError, match="disk full"):
        write_image_atomic(target, 255 - he_tile)
    assert target.read_bytes() == before
    assert os.listdir(tmp_path) == ["a.png"]


def test_write_rejects_bad_inputs(tmp_path, he_tile):
    with pytest.raises(ValueError, match="uint8"):
        write_image_atomic(tmp_path / "a.png", he_tile.astype(np.float32))
    with pytest.raises(ValueError, match="lossless"):
        write_mask_atomic(tmp_path / "m.jpg", np.zeros((4, 4), bool))
    with pytest.raises(ValueError, match="0/1"):
        write_mask_atomic(tmp_path / "m.png", np.full((4, 4), 7, np.uint8))


def test_list_images_sorted_recursive_and_skips_hidden(tmp_path, he_tile):
    for rel in ("b.png", "a/z.JPG", "a/c.tif", ".hidden.png", "._b.png", "notes.txt", "a/.cache/x.png"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(b"x")
    rels = [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path)]
    assert rels == ["a/c.tif", "a/z.JPG", "b.png"]
    assert [p.name for p in list_images(tmp_path, recursive=False)] == ["b.png"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_images(tmp_path / "missing")
