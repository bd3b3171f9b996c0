"""One input pipeline: bytes -> uint8 [H, W, 3] at the backbone's size, plus deterministic views.

Every image goes through :func:`decode_image`, so a feature depends only on the file bytes, the
target size, the resize mode and the view. Real X-ray folders hold every PIL mode there is
(grayscale, RGB, RGBA, palette, CMYK, 16-bit, 1-bit, EXIF-rotated), truncated or mislabelled
files, and occasionally a decompression bomb; all of these either decode to the same 3-channel
uint8 array or raise :class:`ImageDecodeError` with a short reason that extraction lists as a
skipped file. No PIL exception or warning escapes as anything else.

Sizes are ``(height, width)`` like the arrays (and Keras' ``image_size``); an int means square.
"""
from __future__ import annotations

import io
import math
import re
import struct
import warnings
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, UnidentifiedImageError

try:  # libjpeg-turbo straight into numpy: 2.5x faster than PIL on a 224-px JPEG, same pixels
    import simplejpeg as _simplejpeg
except ImportError:  # pragma: no cover - a platform without its wheel decodes with PIL alone
    _simplejpeg = None

from featcache.errors import ConfigError

MAX_PIXELS = 180_000_000  # decompression-bomb guard: far above any X-ray (about 3000 x 3000)
RESIZE_MODES = ("squash", "pad", "crop")
RESAMPLE = Image.Resampling.BILINEAR  # one filter everywhere (antialiased when shrinking)
_ORIENTATION_TAG = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageDecodeError(Exception):
    """An image that cannot be decoded; ``reason`` is short enough for a skipped-files table."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _quiet_pil() -> None:
    """Silence PIL's warnings (bomb warnings, odd EXIF, palette transparency) for this process.

    Problems with a file are reported as skip reasons, not warnings. A module-scoped filter is
    (re)installed on every call rather than ``warnings.catch_warnings()``, which is not
    thread-safe and extraction decodes in threads; re-adding survives test harnesses that reset
    the filter list. Warnings from code outside PIL are untouched.
    """
    global _FILTER
    if _FILTER is None or not warnings.filters or warnings.filters[0] != _FILTER:
        warnings.filterwarnings("ignore", module=r"PIL(\.|$)")
        _FILTER = warnings.filters[0]


_FILTER: tuple | None = None


# ----------------------------------------------------------------------------------------- decoding

def _normalise_size(size: int | tuple[int, int] | Sequence[int]) -> tuple[int, int]:
    if isinstance(size, int | np.integer):
        size = (int(size), int(size))
    h, w = (int(v) for v in size)
    if h < 1 or w < 1:
        raise ConfigError(f"image size must be positive, got {h}x{w}; pass e.g. --image-size 224.")
    return h, w


def _header_size(data: bytes) -> tuple[int, int] | None:
    """Width and height from the header alone, bypassing PIL's own bomb check (for the message)."""
    prefix = data[:16]
    for fmt in Image.ID:
        factory, accept = Image.OPEN[fmt]
        try:
            if accept is None or accept(prefix) is True:
                return factory(io.BytesIO(data), "").size
        except Exception:  # noqa: BLE001 - a plugin that cannot read the header is simply not the one
            continue
    return None


def _too_large(w: int, h: int, limit: int | None = None) -> ImageDecodeError:
    return ImageDecodeError(f"image too large: {w}x{h} pixels (limit {limit or MAX_PIXELS:,}; "
                            "decompression-bomb guard)")


def _open(data: bytes) -> Image.Image:
    """Open lazily (header only) and apply the size guard before any pixel is allocated."""
    if not data:
        raise ImageDecodeError("zero-byte file")
    try:
        im = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        dims = _header_size(data)
        if dims is None:
            raise ImageDecodeError("image too large (decompression-bomb guard)") from exc
        # Pillow's own guard (twice Image.MAX_IMAGE_PIXELS) can fire below MAX_PIXELS: name the one that did
        pil_limit = 2 * int(Image.MAX_IMAGE_PIXELS or 0)
        raise _too_large(*dims, min(MAX_PIXELS, pil_limit) if pil_limit else MAX_PIXELS) from exc
    except UnidentifiedImageError as exc:
        if _tiff_cut_before_ifd(data):
            raise ImageDecodeError("truncated image") from exc
        if data[128:132] == b"DICM":  # the DICOM preamble's magic (a .dcm renamed, or no extension)
            raise ImageDecodeError("DICOM, which featcache does not read; export it as PNG, 16-bit to keep "
                                   "its grey levels, or JPEG") from exc
        bits = _jpeg_precision(data)
        if bits not in (None, 8):
            raise ImageDecodeError(f"{bits}-bit JPEG, which featcache cannot decode (Pillow reads 8-bit "
                                   "JPEGs only); export it as PNG, 16-bit to keep its grey levels") from exc
        fmt = _signature_format(data)
        if fmt is not None:
            raise ImageDecodeError(
                f"damaged {fmt} (its header cannot be read: cut short or overwritten)") from exc
        raise ImageDecodeError("not an image (unrecognised format)") from exc
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken headers
        if _looks_truncated(exc) or _riff_cut_short(data):
            raise ImageDecodeError("truncated image") from exc
        raise ImageDecodeError(f"corrupt image header ({_short(exc)})") from exc
    w, h = im.size
    if w < 1 or h < 1:
        raise ImageDecodeError(f"empty image ({w}x{h} pixels)")
    if w * h > MAX_PIXELS:
        raise _too_large(w, h)
    return im


# The signatures of the formats a skip reason can name. A TIFF's is left out: one whose directory is gone
# is told apart more exactly by _tiff_cut_before_ifd.
_SIGNATURES = ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"),
               (b"GIF87a", "GIF"), (b"GIF89a", "GIF"))


def _signature_format(data: bytes) -> str | None:
    """The format ``data`` starts as (JPEG, PNG, GIF, WebP), or None; used only once Pillow gave up.

    Why: a JPEG or PNG cut inside its header, or whose header was overwritten, was listed as "not an image
    (unrecognised format)", as a text file renamed .jpeg is: a user could not tell a file to download
    again from one to delete. Only the opening bytes are compared, never the file's extension."""
    for magic, fmt in _SIGNATURES:
        if data.startswith(magic):
            return fmt
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    return None


def _jpeg_precision(data: bytes) -> int | None:
    """The sample precision (bits) a JPEG's frame header gives, or None when there is no readable one.

    Why: Pillow reads 8-bit JPEGs only and gives up on a 12-bit one (JPEG extended, as DICOM exports
    hold) or a 16-bit lossless one without naming it, so a valid file was listed as "damaged JPEG (its
    header cannot be read: cut short or overwritten)" and a user would fetch it again for nothing. Read
    only after Pillow failed, up to the first scan.
    """
    if not data.startswith(b"\xff\xd8"):
        return None
    pos = 2
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte before the marker
            pos += 1
            continue
        if marker in (0xD9, 0xDA):  # end of image, or a scan before any frame header
            return None
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header (SOFn)
            return data[pos + 4] if pos + 4 < len(data) else None
        pos += 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
    return None


def _tiff_cut_before_ifd(data: bytes) -> bool:
    """Whether ``data`` is a TIFF header whose first directory (IFD) lies at or past the end of the bytes.

    Why: a compressed (LZW, deflate) TIFF as libtiff writes it keeps its directory after the pixel data, so
    a file cut short loses it and PIL cannot identify the file at all: the skip list called a truncated
    X-ray "not an image". Classic TIFF stores the offset as 4 bytes at 4, BigTIFF as 8 bytes at 8.
    """
    order = {b"II": "<", b"MM": ">"}.get(data[:2])
    if order is None or len(data) < 8:
        return False
    magic = struct.unpack(order + "H", data[2:4])[0]
    if magic == 42:
        return struct.unpack(order + "I", data[4:8])[0] >= len(data)
    if magic == 43:
        return len(data) < 16 or struct.unpack(order + "Q", data[8:16])[0] >= len(data)
    return False


def _riff_cut_short(data: bytes) -> bool:
    """Whether ``data`` is a WebP shorter than its RIFF header's size says; asked only once Pillow gave up.

    Why: Pillow opens a WebP through libwebp's decoder, which refuses a file cut short with "could not
    create decoder object": extract listed it as "corrupt image header (...)", where a JPEG, PNG or TIFF cut
    short is a "truncated image", the file to copy again. The RIFF header (bytes 4-8, little-endian) holds
    the size of everything after its first 8 bytes; a WebP broken some other way keeps its own reason.
    """
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        return False
    return len(data) < 8 + int.from_bytes(data[4:8], "little")


def _looks_truncated(exc: BaseException) -> bool:
    """PIL reports early end-of-data with several types; all mean the file was cut short."""
    return "truncated" in str(exc).lower() or isinstance(exc, EOFError | struct.error)


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return text[:80]


def _orientation(im: Image.Image) -> int:
    """EXIF orientation (1 = upright); a corrupt EXIF block is ignored rather than fatal."""
    try:
        value = im.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if int(value) in _TRANSPOSE else 1
    except Exception:  # noqa: BLE001 - broken EXIF must not cost the image
        return 1


def _load(im: Image.Image, size_hw: tuple[int, int], data: bytes) -> tuple[Image.Image | np.ndarray, int]:
    """Decode pixels and return them (a PIL image, or an array from ``_fast_jpeg``) with the EXIF orientation.

    JPEGs are first reduced in the DCT domain to at least twice the target size (their EXIF is
    read from the header, so a 90-degree orientation can swap the requested sides). Other formats
    read orientation only after loading: PNG's ``getexif()`` loads the pixels itself, and a
    failed load hidden there would leave a half-decoded image that a second ``load()`` accepts.
    """
    orientation = 1
    if im.format in ("JPEG", "MPO"):
        if im.info.get("progressive") and _progressive_scans_short(data):
            raise ImageDecodeError(PROGRESSIVE_CUT)
        orientation = _orientation(im)
        h, w = size_hw
        if orientation in (5, 6, 7, 8):  # the stored image is rotated by 90 degrees
            h, w = w, h
        request = (2 * w, 2 * h)
        fast = _fast_jpeg(im, data, request)
        if fast is not None:
            return fast, orientation
        if im.mode in ("L", "RGB", "CMYK"):
            im.draft(im.mode, request)
    try:
        im.load()
    except Exception as exc:  # noqa: BLE001
        if _looks_truncated(exc) or _riff_cut_short(data):
            raise ImageDecodeError("truncated image") from exc
        if isinstance(exc, zlib.error):
            raise ImageDecodeError("corrupt image data (bad compressed stream)") from exc
        raise ImageDecodeError(f"corrupt image data ({_short(exc)})") from exc
    if im.format == "PNG" and _png_rows_short(data):
        raise ImageDecodeError("truncated image")
    if im.format not in ("JPEG", "MPO"):
        orientation = _orientation(im)
    return im, orientation


_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # by IHDR colour type


def _png_rows_short(data: bytes) -> bool:
    """Whether a non-interlaced PNG's image data inflates to fewer bytes than its rows need.

    Why: a PNG whose compressed stream is complete but holds only part of the rows (an encoder or a copy
    that stopped early, then an end chunk) loads in PIL without a word, the missing rows black. The
    stream is inflated once more, in 1 MiB steps, only to count its bytes. Anything unusual (interlaced,
    unparsable chunks) is left to PIL.
    """
    try:
        if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
            return False
        width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", data[16:29])
        if interlace or colour not in _PNG_CHANNELS:
            return False
        need = height * (1 + -(-width * depth * _PNG_CHANNELS[colour] // 8))
        inflate, got, pos = zlib.decompressobj(), 0, 8
        while pos + 8 <= len(data):
            length, kind = struct.unpack(">I4s", data[pos:pos + 8])
            if kind == b"IDAT":
                pending = data[pos + 8:pos + 8 + length]
                while pending and got < need:
                    got += len(inflate.decompress(pending, 1 << 20))
                    pending = inflate.unconsumed_tail
            elif kind == b"IEND" or got >= need:
                break
            pos += 12 + length
        return got + len(inflate.flush()) < need if got < need else False
    except (zlib.error, struct.error, ValueError):
        return False


def _draft_scale(size_wh: tuple[int, int], request_wh: tuple[int, int]) -> int:
    """The DCT scale denominator PIL's ``JpegImageFile.draft`` picks: the largest of 8, 4, 2 that
    keeps both sides at least the requested ones, else 1."""
    scale = min(size_wh[0] // request_wh[0], size_wh[1] // request_wh[1])
    return next((s for s in (8, 4, 2) if scale >= s), 1)


def _fast_jpeg(im: Image.Image, data: bytes, request_wh: tuple[int, int]) -> np.ndarray | None:
    """Pixels of a plain grayscale or YCbCr JPEG decoded by simplejpeg, equal to what PIL decodes.

    Why: PIL decodes into its 4-byte RGBX layout and ``np.asarray`` then packs it (0.39 ms for a
    224-px Kermany file); simplejpeg runs the same libjpeg-turbo into a numpy array (0.16 ms). During
    ``extract`` that decode competes with the forward pass for the two cores. Both libraries use
    libjpeg-turbo's default (accurate) DCT and upsampling, and the scale is the one ``draft`` would
    choose (``min_factor`` forbids a larger reduction, the minimum sides a smaller one), so the arrays
    are identical: the tests compare them over subsamplings, progressive files, odd sizes and every
    draft scale. ``None`` hands the file to PIL: no simplejpeg, another mode (CMYK, palette...) or an MPO, a
    multi-tile file ``draft`` would not scale (these first pass :func:`_check_jpeg_scan`), or any decode
    error, which PIL then reports in its words.
    """
    if _simplejpeg is None:
        return None
    if im.format != "JPEG" or im.mode not in ("L", "RGB") or len(im.tile) != 1:
        _check_jpeg_scan(data, im.mode)
        return None
    w, h = im.size
    s = _draft_scale((w, h), request_wh)
    out_h, out_w = -(-h // s), -(-w // s)
    try:
        arr = _simplejpeg.decode_jpeg(data, "GRAY" if im.mode == "L" else "RGB", min_height=out_h,
                                      min_width=out_w, min_factor=s)
    except Exception as exc:  # noqa: BLE001 - PIL decodes it again and words the error
        damage = _jpeg_damage(str(exc))
        if damage:  # PIL would only warn, and fill the missing part with grey
            raise ImageDecodeError(damage) from exc
        return None
    if arr.shape[:2] != (out_h, out_w):
        return None
    return arr[:, :, 0] if im.mode == "L" else arr


def _check_jpeg_scan(data: bytes, mode: str) -> None:
    """Refuse a JPEG that PIL decodes itself (CMYK, MPO, multi-tile) when libjpeg reports lost pixels.

    Why: PIL never sees libjpeg's "premature end of data segment" warning, so a CMYK file or an MPO (what
    Pillow calls many phone-camera JPEGs) cut short but ending with FF D9 was cached with its missing half
    grey, while the same damage in an RGB file was refused. The scan is decoded once more by simplejpeg at
    its smallest DCT scale (every coefficient is still entropy-decoded, so the warning still comes) only
    to hear that warning; the pixels used stay PIL's, so intact files decode exactly as before. Any other
    simplejpeg error (a colour conversion it does not offer...) is left to PIL.
    """
    try:
        _simplejpeg.decode_jpeg(data, "CMYK" if mode == "CMYK" else "RGB", min_height=1, min_width=1,
                                min_factor=1)
    except Exception as exc:  # noqa: BLE001 - only damage is ours to word; PIL words the rest
        damage = _jpeg_damage(str(exc))
        if damage:
            raise ImageDecodeError(damage) from exc


_SEQUENTIAL_SOF = (0xC0, 0xC1)  # baseline and extended sequential Huffman frames: every pixel in one pass
_PROGRESSIVE_SOF = 0xC2  # the progressive Huffman frame
# a marker inside entropy-coded data: FF (fill FFs allowed) and neither a stuffed 00 nor a restart D0-D7
_MARKER_IN_SCAN = re.compile(rb"\xff+[^\x00\xd0-\xd7\xff]")


def _end_marker_restored(data: bytes) -> bytes:
    """``data`` with its end-of-image marker (FF D9) put back when that marker is a JPEG's only damage.

    Why: a JPEG whose last two bytes are missing (a copy or an encoder that stopped at the marker) holds
    every pixel, and Pillow and libjpeg decode it whole, but libjpeg's "premature end of JPEG file" warning,
    which also comes for files cut inside their data, had extract skip it as "truncated image". Only a
    sequential JPEG with a single scan holding every component qualifies, or a progressive one whose scans
    bring every coefficient of every component down to its last bit (:func:`_progressive_scan_state`; one
    cut between two scans also lacks the marker, yet misses detail, and is still refused), and only when
    libjpeg, given the marker, decodes the file without a warning: a scan cut short still warns "premature
    end of data segment" and is skipped as before. The file's key stays the hash of its own bytes.
    """
    if _simplejpeg is None or not data.startswith(b"\xff\xd8\xff") or data.endswith(b"\xff\xd9"):
        return data
    pos, components = 2, 0
    while pos + 4 <= len(data) and data[pos] == 0xFF:
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte before the marker
            pos += 1
            continue
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header (SOFn)
            if pos + 9 >= len(data):
                return data
            if marker == _PROGRESSIVE_SOF:  # every scan there, the last one running to the end of the bytes?
                short, open_scan = _progressive_scan_state(data)
                return _with_end_marker(data, data[pos + 9]) if open_scan and not short else data
            if marker not in _SEQUENTIAL_SOF:
                return data
            components = data[pos + 9]
        elif marker == 0xDA:  # the first scan: whole, alone, and running to the end of the bytes?
            if pos + 4 >= len(data) or data[pos + 4] != components or _MARKER_IN_SCAN.search(data, end):
                return data
            return _with_end_marker(data, components)
        pos = end
    return data


def _with_end_marker(data: bytes, components: int) -> bytes:
    """``data`` with FF D9 appended if libjpeg then decodes it without a warning, else ``data`` unchanged.

    Why: the marker's absence is harmless only when nothing else is missing; libjpeg's warning for a scan
    cut short ("premature end of data segment") is the check, so a cut file keeps its "truncated image".
    """
    fixed = data + b"\xff\xd9"
    try:
        _simplejpeg.decode_jpeg(fixed, "CMYK" if components == 4 else "RGB", min_height=1,
                                min_width=1, min_factor=1)
    except Exception:  # noqa: BLE001 - any warning: the file lacks more than its marker
        return data
    return fixed


PROGRESSIVE_CUT = ("truncated image (a progressive JPEG that stops before its last scans: it would decode "
                   "as a blurred copy)")
_ALL_COEFFICIENTS = (1 << 64) - 1
# _MARKER_IN_SCAN's match without the fill bytes: its one-byte literal start lets re skip ahead at memchr
# speed, 40 times faster over a 500 KB scan
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")


def _progressive_scans_short(data: bytes) -> bool:
    """Whether a progressive JPEG's scans leave some coefficient of some component without its last bit."""
    return _progressive_scan_state(data)[0]


def _progressive_scan_state(data: bytes) -> tuple[bool, bool]:
    """(whether a progressive JPEG's scans leave some coefficient of some component without its last bit,
    whether its last scan's data runs to the end of the bytes, with no end-of-image marker after it).

    Why: a progressive JPEG stores the picture as a series of scans, each adding frequencies (spectral
    selection) or lower bits of them (successive approximation, down to bit 0 in the last scan of each).
    Cut right after one scan, with its end-of-image marker (FF D9) at the end, libjpeg decodes it without
    a warning: the first scans alone, a blurred copy, which extract cached as a good X-ray. The headers do
    not say how many scans there will be, but a complete file has, for every component and each of the 64
    DCT coefficients, a scan that ends at bit 0 (libjpeg tracks the same in its ``coef_bits`` table). Only
    the marker segments are read (entropy-coded data is skipped with one regex search per scan), and only
    for files whose frame header says progressive, so baseline files cost nothing. Anything unparsable
    returns (False, False) and is left to the decoder, which words its own errors. The second answer lets
    :func:`_end_marker_restored` tell a complete file that lost only its FF D9 from one cut elsewhere.
    """
    pos, done, scans, open_scan = 2, {}, 0, False  # done: component id -> mask of the coefficients complete
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            return False, False
        marker = data[pos + 1]
        if marker == 0xFF:  # a fill byte before the marker
            pos += 1
            continue
        if marker == 0xD9:  # end of image (an MPO's later pictures follow it)
            break
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            pos += 2
            continue
        end = pos + 2 + int.from_bytes(data[pos + 2:pos + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # a frame header (SOFn)
            count = data[pos + 9] if pos + 9 < len(data) else 0
            done = {data[i]: 0 for i in range(pos + 10, min(pos + 10 + 3 * count, len(data)), 3)}
        elif marker == 0xDA:  # a scan: its components, spectral band Ss..Se and last bit Al
            count = data[pos + 4] if pos + 4 < len(data) else 0
            head = data[pos + 5 + 2 * count:pos + 8 + 2 * count]
            if len(head) < 3:
                return False, False
            first, last, al = head[0], min(head[1], 63), head[2] & 0x0F
            scans += 1
            if al == 0 and first <= last:
                band = ((1 << (last + 1)) - 1) ^ ((1 << first) - 1)
                for c in data[pos + 5:pos + 5 + 2 * count:2]:
                    if c in done:
                        done[c] |= band
            found = _NEXT_MARKER.search(data, end)
            if found is None:  # the data runs to the end of the bytes: cut inside this scan, or at FF D9
                open_scan = True
                break
            end = found.start()
        pos = end
    return scans > 0 and any(mask != _ALL_COEFFICIENTS for mask in done.values()), open_scan


_EXTRANEOUS_OK = 64  # stray bytes before a marker that a JPEG may carry without harm


def _jpeg_damage(message: str) -> str | None:
    """The skip reason for libjpeg's warnings that mean pixels were lost; None for the rest.

    Why: a JPEG cut short but still ending with its end-of-image marker (or with bytes zeroed inside)
    makes libjpeg warn "premature end of data segment" or "bad Huffman code" and fill the rest with
    grey; PIL ignores the warning, so the damaged X-ray was cached as a good one. simplejpeg raises
    them. A few "extraneous bytes before marker" are padding some encoders leave; thousands mean the
    scan data was overwritten and decoded into wrong pixels (zeroed bytes of a 256-px file: 11,661).
    None of the 5,274 Kermany JPEGs here raises anything. Not every damaged byte can be noticed: libjpeg
    decodes what parses.
    """
    text = message.lower()
    if "premature end" in text:
        return "truncated image"
    extra = re.search(r"(\d+) extraneous bytes", text)
    if extra and int(extra.group(1)) <= _EXTRANEOUS_OK:
        return None
    if "corrupt jpeg data" in text:
        return f"corrupt image data ({message.strip().splitlines()[0][:80]})"
    return None


_COMPOSITE_ROWS = 256  # rows per float32 step of the alpha composite


def _composite_on_black(im: Image.Image, mode: str) -> Image.Image:
    """Flatten alpha onto black (transparent = background = black, like the padding).

    In row blocks: one float32 copy of a whole 13,000 x 13,000 RGBA image (within the pixel limit) and
    its temporaries peaked at 8.6 GB. The arithmetic per pixel is the same, so are the results.
    """
    arr = np.asarray(im)
    out = np.empty(arr.shape[:2] + (arr.shape[2] - 1,), dtype=np.uint8)
    for s in range(0, arr.shape[0], _COMPOSITE_ROWS):
        blk = arr[s:s + _COMPOSITE_ROWS].astype(np.float32)
        alpha = blk[..., -1:] / 255.0
        out[s:s + _COMPOSITE_ROWS] = np.rint(blk[..., :-1] * alpha).astype(np.uint8)
    return Image.fromarray(out[..., 0] if mode == "L" else out)


def _scale_wide(im: Image.Image, white_is_zero: bool = False) -> Image.Image:
    """16-bit / 32-bit / float images to 8-bit L by their actual value range.

    A 12-bit detector stored as 16-bit uses 0..4095: a plain ``>> 8`` would leave it nearly black.
    ``white_is_zero``: the file stores 0 as white (:func:`_white_is_zero`), so the scale is turned over.
    """
    arr = np.asarray(im).astype(np.float64)
    finite = np.isfinite(arr)
    if not finite.any():
        return Image.new("L", im.size, 0)
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    if hi > lo:
        out = (np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo) - lo) * (255.0 / (hi - lo))
    else:  # constant image: place it on the nominal scale of its type
        nominal = 65535.0 if im.mode.startswith("I;16") else (1.0 if im.mode == "F" else 2.0**31 - 1)
        out = np.full(arr.shape, np.clip(lo / nominal, 0.0, 1.0) * 255.0)
    if white_is_zero:
        out = 255.0 - out
    return Image.fromarray(np.rint(np.clip(out, 0, 255)).astype(np.uint8))


def _white_is_zero(im: Image.Image) -> bool:
    """Whether ``im`` is a TIFF whose PhotometricInterpretation tag says 0 is white (DICOM's MONOCHROME1).

    Why: Pillow inverts such a file's 1- to 8-bit grey levels as it reads them, but not 16-bit or float
    ones (its mode table maps them to ``I;16`` and ``F`` as they are stored), so a 16-bit X-ray exported
    as MONOCHROME1 was cached as a negative, bones black, without a word. Only an explicit 0 counts: a file
    without the tag keeps the plain reading it always had.
    """
    try:
        return im.format == "TIFF" and im.tag_v2.get(262) == 0 and (im.mode.startswith("I") or im.mode == "F")
    except Exception:  # noqa: BLE001 - unreadable tags: read as stored
        return False


def _to_l_or_rgb(im: Image.Image, white_is_zero: bool = False) -> Image.Image:
    """Reduce any PIL mode to L or RGB (resizing L is 3x cheaper; channels are expanded last).

    ``white_is_zero``: a 16-bit or float image stored with 0 as white (:func:`_white_is_zero`)."""
    mode = im.mode
    if mode in ("L", "RGB"):
        return im
    if mode == "1":
        return im.convert("L")
    if mode in ("LA", "La"):
        return _composite_on_black(im.convert("LA"), "L")
    if mode in ("RGBA", "RGBa"):
        return _composite_on_black(im.convert("RGBA"), "RGB")
    if mode in ("P", "PA"):
        has_alpha = mode == "PA" or "transparency" in im.info
        if has_alpha:
            return _composite_on_black(im.convert("RGBA"), "RGB")
        return im.convert("RGB")
    if mode.startswith("I") or mode == "F":
        return _scale_wide(im, white_is_zero)
    return im.convert("RGB")  # CMYK (PIL reads JPEG CMYK as Adobe-inverted), YCbCr, LAB, HSV, RGBX


def _resize(im: Image.Image, size_hw: tuple[int, int], mode: str,
            full_wh: tuple[int, int] | None = None) -> Image.Image:
    """``im`` to ``size_hw`` by ``mode``. ``full_wh``: the picture's size before a JPEG's DCT downscaling
    (which rounds each side up, so ``im`` can have another aspect ratio by a fraction of a pixel). The
    crop box and the padded size are worked out on it, so they are the same whether or not the decoder
    downscaled: the padded box of a 1616 x 1121 original was 224 x 156 with downscaling, 224 x 155 without.
    """
    h, w = size_hw
    sw, sh = im.size
    if (sw, sh) == (w, h):
        return im  # fast path: already the target size (the 224-px Kermany copy)
    if mode == "squash":
        return im.resize((w, h), RESAMPLE)
    fw, fh = full_wh or (sw, sh)
    if mode == "crop":  # one resample of the central box with the target's aspect ratio
        scale = max(w / fw, h / fh)
        bw, bh = w / scale, h / scale
        kx, ky = sw / fw, sh / fh  # the full picture's coordinates in im's
        # clamped: when one side fits exactly, rounding can put an edge 1e-15 outside, which PIL refuses
        box = (max(0.0, (fw - bw) / 2 * kx), max(0.0, (fh - bh) / 2 * ky),
               min(sw, (fw + bw) / 2 * kx), min(sh, (fh + bh) / 2 * ky))
        return im.resize((w, h), RESAMPLE, box=box)
    scale = min(w / fw, h / fh)  # pad: fit inside, keep aspect, black borders
    nw, nh = max(1, min(w, round(fw * scale))), max(1, min(h, round(fh * scale)))
    canvas = Image.new(im.mode, (w, h), 0)
    canvas.paste(im.resize((nw, nh), RESAMPLE), ((w - nw) // 2, (h - nh) // 2))
    return canvas


UPSCALE_LIMIT = 4  # an image upscaled more than this to the backbone's input is noted (a 5x5 "X-ray")


def pixel_size(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, frames) from the image headers (no pixel decoding); None when PIL cannot tell.

    Frames: an animated GIF or a multi-page TIFF is read from its first frame only; the count lets predict
    and extract say so (a 3-page TIFF got one label without a word). Sizes: both note images upscaled more
    than ``UPSCALE_LIMIT`` times to the backbone's input."""
    _quiet_pil()  # a 90-180 MP image made PIL print its DecompressionBombWarning here
    try:
        with Image.open(io.BytesIO(data)) as im:
            return int(im.size[0]), int(im.size[1]), _frames(im)
    except Exception:  # noqa: BLE001 - any unreadable header: the decoder reports it properly later
        return None


def decode_image(data: bytes, size: int | tuple[int, int], resize: str = "squash") -> np.ndarray:
    """Decode image bytes to a uint8 ``[H, W, 3]`` array of ``size`` = (height, width).

    Raises :class:`ImageDecodeError` (with ``reason``) for anything that is not a usable image.
    """
    return decode_image_sized(data, size, resize)[0]


def decode_image_sized(data: bytes, size: int | tuple[int, int],
                       resize: str = "squash") -> tuple[np.ndarray, tuple[int, int, int]]:
    """:func:`decode_image`, plus the file's (width, height, frames) as :func:`pixel_size` gives them.

    Why: extract notes images smaller than the input and multi-frame files; reading the header a second
    time with :func:`pixel_size` cost each image about 0.13 ms on the decode threads, which share the two
    cores with the forward pass that issue 5's extract efficiency is measured against.
    """
    if resize not in RESIZE_MODES:
        raise ConfigError(f"unknown resize mode '{resize}'; choose one of: {', '.join(RESIZE_MODES)}.")
    size_hw = _normalise_size(size)
    _quiet_pil()
    data = _end_marker_restored(data)
    im = opened = _open(data)
    full_wh = im.size  # before _load: a JPEG's draft mode shrinks im.size
    dims = (int(full_wh[0]), int(full_wh[1]))
    white_is_zero = _white_is_zero(im)  # read from the opened file: a transposed copy has no TIFF tags
    try:
        pixels, orientation = _load(im, size_hw, data)
        if isinstance(pixels, np.ndarray) and orientation == 1 and pixels.shape[:2] == size_hw:
            arr = pixels  # the common case (a file already at the target size) never becomes an Image
        else:
            im = Image.fromarray(pixels) if isinstance(pixels, np.ndarray) else pixels
            if orientation != 1:
                im = im.transpose(_TRANSPOSE[orientation])
                if orientation >= 5:  # these turn the picture a quarter
                    full_wh = full_wh[::-1]
            im = _resize(_to_l_or_rgb(im, white_is_zero), size_hw, resize, full_wh)
            arr = np.asarray(im, dtype=np.uint8)
    except ImageDecodeError:
        raise
    except MemoryError as exc:
        raise ImageDecodeError("image too large to decode (out of memory)") from exc
    except Exception as exc:  # noqa: BLE001 - nothing from PIL may escape as another type
        raise ImageDecodeError(f"cannot decode image ({_short(exc)})") from exc
    if arr.ndim == 2:
        arr = np.repeat(arr[:, :, None], 3, axis=2)
    return np.ascontiguousarray(arr), (*dims, _frames(opened))


def _frames(im: Image.Image) -> int:
    """Frames of an opened image (asked after its first frame was read: counting them may seek)."""
    try:
        return int(getattr(im, "n_frames", 1) or 1) if getattr(im, "is_animated", False) else 1
    except Exception:  # noqa: BLE001 - a count PIL cannot make: the first frame is what was read anyway
        return 1


# ----------------------------------------------------------------------------------------- views

VIEW_FORMS = (
    "orig",
    "hflip",
    "vflip",
    "rot+D / rot-D (degrees, 0 < D <= 180, counter-clockwise for +, about the centre, black fill)",
    "bright+F / bright-F (multiply by 1+F / 1-F, 0 < F < 1)",
    "contrast+F / contrast-F (scale deviations from the image mean by 1+F / 1-F, 0 < F < 1)",
    "zoomZ (centre zoom by 1 < Z <= 4, e.g. zoom1.1)",
    "shiftx+F / shiftx-F / shifty+F / shifty-F (translate by F of the width/height, 0 < F < 0.5, black fill;"
    " + is right/down)",
)
_NUM = r"(\d+(?:\.\d*)?|\.\d+)"
_SIGNED_RE = re.compile(rf"^(rot|bright|contrast|shiftx|shifty)([+-]?){_NUM}$")
_ZOOM_RE = re.compile(rf"^zoom{_NUM}$")
_LIMITS = {  # kind -> (exclusive low, high, high inclusive?)
    "rot": (0.0, 180.0, True),
    "bright": (0.0, 1.0, False),
    "contrast": (0.0, 1.0, False),
    "shiftx": (0.0, 0.5, False),
    "shifty": (0.0, 0.5, False),
    "zoom": (1.0, 4.0, True),
}


def _fmt(x: float) -> str:
    """Canonical number: '20', '7.5', '0.2' (so 'rot+20.0' and 'rot20' name the same rows)."""
    return format(x, "g")


def _parse_view(text: str) -> tuple[str, str, float]:
    """``(canonical name, kind, signed amount)``; ConfigError listing the valid forms otherwise."""
    t = text.strip().lower()
    if t in ("orig", "hflip", "vflip"):
        return t, t, 0.0
    kind, sign, num = "", "+", ""
    m = _SIGNED_RE.match(t)
    if m:
        kind, sign, num = m.group(1), m.group(2) or "+", m.group(3)
    else:
        m = _ZOOM_RE.match(t)
        if m:
            kind, num = "zoom", m.group(1)
    value = float(num) if kind else math.nan
    if kind:
        lo, hi, hi_incl = _LIMITS[kind]
        if value > lo and (value < hi or (hi_incl and value == hi)):
            if kind == "zoom":
                return f"zoom{_fmt(value)}", kind, value
            signed = value if sign == "+" else -value
            return f"{kind}{sign}{_fmt(value)}", kind, signed
    raise ConfigError(f"invalid view '{text.strip()}'; valid forms: {'; '.join(VIEW_FORMS)}.")


@dataclass(frozen=True)
class View:
    """A deterministic augmentation, identified by its canonical name (its cache row key)."""

    name: str
    kind: str = field(default="", compare=False, repr=False)
    amount: float = field(default=0.0, compare=False, repr=False)

    def __post_init__(self) -> None:
        name, kind, amount = _parse_view(self.name)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "kind", kind)
        object.__setattr__(self, "amount", amount)

    def apply(self, img: np.ndarray) -> np.ndarray:
        """The view of a uint8 ``[H, W, 3]`` image: same shape and dtype, same result every time."""
        if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"View.apply expects uint8 [H, W, 3], got {img.dtype} {img.shape}")
        return _APPLY[self.kind](img, self.amount)


def _rotate(img: np.ndarray, degrees: float) -> np.ndarray:
    im = Image.fromarray(img).rotate(degrees, resample=RESAMPLE, expand=False, fillcolor=(0, 0, 0))
    return np.asarray(im, dtype=np.uint8).copy()


def _scale_values(img: np.ndarray, factor: float, centre: float) -> np.ndarray:
    out = centre + (img.astype(np.float32) - centre) * np.float32(factor)
    return np.rint(np.clip(out, 0, 255)).astype(np.uint8)


def _zoom(img: np.ndarray, z: float) -> np.ndarray:
    h, w = img.shape[:2]
    bw, bh = w / z, h / z
    box = ((w - bw) / 2, (h - bh) / 2, (w + bw) / 2, (h + bh) / 2)
    return np.asarray(Image.fromarray(img).resize((w, h), RESAMPLE, box=box), dtype=np.uint8).copy()


def _shift(img: np.ndarray, frac: float, axis: int) -> np.ndarray:
    n = img.shape[axis]
    d = int(round(frac * n))
    out = np.zeros_like(img)
    if d == 0:
        return img.copy()
    src = [slice(None)] * 3
    dst = [slice(None)] * 3
    if d > 0:
        src[axis], dst[axis] = slice(0, n - d), slice(d, n)
    else:
        src[axis], dst[axis] = slice(-d, n), slice(0, n + d)
    out[tuple(dst)] = img[tuple(src)]
    return out


_APPLY = {
    "orig": lambda img, _: img,
    "hflip": lambda img, _: np.ascontiguousarray(img[:, ::-1]),
    "vflip": lambda img, _: np.ascontiguousarray(img[::-1]),
    "rot": _rotate,
    "bright": lambda img, a: _scale_values(img, 1.0 + a, 0.0),
    "contrast": lambda img, a: _scale_values(img, 1.0 + a, float(img.mean(dtype=np.float64))),
    "zoom": _zoom,
    "shiftx": lambda img, a: _shift(img, a, 1),
    "shifty": lambda img, a: _shift(img, a, 0),
}


def parse_views(spec: str | Sequence[str], flag: str = "--views") -> list[View]:
    """Views from ``"orig,hflip,rot+20"`` or a list of such strings; duplicates collapse, order kept.

    ``flag``: the option the views came from, for the example an empty list's error gives (fit's
    ``--tta-views ''`` was told to "pass e.g. --views orig,hflip", extract's option)."""
    items = [spec] if isinstance(spec, str) else list(spec)
    names = [part.strip() for item in items for part in str(item).split(",") if part.strip()]
    if not names:
        forms = "; ".join(VIEW_FORMS)
        raise ConfigError(f"no views given; pass e.g. {flag} orig,hflip (valid forms: {forms}).")
    views: list[View] = []
    for name in names:
        view = View(name)
        if view not in views:
            views.append(view)
    return views


def decode_views(data: bytes, size: int | tuple[int, int], resize: str,
                 views: Sequence[View]) -> list[np.ndarray]:
    """Decode once and apply each view (the costly decode is shared by all views of a file)."""
    return decode_views_sized(data, size, resize, views)[0]


def decode_views_sized(data: bytes, size: int | tuple[int, int], resize: str,
                       views: Sequence[View]) -> tuple[list[np.ndarray], tuple[int, int, int]]:
    """:func:`decode_views` with the file's (width, height, frames) (:func:`decode_image_sized`)."""
    base, dims = decode_image_sized(data, size, resize)
    return [view.apply(base) for view in views], dims
