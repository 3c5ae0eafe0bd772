"""The one image decoder against PIL (the oracle), case by case, and the choice it makes between
torchvision's decoder and PIL's."""
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_image, read_file

from hrnetdet.data.images import load_image, read_image

RGB = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)


def _with_orientation(path, orientation):
    im = Image.fromarray(RGB)
    exif = im.getexif()
    exif[0x0112] = orientation
    im.save(path, exif=exif.tobytes())


def _png16(path, arr):
    """A 16-bit PNG (grey, grey+alpha, RGB or RGBA): PIL cannot write 16-bit colour."""
    h, w, c = arr.shape
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", w, h, 16, {1: 0, 2: 4, 3: 2, 4: 6}[c], 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _cases(d):
    """name -> path of every kind of file the decoder must read as PIL shows it."""
    files = {}
    for ext in ("jpg", "png", "webp"):
        for orientation in range(1, 9):
            files[f"o{orientation}.{ext}"] = d / f"o{orientation}.{ext}"
            _with_orientation(files[f"o{orientation}.{ext}"], orientation)
    Image.fromarray(RGB).quantize(16).save(d / "palette.png")
    pal = Image.fromarray(RGB).quantize(16)
    pal.save(d / "palette_transparent.png", transparency=0)
    Image.fromarray(RGB).convert("CMYK").save(d / "cmyk.jpg", quality=95)
    Image.fromarray(RGB[..., 0]).save(d / "grey.png")
    Image.fromarray(RGB[..., 0]).save(d / "grey.jpg")
    Image.fromarray(np.dstack([RGB, RGB[..., :1]])).save(d / "rgba.png")
    Image.fromarray(np.dstack([RGB[..., :1], RGB[..., 1:2]]), mode="LA").save(d / "grey_alpha.png")
    Image.fromarray(RGB).save(d / "plain.bmp")
    Image.fromarray(RGB).save(d / "plain.tif")
    for name in ("palette.png", "palette_transparent.png", "cmyk.jpg", "grey.png", "grey.jpg", "rgba.png",
                 "grey_alpha.png", "plain.bmp", "plain.tif"):
        files[name] = d / name
    return files


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    return _cases(tmp_path_factory.mktemp("decoder"))


def _pil(path):
    with Image.open(path) as im:
        im = ImageOps.exif_transpose(im)
        if im.mode == "P" and "transparency" in im.info:
            im = im.convert("RGBA")
        return torch.from_numpy(np.asarray(im.convert("RGB")).copy()).permute(2, 0, 1)


def test_every_kind_of_file_decodes_as_pil_shows_it(cases):
    for name, path in cases.items():
        got = read_image(str(path))
        assert got.dtype == torch.uint8, name
        assert torch.equal(got, _pil(path)), name
        torch.testing.assert_close(load_image(str(path)), got.float() / 255)


def test_exif_orientation_gives_the_upright_frame(cases):
    for ext in ("jpg", "png", "webp"):
        for orientation in range(1, 9):
            assert read_image(str(cases[f"o{orientation}.{ext}"])).shape[1:] == ((20, 30) if orientation < 5 else (30, 20))


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torchvision 0.29 deprecates its decoders
def test_the_decoder_choice_torchvision_for_jpeg_and_png_pil_for_webp(cases):
    """torchvision agrees with PIL exactly on JPEG and PNG (so it is used there: faster, 16-bit
    kept); it ignores WEBP's EXIF orientation (so PIL reads WEBP)."""
    def torchvision_decode(path):
        return decode_image(read_file(str(path)), mode=ImageReadMode.RGB, apply_exif_orientation=True)
    for name, path in cases.items():
        if name.endswith((".jpg", ".png")):
            assert torch.equal(torchvision_decode(path), _pil(path)), name
    assert torchvision_decode(cases["o6.webp"]).shape[1:] == (20, 30)  # not turned upright
    assert _pil(cases["o6.webp"]).shape[1:] == (30, 20)


def test_sixteen_bit_pngs_keep_their_precision(tmp_path):
    deep = np.random.default_rng(1).integers(0, 65536, (6, 7, 3)).astype(np.uint16)
    for channels, name in ((1, "g16.png"), (2, "ga16.png"), (3, "rgb16.png"), (4, "rgba16.png")):
        arr = np.dstack([deep, deep[..., :1]])[..., :channels] if channels == 4 else deep[..., :channels]
        _png16(tmp_path / name, arr)
        expected = torch.from_numpy(np.repeat(arr[..., :1], 3, 2) if channels < 3 else arr[..., :3].copy())
        expected = expected.permute(2, 0, 1).float() / 65535
        torch.testing.assert_close(load_image(str(tmp_path / name)), expected, rtol=0, atol=1e-7)


def test_unreadable_files_name_themselves(tmp_path):
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really")
    (tmp_path / "notes.png").write_text("hello")
    for name in ("broken.jpg", "notes.png"):
        with pytest.raises(ValueError, match=f"cannot read .*{name}"):
            read_image(str(tmp_path / name))
    with pytest.raises(FileNotFoundError, match="missing.jpg"):
        read_image(str(tmp_path / "missing.jpg"))
