"""Find the Kermany tree inside an extracted archive and arrange it as ``train/test/val × NORMAL/PNEUMONIA``.

Why: archives nest the tree at various depths (``chest_xray/chest_xray/...``), spell the folders in
various cases and carry junk (``__MACOSX``); ``datasets.discover`` reads one fixed layout.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

from featcache.datasets import SPLIT_ALIASES  # what discovery reads as a split: valid/ too
from featcache.download.archive import is_junk
from featcache.errors import DownloadError

KERMANY_LABELS = ("NORMAL", "PNEUMONIA")
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
    for alias in SPLIT_ALIASES:
        if alias in children:
            labels = _child_dirs(children[alias])
            if any(lbl.lower() in labels for lbl in KERMANY_LABELS):
                return True
    return False


def _image_files(root: Path) -> Iterator[tuple[str, str, list[os.DirEntry]]]:
    """(split, label, its image files sorted by name) for each split/label folder of a candidate root:
    what ``layout_kermany`` moves and what ``find_kermany_root`` counts to tell candidates apart."""
    for alias, split_dir in _child_dirs(root).items():
        split = SPLIT_ALIASES.get(alias)
        if split is None:
            continue
        labels = _child_dirs(split_dir)
        for label in KERMANY_LABELS:
            src_dir = labels.get(label.lower())
            if src_dir is None:
                continue
            with os.scandir(src_dir) as entries:
                files = sorted((e for e in entries if e.is_file(follow_symlinks=False)
                                and not e.name.startswith(".")
                                and Path(e.name).suffix.lower() in LAYOUT_EXTENSIONS), key=lambda e: e.name)
            yield split, label, files


def _count_images(root: Path) -> dict[str, int]:
    """Images ``layout_kermany`` would take from a candidate root, per class label (none when a folder
    cannot be read)."""
    counts: dict[str, int] = {}
    try:
        for _, label, files in _image_files(root):
            counts[label] = counts.get(label, 0) + len(files)
    except OSError:
        return {}
    return counts


def find_kermany_root(extracted: Path, max_depth: int = 6) -> Path:
    """The shallowest folder in the extracted tree that has the Kermany split/class structure.

    Tolerates a top-level folder (``chest_xray/``), nesting (the Kaggle copy repeats
    ``chest_xray/chest_xray/``: the shallowest wins), ``__MACOSX`` and the Mendeley v3 archive's OCT
    tree beside the chest X-rays (the one candidate with PNEUMONIA images wins). Several candidates at the
    shallowest depth that hold images are refused, listed: picking one by name would silently
    install whichever copy sorts first (another version, a subset) as the dataset.
    """
    level = [extracted]
    for _depth in range(max_depth + 1):
        hits = [d for d in level if _looks_like_root(d)]
        if hits:
            counts = {d: _count_images(d) for d in hits}
            with_images = [d for d in hits if sum(counts[d].values())]
            if len(with_images) > 1:  # Mendeley v3 holds CellData/OCT/ (CNV, DME, DRUSEN, NORMAL) beside
                # CellData/chest_xray/: only the chest X-ray tree has pneumonia
                chest = [d for d in with_images if counts[d].get("PNEUMONIA")]
                with_images = chest if len(chest) == 1 else with_images
            if len(with_images) > 1:
                names = ", ".join(f"{d.relative_to(extracted).as_posix()}/ ({sum(counts[d].values())} images)"
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
    for split, label, files in _image_files(root):
        target_dir = stage / split / label
        n = 0
        for entry in files:
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
