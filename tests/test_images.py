"""The image pipeline: every PIL mode, EXIF orientation, resize modes, draft mode, bad files, views."""
from __future__ import annotations

import io
import re
import warnings

import numpy as np
import pytest
from badcorpus import huge_png, make_bad_corpus, outcome_keyword
from PIL import Image, JpegImagePlugin

from featcache import images
from featcache.datasets import discover
from featcache.errors import ConfigError
from featcache.images import ImageDecodeError, View, decode_image, decode_views, parse_views


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _jpeg(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=95, **kw)
    return buf.getvalue()


def _gray(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w), dtype=np.uint8)


def _rgb(h: int = 24, w: int = 32, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# ----------------------------------------------------------------------------------------- modes

def test_grayscale_becomes_three_identical_channels():
    g = _gray()
    out = decode_image(_png(Image.fromarray(g)), (24, 32))
    assert out.shape == (24, 32, 3) and out.dtype == np.uint8
    assert all(np.array_equal(out[..., c], g) for c in range(3))


def test_rgb_fast_path_is_exact_and_size_is_height_width():
    rgb = _rgb(24, 32)
    assert np.array_equal(decode_image(_png(Image.fromarray(rgb)), (24, 32)), rgb)
    assert decode_image(_png(Image.fromarray(rgb)), (40, 16)).shape == (40, 16, 3)
    assert decode_image(_png(Image.fromarray(rgb)), 20).shape == (20, 20, 3)


def test_rgba_is_composited_on_black():
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3] = 200
    rgba[:4, :, 3] = 255  # top half opaque, bottom half fully transparent
    rgba[4:, :, 3] = 0
    out = decode_image(_png(Image.fromarray(rgba)), 8)
    assert (out[:4] == 200).all() and (out[4:] == 0).all()


def test_la_is_composited_on_black():
    la = np.dstack([np.full((8, 8), 100, np.uint8), np.full((8, 8), 128, np.uint8)])
    out = decode_image(_png(Image.fromarray(la)), 8)
    assert (out == round(100 * 128 / 255)).all()


def test_palette_with_transparency():
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    pal.paste(0, (0, 0, 8, 4))  # top half uses index 0, declared transparent
    out = decode_image(_png(pal, transparency=0), 8)
    assert (out[:4] == 0).all()
    assert (out[4:] == [0, 255, 0]).all()
    plain = decode_image(_png(pal), 8)  # without transparency the red stays
    assert (plain[:4] == [255, 0, 0]).all()


def test_16bit_is_scaled_by_its_range_not_shifted():
    g16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 64)  # 0..4032: a 12-bit detector
    img = Image.fromarray(g16)
    assert img.mode == "I;16"
    out = decode_image(_png(img), 8)[..., 0]
    assert out.min() == 0 and out.max() == 255  # `>> 8` would give a nearly black 0..15
    assert np.all(np.diff(out.ravel().astype(int)) >= 0)  # order kept
    flat = decode_image(_png(Image.fromarray(np.full((4, 4), 65535, np.uint16))), 4)
    assert (flat == 255).all()


def test_cmyk_jpeg_matches_rgb():
    rgb = np.zeros((16, 16, 3), np.uint8)
    rgb[:8, :, 0] = 220
    rgb[8:, :, 2] = 180
    out = decode_image(_jpeg(Image.fromarray(rgb).convert("CMYK")), 16).astype(int)
    assert Image.open(io.BytesIO(_jpeg(Image.fromarray(rgb).convert("CMYK")))).mode == "CMYK"
    assert np.abs(out - rgb).mean() < 8


def test_one_bit_image():
    bits = np.zeros((8, 8), bool)
    bits[:, :4] = True
    out = decode_image(_png(Image.fromarray(bits)), 8)
    assert set(np.unique(out)) == {0, 255} and (out[:, :4] == 255).all()


def test_exif_orientation_is_applied():
    stored = np.zeros((30, 50), np.uint8)
    stored[:, :25] = 255  # bright left half as stored
    img = Image.fromarray(stored).convert("RGB")
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    out = decode_image(_jpeg(img, exif=exif), (50, 30))
    assert out.shape == (50, 30, 3)
    assert out[:20].mean() > 200 and out[30:].mean() < 50  # left became top


def test_resize_modes():
    wide = np.full((20, 40), 255, np.uint8)
    data = _png(Image.fromarray(wide))
    squash = decode_image(data, 32, "squash")
    assert (squash == 255).all()
    pad = decode_image(data, 32, "pad")
    assert (pad[:8] == 0).all() and (pad[-8:] == 0).all() and (pad[9:23] == 255).all()
    stripes = np.zeros((20, 40), np.uint8)
    stripes[:, 10:30] = 255  # only the centre square is white
    crop = decode_image(_png(Image.fromarray(stripes)), 32, "crop")
    assert (crop[:, 2:-2] == 255).all()
    assert not (decode_image(_png(Image.fromarray(stripes)), 32, "squash") == 255).all()
    with pytest.raises(ConfigError, match="unknown resize mode 'zoom'"):
        decode_image(data, 32, "zoom")
    with pytest.raises(ConfigError, match="must be positive"):
        decode_image(data, 0)


def test_draft_mode_downscales_big_jpegs_in_dct_domain(monkeypatch):
    yy, xx = np.mgrid[0:1000, 0:1200]
    big = ((np.sin(xx / 90) + np.cos(yy / 70)) * 60 + 128).clip(0, 255).astype(np.uint8)
    data = _jpeg(Image.fromarray(big))
    monkeypatch.setattr(images, "_simplejpeg", None)  # PIL's own path: draft() picks the scale
    calls = []
    real_draft = JpegImagePlugin.JpegImageFile.draft

    def spy(self, mode, size):
        result = real_draft(self, mode, size)
        calls.append((size, self.size))
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", spy)
    fast = decode_image(data, 64)
    assert calls == [((128, 128), (300, 250))]  # scale 1/4: still at least twice the target
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda self, mode, size: None)
    full = decode_image(data, 64)
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 2.0


@pytest.mark.parametrize("mode", ["pad", "crop"])
def test_pad_and_crop_geometry_does_not_depend_on_dct_downscaling(monkeypatch, tmp_path, mode):
    """Downscaling rounds each side up (1616 x 1121 at 1/4 is 404 x 281), and the padded box was worked
    out on that size: 224 x 156 where the full picture gives 224 x 155 (originals-sample's
    IM-0279-0001). The box now comes from the full size, with or without downscaling."""
    white = Image.new("L", (1616, 1121), 255)
    stripes = Image.fromarray(np.tile((np.arange(1616) // 40 % 2 * 255).astype(np.uint8), (1121, 1)))
    data, striped = _jpeg(white), _jpeg(stripes)
    fast, fast_striped = decode_image(data, 224, mode), decode_image(striped, 224, mode).astype(int)
    monkeypatch.setattr(images, "_simplejpeg", None)
    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", lambda self, mode, size: None)
    full, full_striped = decode_image(data, 224, mode), decode_image(striped, 224, mode).astype(int)
    lit = (fast[:, :, 0] > 128).sum(axis=0).max(), (full[:, :, 0] > 128).sum(axis=0).max()
    assert lit == ((155, 155) if mode == "pad" else (224, 224))
    # sharp stripes show a shifted box: the old crop box differed from the full decode's by up to 24 levels
    assert np.abs(fast_striped - full_striped).max() <= 8
    from featcache.cache import cache_config  # old pad/crop caches hold the old boxes: another cache file

    described = {"name": "x", "input_size": 224}
    assert cache_config(tmp_path, described, mode, "float16")["resize_box"] == "full size"
    assert "resize_box" not in cache_config(tmp_path, described, "squash", "float16")


def _fast_jpeg_cases() -> list[tuple[str, bytes]]:
    """JPEGs of every layout the simplejpeg path takes: subsamplings, progressive, gray, odd sizes, EXIF."""
    rng = np.random.default_rng(3)
    cases = []
    for w, h in [(224, 224), (333, 217), (97, 411), (1210, 1003)]:
        coarse = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
        img = Image.fromarray(coarse).resize((w, h), Image.Resampling.BILINEAR)  # smooth, like photos
        for sub in (0, 1, 2):
            cases.append((f"rgb{w}x{h}-sub{sub}", _jpeg(img, subsampling=sub)))
        cases.append((f"rgb{w}x{h}-progressive", _jpeg(img, progressive=True)))
        cases.append((f"gray{w}x{h}", _jpeg(img.convert("L"))))
    rotated = Image.fromarray(_rgb(60, 90, seed=4))
    exif = rotated.getexif()
    exif[0x0112] = 6
    cases.append(("rgb-exif-rotated", _jpeg(rotated, exif=exif)))
    return cases


class _SimplejpegSpy:
    """Stands in for the simplejpeg module and counts the decodes it is asked for."""

    def __init__(self) -> None:
        import simplejpeg

        self.real = simplejpeg
        self.calls: list[float] = []

    def decode_jpeg(self, data, colorspace, **kw):
        self.calls.append(kw["min_factor"])
        return self.real.decode_jpeg(data, colorspace, **kw)


def test_simplejpeg_path_decodes_the_same_pixels_as_pil(monkeypatch):
    """Why it matters: a cache made before the fast path (or on a machine without simplejpeg) must hold
    the features this decoder would compute, bit for bit, at every DCT scale draft() would pick."""
    assert images._simplejpeg is not None, "simplejpeg is a dependency of featcache"
    spy = _SimplejpegSpy()
    used = spy.calls
    targets = [(224, "squash"), (64, "squash"), (16, "squash"), ((200, 256), "crop"), (299, "pad")]
    for name, data in _fast_jpeg_cases():
        for size, mode in targets:
            monkeypatch.setattr(images, "_simplejpeg", None)
            want = decode_image(data, size, mode)
            monkeypatch.setattr(images, "_simplejpeg", spy)
            n = len(used)
            got = decode_image(data, size, mode)
            assert len(used) == n + 1, (name, size, mode)  # the fast path really ran
            assert got.shape == want.shape and np.array_equal(got, want), (name, size, mode)
    assert set(used) == {1, 2, 4, 8}  # every draft scale was exercised


def test_simplejpeg_path_leaves_other_jpegs_and_errors_to_pil(monkeypatch):
    spy = _SimplejpegSpy()
    monkeypatch.setattr(images, "_simplejpeg", spy)
    cmyk = _jpeg(Image.fromarray(_rgb(20, 20)).convert("CMYK"))
    got = decode_image(cmyk, 16)
    assert spy.calls == [1]  # simplejpeg only checked the scan (see the next test) ...
    monkeypatch.setattr(images, "_simplejpeg", None)
    assert np.array_equal(got, decode_image(cmyk, 16))  # ... the pixels are PIL's (Adobe-inverted) path
    monkeypatch.setattr(images, "_simplejpeg", spy)
    whole = _jpeg(Image.fromarray(_gray(64, 64)))
    with pytest.raises(ImageDecodeError) as err:
        decode_image(whole[: len(whole) * 2 // 3], 16)  # cut inside the scan: the header still opens
    assert err.value.reason == "truncated image"
    # simplejpeg decoded the cut file twice: once with an end marker put back (it lacks FF D9; the scan still
    # warns, so it lacks more), once on the fast path, which refused it
    assert len(spy.calls) == 3


def _wave(size: int = 400) -> np.ndarray:
    y, x = np.mgrid[:size, :size]
    return ((np.sin(x / 13) * np.cos(y / 9) + 1) * 120).astype(np.uint8)


def test_a_cmyk_or_mpo_jpeg_cut_short_but_ending_properly_is_refused(monkeypatch):
    """CMYK JPEGs and MPOs (Pillow's name for many phone-camera JPEGs) are decoded by PIL, which never
    sees libjpeg's "premature end" warning: cut short but ending with FF D9, they were cached with the
    missing half grey, while the same damage in an RGB file was refused. Intact ones decode as before."""
    pytest.importorskip("simplejpeg")
    gray = Image.fromarray(_wave())
    buf = io.BytesIO()
    gray.convert("CMYK").save(buf, "JPEG")
    cmyk = buf.getvalue()
    buf = io.BytesIO()
    gray.convert("RGB").save(buf, "MPO", save_all=True, append_images=[gray.convert("RGB")])
    mpo = buf.getvalue()
    assert Image.open(io.BytesIO(mpo)).format == "MPO"
    for whole, keep in ((cmyk, 2), (mpo, 4)):
        with pytest.raises(ImageDecodeError) as err:
            decode_image(whole[: len(whole) // keep] + b"\xff\xd9", 64)
        assert err.value.reason == "truncated image"
        got = decode_image(whole, 64)
        monkeypatch.setattr(images, "_simplejpeg", None)  # PIL alone: the pixels cached before this fix
        assert np.array_equal(got, decode_image(whole, 64))
        monkeypatch.undo()


def test_a_damaged_jpeg_that_still_ends_properly_is_refused():
    """A JPEG cut short but ending with its end-of-image marker (or with bytes zeroed inside) made libjpeg
    warn and fill the rest with grey; PIL ignored the warning, so the damaged X-ray was cached as a good
    one. simplejpeg's error now names it."""
    pytest.importorskip("simplejpeg")
    whole = _jpeg(Image.fromarray(np.kron(_gray(16, 16), np.ones((8, 8), np.uint8))))
    n = len(whole)
    cut = whole[: int(n * 0.4)] + b"\xff\xd9"
    zeroed = whole[: int(n * 0.4)] + bytes(int(n * 0.2)) + whole[int(n * 0.6):]
    assert Image.open(io.BytesIO(cut)).load() is not None  # PIL alone: no complaint
    for damaged in (cut, zeroed):
        with pytest.raises(ImageDecodeError) as err:
            decode_image(damaged, 16)
        assert err.value.reason == "truncated image" or err.value.reason.startswith("corrupt image data")
    assert decode_image(whole, 16).shape == (16, 16, 3)
    noisy = io.BytesIO()  # zeroed scan data that still parses: libjpeg says "N extraneous bytes"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (256, 256), dtype=np.uint8)).save(
        noisy, "JPEG", quality=90)
    data = noisy.getvalue()
    cut = len(data) * 2 // 5, len(data) * 3 // 5
    with pytest.raises(ImageDecodeError, match="extraneous bytes"):
        decode_image(data[:cut[0]] + bytes(cut[1] - cut[0]) + data[cut[1]:], 16)
    assert images._jpeg_damage("Corrupt JPEG data: 2 extraneous bytes before marker 0xd9") is None


def test_a_jpeg_missing_only_its_end_marker_decodes_to_the_intact_files_pixels():
    """A JPEG whose last two bytes (FF D9) are missing holds every pixel, but libjpeg's "premature end of
    JPEG file" warning had it skipped as "truncated image". It decodes now, to the intact file's pixels; a
    file that lacks more (its scan cut, a progressive file's last scans) is still refused."""
    pytest.importorskip("simplejpeg")
    wave = _wave(240)
    for img in (Image.fromarray(wave), Image.fromarray(np.stack([wave, wave[::-1], wave.T], axis=2)),
                Image.fromarray(wave).convert("CMYK")):  # the last one PIL decodes, simplejpeg only checks
        whole = _jpeg(img)
        assert whole.endswith(b"\xff\xd9")
        for size, mode in ((224, "squash"), ((100, 60), "crop"), (240, "pad")):
            want = decode_image(whole, size, mode)
            for lost in (1, 2):  # the marker's last byte, or both
                assert np.array_equal(decode_image(whole[:-lost], size, mode), want), (img.mode, size, lost)
        with pytest.raises(ImageDecodeError, match="^truncated image$"):
            decode_image(whole[:-40], 64)  # the scan's data is cut: libjpeg still warns with the marker back
    buf = io.BytesIO()
    Image.fromarray(wave).save(buf, "JPEG", quality=95, progressive=True)
    progressive = buf.getvalue()
    # a progressive file without its marker may lack its last scans too (cut between two): still refused
    with pytest.raises(ImageDecodeError, match="^truncated image"):
        decode_image(progressive[:progressive.rindex(b"\xff\xda")], 64)


def test_a_complete_progressive_jpeg_missing_only_its_end_marker_decodes_to_the_intact_files_pixels():
    """A progressive JPEG with every scan but without its last two bytes (FF D9) was skipped as "truncated
    image", while a baseline file in that state decoded. It decodes now, to the intact file's pixels; one cut
    between two scans, or inside its last scan, is still refused."""
    pytest.importorskip("simplejpeg")
    wave = _wave(240)
    for img in (Image.fromarray(wave), Image.fromarray(np.stack([wave, wave[::-1], wave.T], axis=2)),
                Image.fromarray(wave).convert("CMYK")):
        whole = _jpeg(img, progressive=True)
        assert whole.endswith(b"\xff\xd9")
        for size, mode in ((224, "squash"), ((100, 60), "crop")):
            want = decode_image(whole, size, mode)
            for lost in (1, 2):  # the marker's last byte, or both
                assert np.array_equal(decode_image(whole[:-lost], size, mode), want), (img.mode, size, lost)
        last_scan = whole.rindex(b"\xff\xda")
        for cut in (last_scan, last_scan + 40, len(whole) - 40, len(whole) - 3):
            with pytest.raises(ImageDecodeError, match="^truncated image"):
                decode_image(whole[:cut], 64)


def test_a_progressive_jpeg_cut_after_a_scan_but_ending_properly_is_refused(monkeypatch):
    """A progressive JPEG cut right after one of its scans, ending with FF D9, decodes in libjpeg without a
    warning, from its first scans only: a blurred copy of the X-ray, which extract cached as a good one.
    Every such cut is refused now; the intact file decodes to the same pixels as before."""
    wave = _wave(240)
    for img in (Image.fromarray(wave), Image.fromarray(np.stack([wave, wave[::-1], wave.T], axis=2)),
                Image.fromarray(wave).convert("CMYK")):
        whole = _jpeg(img, progressive=True)
        first_scan = whole.index(b"\xff\xda")
        # every marker after the first scan's data: the Huffman tables or the header of a later scan
        cuts = [m.start() for m in re.finditer(rb"\xff[\xc4\xda]", whole) if m.start() > first_scan]
        assert len(cuts) >= 5, img.mode
        for cut in cuts:
            damaged = whole[:cut] + b"\xff\xd9"
            Image.open(io.BytesIO(damaged)).load()  # PIL alone: no complaint
            with pytest.raises(ImageDecodeError) as err:
                decode_image(damaged, 64)
            assert err.value.reason == images.PROGRESSIVE_CUT, (img.mode, cut)
            assert err.value.reason.startswith("truncated image")
        got = decode_image(whole, 64)
        monkeypatch.setattr(images, "_simplejpeg", None)  # PIL alone: what the file decoded to before
        assert np.array_equal(got, decode_image(whole, 64))
        monkeypatch.undo()


def test_crop_when_one_side_fits_exactly():
    """A 31 x 53 image cropped to 299 x 299: the box's left edge came out at -1.8e-15, which PIL refused
    ("box offset can't be negative"); about one (width, height, target) combination in eight did."""
    out = decode_image(_png(Image.fromarray(_rgb(53, 31))), 299, "crop")
    assert out.shape == (299, 299, 3)


# ----------------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize(("data", "reason"), [
    (b"", "zero-byte file"),
    (b"just some text, not an image\n" * 3, "not an image (unrecognised format)"),
    (_jpeg(Image.fromarray(_gray(64, 64)))[:300], "truncated image"),
])
def test_bad_bytes_raise_decode_error(data, reason):
    with pytest.raises(ImageDecodeError) as err:
        decode_image(data, 16)
    assert err.value.reason == reason


def test_a_webp_cut_short_is_a_truncated_image():
    """A WebP cut short was listed as "corrupt image header (could not create decoder object)", where a JPEG
    or PNG cut short is a "truncated image". Shorter than its RIFF header says, it is one now; a WebP of full
    length whose data was overwritten keeps a reason of its own."""
    wave = _wave(240)
    for kw in ({"quality": 90}, {"lossless": True}):
        buf = io.BytesIO()
        Image.fromarray(wave).save(buf, "WEBP", **kw)
        whole = buf.getvalue()
        assert decode_image(whole, 64).shape == (64, 64, 3)
        for cut in (len(whole) - 1, len(whole) // 2, 40):
            with pytest.raises(ImageDecodeError) as err:
                decode_image(whole[:cut], 64)
            assert err.value.reason == "truncated image", (kw, cut)
    with pytest.raises(ImageDecodeError) as err:
        decode_image(whole[:30] + bytes(len(whole) - 30), 64)  # the lossless file, its data zeroed
    assert err.value.reason != "truncated image"


def test_a_jpeg_or_png_with_a_damaged_header_is_named_damaged_not_not_an_image():
    """A JPEG or PNG cut inside its header, or whose header bytes were overwritten, was listed as "not an
    image (unrecognised format)", the reason of a text file named .jpeg: nothing told a file worth
    downloading again from one to delete."""
    jpeg = _jpeg(Image.fromarray(_gray(64, 64)))
    png = _png(Image.fromarray(_gray(64, 64)))
    sof = jpeg.index(b"\xff\xc0")
    damaged = {
        "JPEG": [jpeg[:20], jpeg[:sof] + b"\x00" * 40 + jpeg[sof + 40:]],
        "PNG": [png[:40], png[:16] + b"\x00" * 8 + png[24:]],
    }
    for fmt, cases in damaged.items():
        for data in cases:
            with pytest.raises(ImageDecodeError) as err:
                decode_image(data, 16)
            assert err.value.reason == f"damaged {fmt} (its header cannot be read: cut short or overwritten)"
    with pytest.raises(ImageDecodeError, match=r"^not an image \(unrecognised format\)$"):
        decode_image(b"\xff\xd8 some text after two JPEG-like bytes", 16)


def test_a_12_or_16_bit_jpeg_is_named_so_not_damaged():
    """Pillow reads 8-bit JPEGs only: a valid 12-bit one (JPEG extended, as DICOM exports hold) or 16-bit
    lossless one was listed as "damaged JPEG (... cut short or overwritten)", so a user would fetch it again
    for nothing. The skip reason names its precision; a JPEG whose frame header is overwritten is still
    called damaged."""
    jpeg = _jpeg(Image.fromarray(_gray(64, 64)))
    sof = jpeg.index(b"\xff\xc0")
    for bits in (12, 16):
        with pytest.raises(ImageDecodeError) as err:
            decode_image(jpeg[:sof + 4] + bytes([bits]) + jpeg[sof + 5:], 16)
        assert err.value.reason.startswith(f"{bits}-bit JPEG, which featcache cannot"), err.value.reason
    with pytest.raises(ImageDecodeError, match=r"^damaged JPEG"):
        decode_image(jpeg[:sof] + b"\x00" * 40 + jpeg[sof + 40:], 16)


@pytest.mark.parametrize("compression", ["tiff_lzw", "tiff_adobe_deflate"])
def test_a_truncated_compressed_tiff_is_a_truncated_image(compression):
    """libtiff writes a compressed TIFF's directory after its pixels: cut short, PIL could not identify the
    file, and it was listed as "not an image (unrecognised format)"."""
    buf = io.BytesIO()
    Image.fromarray(_gray(64, 64)).save(buf, "TIFF", compression=compression)
    data = buf.getvalue()
    for keep in (0.3, 0.9):
        with pytest.raises(ImageDecodeError) as err:
            decode_image(data[:int(len(data) * keep)], 16)
        assert err.value.reason == "truncated image"
    assert decode_image(data, 16).shape == (16, 16, 3)
    with pytest.raises(ImageDecodeError, match="unrecognised format"):
        decode_image(b"II*\x00\x08\x00\x00\x00" + b"\x00" * 16, 16)  # directory in the file, but empty


def test_decompression_bomb_is_refused_from_the_header():
    with pytest.raises(ImageDecodeError, match=r"image too large: 30000x30000 pixels"):
        decode_image(huge_png(), 32)


def test_a_bomb_refused_by_pillow_names_pillows_limit(monkeypatch):
    """Pillow refuses above twice Image.MAX_IMAGE_PIXELS (178,956,970 by default), below featcache's
    180,000,000: a 13400 x 13400 file was refused as over a limit of 180,000,000 it was under."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 400_000_000)  # Pillow's guard: 800,000,000
    monkeypatch.setattr(images, "MAX_PIXELS", 500_000_000)
    with pytest.raises(ImageDecodeError, match=r"30000x30000 pixels \(limit 500,000,000;"):
        decode_image(huge_png(), 32)  # 900,000,000 pixels: over both; the lower limit is named
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100_000_000)  # Pillow's guard fires first
    with pytest.raises(ImageDecodeError, match=r"30000x30000 pixels \(limit 200,000,000;"):
        decode_image(huge_png(), 32)


def test_own_pixel_limit_applies_before_loading(monkeypatch):
    data = _png(Image.fromarray(_gray(40, 40)))
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    loaded = []
    monkeypatch.setattr(Image.Image, "load", lambda self: loaded.append(1))
    with pytest.raises(ImageDecodeError, match="image too large: 40x40 pixels"):
        decode_image(data, 8)
    assert loaded == []


def test_no_pil_warning_escapes(monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 40x40 now triggers PIL's bomb *warning*
    pal = Image.new("P", (40, 40), 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decode_image(_png(Image.fromarray(_gray(40, 40))), 8)
        decode_image(_png(pal, transparency=0), 8)
    assert [str(w.message) for w in caught] == []


def test_bad_corpus_every_file_cached_or_skipped_with_reason(tmp_path):
    expected = make_bad_corpus(tmp_path / "bad")
    ds = discover(tmp_path / "bad")
    outcome = {rel: f"skip:{why}" for rel, why in ds.skipped}
    for rec in ds.records:
        try:
            arr = decode_image(rec.path.read_bytes(), (24, 20))
            assert arr.shape == (24, 20, 3) and arr.dtype == np.uint8
            outcome[rec.relpath] = "ok"
        except ImageDecodeError as exc:
            outcome[rec.relpath] = f"skip:{exc.reason}"
    assert set(outcome) == set(expected)
    for rel, want in expected.items():
        kind, keyword = outcome_keyword(want)
        got_kind, got_reason = outcome_keyword(outcome[rel])
        assert got_kind == kind, (rel, outcome[rel])
        if keyword:
            assert keyword in got_reason.lower(), (rel, outcome[rel])
    assert sum(v == "ok" for v in expected.values()) >= 15


def test_real_originals_decode(shared_dir):
    files = sorted((shared_dir / "data" / "originals-sample").rglob("*.jpeg"))[:3]
    for f in files:
        out = decode_image(f.read_bytes(), 64)
        assert out.shape == (64, 64, 3) and 20 < out.mean() < 235


# ----------------------------------------------------------------------------------------- views

def test_parse_views_canonical_names_and_dedup():
    views = parse_views("orig, hflip,rot20,rot+20.0,rot-7.50,bright+0.20,contrast-.3,zoom1.10,shiftx-0.1")
    assert [v.name for v in views] == ["orig", "hflip", "rot+20", "rot-7.5", "bright+0.2", "contrast-0.3",
                                       "zoom1.1", "shiftx-0.1"]
    assert parse_views(["orig,vflip", "shifty+0.25"]) == [View("orig"), View("vflip"), View("shifty+0.25")]
    assert View("rot20") == View("rot+20") and View("rot20").name == "rot+20"


@pytest.mark.parametrize("bad", ["blur", "rot+0", "rot+200", "rot", "bright+1", "bright+1.5", "zoom0.9",
                                 "zoom1", "zoom5", "shiftx+0.5", "contrast", "hflip2", "rot+nan", "rot+2e3"])
def test_parse_views_rejects_malformed(bad):
    with pytest.raises(ConfigError, match=re.escape(f"invalid view '{bad}'") + ".*valid forms: orig; hflip"):
        parse_views(f"orig,{bad}")


def test_parse_views_empty():
    with pytest.raises(ConfigError, match="no views given"):
        parse_views(" , ")


ALL_VIEWS = ["orig", "hflip", "vflip", "rot+20", "rot-20", "bright+0.2", "bright-0.2", "contrast+0.3",
             "contrast-0.3", "zoom1.1", "shiftx+0.1", "shiftx-0.1", "shifty+0.1", "shifty-0.1"]


@pytest.mark.parametrize("name", ALL_VIEWS)
def test_views_keep_shape_dtype_and_are_deterministic(name):
    img = _rgb(20, 28, seed=3)
    view = View(name)
    a, b = view.apply(img), view.apply(img.copy())
    assert a.shape == img.shape and a.dtype == np.uint8
    assert np.array_equal(a, b)
    if name != "orig":
        assert not np.array_equal(a, img)


def test_view_semantics():
    img = _rgb(16, 16, seed=4)
    assert np.array_equal(View("hflip").apply(img), img[:, ::-1])
    assert np.array_equal(View("vflip").apply(img), img[::-1])
    assert np.array_equal(View("rot+90").apply(img), np.rot90(img, 1))  # + is counter-clockwise
    flat = np.full((4, 4, 3), 100, np.uint8)
    assert (View("bright+0.5").apply(flat) == 150).all() and (View("bright-0.5").apply(flat) == 50).all()
    assert (View("bright+0.9").apply(np.full((2, 2, 3), 200, np.uint8)) == 255).all()  # clipped
    two = np.zeros((4, 4, 3), np.uint8)
    two[:, :2] = 100
    two[:, 2:] = 200  # mean 150
    c = View("contrast+0.5").apply(two)
    assert (c[:, :2] == 75).all() and (c[:, 2:] == 225).all()
    s = View("shiftx+0.25").apply(img)
    assert (s[:, :4] == 0).all() and np.array_equal(s[:, 4:], img[:, :12])
    s = View("shifty-0.25").apply(img)
    assert (s[12:] == 0).all() and np.array_equal(s[:12], img[4:])
    z = View("zoom2").apply(np.pad(np.full((8, 8, 3), 255, np.uint8), ((4, 4), (4, 4), (0, 0))))
    assert (z[2:-2, 2:-2] == 255).all()  # the centre half fills the frame
    with pytest.raises(ValueError, match="uint8"):
        View("hflip").apply(img.astype(np.float32))


def test_decode_views_decodes_once_and_applies_each(monkeypatch):
    data = _png(Image.fromarray(_rgb(16, 16, seed=5)))
    calls = []
    real = images.decode_image_sized  # what decode_views and extract's decode_views_sized both go through
    monkeypatch.setattr(images, "decode_image_sized", lambda *a, **k: calls.append(1) or real(*a, **k))
    views = parse_views("orig,hflip,rot+20")
    out = decode_views(data, 16, "squash", views)
    assert calls == [1] and len(out) == 3
    sized, dims = images.decode_views_sized(data, 16, "squash", views)  # the same, with the file's size
    assert calls == [1, 1] and dims == (16, 16, 1)
    assert all(np.array_equal(a, b) for a, b in zip(sized, out, strict=True))
    base = images.decode_image(data, 16)
    assert np.array_equal(out[0], base) and np.array_equal(out[1], base[:, ::-1])
    assert np.array_equal(out[2], View("rot+20").apply(base))


def test_alpha_composite_in_row_blocks_equals_the_whole_image_at_once():
    """The composite runs in row blocks (a 13,000-px RGBA PNG peaked at 8.6 GB as one float32 copy);
    every pixel must come out as the whole-image arithmetic gave it."""
    a = np.random.default_rng(0).integers(0, 256, (700, 300, 4), dtype=np.uint8)
    arr = a.astype(np.float32)
    whole = np.rint(arr[..., :-1] * (arr[..., -1:] / 255.0)).astype(np.uint8)
    assert np.array_equal(np.asarray(images._composite_on_black(Image.fromarray(a, "RGBA"), "RGB")), whole)


def test_a_png_holding_part_of_its_rows_is_refused():
    """A PNG whose compressed stream is complete but holds only half the rows (then a valid end chunk)
    loaded in PIL without a word, the missing rows black, and was cached."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    rows = b"".join(b"\0" + bytes((4 * x) % 256 for x in range(64)) for _ in range(64))
    head = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 64, 64, 8, 0, 0, 0, 0))
    whole = head + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    half = head + chunk(b"IDAT", zlib.compress(rows[: len(rows) // 2])) + chunk(b"IEND", b"")
    assert decode_image(whole, 16).shape == (16, 16, 3)
    Image.open(io.BytesIO(half)).load()  # PIL alone: no complaint
    with pytest.raises(ImageDecodeError) as err:
        decode_image(half, 16)
    assert err.value.reason == "truncated image"
    for mode in ("L", "RGB", "RGBA", "P", "LA", "I;16", "1"):  # every complete PNG PIL writes passes
        assert not images._png_rows_short(_png(Image.new(mode, (37, 23)))), mode


def _tiff(img: Image.Image, photometric: int, compression: str | None = None) -> bytes:
    buf = io.BytesIO()
    options = {"compression": compression} if compression else {}
    img.save(buf, "TIFF", tiffinfo={262: photometric}, **options)
    return buf.getvalue()


@pytest.mark.parametrize("compression", [None, "tiff_lzw"])
def test_a_wide_tiff_storing_zero_as_white_is_not_cached_as_a_negative(compression):
    """A 16-bit or float TIFF whose PhotometricInterpretation is 0 (WhiteIsZero, DICOM's MONOCHROME1, which
    many CR/DX exports keep) was read as stored: Pillow inverts such 8-bit files but not wider ones, so the
    X-ray was cached as its negative, bones black. It decodes now as the same picture stored the usual way."""
    wave = _wave(64).astype(np.uint16) * 16 + 100  # 12-bit detector values in 16 bits
    for arr in (wave, wave.astype(np.float32)):
        usual = decode_image(_tiff(Image.fromarray(arr), 1, compression), 32)
        stored_inverted = arr.max() + arr.min() - arr  # the same picture as a MONOCHROME1 file holds it
        got = decode_image(_tiff(Image.fromarray(stored_inverted), 0, compression), 32)
        assert np.abs(got.astype(int) - usual.astype(int)).max() <= 1, arr.dtype
        assert usual.std() > 40
    eight = Image.fromarray(_wave(64))  # 8 bits: Pillow turns the scale over as it writes and reads, alone
    assert np.array_equal(decode_image(_tiff(eight, 0, compression), 32),
                          decode_image(_tiff(eight, 1, compression), 32))
