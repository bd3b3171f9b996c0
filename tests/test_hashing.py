"""Content hashes: one read for small files, streamed blocks for big ones, grouped pool keeps order."""
from __future__ import annotations

import hashlib

from featcache import hashing
from featcache.hashing import BLOCK_SIZE, sha256_file, sha256_many


def test_sha256_file_small_and_streamed(tmp_path):
    for size in (0, 1, 6_000, BLOCK_SIZE, BLOCK_SIZE + 1, 3 * BLOCK_SIZE + 17):
        data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
        path = tmp_path / f"f{size}"
        path.write_bytes(data)
        assert sha256_file(path) == hashlib.sha256(data).hexdigest(), size


def test_sha256_many_keeps_order_and_reports_unreadable(tmp_path):
    n = 3 * hashing._GROUP + 5  # several pool tasks, the last one short
    paths = []
    for i in range(n):
        p = tmp_path / f"{i:03d}.bin"
        if i != 40:  # one missing file in the middle of a group
            p.write_bytes(f"file {i}".encode())
        paths.append(p)
    for workers in (1, 4):
        out = list(sha256_many(paths, workers=workers))
        assert [p for p, _ in out] == paths
        for i, (_p, digest) in enumerate(out):
            if i == 40:
                assert isinstance(digest, FileNotFoundError)
            else:
                assert digest == hashlib.sha256(f"file {i}".encode()).hexdigest()
