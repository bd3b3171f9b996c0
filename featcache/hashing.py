"""Content hashes: the identity of an image is the SHA-256 of its bytes.

Cache rows are keyed by these digests, so two copies of the same file are computed once and a
renamed file is still found in the cache. Hashing streams in 1 MiB blocks so memory stays flat
for any file size; ``sha256_many`` uses a small thread pool because hashlib releases the GIL and
the work is mostly I/O on cold caches.
"""
from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BLOCK_SIZE = 1 << 20  # 1 MiB: large enough to amortise syscalls, small enough to keep memory flat
_GROUP = 32  # files per pool task in sha256_many


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of an in-memory buffer (used when the bytes are already read for decoding)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file: one read when it fits a block, else streamed in 1 MiB blocks.

    Why not always ``read(BLOCK_SIZE)``: that allocates a fresh 1 MiB buffer per call, which cost
    more than the hashing for the 6-KB Kermany files (0.10 s against 0.07 s for 5,232 files).
    """
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as fh:
        if os.fstat(fh.fileno()).st_size <= BLOCK_SIZE:
            digest.update(fh.readall())  # readall() also finishes a file that grew since fstat
            return digest.hexdigest()
        view = memoryview(bytearray(BLOCK_SIZE))
        while n := fh.readinto(view):
            digest.update(view[:n])
    return digest.hexdigest()


def sha256_many(paths: Iterable[str | Path], workers: int = 4) -> Iterator[tuple[Path, str | OSError]]:
    """Hash many files in order, yielding ``(path, hex)`` or ``(path, OSError)`` for unreadable ones.

    Results come back in input order (deterministic) while up to ``workers`` groups of files are
    hashed at once: parallel reads help on cold or network storage, and a group of ``_GROUP`` files
    per task keeps the pool's per-task cost (about 40 us, more than hashing a small cached file)
    out of the loop. An I/O error is yielded rather than raised so one bad file does not stop a
    scan of thousands.
    """

    def one(p: Path) -> str | OSError:
        try:
            return sha256_file(p)
        except OSError as exc:
            return exc

    def group(ps: list[Path]) -> list[str | OSError]:
        return [one(p) for p in ps]

    items = [Path(p) for p in paths]
    if workers <= 1 or len(items) <= _GROUP:
        for p in items:
            yield p, one(p)
        return
    groups = [items[i:i + _GROUP] for i in range(0, len(items), _GROUP)]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        for ps, digests in zip(groups, pool.map(group, groups), strict=True):
            yield from zip(ps, digests, strict=True)

