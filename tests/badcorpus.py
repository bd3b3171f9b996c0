"""A generated corpus of bad and odd image files inside a Kermany-like tree.

``make_bad_corpus(root)`` writes ``root/train/{NORMAL,PNEUMONIA}/...`` with good images next to
every kind of trouble real folders hold, and returns ``{relpath: expected outcome}``:

* ``"ok"``: the file must be decoded and cached (its features present after extraction);
* ``"skip:<keyword>"``: the file must be refused, and ``<keyword>`` (lower case) must occur in the
  reason, either in ``Dataset.skipped`` (discovery refusals: hidden, extension, symlink loop,
  broken symlink, not a regular file, unreadable, directory named like an image) or in
  ``ImageDecodeError.reason`` (decode refusals: zero-byte, truncated, not an image, too large,
  corrupt). Use :func:`outcome_keyword` to split the value.

Relpaths are POSIX and use ``os.fsdecode`` for the non-UTF-8 name, exactly as
``featcache.datasets`` reports them; a skipped folder ends with ``/``. The same image is written
under two names (both ``ok``; they share one cache key): see ``DUPLICATE_PAIR``.

Running as root: ``chmod 000`` does not stop root from reading, so that file is then expected
``ok`` (it is a good image); the FIFO ``pipe.jpeg`` is the root-proof unreadable case (opening it
would block forever, so discovery must refuse non-regular files).
"""
from __future__ import annotations

import functools
import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

NON_UTF8_NAME = b"IM-0200-0001-\xff\xfe.jpeg"  # not valid UTF-8: must survive via os.fsdecode
DUPLICATE_PAIR = ("train/NORMAL/IM-0001-0001.jpeg", "train/NORMAL/IM-0300-0001.jpeg")
HUGE_SIZE = (30_000, 30_000)  # 900 Mpixel header, ~110 KB on disk


def outcome_keyword(outcome: str) -> tuple[str, str | None]:
    """``("ok", None)`` or ``("skip", keyword)`` from an expected-outcome string."""
    kind, _, keyword = outcome.partition(":")
    return kind, (keyword or None)


def _xray(seed: int, size: tuple[int, int] = (48, 40)) -> np.ndarray:
    """A small grayscale test pattern (structure, not noise only, so resizing has something to do)."""
    rng = np.random.default_rng(seed)
    h, w = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = 80 + 60 * np.sin(xx / 5.0 + seed) + 40 * np.cos(yy / 7.0)
    return (base + rng.normal(0, 10, (h, w))).clip(0, 255).astype(np.uint8)


def _jpeg(arr: np.ndarray, mode: str = "RGB", **kw) -> bytes:
    buf = io.BytesIO()
    img = Image.fromarray(arr)
    img = img.convert(mode) if img.mode != mode else img
    img.save(buf, "JPEG", quality=90, **kw)
    return buf.getvalue()


def _png(img: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG", **kw)
    return buf.getvalue()


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


@functools.lru_cache(maxsize=1)
def huge_png() -> bytes:
    """A valid all-black 1-bit PNG whose header says 30000x30000: a decompression bomb in miniature."""
    w, h = HUGE_SIZE
    comp = zlib.compressobj(9)
    rows = (b"\x00" + b"\x00" * ((w + 7) // 8)) * 1000
    data = b"".join(comp.compress(rows) for _ in range(h // 1000)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def _write(path: Path, data: bytes) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path.as_posix()


def _odd_images() -> dict[str, bytes]:
    """Files in unusual but valid formats (all must decode): name -> bytes."""
    g = _xray(11)
    rgba = np.dstack([np.dstack([g, g, g]), np.full_like(g, 200)])
    pal = Image.fromarray(g).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    pal.info["transparency"] = 0
    rotated = Image.fromarray(_xray(12, (30, 50))).convert("RGB")
    exif = rotated.getexif()
    exif[0x0112] = 6
    la = Image.fromarray(np.dstack([g, np.full_like(g, 128)]))
    return {
        "train/NORMAL/IM-0010-0001.jpeg": _png(Image.fromarray(_xray(13))),          # PNG named .jpeg
        "train/NORMAL/IM-0011-0001.png": _png(Image.fromarray(g.astype(np.uint16) * 16)),
        "train/NORMAL/IM-0012-0001.png": _png(Image.fromarray(rgba)),
        "train/NORMAL/IM-0013-0001.png": _png(pal, transparency=0),
        "train/NORMAL/IM-0014-0001.jpeg": _jpeg(np.dstack([g, g // 2, 255 - g]), "CMYK"),
        "train/NORMAL/IM-0015-0001.jpeg": _jpeg(g, "L"),
        "train/NORMAL/IM-0016-0001.png": _png(Image.new("L", (1, 1), 128)),          # 1x1
        "train/NORMAL/IM-0017-0001.png": _png(Image.fromarray(g > 128)),            # 1-bit
        "train/NORMAL/IM-0018-0001.png": _png(la),
        "train/PNEUMONIA/person20_virus_50.jpeg": _jpeg_with_exif(rotated, exif),
        "train/PNEUMONIA/[bold]person21_virus_51[red].jpeg": _jpeg(_xray(14)),
        "train/PNEUMONIA/<img src=x onerror=alert(1)>.jpeg": _jpeg(_xray(15)),
    }


def _jpeg_with_exif(img: Image.Image, exif: Image.Exif) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=90, exif=exif)
    return buf.getvalue()


def make_bad_corpus(root: Path, fifo: bool = True) -> dict[str, str]:
    """Write the corpus under ``root`` and return ``{relpath: "ok" | "skip:<keyword>"}``.

    ``fifo=False`` leaves out the named pipe for callers that copy the tree with tools that
    would block on it.
    """
    root = Path(root)
    normal, pneu = root / "train" / "NORMAL", root / "train" / "PNEUMONIA"
    out: dict[str, str] = {}

    def put(rel: str, data: bytes, outcome: str) -> Path:
        path = root / rel
        _write(path, data)
        out[rel] = outcome
        return path

    good = _jpeg(_xray(1))
    put("train/NORMAL/IM-0001-0001.jpeg", good, "ok")
    put("train/NORMAL/IM-0002-0001.jpeg", _jpeg(_xray(2)), "ok")
    put("train/PNEUMONIA/person1_bacteria_1.jpeg", _jpeg(_xray(3)), "ok")
    put("train/PNEUMONIA/person2_virus_2.jpeg", _jpeg(_xray(4)), "ok")
    put(DUPLICATE_PAIR[1], good, "ok")
    for rel, data in _odd_images().items():
        put(rel, data, "ok")

    put("train/NORMAL/IM-0100-0001.jpeg", b"", "skip:zero-byte")
    bigger = _jpeg(_xray(5, (96, 96)))
    put("train/PNEUMONIA/person3_bacteria_3.jpeg", bigger[: len(bigger) // 2], "skip:truncated")
    text = b"this is not an image, just text\n" * 4
    put("train/PNEUMONIA/person4_bacteria_4.jpeg", text, "skip:not an image")
    put("train/NORMAL/IM-0101-0001.png", huge_png(), "skip:too large")
    corrupt = bytearray(_png(Image.fromarray(_xray(6))))
    corrupt[60:90] = b"\x00" * 30  # smash the compressed pixel stream (and its CRC)
    put("train/NORMAL/IM-0102-0001.png", bytes(corrupt), "skip:corrupt")
    put("train/NORMAL/README.txt", b"notes about the scans\n", "skip:extension")
    put("train/NORMAL/.DS_Store", b"\x00\x00\x00\x01Bud1", "skip:hidden")
    put("train/NORMAL/._IM-0001-0001.jpeg", good, "skip:hidden")

    os.symlink("loop-b.jpeg", normal / "loop-a.jpeg")
    os.symlink("loop-a.jpeg", normal / "loop-b.jpeg")
    out["train/NORMAL/loop-a.jpeg"] = out["train/NORMAL/loop-b.jpeg"] = "skip:symlink loop"
    os.symlink("..", normal / "parent-link")
    out["train/NORMAL/parent-link/"] = "skip:symlink loop"
    os.symlink("does-not-exist.jpeg", pneu / "person5_virus_5.jpeg")
    out["train/PNEUMONIA/person5_virus_5.jpeg"] = "skip:broken symlink"
    os.symlink("IM-0002-0001.jpeg", normal / "IM-0103-0001.jpeg")  # a link to a good file is followed
    out["train/NORMAL/IM-0103-0001.jpeg"] = "ok"
    (normal / "IM-0104-0001.jpeg").mkdir()
    out["train/NORMAL/IM-0104-0001.jpeg/"] = "skip:directory named like an image"

    locked = put("train/NORMAL/IM-0105-0001.jpeg", _jpeg(_xray(7)), "ok")
    locked.chmod(0)
    if not os.access(locked, os.R_OK):  # not root: the permission bits really lock it
        out["train/NORMAL/IM-0105-0001.jpeg"] = "skip:unreadable"
    if fifo:
        os.mkfifo(pneu / "pipe.jpeg")
        out["train/PNEUMONIA/pipe.jpeg"] = "skip:not a regular file"

    bad_name = os.fsencode(normal) + b"/" + NON_UTF8_NAME
    with open(bad_name, "wb") as fh:
        fh.write(_jpeg(_xray(8)))
    out["train/NORMAL/" + os.fsdecode(NON_UTF8_NAME)] = "ok"
    return out
