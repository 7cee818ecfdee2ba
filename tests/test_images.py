"""Opening user images: every mode handled, bad files refused with a clear message."""
import numpy as np
import pytest
from PIL import Image

from clipforget.data.images import ImageError, open_image


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "CMYK", "I;16", "I", "F", "1"])
def test_modes_become_rgb(tmp_path, mode):
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 16, 3), dtype=np.uint8))
    if mode == "I;16":
        img = Image.fromarray((np.arange(256, dtype=np.uint16).reshape(16, 16) * 257), "I;16")
    else:
        img = rgb.convert(mode)
    path = tmp_path / ("x.tif" if mode in ("I;16", "I", "F", "CMYK") else "x.png")
    img.save(path)
    out = open_image(path)
    assert out.mode == "RGB" and out.size == (16, 16)
    if mode == "I;16":  # 16-bit scaled to 8-bit, not clipped
        arr = np.asarray(out)[..., 0]
        assert arr.min() == 0 and arr.max() == 255


def test_rgba_is_composited_on_white(tmp_path):
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "t.png")
    assert open_image(tmp_path / "t.png").getpixel((0, 0)) == (255, 255, 255)


def test_corrupted_and_non_images(tmp_path):
    Image.new("RGB", (64, 64), "red").save(tmp_path / "ok.jpg")
    data = (tmp_path / "ok.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 3])
    with pytest.raises(ImageError, match="corrupted or truncated"):
        open_image(tmp_path / "trunc.jpg")
    (tmp_path / "notes.jpg").write_text("not an image at all")
    with pytest.raises(ImageError, match="not an image"):
        open_image(tmp_path / "notes.jpg")


def test_decompression_bomb_and_huge_images(tmp_path):
    Image.new("1", (12000, 12000)).save(tmp_path / "bomb.png")    # tiny file, 144 MP
    with pytest.raises(ImageError, match="decompression bomb|pixels"):
        open_image(tmp_path / "bomb.png")
    Image.new("L", (3000, 3000)).save(tmp_path / "big.png")
    with pytest.raises(ImageError, match="downscale"):
        open_image(tmp_path / "big.png", max_pixels=1_000_000)


def _png16_rgb(arr: np.ndarray) -> bytes:
    """A 48-bit RGB PNG (Pillow writes no 16-bit-per-channel colour PNGs itself)."""
    import struct
    import zlib
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)) +
            chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_16_bit_pngs_become_8_bit_rgb(tmp_path):
    gray = (np.arange(256, dtype=np.uint16).reshape(16, 16) * 257)
    Image.fromarray(gray, "I;16").save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"
    out = np.asarray(open_image(tmp_path / "g16.png"))
    assert out.shape == (16, 16, 3) and out[..., 0].min() == 0 and out[..., 0].max() == 255
    rgb = np.zeros((4, 4, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 65535, 32768, 256
    (tmp_path / "rgb48.png").write_bytes(_png16_rgb(rgb))
    assert open_image(tmp_path / "rgb48.png").getpixel((0, 0)) == (255, 128, 1)


@pytest.mark.parametrize("mode", ["La", "RGBa", "PA"])
def test_premultiplied_and_keyed_transparency_on_white(tmp_path, mode):
    from clipforget.data.images import to_rgb
    clear = Image.new("RGBA", (4, 4), (200, 30, 60, 0))
    img = clear.convert("LA").convert("La") if mode == "La" else clear.convert(mode)
    assert to_rgb(img).getpixel((0, 0)) == (255, 255, 255)
    keyed = Image.new("L", (4, 4), 100)
    keyed.info["transparency"] = 100             # a grayscale PNG with a tRNS key
    assert to_rgb(keyed).getpixel((0, 0)) == (255, 255, 255)


def test_oversized_files_and_folders_named_like_images(tmp_path, monkeypatch):
    import clipforget.data.images as images
    Image.new("RGB", (64, 64), "red").save(tmp_path / "ok.png")
    monkeypatch.setattr(images, "MAX_FILE_BYTES", 100)
    with pytest.raises(ImageError, match=r"ok.png is 0 MiB; the limit is 0 MiB — downscale it first"):
        open_image(tmp_path / "ok.png")
    (tmp_path / "album.jpg").mkdir()
    with pytest.raises(ImageError, match="album.jpg is a folder, not an image"):
        open_image(tmp_path / "album.jpg")
    with pytest.raises(ImageError, match="cannot read image .*missing.png: No such file"):
        open_image(tmp_path / "missing.png")
