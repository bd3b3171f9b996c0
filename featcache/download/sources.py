"""Where the Kermany dataset can be downloaded from, and the SHA-256 pins a user may give.

Why a table: the official archive (Mendeley Data) and TensorFlow's TFRecord mirror differ in files and
format; each source names its files and, only where really known, their checksums. None is invented
here: an unknown checksum is trusted on first use and recorded (see ``transfer``); ``--sha256`` pins one.
"""
from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from featcache.errors import ConfigError

HEX64 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class RemoteFile:
    """One file of a source: where it lives and, only when really known, its SHA-256."""

    name: str                    # file name under <dest>/.downloads/
    url: str
    sha256: str | None = None    # None = not published / not verified by us: computed and recorded
    split: str | None = None     # tfrecord shards: which split the file holds
    role: str = "archive"        # "archive" | "images" | "paths"


@dataclass(frozen=True)
class Source:
    """A named way of getting the dataset."""

    name: str
    kind: str                    # "archive" (zip / tar[.gz]) | "tfrecord"
    description: str
    files: tuple[RemoteFile, ...]

    def resolve(self, url: str | None) -> tuple[RemoteFile, ...]:
        """The files to fetch, with ``url`` overriding the default location.

        For an archive source ``url`` is the archive itself; for the TFRecord source it is the base
        folder holding ``train/images.tfrec`` and friends. A checksum from the table belongs to the
        table's URL only, so an overridden URL drops it (use ``--sha256`` to pin one).
        """
        if url is None:
            return self.files
        check_url(url)
        if self.kind == "archive":
            name = _archive_name_from_url(url, self.files[0].name)
            return (RemoteFile(name=name, url=url, sha256=None, role="archive"),)
        base = url.rstrip("/")
        return tuple(
            RemoteFile(name=f.name, url=f"{base}/{f.split}/{f.role}.tfrec", sha256=None, split=f.split,
                       role=f.role)
            for f in self.files
        )


_MENDELEY_URL = ("https://data.mendeley.com/public-files/datasets/rscbjbr9sj/files/"
                 "f12eaf6d-6023-432f-acc9-80c9d7393433/file_downloaded")
_TFRECORD_BASE = "https://storage.googleapis.com/download.tensorflow.org/data/ChestXRay2017"

SOURCES: dict[str, Source] = {
    "mendeley": Source(
        name="mendeley",
        kind="archive",
        description="Kermany, Zhang, Goldbaum (2018), Mendeley Data v2, doi:10.17632/rscbjbr9sj.2, "
                    "ChestXRay2017.zip (CC BY 4.0): official train/test splits, original JPEGs",
        files=(RemoteFile(name="ChestXRay2017.zip", url=_MENDELEY_URL, sha256=None),),
    ),
    "tfrecord": Source(
        name="tfrecord",
        kind="tfrecord",
        description="TFRecord copy used by the TensorFlow/Keras pneumonia tutorial "
                    "(download.tensorflow.org/data/ChestXRay2017): images.tfrec + paths.tfrec per split",
        files=tuple(
            RemoteFile(name=f"{split}-{role}.tfrec", url=f"{_TFRECORD_BASE}/{split}/{role}.tfrec",
                       sha256=None, split=split, role=role)
            for split in ("train", "test") for role in ("images", "paths")
        ),
    ),
}


def get_source(name: str) -> Source:
    """The named source, or a ConfigError listing the valid names."""
    try:
        return SOURCES[name]
    except KeyError:
        raise ConfigError(f"--source: unknown download source {name!r}; choose one of: "
                          f"{', '.join(SOURCES)}.") from None


def check_url(url: str) -> None:
    """Only http(s): a ``file://`` or ``ftp://`` URL from a flag must not read arbitrary local files."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"--url must be an http:// or https:// address, got {url!r}.")


def _archive_name_from_url(url: str, default: str) -> str:
    """Keep the URL's file name when it looks like an archive (cosmetic; format is sniffed anyway)."""
    base = os.path.basename(urlsplit(url).path)
    if re.fullmatch(r"[A-Za-z0-9._-]{1,120}", base or "") and base.lower().endswith(
            (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")) and not base.startswith("."):
        return base
    return default


def parse_sha256_pins(values: str | Sequence[str] | Mapping[str, str] | None,
                      files: Sequence[RemoteFile]) -> dict[str, str]:
    """Turn ``--sha256`` values into {file name: hex}.

    A bare hex digest pins a single-file source; ``NAME=HEX`` pins one file of a multi-file source.
    """
    if values is None:
        return {}
    if isinstance(values, Mapping):
        items = [f"{k}={v}" for k, v in values.items()]
    elif isinstance(values, str):
        items = [values]
    else:
        items = list(values)
    names = [f.name for f in files]
    pins: dict[str, str] = {}
    for item in items:
        name, sep, digest = item.rpartition("=")
        if not sep:
            if len(files) != 1:
                raise ConfigError(f"this source has {len(files)} files; pin each with --sha256 NAME=HEX "
                                  f"(names: {', '.join(names)}).")
            name = names[0]
        digest = digest.strip().lower()
        if not HEX64.match(digest):
            raise ConfigError(f"--sha256 value {digest!r} is not a 64-character hex SHA-256 digest.")
        if name not in names:
            raise ConfigError(f"--sha256 names unknown file {name!r}; files of this source: "
                              f"{', '.join(names)}.")
        pins[name] = digest
    return pins
