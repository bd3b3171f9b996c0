"""Extraction of an untrusted zip or tar archive, without ``extractall``.

Why: entries with absolute paths, drive letters, ``..`` components, links or device files are rejected
(zip-slip), and zip bombs are caught from the headers before anything is written (entry count, total
size, compression ratio). Every file is written by our own code at a path computed and checked to lie
inside the output folder.
"""
from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
import tarfile
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

from featcache.errors import DownloadError, NetworkError, os_reason
from featcache.faults import crash_point
from featcache.progress import ProgressFn, emit

_JUNK_NAMES = {"__MACOSX", ".DS_Store", "Thumbs.db", "desktop.ini"}


@dataclass(frozen=True)
class ExtractLimits:
    """Caps checked from archive headers before any byte is written (zip-bomb guard).

    The real ChestXRay2017.zip has about 12k entries (half of them ``__MACOSX`` junk) and 1.2 GB of
    JPEGs that barely compress (ratio ~1), so these defaults leave a wide margin for honest archives.
    """

    max_entries: int = 100_000
    max_total_bytes: int = 16 * 2**30
    max_ratio: float = 100.0              # uncompressed / compressed, per entry and for the archive
    ratio_min_bytes: int = 1 << 20        # ratios of tiny entries mean nothing (a 10-byte text file)


def _entry_parts(name: str) -> tuple[str, ...]:
    """Split an archive entry name into safe components, or raise DownloadError (zip-slip guard)."""
    if "\x00" in name:
        raise DownloadError(f"archive entry {name!r} contains a NUL byte; refusing to extract the archive.")
    norm = name.replace("\\", "/")
    if norm.startswith("/"):
        raise DownloadError(f"archive entry {name!r} has an absolute path; refusing to extract the archive.")
    if re.match(r"^[A-Za-z]:", norm):
        raise DownloadError(f"archive entry {name!r} has a drive letter; refusing to extract the archive.")
    parts = tuple(p for p in norm.split("/") if p not in ("", "."))
    if ".." in parts:
        raise DownloadError(f"archive entry {name!r} climbs out with '..'; refusing to extract the archive.")
    return parts


def is_junk(parts: tuple[str, ...]) -> bool:
    """macOS resource forks and desktop litter that ship inside the Kermany zip."""
    return any(p in _JUNK_NAMES or p.startswith("._") for p in parts)


def inside(root: Path, target: Path) -> Path:
    """Second line of defence: the resolved target must stay under the resolved root."""
    root_r = os.path.realpath(root)
    target_r = os.path.realpath(target)
    if os.path.commonpath([root_r, target_r]) != root_r:
        raise DownloadError(f"archive entry would be written outside the extraction folder ({target}); "
                            f"refusing.")
    return target


@dataclass
class _Plan:
    """Validated entries: (parts, is_dir, size, handle) where handle is the ZipInfo / TarInfo."""

    entries: list[tuple[tuple[str, ...], bool, int, object]] = field(default_factory=list)
    total: int = 0


def _check_totals(plan: _Plan, archive_size: int, limits: ExtractLimits, name: str) -> None:
    if plan.total > limits.max_total_bytes:
        raise DownloadError(f"{name} would expand to more than {limits.max_total_bytes} bytes; refusing to "
                            f"extract a possible zip bomb.")
    if plan.total > limits.ratio_min_bytes and plan.total > limits.max_ratio * max(archive_size, 1):
        raise DownloadError(f"{name} expands {plan.total / max(archive_size, 1):.0f}x its size; refusing to "
                            f"extract a possible zip bomb.")


def _plan_zip(zf: zipfile.ZipFile, limits: ExtractLimits, name: str) -> _Plan:
    infos = zf.infolist()
    if len(infos) > limits.max_entries:
        raise DownloadError(f"{name} has {len(infos)} entries, more than the limit of {limits.max_entries}; "
                            f"refusing to extract it.")
    plan = _Plan()
    for info in infos:
        parts = _entry_parts(info.filename)
        fmt = stat.S_IFMT(info.external_attr >> 16)
        if fmt == stat.S_IFLNK:
            raise DownloadError(f"archive entry {info.filename!r} is a symbolic link; refusing to extract "
                                f"the archive.")
        if fmt not in (0, stat.S_IFREG, stat.S_IFDIR):
            raise DownloadError(f"archive entry {info.filename!r} is a device or special file; refusing to "
                                f"extract the archive.")
        if info.flag_bits & 0x1:
            raise DownloadError(f"archive entry {info.filename!r} is encrypted; featcache cannot extract it.")
        if info.is_dir():
            plan.entries.append((parts, True, 0, info))
            continue
        if info.file_size > limits.ratio_min_bytes and \
                info.file_size > limits.max_ratio * max(info.compress_size, 1):
            raise DownloadError(f"archive entry {info.filename!r} expands "
                                f"{info.file_size / max(info.compress_size, 1):.0f}x; refusing to extract "
                                f"a possible zip bomb.")
        plan.total += info.file_size
        if plan.total > limits.max_total_bytes:
            _check_totals(plan, 0, limits, name)
        plan.entries.append((parts, False, info.file_size, info))
    return plan


def _plan_tar(tf: tarfile.TarFile, limits: ExtractLimits, name: str) -> _Plan:
    plan = _Plan()
    while (member := tf.next()) is not None:    # bounded by the entry cap below
        if len(plan.entries) >= limits.max_entries:
            raise DownloadError(f"{name} has more than {limits.max_entries} entries; refusing to extract it.")
        parts = _entry_parts(member.name)
        if member.issym() or member.islnk():
            kind = "symbolic link" if member.issym() else "hard link"
            raise DownloadError(f"archive entry {member.name!r} is a {kind}; refusing to extract the "
                                f"archive.")
        if member.ischr() or member.isblk() or member.isfifo():
            raise DownloadError(f"archive entry {member.name!r} is a device or special file; refusing to "
                                f"extract the archive.")
        if member.issparse() or not (member.isreg() or member.isdir()):
            raise DownloadError(f"archive entry {member.name!r} has an unsupported type; refusing to extract "
                                f"the archive.")
        if member.isdir():
            plan.entries.append((parts, True, 0, member))
            continue
        plan.total += member.size
        if plan.total > limits.max_total_bytes:   # checked before tarfile skips (decompresses) the data
            _check_totals(plan, 0, limits, name)
        plan.entries.append((parts, False, member.size, member))
    return plan


def _check_layout(plan: _Plan, name: str) -> None:
    """Duplicate names or a file that is also a folder would silently overwrite: refuse instead."""
    files: set[tuple[str, ...]] = set()
    dirs: set[tuple[str, ...]] = set()
    for parts, is_dir, _, _ in plan.entries:
        if not parts:
            continue
        for i in range(1, len(parts)):
            dirs.add(parts[:i])
        if is_dir:
            dirs.add(parts)
        elif parts in files:
            raise DownloadError(f"{name} holds {'/'.join(parts)!r} twice; refusing to extract an ambiguous "
                                f"archive.")
        else:
            files.add(parts)
    clash = files & dirs
    if clash:
        raise DownloadError(f"{name} uses {'/'.join(sorted(clash)[0])!r} both as a file and as a folder; "
                            f"refusing to extract it.")


def _write_error(exc: OSError, folder: Path) -> NetworkError:
    """A refused write (full disk, quota, permissions) is the disk's fault, not the archive's: exit 1.

    Why separate from "damaged": telling the user to delete a good 1.2 GB download because the disk
    filled up would cost them the download and fix nothing.
    """
    return NetworkError(f"cannot write the extracted files in {folder} ({os_reason(exc)}); free some space "
                        f"or fix permissions there, then rerun (the download is kept).")


def safe_extract(archive: str | Path, out_dir: str | Path, limits: ExtractLimits | None = None,
                 progress: ProgressFn | None = None) -> int:
    """Extract a zip or tar(.gz/.bz2/.xz) archive into the empty folder ``out_dir``; return files written.

    The format is sniffed from the bytes, not the name. Every entry is validated first (names,
    types, sizes); only then are regular files written, by our own code, with fresh permissions.
    ``__MACOSX`` and ``._*`` junk is validated but not written.
    """
    archive, out_dir = Path(archive), Path(out_dir)
    limits = limits or ExtractLimits()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(exc, out_dir) from None
    size = archive.stat().st_size
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as zf:
                plan = _plan_zip(zf, limits, archive.name)
                return _write_plan(plan, size, out_dir, limits, archive.name, progress,
                                   lambda info: zf.open(info))
        if tarfile.is_tarfile(archive):
            with tarfile.open(archive, "r:*") as tf:
                plan = _plan_tar(tf, limits, archive.name)
                return _write_plan(plan, size, out_dir, limits, archive.name, progress,
                                   lambda member: tf.extractfile(member))
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, ValueError, zlib.error) as exc:
        raise DownloadError(f"{archive.name} is damaged ({type(exc).__name__}: {exc}); delete {archive} and "
                            f"rerun to download it again.") from None
    raise DownloadError(f"{archive.name} is neither a zip nor a tar archive: it may be truncated or an HTML "
                        f"page (a login or error page) saved in its place; delete {archive} and rerun, or "
                        f"check --source or --url.")


def _copy_entry(src, target: Path, size: int, name: str, out_dir: Path) -> None:
    """Write one entry; an OSError from open, write or close becomes a write error naming ``out_dir``.

    Reads from ``src`` stay outside that net: a truncated or corrupt archive raises OSError subclasses
    too (``BadGzipFile``), and those must still say "damaged".
    """
    try:
        dst = open(target, "xb")  # noqa: SIM115 (close() is checked on its own: ENOSPC can come there)
    except OSError as exc:
        raise _write_error(exc, out_dir) from None
    try:
        written = 0
        while block := src.read(1 << 20):
            written += len(block)
            if written > size:
                raise DownloadError(f"archive entry {name!r} is larger than its header says; refusing to "
                                    f"extract a possible zip bomb.")
            try:
                dst.write(block)
            except OSError as exc:
                raise _write_error(exc, out_dir) from None
    except BaseException:
        with contextlib.suppress(OSError):
            dst.close()
        raise
    try:
        dst.close()                      # buffered bytes reach the disk here: ENOSPC can come now
    except OSError as exc:
        raise _write_error(exc, out_dir) from None


def _write_plan(plan: _Plan, archive_size: int, out_dir: Path, limits: ExtractLimits, name: str,
                progress: ProgressFn | None, opener) -> int:
    _check_totals(plan, archive_size, limits, name)
    _check_layout(plan, name)
    free = shutil.disk_usage(out_dir).free
    if plan.total > free:
        raise NetworkError(f"{name} needs {plan.total:,} bytes but only {free:,} are free in {out_dir}; "
                            f"free some space and rerun.")
    todo = [e for e in plan.entries if e[0] and not is_junk(e[0]) and not e[1]]
    for i, (parts, _is_dir, size, handle) in enumerate(todo, 1):
        target = inside(out_dir, out_dir.joinpath(*parts))
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _write_error(exc, out_dir) from None
        inside(out_dir, target.parent)
        src = opener(handle)
        if src is None:
            raise DownloadError(f"archive entry {'/'.join(parts)!r} cannot be read; refusing to extract "
                                f"the archive.")
        with src:
            _copy_entry(src, target, size, "/".join(parts), out_dir)
        crash_point("download.extract_entry")
        emit(progress, "extract", i, len(todo), name)
    return len(todo)
