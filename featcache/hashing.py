"""Content hashes: the identity of an image is the SHA-256 of its bytes.

Cache rows are keyed by these digests, so two copies of the same file are computed once and a
renamed file is still found in the cache. Hashing streams in 1 MiB blocks so memory stays flat
for any file size; ``sha256_many`` uses a small thread pool because hashlib releases the GIL and
the work is mostly I/O on cold caches.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

BLOCK_SIZE = 1 << 20  # 1 MiB: large enough to amortise syscalls, small enough to keep memory flat


def sha256_bytes(data: bytes) -> str:
    """Hex SHA-256 of an in-memory buffer (used when the bytes are already read for decoding)."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file, streamed in 1 MiB blocks so huge files never load whole."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while True:
            block = fh.read(BLOCK_SIZE)
            if not block:
                break
            digest.update(block)
    return digest.hexdigest()


def sha256_many(paths: Iterable[str | Path], workers: int = 4) -> Iterator[tuple[Path, str | OSError]]:
    """Hash many files in order, yielding ``(path, hex)`` or ``(path, OSError)`` for unreadable ones.

    Results come back in input order (deterministic) while up to ``workers`` files are hashed at
    once. An I/O error is yielded rather than raised so one bad file does not stop a scan of
    thousands.
    """

    def one(p: Path) -> str | OSError:
        try:
            return sha256_file(p)
        except OSError as exc:
            return exc

    items = [Path(p) for p in paths]
    if workers <= 1 or len(items) < 2:
        for p in items:
            yield p, one(p)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        yield from zip(items, pool.map(one, items), strict=True)
