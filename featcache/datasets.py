"""Finding images, their labels, splits and patients.

Three layouts are understood, all resolved into the same sorted list of :class:`ImageRecord`:

* **kermany**: ``root/{train,test[,val]}/{NORMAL,PNEUMONIA}/*.jpeg`` (or ``root`` being one split
  folder). File names carry the patient and the pneumonia subtype; we parse them because a split
  that ignores patients leaks them between train and validation (about 66% of Kermany's training
  images belong to patients with several images).
* **folders**: any ``root/[split/]CLASS/*.ext`` tree.
* **manifest**: a CSV ``path,label[,split][,group]`` with paths relative to the CSV's folder.

Discovery never raises for one odd file: hidden files, wrong extensions, broken links, symlink
loops and unreadable files land in ``Dataset.skipped`` with a reason, because real folders are
messy and one stray ``.DS_Store`` must not stop an hour-long extraction. It only raises
:class:`~featcache.errors.DataError` when the dataset as a whole cannot be used.
"""
from __future__ import annotations

import csv
import errno
import os
import re
import stat
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from featcache.errors import ConfigError, DataError
from featcache.hashing import sha256_many
from featcache.progress import ProgressFn, emit

SUBTYPES = ("normal", "bacteria", "virus")
"""The Kermany subtypes (3class task classes, in this order), from the file names."""
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".gif", ".webp"}
DICOM_EXTENSIONS = (".dcm", ".dicom")
SPLIT_NAMES = {"train", "val", "test"}
# Training/ and Testing/ too (Kaggle's brain-tumour MRI set, among others): unknown to discovery, they were
# read as two classes, and a fit then learned train-versus-test without a word.
SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "validation": "val", "valid": "val",
                 "test": "test", "testing": "test"}
_KERMANY_LABELS = {"NORMAL", "PNEUMONIA"}
_NO_CLASS_FOLDER = "not inside a class folder"  # a skip reason; the no-images message looks for it
TASKS = ("binary", "3class", "folders")


HIDDEN_FILE = "hidden file"
HIDDEN_FOLDER = "hidden folder"


def is_hidden_skip(reason: str) -> bool:
    """Whether a skip reason is a hidden entry (.DS_Store, macOS' ._x.jpeg forks, .ipynb_checkpoints/).

    Why: such entries are a copy's or a tool's clutter, never images someone meant to use, so
    ``extract --strict`` does not count them (as predict leaves them out); they are still listed."""
    return reason in (HIDDEN_FILE, HIDDEN_FOLDER)


def unusable_first(skipped: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Skipped (path, reason) pairs with hidden entries last, each kind in its order. Why: summaries show
    the first few, and a Mac-made copy's ``.DS_Store`` files filled `run`'s three lines while the damaged
    images that needed the user went unshown."""
    return sorted(skipped, key=lambda item: is_hidden_skip(item[1]))


def not_an_image_extension(suffix: str) -> str:
    """The reason a file of extension ``suffix`` (lower case, with its dot, or "") is left out.

    Why DICOM is named: it is what a hospital's X-rays come as, and "not an image file extension (.dcm)"
    read as if featcache took the file for something other than an image, with nothing said of what to do."""
    if suffix in DICOM_EXTENSIONS:
        return (f"not an image file extension ({suffix}: DICOM, which featcache does not read; export it as "
                "PNG, 16-bit to keep its grey levels, or JPEG)")
    return f"not an image file extension ({suffix or 'none'})"


# person447_virus_921_1 / person1000_bacteria_2931 -> (subtype, patient)
_PERSON_RE = re.compile(r"^(person\d+)_(bacteria|virus)_\d+(?:_\d+)*$", re.IGNORECASE)
# IM-0115-0001 / NORMAL2-IM-1427-0001 / IM-0439-0001-0001 -> patient = prefix up to the first number
_IM_RE = re.compile(r"^((?:NORMAL\d*-)?IM-\d+)(?:-\d+)+$", re.IGNORECASE)
# Mendeley Data v3 (ZhangLabData, CellData/chest_xray): NORMAL-1003233-0001 / BACTERIA-1008087-0001 /
# VIRUS-1047596-0001 -> (subtype, patient number). The patient is the number alone, so one number seen
# under two subtypes stays one patient (grouping more never leaks a patient across folds).
_V3_RE = re.compile(r"^(normal|bacteria|virus)-(\d+)(?:-\d+)+$", re.IGNORECASE)
# what a file manager or browser appends to a copy: "name (1)", "name copy", "name copy 2", "name - Copy (2)",
# Firefox's "name(1)", macOS Finder's "keep both" "name 2". Left on, a copy of a patient's image would be a
# patient of its own (and, with no subtype, refused by --task 3class), and could land on the other side of
# a split.
_COPY_SUFFIX_RE = re.compile(r"(?: ?\(\d+\)| \d+| copy(?: \d+)?| - copy(?: \(\d+\))?)+$", re.IGNORECASE)




def is_im_name(relpath: str) -> bool:
    """Whether a file is named in Kermany's IM-k / NORMAL2-IM-k form, whose patient (``_IM_RE``) rests on
    an assumption the report states: the two prefixes number different patients."""
    return _im_match(relpath) is not None


def _im_match(relpath: str) -> re.Match[str] | None:
    """``_IM_RE`` on a path's stem, a file manager's copy suffix left out."""
    return _IM_RE.match(_COPY_SUFFIX_RE.sub("", Path(relpath.replace("\\", "/")).stem))


def im_numbers_under_both_prefixes(relpaths: Iterable[str]) -> int:
    """How many numbers k name both an IM-k and a NORMAL2-IM-k (any ``NORMAL<d>-`` prefix) file among
    ``relpaths``: the images the report's patient assumption (``is_im_name``) is about, counted on the
    data in hand rather than quoted from the official training folder."""
    prefixes: dict[str, set[str]] = {}
    for rel in relpaths:
        m = _im_match(rel)
        if m:
            prefix, _, number = m.group(1).upper().rpartition("IM-")
            prefixes.setdefault(str(int(number)), set()).add(prefix)
    return sum(1 for seen in prefixes.values() if "" in seen and len(seen) > 1)


def skip_entries(skipped: Iterable[tuple[str, str]]) -> list[dict[str, str]]:
    """(path, reason) pairs as ``{"path", "reason"}`` objects: the one shape every ``--json`` output lists
    skipped or left-out files in (extract, data inspect, fit, predict, run), so a script reads them all
    the same way and each entry says what its two strings are."""
    return [{"path": path, "reason": reason} for path, reason in skipped]


@dataclass(frozen=True)
class ImageRecord:
    """One image file and everything derived from its location and name."""

    path: Path
    relpath: str
    split: str | None
    label: str
    subtype: str | None
    group: str

    @property
    def has_patient_id(self) -> bool:
        """Whether ``group`` is a real patient id (from the file name or a manifest column), not the file stem
        that stands in when there is none (then fit groups the images that share a file stem: mostly one)."""
        return self.group != Path(self.relpath).stem


@dataclass
class Dataset:
    """A discovered dataset: records sorted by relpath (deterministic order) plus refused files."""

    root: Path
    layout: str
    records: list[ImageRecord]
    skipped: list[tuple[str, str]] = field(default_factory=list)
    manifest: Path | None = None  # the CSV the records came from (layout "manifest"), to read it again

    def splits(self) -> list[str]:
        """Split names present, sorted (``None`` excluded)."""
        return sorted({r.split for r in self.records if r.split is not None})

    def select(self, splits: Iterable[str] | None) -> list[ImageRecord]:
        """Records of the given splits (all when ``None``); an absent split is a DataError, not an empty list.

        An empty selection would silently turn into an empty cache or a fit on nothing, so a
        typo like ``--splits valid`` when only train/test exist fails loudly instead.
        """
        if splits is None:
            return list(self.records)
        wanted = [_normalise_split(s) for s in splits]
        present = set(self.splits())
        for name in wanted:
            if name not in present:
                have = ", ".join(present) if present else "none (no split folders or split column)"
                raise DataError(f"the dataset has no split '{name}'; its splits are: {have}.")
        keep = set(wanted)
        return [r for r in self.records if r.split in keep]


def _normalise_split(name: str) -> str:
    """Map folder/manifest spellings (``Validation``, ``VAL``) to train/val/test; keep others as written."""
    return SPLIT_ALIASES.get(name.strip().lower(), name.strip())


def split_folder(name: str) -> str | None:
    """The split a folder name stands for (train, val or test), or None when it is not a split folder."""
    low = name.lower()
    return SPLIT_ALIASES.get(low)  # valid/, training/, testing/ too: common download layouts


def parse_kermany_name(filename: str) -> tuple[str | None, str | None]:
    """``(subtype, patient)`` from a Kermany file name, ``(None, None)`` when it is not one.

    ``person447_virus_921_1.jpeg`` -> ("virus", "person447"); ``NORMAL2-IM-1427-0001.jpeg`` ->
    ("normal", "NORMAL2-IM-1427"); the Mendeley v3 names ``VIRUS-1047596-0001.jpeg`` ->
    ("virus", "1047596"). The Kaggle/v2 normal files carry no subtype word: the ``IM-`` naming is
    only used for normal images in the dataset, but callers should still trust the class folder.
    """
    stem = _COPY_SUFFIX_RE.sub("", Path(filename).stem if "." in filename else filename)
    # patient ids in the dataset's own case whatever the file's (PERSON447_VIRUS_921.jpeg is person447):
    # a renamed copy of a patient's image in another split must still be that patient
    m = _PERSON_RE.match(stem)
    if m:
        return m.group(2).lower(), m.group(1).lower()
    m = _IM_RE.match(stem)
    if m:
        return "normal", m.group(1).upper()
    m = _V3_RE.match(stem)
    if m:
        return m.group(1).lower(), m.group(2)
    return None, None


def _subtype_and_group(label: str, filename: str) -> tuple[str | None, str]:
    """Subtype and patient id (falls back to the file stem). A label that is a subtype (NORMAL, or a
    manifest's or folder's bacteria/virus) wins over the file name: otherwise --task 3class would label
    an image by its name while --task folders labels it by what the user wrote."""
    name_subtype, patient = parse_kermany_name(filename)
    if label.lower() in SUBTYPES:
        subtype: str | None = label.lower()
    elif name_subtype in ("bacteria", "virus"):
        subtype = name_subtype
    else:
        subtype = None
    return subtype, patient if patient else Path(filename).stem


# ----------------------------------------------------------------------------------------- discovery

def _rel(parts: Sequence[str]) -> str:
    return "/".join(parts)


def _stat_entry(entry: os.DirEntry) -> os.stat_result | str:
    """Stat an entry (following links); a reason string instead when that is impossible."""
    try:
        if entry.is_symlink():
            return os.stat(entry.path)
        return entry.stat(follow_symlinks=False)
    except FileNotFoundError:
        return "broken symlink"
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "symlink loop"
        return f"unreadable ({exc.strerror or exc})"


def _downloader_entry(name: str) -> bool:
    """Whether a name at the dataset root is one `featcache data download` writes there.

    Why: its download cache (``.downloads/``), marker and a killed run's extraction folder sit beside
    the splits it installs; listed as skipped they would make ``extract --strict`` fail on every fresh
    download and tell the user to remove the cache. Only these exact names are left out silently.
    """
    from featcache.download import DOWNLOADS_DIR, MARKER_NAME, TEMP_PREFIX  # lazy: urllib costs 50 ms

    return name in (DOWNLOADS_DIR, MARKER_NAME, f"{MARKER_NAME}.tmp") or name.startswith(TEMP_PREFIX)


def _walk(directory: Path, parts: tuple[str, ...], ancestors: frozenset[tuple[int, int]],
          files: list[tuple[tuple[str, ...], Path]], skipped: list[tuple[str, str]]) -> None:
    """Depth-first scan collecting candidate image files and refusals, following symlinks safely."""
    try:
        with os.scandir(directory) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        skipped.append((_rel(parts) + "/", f"unreadable folder ({exc.strerror or exc})"))
        return
    for entry in entries:
        sub = (*parts, entry.name)
        rel = _rel(sub)
        if entry.name.startswith(".") and not parts and _downloader_entry(entry.name):
            continue                    # `data download`'s own cache and marker: not the user's files
        if entry.name.startswith("."):  # .DS_Store, ._x.jpeg (macOS forks), .ipynb_checkpoints/
            hidden_dir = entry.is_dir()
            skipped.append((rel + "/", HIDDEN_FOLDER) if hidden_dir else (rel, HIDDEN_FILE))
            continue
        st = _stat_entry(entry)
        if isinstance(st, str):
            skipped.append((rel, st))
            continue
        is_dir = stat.S_ISDIR(st.st_mode)
        suffix = os.path.splitext(entry.name)[1].lower()
        if is_dir:
            key = (st.st_dev, st.st_ino)
            if suffix in IMAGE_EXTENSIONS:
                skipped.append((rel + "/", "directory named like an image"))
            elif key in ancestors:
                skipped.append((rel + "/", "symlink loop"))
            else:
                _walk(Path(entry.path), sub, ancestors | {key}, files, skipped)
        elif not stat.S_ISREG(st.st_mode):
            skipped.append((rel, "not a regular file"))
        elif suffix not in IMAGE_EXTENSIONS:
            skipped.append((rel, not_an_image_extension(suffix)))
        elif not os.access(entry.path, os.R_OK):
            skipped.append((rel, "unreadable (permission denied)"))
        else:
            files.append((sub, Path(entry.path)))


def scan_images(root: Path) -> tuple[list[Path], list[tuple[str, str]]]:
    """(image files below ``root``, [(relative path, reason)] of what was left out), found the way
    discovery finds a dataset's images: symlinked folders followed (loops refused), hidden entries and
    files without an image extension left out with a reason. Used by predict for folders of new images."""
    files: list[tuple[tuple[str, ...], Path]] = []
    skipped: list[tuple[str, str]] = []
    root_st = root.stat()
    _walk(root, (), frozenset({(root_st.st_dev, root_st.st_ino)}), files, skipped)
    return [path for _, path in files], skipped


def _classify(parts: tuple[str, ...], root_split: str | None) -> tuple[str | None, str] | str:
    """``(split, label)`` for a file's relative parts, or a skip reason.

    A split folder is recognised directly under the root (or the root itself is one); the class
    is the next folder. Deeper sub-folders below the class folder are allowed.
    """
    dirs = parts[:-1]
    first_split = split_folder(dirs[0]) if dirs else None
    if first_split is not None:
        if len(dirs) < 2:
            return _NO_CLASS_FOLDER
        return first_split, dirs[1]
    if not dirs:
        return _NO_CLASS_FOLDER
    return root_split, dirs[0]


def _discover_folders(root: Path) -> Dataset:
    files: list[tuple[tuple[str, ...], Path]] = []
    skipped: list[tuple[str, str]] = []
    root_st = root.stat()
    _walk(root, (), frozenset({(root_st.st_dev, root_st.st_ino)}), files, skipped)
    root_split = split_folder(root.name)
    classified: list[tuple[tuple[str, ...], Path, str | None, str]] = []
    for parts, path in files:
        c = _classify(parts, root_split)
        if isinstance(c, str):
            skipped.append((_rel(parts), c))
        else:
            classified.append((parts, path, c[0], c[1]))
    has_split_folders = any(split_folder(p[0]) is not None for p, *_ in classified)
    if not has_split_folders:
        _refuse_nested_root(root, classified)
    records: list[ImageRecord] = []
    for parts, path, split, label in classified:
        if has_split_folders and root_split is None and split is None:
            skipped.append((_rel(parts), "outside the train/val/test folders"))
            continue
        subtype, group = _subtype_and_group(label, parts[-1])
        records.append(ImageRecord(path, _rel(parts), split, label, subtype, group))
    if len({r.label for r in records}) < 2:
        _refuse_manifest_beside(root, {r.label for r in records}, skipped)
    if not records:
        raise DataError(_no_images_message(root, skipped))
    labels = {r.label.upper() for r in records}
    layout = "kermany" if labels <= _KERMANY_LABELS else "folders"
    return Dataset(root, layout, sorted(records, key=lambda r: r.relpath), sorted(skipped))


def _refuse_nested_root(
    root: Path, classified: Sequence[tuple[tuple[str, ...], Path, str | None, str]]
) -> None:
    """Refuse a folder one level above a dataset instead of labelling every image by that level.

    Kaggle's Kermany archive unpacks to ``chest_xray/chest_xray/{train,test,val}/...``, so pointing
    ``--data`` at the outer folder is an easy mistake. Read as a class-folder tree it would make one
    class, ``chest_xray``, of all 5,856 images, and the extract would run for an hour before a fit
    failed on the labels. A class folder whose own sub-folders are split folders (train/val/test)
    or Kermany classes (NORMAL/PNEUMONIA) can only be such a wrapper.
    """
    inner: dict[str, set[str]] = defaultdict(set)
    split_then_images: dict[str, str] = {}  # class folder -> a split folder holding images directly
    for parts, _path, _split, label in classified:
        if len(parts) >= 3:
            sub = parts[1]
            if split_folder(sub) is not None or sub.upper() in _KERMANY_LABELS:
                inner[label].add(sub)
            if len(parts) == 3 and split_folder(sub) is not None:
                split_then_images.setdefault(label, sub)
    if len(split_then_images) > 1:  # NORMAL/train/x.jpeg: classes first; no wrapper to step into (a fit
        first = sorted(split_then_images)[0]  # audit: "pass 'NORMAL'" was advice that then failed)
        sub, names = split_then_images[first], ", ".join(sorted(split_then_images))
        raise DataError(
            f"'{os.fsdecode(root)}' holds its splits inside its class folders ({names} hold {sub}/ ...); "
            f"featcache reads the split first, then the class: '{sub}/{first}/', not '{first}/{sub}/'. Move "
            "the folders that way, or list the images in a CSV manifest (path,label,split) and pass that.")
    if inner:
        label = sorted(inner)[0]
        subs = ", ".join(f"{s}/" for s in sorted(inner[label]))
        raise DataError(
            f"'{os.fsdecode(root)}' looks like the folder above a dataset: its class folder '{label}' holds "
            f"{subs}; pass the dataset folder itself: '{os.fsdecode(root / label)}'."
        )


def _manifests_beside(root: Path, skipped: Sequence[tuple[str, str]]) -> list[str]:
    """The CSV files directly in ``root`` whose header has path and label columns (sorted names): manifests
    that a folder reading lists as skipped files, since only ``--data FILE.csv`` reads one."""
    names = []
    for rel, why in skipped:  # regular files only (that reason): opening a named pipe would block
        if "/" in rel or not rel.lower().endswith(".csv") or not why.startswith("not an image file ext"):
            continue
        try:
            with open(root / rel, newline="", encoding="utf-8-sig") as fh:
                header = next(csv.reader(fh), [])
        except (OSError, UnicodeDecodeError, csv.Error):
            continue
        if {"path", "label"} <= {h.strip().lower() for h in header}:
            names.append(rel)
    return sorted(names)


def _refuse_manifest_beside(root: Path, labels: set[str], skipped: Sequence[tuple[str, str]]) -> None:
    """Refuse a folder read as class folders that gives no class or one, when a manifest lies in it.

    Why: the usual manifest layout is a CSV beside its images (``labels.csv`` + ``images/`` or loose
    files). Passing the folder instead of the CSV read ``images/`` as the only class, which extract took
    without a word and fit refused only after the extraction (one class), or, for loose images, advised
    passing the folder above, which makes the folder itself the one class. The manifest is what was meant.
    """
    manifests = _manifests_beside(root, skipped)
    if not manifests:
        return
    where = os.fsdecode(root)
    found = (f"the manifest '{manifests[0]}'" if len(manifests) == 1 else
             "the manifests " + ", ".join(f"'{m}'" for m in manifests))
    read = (f"read as class folders it has one class, '{next(iter(labels))}'" if labels else
            "no image in it lies in a class folder")
    raise DataError(f"'{where}' holds {found} (a CSV with path and label columns), but {read}; to use the "
                    f"manifest's labels pass the CSV in place of the folder: "
                    f"'{os.fsdecode(root / manifests[0])}'.")


def _no_images_message(root: Path, skipped: list[tuple[str, str]]) -> str:
    where = os.fsdecode(root)
    loose = [rel for rel, why in skipped if why == _NO_CLASS_FOLDER and "/" not in rel]
    if loose:
        # Every image lies directly in the folder given: most often one class's folder was passed.
        parent = os.fsdecode(root.parent)
        return (f"the {len(loose)} image(s) under '{where}' lie directly in it, so they have no class "
                f"folder; if '{root.name}' is a class, pass the folder above it: '{parent}'.")
    if skipped:
        rel, why = sorted(skipped)[0]
        return (f"no usable images under '{where}' ({len(skipped)} files skipped, e.g. '{rel}': {why}); "
                "put images in class folders like DIR/[train/]CLASS/image.jpeg.")
    return f"no images found under '{where}'; put images in class folders like DIR/[train/]CLASS/image.jpeg."


# ----------------------------------------------------------------------------------------- manifest

def _read_manifest_rows(csv_path: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header (lower-cased) and rows with their 1-based line numbers; DataError for unreadable CSVs."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.reader(fh)
            header = next(reader, None)
            if header is None:
                raise DataError(f"manifest '{os.fsdecode(csv_path)}' is empty; it needs a header "
                                "line path,label[,split][,group].")
            cols = [h.strip().lower() for h in header]
            rows = []
            start = reader.line_num + 1  # a quoted cell may span lines: report where its row begins
            for row in reader:
                if any(cell.strip() for cell in row[len(cols):]):  # trailing empty cells are harmless
                    # zip dropped them: "a,b.png,NORMAL" under path,label became path "a", label "b.png"
                    raise DataError(
                        f"manifest '{os.fsdecode(csv_path)}' line {start} has {len(row)} values but its "
                        f"header names {len(cols)} columns ({','.join(cols)}); quote a path or label "
                        'that holds a comma ("a,b.png"), or add the extra columns to the header.')
                if any(cell.strip() for cell in row):
                    rows.append((start, dict(zip(cols, (c.strip() for c in row), strict=False))))
                start = reader.line_num + 1
    except UnicodeDecodeError as exc:
        name = os.fsdecode(csv_path)
        raise DataError(f"manifest '{name}' is not UTF-8 text; save it as UTF-8 CSV.") from exc
    except csv.Error as exc:
        name = os.fsdecode(csv_path)
        raise DataError(f"manifest '{name}' is not valid CSV ({exc}); fix the file.") from exc
    except OSError as exc:
        name = os.fsdecode(csv_path)
        raise DataError(f"cannot read manifest '{name}' ({exc.strerror or exc}).") from exc
    return cols, rows


def _manifest_file_problem(path: Path) -> str | None:
    """Why a listed file cannot be used (None when fine); missing files are handled by the caller."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return "broken symlink"
    except OSError as exc:
        return "symlink loop" if exc.errno == errno.ELOOP else f"unreadable ({exc.strerror or exc})"
    if stat.S_ISDIR(st.st_mode):
        return "directory named like an image" if path.suffix.lower() in IMAGE_EXTENSIONS else "not a file"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        return not_an_image_extension(path.suffix.lower())
    if not os.access(path, os.R_OK):
        return "unreadable (permission denied)"
    return None


def _discover_manifest(root: Path, csv_path: Path) -> Dataset:
    cols, rows = _read_manifest_rows(csv_path)
    missing_cols = [c for c in ("path", "label") if c not in cols]
    if missing_cols:
        sep = next((name for ch, name in ((";", "semicolon"), ("\t", "tab"), ("|", "'|'"))
                    if len(cols) == 1 and ch in cols[0]), None)
        hint = (f" Its header '{cols[0]}' looks {sep}-separated: save it with commas (a spreadsheet's "
                "'CSV (comma delimited)')." if sep else "")
        raise DataError(f"manifest '{os.fsdecode(csv_path)}' lacks the column(s) {', '.join(missing_cols)}; "
                        f"its header must be path,label[,split][,group].{hint}")
    base = csv_path.parent.resolve()
    records: list[ImageRecord] = []
    skipped: list[tuple[str, str]] = []
    missing: list[str] = []
    seen: dict[str, int] = {}
    for line, row in rows:
        raw, label = row.get("path") or "", row.get("label") or ""
        if "\n" in raw or "\n" in label:  # csv read on to the end of the file inside one cell
            raise DataError(f"manifest '{os.fsdecode(csv_path)}' line {line} opens a quote (\") that is "
                            "never closed, so the lines after it were read as one cell; close or remove the "
                            "quote.")
        if raw.lower() == "path" and label.lower() == "label":
            raise DataError(f"manifest '{os.fsdecode(csv_path)}' line {line} repeats the header row (were "
                            "two CSVs joined?); keep one header line, the first.")
        if not raw or not label:
            raise DataError(f"manifest '{os.fsdecode(csv_path)}' line {line} has an empty path or label; "
                            "fill in both.")
        path = Path(os.path.normpath(base / raw))
        relpath = Path(os.path.relpath(path, root)).as_posix()
        if relpath in seen:
            raise DataError(f"manifest '{os.fsdecode(csv_path)}' lists '{raw}' twice (lines {seen[relpath]} "
                            f"and {line}); keep one row per image.")
        seen[relpath] = line
        if not os.path.lexists(path):
            missing.append(raw)
            continue
        problem = _manifest_file_problem(path)
        if problem:
            skipped.append((relpath, problem))
            continue
        split = _normalise_split(row["split"]) if (row.get("split") or "").strip() else None
        if split is not None and split not in ("train", "val", "test"):  # fit would use it nowhere
            raise DataError(f"manifest '{os.fsdecode(csv_path)}' line {line} has split '{row['split']}'; "
                            "use train, val (validation) or test, or leave it empty (training).")
        subtype, group = _subtype_and_group(label, path.name)
        records.append(ImageRecord(path, relpath, split, label, subtype, row.get("group") or group))
    if missing:
        windows = [m for m in missing if "\\" in m and os.path.lexists(base / m.replace("\\", "/"))]
        hint = (f" {len(windows)} of them name an existing file once their backslashes are slashes, e.g. "
                f"'{windows[0]}': write paths with / (Windows-style \\ is part of a file name here)."
                if windows else "")
        relative = [m for m in missing if not Path(m).is_absolute()]
        # absolute paths are read as they are: "must be relative" misled about a file that is just gone
        where = (f"relative paths are read from the manifest's folder, {base}" if relative else
                 "no such file; correct or drop those rows")
        raise DataError(f"manifest '{os.fsdecode(csv_path)}' lists {len(missing)} missing file(s), e.g. "
                        f"'{(relative or missing)[0]}'; {where}.{hint}")
    if not records and not skipped:  # a header and nothing else: say so, not "no images under the folder"
        raise DataError(f"manifest '{os.fsdecode(csv_path)}' lists no images; add one row per image "
                        "(path,label[,split][,group]).")
    if not records:
        raise DataError(_no_images_message(root, skipped))
    return Dataset(root, "manifest", sorted(records, key=lambda r: r.relpath), sorted(skipped),
                   Path(os.path.abspath(csv_path)))


def discover(root: str | Path, manifest: str | Path | None = None) -> Dataset:
    """Find every image under ``root`` (or listed in ``manifest``) with split, label, subtype and patient.

    A ``root`` that is itself a ``.csv`` file is read as a manifest whose folder is the root.
    """
    root_path = Path(os.path.abspath(os.fsdecode(root)))
    if manifest is None and root_path.suffix.lower() == ".csv" and root_path.is_file():
        manifest, root_path = root_path, root_path.parent
    if not root_path.exists():
        raise DataError(f"data folder '{os.fsdecode(root_path)}' does not exist; pass the folder that holds "
                        "train/ and test/ (or class folders).")
    if not root_path.is_dir():
        raise DataError(f"'{os.fsdecode(root_path)}' is not a folder; pass a dataset folder or a .csv "
                        "manifest.")
    root_path = root_path.resolve()
    if manifest is not None:
        csv_path = Path(os.path.abspath(os.fsdecode(manifest)))
        if not csv_path.is_file():
            raise DataError(f"manifest '{os.fsdecode(csv_path)}' does not exist; pass a CSV with header "
                            "path,label[,split][,group].")
        return _discover_manifest(root_path, csv_path)
    return _discover_folders(root_path)


# ----------------------------------------------------------------------------------------- labels

def case_twins(labels: Iterable[str]) -> list[list[str]]:
    """The sets of labels that differ only in case (``[["NORMAL", "Normal"]]``), each sorted. Why: binary
    and 3class read them as one class, `--task folders` would make them several; inspect says so and
    the folders task refuses them."""
    spellings: dict[str, set[str]] = {}
    for label in labels:
        spellings.setdefault(label.casefold(), set()).add(label)
    return sorted(sorted(names) for names in spellings.values() if len(names) > 1)


def task_labels(records: Sequence[ImageRecord], task: str) -> tuple[np.ndarray, list[str]]:
    """Integer targets and class names for a labelling task.

    ``binary``: NORMAL -> 0, anything else -> 1 (both kinds must be present); ``3class``:
    normal/bacteria/virus from the Kermany subtype; ``folders``: the sorted distinct labels.
    """
    if task not in TASKS:
        raise ConfigError(f"unknown task '{task}'; choose one of: {', '.join(TASKS)}.")
    if not records:
        raise DataError("no images to label; check the dataset folder and the selected splits.")
    if task == "binary":
        y = np.array([0 if r.label.upper() == "NORMAL" else 1 for r in records], dtype=np.int64)
        if y.min() == y.max():
            kind = "NORMAL" if y[0] == 0 else "non-NORMAL"
            raise DataError(f"task 'binary' needs NORMAL and non-NORMAL images but all are {kind}; "
                            "use --task folders for other class names.")
        return y, ["NORMAL", "PNEUMONIA"]
    if task == "3class":
        classes = list(SUBTYPES)
        lacking = [r.relpath for r in records if r.subtype not in classes]
        if lacking:
            raise DataError(f"task '3class' needs Kermany names (person*_bacteria_*/person*_virus_*) but "
                            f"{len(lacking)} image(s) have no subtype, e.g. '{lacking[0]}'.")
        return np.array([classes.index(r.subtype) for r in records], dtype=np.int64), classes
    classes = sorted({r.label for r in records})
    twins = case_twins(classes)
    if twins:  # a manifest's NORMAL/Normal/normal: three classes of one (binary and 3class read them as one)
        raise DataError(f"task 'folders': the labels {', '.join(repr(c) for c in twins[0])} differ only in "
                        "case, so they would be separate classes; spell each class one way in the manifest "
                        "or folder names.")
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[r.label] for r in records], dtype=np.int64), classes


# ----------------------------------------------------------------------------------------- inspect

def _hash_records(records: Sequence[ImageRecord], progress: ProgressFn | None,
                  workers: int) -> Iterator[tuple[ImageRecord, str | OSError]]:
    total = len(records)
    emit(progress, "hash", 0, total, "hashing image files")
    step = max(1, total // 100)
    digests = sha256_many((r.path for r in records), workers)
    for i, (rec, (_, digest)) in enumerate(zip(records, digests, strict=True), 1):
        if i % step == 0 or i == total:
            emit(progress, "hash", i, total)
        yield rec, digest


INSPECT_DECODE_SIZE = 32  # pixels: enough to decode every byte of a file (JPEG draft mode reads it all)


def _undecodable(recs_by_digest: dict[str, list[ImageRecord]], progress: ProgressFn | None,
                 workers: int, size: int) -> dict[str, str]:
    """digest -> reason, for the files that extract would skip as undecodable (one decode per unique file).

    Why: a truncated or mislabelled file hashes fine, so without this ``inspect`` counted it as an image
    that extract then skips; the decode is small (``size`` px, JPEG DCT-domain downscaling), so the
    check costs a fraction of a second per thousand 224-px files.
    """
    from concurrent.futures import ThreadPoolExecutor

    from featcache.images import ImageDecodeError, decode_image

    def check(item: tuple[str, ImageRecord]) -> str | None:
        _digest, rec = item
        try:
            data = rec.path.read_bytes()
        except OSError as exc:
            return f"unreadable: {exc.strerror or type(exc).__name__}"
        try:
            decode_image(data, size)
        except ImageDecodeError as exc:
            return exc.reason
        return None

    items = [(d, recs[0]) for d, recs in recs_by_digest.items()]
    total = len(items)
    emit(progress, "decode", 0, total, "decoding image files")
    bad: dict[str, str] = {}
    step = max(1, total // 100)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for i, ((digest, _rec), reason) in enumerate(zip(items, pool.map(check, items), strict=True), 1):
            if reason is not None:
                bad[digest] = reason
            if i % step == 0 or i == total:
                emit(progress, "decode", i, total)
    return bad


def inspect(dataset: Dataset, progress: ProgressFn | None = None, workers: int = 4,
            decode: bool = True) -> dict:
    """Counts, patients, byte-identical duplicates and cross-split leaks of a dataset (JSON-ready).

    Duplicates are found by SHA-256 of the file bytes: the cache keys rows the same way, so what
    is reported here is exactly what extraction will compute once. With ``decode`` (the default) every
    unique file is also decoded once, small, and the ones extract would skip (truncated, not an image)
    are listed under ``skipped`` with extract's reason instead of being counted as images.
    """
    counts: dict[str, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(int)))
    patients_by_split: dict[str, set[str]] = defaultdict(set)
    splits_by_patient: dict[str, set[str]] = defaultdict(set)
    by_digest: dict[str, list[ImageRecord]] = defaultdict(list)
    skipped = list(dataset.skipped)
    hashed: dict[str, list[ImageRecord]] = defaultdict(list)
    for rec, digest in _hash_records(dataset.records, progress, workers):
        if isinstance(digest, OSError):
            skipped.append((rec.relpath, f"unreadable ({digest.strerror or digest})"))
            continue
        hashed[digest].append(rec)
    bad = _undecodable(hashed, progress, workers, INSPECT_DECODE_SIZE) if decode else {}
    for digest, reason in bad.items():
        skipped.extend((rec.relpath, reason) for rec in hashed[digest])
    for rec, digest in ((r, d) for d, recs in hashed.items() if d not in bad for r in recs):
        split = rec.split if rec.split is not None else "-"
        counts[split][rec.label][rec.subtype or "-"] += 1
        # without a patient id the audit counts every image as its own patient (fit groups by file stem,
        # which only merges more): a file name that recurs
        # in train/ and test/ is not one child on both sides
        patient = rec.group if rec.has_patient_id else f"image {rec.relpath}"
        patients_by_split[split].add(patient)
        splits_by_patient[patient].add(split)
        by_digest[digest].append(rec)
    dup_groups = sorted(sorted(r.relpath for r in g) for g in by_digest.values() if len(g) > 1)
    split_of = {r.relpath: (r.split or "-") for r in dataset.records}
    counted = [r for g in by_digest.values() for r in g]

    def group_splits(group: list[str]) -> set[str]:
        return {split_of[r] for r in group}

    # a class folder left empty (a copy that failed) vanished without a word: test/NORMAL/ empty gave a
    # test split of one class, where AUC and that class's recall cannot be computed
    lacking = _splits_lacking_classes(counts)

    return {
        "root": os.fsdecode(dataset.root),
        "layout": dataset.layout,
        "n_images": sum(len(g) for g in by_digest.values()),
        "n_unique": len(by_digest),
        "counts": {s: {lab: dict(sorted(sub.items())) for lab, sub in sorted(c.items())}
                   for s, c in sorted(counts.items())},
        "n_patients": len(splits_by_patient),
        # images whose name (or manifest) gives no patient id: each counts as a patient above, while fit
        # groups them by file stem (``stem_groups``); said, since a patient count read as real is not
        "n_without_patient_id": sum(1 for r in counted if not r.has_patient_id),
        "stem_groups": len({r.group for r in counted if not r.has_patient_id}),
        "patients_per_split": {s: len(p) for s, p in sorted(patients_by_split.items())},
        "duplicates": dup_groups,
        "cross_split_patients": {p: sorted(s) for p, s in sorted(splits_by_patient.items()) if len(s) > 1},
        "cross_split_duplicates": [g for g in dup_groups if len(group_splits(g)) > 1],
        # of those, the groups with an image in the test split (train and val are one pool for fit)
        "cross_split_duplicates_with_test": sum(1 for g in dup_groups if {"test"} < group_splits(g)),
        # the same bytes under different labels: at least one label is wrong, whatever a model learns. Labels
        # that differ only in case are one class (binary, 3class; `case_twin_labels` names them), so a copy
        # under Pneumonia/ and PNEUMONIA/ is a duplicate, not a contradiction
        "conflicting_duplicates": sorted(sorted(r.relpath for r in g) for g in by_digest.values()
                                         if len({(r.label.upper(), r.subtype) for r in g}) > 1),
        "skipped": skip_entries(sorted(skipped)),
        "decode_checked": decode,
        "case_twin_labels": case_twins({r.label for r in counted}),
        "splits_lacking_classes": lacking,
        # the same for Kermany subtypes, the classes of --task 3class: a test/PNEUMONIA/ of bacteria alone
        # passed without a word, and a 3-class fit then had no test AUC and no virus recall
        "splits_lacking_subtypes": _splits_lacking_subtypes(counts, lacking),
    }


def _splits_lacking_subtypes(counts: dict[str, dict[str, dict[str, int]]],
                             lacking_classes: dict[str, list[str]]) -> dict[str, list[str]]:
    """{split: [Kermany subtypes (normal, bacteria, virus) found in other splits but not in this one]}, less
    those ``lacking_classes`` (``_splits_lacking_classes``) already names (no NORMAL folder: no normal
    subtype either)."""
    def subtypes(labels: dict[str, dict[str, int]]) -> set[str]:
        return {sub for subs in labels.values() for sub in subs if sub in SUBTYPES}

    every = {sub for labels in counts.values() for sub in subtypes(labels)}
    out = {}
    for split, labels in sorted(counts.items()):
        missing = every - subtypes(labels)
        missing -= {m.lower() for m in lacking_classes.get(split, [])}  # said as a lacking class
        if len(counts) > 1 and missing:
            out[split] = [s for s in SUBTYPES if s in missing]
    return out


def _splits_lacking_classes(counts: dict[str, dict[str, dict[str, int]]]) -> dict[str, list[str]]:
    """{split: [classes found in other splits but not in this one]}, for datasets with several splits."""
    every = {label for labels in counts.values() for label in labels}
    return {split: sorted(every - set(labels)) for split, labels in sorted(counts.items())
            if len(counts) > 1 and every - set(labels)}
