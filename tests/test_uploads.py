"""Uploaded example images: size, type by content, decompression bombs, safe names, all or nothing."""
from __future__ import annotations

import io
import os

import pytest
from PIL import Image

from clipforget.uploads import (UPLOADS, UploadConfig, UploadError, open_batch, sanitize_name,
                                store_uploads)


def _png(size=(24, 24), mode="RGB", color=(200, 30, 30), fmt="PNG") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, color if mode != "1" else 0).save(buf, fmt)
    return buf.getvalue()


def _stored(tmp_path):
    root = tmp_path / UPLOADS
    return sorted(p.relative_to(root) for p in root.rglob("*")) if root.exists() else []


def test_valid_uploads_are_stored_as_png_under_the_runs_folder(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "poodle one.jpg").write_bytes(_png(fmt="JPEG"))
    batch = store_uploads([src / "poodle one.jpg", ("p2.webp", _png(fmt="WEBP")),
                           ("gray.png", _png(mode="L", color=90))], tmp_path / "runs")
    assert [p.name for p in batch.paths] == ["00-poodle_one.png", "01-p2.png", "02-gray.png"]
    for p in batch.paths:
        assert p.parent == tmp_path / "runs" / UPLOADS / batch.id
        with Image.open(p) as im:
            assert im.format == "PNG" and im.mode == "RGB" and im.size == (24, 24)
    again = open_batch(tmp_path / "runs", batch.id)
    assert again.paths == batch.paths
    assert not [p for p in batch.dir.parent.iterdir() if p.name.startswith(".")]   # no temporaries left


@pytest.mark.parametrize("name, expected", [
    ("../../etc/passwd.png", "passwd"),
    ("..\\..\\windows\\system32\\x.png", "x"),
    ("/abs/path/img.PNG", "img"),
    ("....png", "png"),
    ("..", "image"),
    ("", "image"),
    ("a\x00b/../c d?.jpg", "c_d"),
    ("pöodle–ünïcode.png", "poodle_unicode"),
    (".hidden.png", "hidden"),
    ("x" * 300 + ".png", "x" * 64),
])
def test_names_cannot_traverse_paths(name, expected, tmp_path):
    assert sanitize_name(name) == expected
    batch = store_uploads([(name, _png())], tmp_path)
    (stored,) = batch.paths
    assert stored.resolve().parent == (tmp_path / UPLOADS / batch.id).resolve()
    assert stored.name == f"00-{expected}.png"


def test_type_is_checked_by_content_not_by_name(tmp_path):
    with pytest.raises(UploadError, match="not an image"):
        store_uploads([("photo.png", b"#!/bin/sh\necho this is not a png\n" * 10)], tmp_path)
    # a real PNG under a misleading name is accepted (and stored as .png)
    batch = store_uploads([("notes.txt", _png())], tmp_path)
    assert batch.paths[0].name == "00-notes.png"


def test_format_outside_the_allowed_list_is_refused(tmp_path):
    with pytest.raises(UploadError, match="is a GIF image"):
        store_uploads([("anim.gif", _png(fmt="GIF"))], tmp_path, UploadConfig(formats=("PNG", "JPEG")))


def test_size_limit_is_checked_before_reading(tmp_path):
    big = tmp_path / "big.png"
    with open(big, "wb") as f:          # sparse file: large on paper, never read
        f.truncate(11 * 2**20)
    with pytest.raises(UploadError, match=r"big'? is 11.0 MiB; the limit is 10 MiB"):
        store_uploads([big], tmp_path / "runs")
    with pytest.raises(UploadError, match="is empty"):
        store_uploads([("e.png", b"")], tmp_path / "runs")
    with pytest.raises(UploadError, match="at most 2"):
        store_uploads([("a.png", _png())] * 3, tmp_path / "runs", UploadConfig(max_files=2))
    with pytest.raises(UploadError, match="no images"):
        store_uploads([], tmp_path / "runs")


def test_decompression_bomb_is_refused(tmp_path):
    bomb = _png(size=(8000, 8000), mode="1")       # 64 Mpx, a few kB on disk
    assert len(bomb) < 100_000
    with pytest.raises(UploadError, match="pixels, more than"):
        store_uploads([("bomb.png", bomb)], tmp_path)


def test_an_image_over_pillows_own_limit_is_refused_with_the_limit(tmp_path, monkeypatch):
    """Pillow refuses images over twice its MAX_IMAGE_PIXELS itself, with DecompressionBombError (not
    an OSError), and warns over it (an error where warnings are): both are an UploadError giving the
    limit, and nothing is stored. The limit is lowered here; a real one needs a 180 Mpx image."""
    import warnings
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(UploadError, match="'huge' has 10,000 pixels, more than the limit of 1,000 pixels per "
                                          "image — downscale it"):
        store_uploads([("huge.png", _png(size=(100, 100), mode="1"))], tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with pytest.raises(UploadError, match="'big' has 1,600 pixels, more than the limit of 1,000 pixels"):
            store_uploads([("big.png", _png(size=(40, 40)))], tmp_path)
    assert _stored(tmp_path) == []


def test_corrupted_image_is_refused(tmp_path):
    data = _png(size=(64, 64))
    with pytest.raises(UploadError, match="truncated|corrupted|could not be read"):
        store_uploads([("cut.png", data[: len(data) // 2])], tmp_path)


def test_one_bad_file_stores_nothing(tmp_path):
    with pytest.raises(UploadError, match="'bad' is not an image"):
        store_uploads([("good.png", _png()), ("bad.png", b"not an image at all" * 20)], tmp_path)
    assert _stored(tmp_path) == []


def test_batch_ids_are_not_paths_and_old_batches_are_pruned(tmp_path):
    with pytest.raises(UploadError, match="invalid upload id"):
        open_batch(tmp_path, "../../etc")
    ids = []
    for i in range(4):
        ids.append(store_uploads([("a.png", _png())], tmp_path, UploadConfig(keep_batches=2)).id)
        os.utime(tmp_path / UPLOADS / ids[-1], (1000 + i, 1000 + i))   # deterministic ages
    left = {p.name for p in (tmp_path / UPLOADS).iterdir()}
    assert left == {ids[2], ids[3]}


def test_config_names_the_bad_field():
    with pytest.raises(ValueError, match="max_bytes"):
        UploadConfig(max_bytes=0)
    with pytest.raises(ValueError, match="max_pixels"):
        UploadConfig(max_pixels=10**12)
