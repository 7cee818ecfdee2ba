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
