"""Find the Kermany tree inside an extracted archive and arrange it as ``train/test/val × NORMAL/PNEUMONIA``.

Why: archives nest the tree at various depths (``chest_xray/chest_xray/...``), spell the folders in
various cases and carry junk (``__MACOSX``); ``datasets.discover`` reads one fixed layout.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path

from featcache.download.archive import is_junk
from featcache.errors import DownloadError

KERMANY_LABELS = ("NORMAL", "PNEUMONIA")
_SPLIT_ALIASES = {"train": "train", "test": "test", "val": "val", "validation": "val"}
LAYOUT_EXTENSIONS = {".jpeg", ".jpg", ".png"}


def _child_dirs(folder: Path) -> dict[str, Path]:
    """Sub-folders by lower-case name (case-insensitive matching of train/NORMAL/...)."""
    out: dict[str, Path] = {}
    with contextlib.suppress(OSError):
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            if entry.is_dir(follow_symlinks=False) and not is_junk((entry.name,)):
                out.setdefault(entry.name.lower(), Path(entry.path))
    return out


def _looks_like_root(folder: Path) -> bool:
    """A folder with split sub-folders that hold NORMAL or PNEUMONIA class folders."""
    children = _child_dirs(folder)
    for alias in _SPLIT_ALIASES:
        if alias in children:
            labels = _child_dirs(children[alias])
            if any(lbl.lower() in labels for lbl in KERMANY_LABELS):
                return True
    return False


def _count_images(root: Path) -> int:
    """Images ``layout_kermany`` would take from a candidate root (split/label folders only)."""
    n = 0
    for alias, split_dir in _child_dirs(root).items():
        if alias not in _SPLIT_ALIASES:
            continue
        labels = _child_dirs(split_dir)
        for label in KERMANY_LABELS:
            label_dir = labels.get(label.lower())
            if label_dir is None:
                continue
            with contextlib.suppress(OSError), os.scandir(label_dir) as entries:
                n += sum(1 for e in entries if e.is_file(follow_symlinks=False) and not e.name.startswith(".")
                         and Path(e.name).suffix.lower() in LAYOUT_EXTENSIONS)
    return n


def find_kermany_root(extracted: Path, max_depth: int = 6) -> Path:
    """The shallowest folder in the extracted tree that has the Kermany split/class structure.

    Tolerates a top-level folder (``chest_xray/``), nesting (the Kaggle copy repeats
    ``chest_xray/chest_xray/``: the shallowest wins) and ``__MACOSX``. Several candidates at the
    shallowest depth that hold images are refused, listed: picking one by name would silently
    install whichever copy sorts first (another version, a subset) as the dataset.
    """
    level = [extracted]
    for _depth in range(max_depth + 1):
        hits = [d for d in level if _looks_like_root(d)]
        if hits:
            with_images = [d for d in hits if _count_images(d)]
            if len(with_images) > 1:
                names = ", ".join(f"{d.relative_to(extracted).as_posix()}/ ({_count_images(d)} images)"
                                  for d in with_images)
                raise DownloadError(f"the archive holds several Kermany-like folders at the same depth "
                                    f"({names}); featcache cannot tell which is the dataset: extract the "
                                    f"archive yourself and pass the right folder as --data, or use another "
                                    f"--url.")
            return (with_images or hits)[0]
        level = [c for d in level for c in _child_dirs(d).values()]
        if not level:
            break
    raise DownloadError("the archive holds no chest_xray/{train,test}/{NORMAL,PNEUMONIA}/ folders; "
                        "check --source or --url.")


def layout_kermany(extracted: Path, stage: Path) -> dict[str, dict[str, int]]:
    """Move the images of the found root into ``stage/<split>/<LABEL>/``; return counts."""
    root = find_kermany_root(extracted)
    counts: dict[str, dict[str, int]] = {}
    for alias, split_dir in _child_dirs(root).items():
        split = _SPLIT_ALIASES.get(alias)
        if split is None:
            continue
        labels = _child_dirs(split_dir)
        for label in KERMANY_LABELS:
            src_dir = labels.get(label.lower())
            if src_dir is None:
                continue
            target_dir = stage / split / label
            n = 0
            for entry in sorted(os.scandir(src_dir), key=lambda e: e.name):
                if not entry.is_file(follow_symlinks=False) or entry.name.startswith(".") or \
                        Path(entry.name).suffix.lower() not in LAYOUT_EXTENSIONS:
                    continue
                target_dir.mkdir(parents=True, exist_ok=True)
                target = target_dir / entry.name
                if target.exists():      # "val" and "validation" both present: keep the first copy
                    continue
                os.replace(entry.path, target)
                n += 1
            if n:
                counts.setdefault(split, {})[label] = counts.get(split, {}).get(label, 0) + n
    if not counts:
        raise DownloadError("the archive's split folders hold no .jpeg/.jpg/.png images; check --source "
                            "or --url.")
    return counts
