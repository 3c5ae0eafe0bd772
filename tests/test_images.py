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


def _zero_png(path, width, height):
    """A grey PNG of zeros, compressed row by row: 15000x15000 pixels in about 220 KB, written in
    little memory (the image is never held)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    row, z = bytes(width + 1), zlib.compressobj(9)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)))
        data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
        f.write(chunk(b"IDAT", data) + chunk(b"IEND", b""))


def _claiming(path, fmt, width, height):
    """A 2x2 GIF or BMP whose header claims ``width`` x ``height``: tiny, the size a lie."""
    data = bytearray()
    buffer = __import__("io").BytesIO()
    Image.new("P" if fmt == "GIF" else "RGB", (2, 2)).save(buffer, fmt)
    data = bytearray(buffer.getvalue())
    if fmt == "GIF":  # the logical screen and the first frame's descriptor (after a 2-colour palette)
        data[6:10] = data[24:28] = struct.pack("<HH", width, height)
    else:
        data[18:26] = struct.pack("<ii", width, height)
    path.write_bytes(bytes(data))


PEAK_SCRIPT = """
import resource, sys, time
import torch, torchvision, PIL.Image
from hrnetdet.data.images import read_image
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
for path in sys.argv[1:]:
    start = time.perf_counter()
    try:
        read_image(path)
        print("DECODED", path)
    except ValueError as e:
        print("REFUSED", e)
    print("SECONDS", time.perf_counter() - start)
print("PEAK_MB", (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def test_too_many_pixels_are_refused_from_the_header_before_decoding(tmp_path):
    """A 220 KB PNG of 15000x15000 (torchvision decoded it to 675 MB before) and a BMP whose
    header claims 9000x9000 (PIL allocated its 243 MB): refused, naming size and limit, in a
    process whose peak memory barely moves."""
    import os
    import subprocess
    import sys

    _zero_png(tmp_path / "huge.png", 15000, 15000)
    assert (tmp_path / "huge.png").stat().st_size < 400_000
    _claiming(tmp_path / "claims.bmp", "BMP", 9000, 9000)
    run = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(tmp_path / "huge.png"), str(tmp_path / "claims.bmp")],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    refusals = [line for line in lines if line.startswith("REFUSED")]
    assert len(refusals) == 2, run.stdout
    assert "huge.png' " in refusals[0] and "225.0 megapixels" in refusals[0], refusals[0]
    assert "claims.bmp' is 9000x9000 pixels (81.0 megapixels)" in refusals[1], refusals[1]
    assert all("over the limit of 64.0 megapixels (raise it with --max-pixels)" in line for line in refusals)
    assert all(float(line.split()[1]) < 5 for line in lines if line.startswith("SECONDS")), run.stdout
    assert float(lines[-1].split()[1]) < 60, run.stdout  # megabytes over the baseline after imports


def test_headers_claiming_bombs_are_one_line_refusals_naming_the_file(tmp_path):
    """GIF and BMP headers past PIL's own bomb limit gave its DecompressionBombError traceback."""
    _claiming(tmp_path / "bomb.gif", "GIF", 20000, 20000)  # PIL's own check speaks first: no WxH
    _claiming(tmp_path / "bomb.bmp", "BMP", 50000, 50000)
    for name, megapixels in (("bomb.gif", "400.0"), ("bomb.bmp", "2500.0")):
        with pytest.raises(ValueError) as caught:
            read_image(str(tmp_path / name))
        text = str(caught.value)
        assert name in text and f"{megapixels} megapixels" in text and "limit of 64.0 megapixels" in text, text
        assert "--max-pixels" in text and "\n" not in text and "DOS" not in text


def test_the_pixel_limit_is_a_parameter(tmp_path):
    Image.fromarray(RGB).save(tmp_path / "a.png")
    Image.fromarray(RGB).save(tmp_path / "a.bmp")
    for name in ("a.png", "a.bmp"):
        assert read_image(str(tmp_path / name), max_pixels=600).shape == (3, 20, 30)
        with pytest.raises(ValueError, match=f"{name}' is 30x20 pixels .* over the limit of 0.0 megapixels"):
            read_image(str(tmp_path / name), max_pixels=599)
    with open(tmp_path / "a.png", "r+b") as f:  # 17 MiB (sparse) after IEND: more than 600 pixels can need
        f.truncate(17 << 20)
    with pytest.raises(ValueError, match=r"a.png' holds 17825792 bytes, more than an image of 0.0 megapixels needs"):
        read_image(str(tmp_path / "a.png"), max_pixels=600)
    _zero_png(tmp_path / "wide.png", 3000, 1)
    assert read_image(str(tmp_path / "wide.png"), max_pixels=None).shape == (3, 1, 3000)


def test_images_under_the_smallest_side_are_refused_naming_the_file(tmp_path):
    Image.new("RGB", (1, 1)).save(tmp_path / "dot.png")
    Image.new("RGB", (9, 7)).save(tmp_path / "strip.gif")
    assert read_image(str(tmp_path / "dot.png")).shape == (3, 1, 1)  # the decoder alone: no minimum
    for name, size in (("dot.png", "1x1"), ("strip.gif", "9x7")):
        with pytest.raises(ValueError, match=f"{name}' is {size} pixels; images need at least 8 on each side"):
            read_image(str(tmp_path / name), min_side=8)


def test_fifos_and_devices_are_refused_without_being_opened(tmp_path):
    """A FIFO named x.jpg made the decoder wait for a writer forever."""
    import os
    import threading

    os.mkfifo(tmp_path / "x.jpg")
    outcome = []

    def read():
        try:
            read_image(str(tmp_path / "x.jpg"))
        except ValueError as e:
            outcome.append(str(e))
    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():  # the old decoder waits in open(): a writer lets it go
        os.close(os.open(tmp_path / "x.jpg", os.O_WRONLY | os.O_NONBLOCK))
        reader.join(10)
    assert outcome and outcome[0].endswith("x.jpg' is a FIFO, not a regular file"), outcome
    with pytest.raises(ValueError, match="'/dev/null' is a character device, not a regular file"):
        read_image("/dev/null")
    with pytest.raises(ValueError, match="is a folder, not a regular file"):
        read_image(str(tmp_path))


def test_decoder_errors_are_one_line_without_internals(tmp_path):
    """torchvision's errors carried its C++ source path, PIL's the address of a BytesIO."""
    buffer = __import__("io").BytesIO()
    Image.fromarray(RGB).save(buffer, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buffer.getvalue()[:300])
    buffer = __import__("io").BytesIO()
    Image.fromarray(RGB).save(buffer, "PNG")
    (tmp_path / "cut.png").write_bytes(buffer.getvalue()[:-40])
    (tmp_path / "noise.gif").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "empty.bmp").write_bytes(b"")
    expected = {"cut.jpg": "truncated", "cut.png": "corrupted|truncated", "noise.gif": "not an image file",
                "empty.bmp": "not an image file"}
    for name, reason in expected.items():
        with pytest.raises(ValueError) as caught:
            read_image(str(tmp_path / name))
        text = str(caught.value)
        assert text.startswith(f"cannot read '{tmp_path / name}' as an image: "), text
        assert __import__("re").search(reason, text, __import__("re").I), text
        assert "\n" not in text and ".cpp" not in text and "0x" not in text and "/__w/" not in text, text


def test_names_that_are_not_utf8_make_printable_messages(tmp_path):
    import os

    name = os.path.join(os.fsencode(tmp_path), b"caf\xe9.png")
    with open(name, "wb") as f:
        f.write(b"not a png")
    for path in (name, os.fsdecode(name)):
        with pytest.raises(ValueError) as caught:
            read_image(path)
        assert "caf\\udce9.png" in str(caught.value)
        str(caught.value).encode("utf-8")  # printable as it is: no lone surrogate
    Image.fromarray(RGB).save(os.fsdecode(name), format="PNG")
    assert read_image(os.fsdecode(name)).shape == (3, 20, 30)
