"""Image preprocessing against transformers' Gemma3ImageProcessor (here its Pillow backend: the default
torchvision backend needs torchvision, which this project does not install), Pan & Scan crop geometry
against the reference's own crop function, and every kind of bad image file."""

import struct
import zlib

import numpy as np
import pytest
import torch

from gemmakit import image
from gemmakit.image import PanScan, pan_and_scan_boxes, preprocess

Image = pytest.importorskip("PIL.Image")
gemma3_pil = pytest.importorskip("transformers.models.gemma3.image_processing_pil_gemma3")


def reference(size, pas: PanScan | None):
    return gemma3_pil.Gemma3ImageProcessorPil(
        size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
        do_pan_and_scan=pas is not None, pan_and_scan_min_crop_size=(pas or PanScan()).min_crop_size,
        pan_and_scan_max_num_crops=(pas or PanScan()).max_crops,
        pan_and_scan_min_ratio_to_activate=(pas or PanScan()).min_ratio)


def random_image(path, w, h, mode, seed):
    g = torch.Generator().manual_seed(seed)
    channels = 4 if mode == "RGBA" else 3
    arr = torch.randint(0, 256, (h, w, channels), generator=g, dtype=torch.uint8).numpy()
    img = Image.fromarray(arr, "RGBA" if channels == 4 else "RGB")
    if mode not in ("RGB", "RGBA"):
        img = img.convert(mode)
    img.save(path)
    return path


CASES = [  # width, height, mode, file type, tower size
    (64, 48, "RGB", "png", 896),  # small and slightly wide: upscaled, no crops
    (1000, 300, "RGB", "png", 896),  # wide: 3 crops at the real size
    (300, 1000, "RGBA", "png", 64),  # tall with transparency
    (1024, 1024, "L", "png", 64),  # square greyscale
    (777, 512, "P", "png", 64),  # palette; ratio 1.52 -> 2 crops
    (1500, 400, "RGB", "jpg", 64),  # 4 crops, last one narrower
    (2000, 300, "RGB", "png", 64),  # crop would be 300 high but n capped at 4: 500 wide
    (520, 300, "RGB", "png", 64),  # ratio 1.73 -> 2 crops of 260
    (500, 300, "RGB", "png", 64),  # 2 crops of 250 < 256: none
]


@pytest.mark.parametrize("w, h, mode, ext, size", CASES)
@pytest.mark.parametrize("pan", [False, True], ids=["plain", "pan_and_scan"])
def test_pixels_equal_reference(tmp_path, w, h, mode, ext, size, pan):
    path = random_image(tmp_path / f"img.{ext}", w, h, mode, seed=w + h)
    pas = PanScan() if pan else None
    ref = reference(size, pas)(images=[Image.open(path)], return_tensors="pt")
    got = preprocess(path, size, pas)
    assert got.shape[0] - 1 == int(ref["num_crops"][0])
    assert got.dtype == torch.float32 and got.shape[1:] == (3, size, size)
    torch.testing.assert_close(got, ref["pixel_values"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("pas", [PanScan(), PanScan(min_crop_size=100, max_crops=3, min_ratio=1.5)])
def test_crop_geometry_equals_reference(pas):
    proc = reference(8, pas)
    sizes = [(w, h) for w in (90, 256, 300, 512, 513, 640, 1000, 1023, 1500, 4000) for h in (100, 255, 256, 300, 777)]
    n_cropped = 0
    for w, h in sizes:
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        coords = np.stack([rows, cols])  # each pixel knows where it is: crops reveal their boxes
        crops = proc.pan_and_scan(coords, pas.min_crop_size, pas.max_crops, pas.min_ratio)
        want = [(int(c[1, 0, 0]), int(c[0, 0, 0]), int(c[1, 0, -1]) + 1, int(c[0, -1, 0]) + 1) for c in crops]
        assert pan_and_scan_boxes(w, h, pas) == want, (w, h)
        n_cropped += bool(want)
    assert 0 < n_cropped < len(sizes)  # both branches exercised


def test_crops_tile_the_image_in_order():
    assert pan_and_scan_boxes(1500, 400) == [(0, 0, 375, 400), (375, 0, 750, 400), (750, 0, 1125, 400),
                                             (1125, 0, 1500, 400)]
    # 1001 / 400 = 2.5 rounds half up to 3 crops of ceil(1001 / 3) = 334 rows; the last keeps 333.
    assert pan_and_scan_boxes(400, 1001) == [(0, 0, 400, 334), (0, 334, 400, 668), (0, 668, 400, 1001)]
    assert pan_and_scan_boxes(1199, 1000) == []  # ratio under 1.2


def test_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (20, 20), (10, 200, 30, 0)).save(tmp_path / "clear.png")
    assert torch.equal(preprocess(tmp_path / "clear.png", 14), torch.ones(1, 3, 14, 14))


# -- bad files: one line naming the file ---------------------------------------------------------------

def _one_line_naming(excinfo, path):
    msg = str(excinfo.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        image.load_image(tmp_path / "nope.png")
    assert "not found" in _one_line_naming(e, tmp_path / "nope.png")


def test_directory(tmp_path):
    with pytest.raises(ValueError) as e:
        image.load_image(tmp_path)
    assert "directory" in _one_line_naming(e, tmp_path)


def test_not_an_image(tmp_path):
    (tmp_path / "notes.png").write_text("this is text, not pixels\n" * 20)
    with pytest.raises(ValueError) as e:
        image.load_image(tmp_path / "notes.png")
    assert "not an image" in _one_line_naming(e, tmp_path / "notes.png")


@pytest.mark.parametrize("ext", ["png", "jpg"])
def test_truncated_image(tmp_path, ext):
    path = random_image(tmp_path / f"whole.{ext}", 200, 150, "RGB", seed=1)
    data = path.read_bytes()
    cut = tmp_path / f"cut.{ext}"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as e:
        image.load_image(cut)
    assert "truncated" in _one_line_naming(e, cut)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def test_decompression_bomb(tmp_path):
    # A 100,000 x 100,000 PNG header (10 gigapixels) with one tiny compressed row: a few dozen bytes.
    bomb = tmp_path / "bomb.png"
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 1, 0, 0, 0, 0)  # width, height, 1-bit greyscale
    bomb.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header)
                     + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + _png_chunk(b"IEND", b""))
    assert bomb.stat().st_size < 200
    with pytest.raises(ValueError) as e:
        image.load_image(bomb)
    assert "decompression bomb" in _one_line_naming(e, bomb)


def test_over_the_warning_limit_is_refused_too(tmp_path, monkeypatch):
    # Between 1x and 2x MAX_IMAGE_PIXELS Pillow only warns; gemmakit refuses.
    path = random_image(tmp_path / "big.png", 40, 30, "RGB", seed=2)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 1,200 pixels: over the limit, under 2x
    with pytest.raises(ValueError) as e:
        image.load_image(path)
    assert "decompression bomb" in _one_line_naming(e, path)
