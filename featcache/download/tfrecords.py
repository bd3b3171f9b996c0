"""A Kermany layout from TFRecord shards of ``tf.train.Example`` records (TensorFlow's mirror of the data).

Why a module of its own: this is the only source that needs TensorFlow (imported lazily, to read the
records), and its images come with file names and labels taken from record fields, which are untrusted:
names are sanitised and written inside the staging folder only, and the image count is capped like an
archive's (``ExtractLimits``).
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from featcache.download.archive import ExtractLimits, inside
from featcache.download.layout import KERMANY_LABELS, LAYOUT_EXTENSIONS
from featcache.errors import DownloadError
from featcache.progress import ProgressFn, emit


@dataclass(frozen=True)
class TFRecordFeatures:
    """How to read TFRecord shards that hold ``tf.train.Example`` records.

    The TensorFlow tutorial's files are NOT Examples: ``images.tfrec`` holds raw JPEG bytes per
    record and ``paths.tfrec`` the matching original paths (``.../train/NORMAL/IM-0115-0001.jpeg``);
    that format is detected from the bytes and needs none of these names. For Example shards from
    elsewhere the feature names are guesses of the common convention, hence configurable.
    """

    image: str = "image"          # bytes: the encoded JPEG/PNG
    label: str = "label"          # int64 index into ``label_names`` or bytes "NORMAL"/"PNEUMONIA"
    filename: str = "filename"    # bytes (optional): original file name or path
    label_names: tuple[str, ...] = KERMANY_LABELS


_IMAGE_MAGIC = {b"\xff\xd8\xff": ".jpeg", b"\x89PNG\r\n\x1a\n": ".png"}


def _image_ext(data: bytes) -> str | None:
    return next((ext for magic, ext in _IMAGE_MAGIC.items() if data.startswith(magic)), None)


def _safe_filename(raw: str, fallback: str, ext: str) -> str:
    """Only the last path component of an untrusted name survives; junk falls back to an index."""
    base = raw.replace("\\", "/").rsplit("/", 1)[-1].strip()
    base = "".join(ch for ch in base if ch.isprintable() and ch not in '<>:"|?*')
    if not base or base in (".", "..") or base.startswith(".") or len(base) > 200:
        base = fallback
    if Path(base).suffix.lower() not in LAYOUT_EXTENSIONS:
        base += ext
    return base


def _label_from_path(raw: str) -> str | None:
    parts = raw.replace("\\", "/").split("/")
    return parts[-2].upper() if len(parts) >= 2 and parts[-2].upper() in KERMANY_LABELS else None


def _iter_records(path: Path) -> Iterator[bytes]:
    import tensorflow as tf  # lazy: only this source needs TensorFlow

    try:
        for record in tf.data.TFRecordDataset(str(path)):
            yield bytes(record.numpy())
    except tf.errors.OpError as exc:
        raise DownloadError(f"{path.name} is not a readable TFRecord file ({exc.message.splitlines()[0]}); "
                            f"delete it and rerun.") from None


def _example_fields(raw: bytes, features: TFRecordFeatures, name: str) -> tuple[bytes, str | None, str]:
    """(image bytes, label or None, file name or '') from a serialized tf.train.Example."""
    import tensorflow as tf

    try:
        feats = tf.train.Example.FromString(raw).features.feature
    except Exception:  # noqa: BLE001 (protobuf raises its own DecodeError type)
        raise DownloadError(f"{name} holds records that are neither images nor tf.train.Example; "
                            f"check --source or --url.") from None
    if features.image not in feats or not feats[features.image].bytes_list.value:
        raise DownloadError(f"{name}: records have no bytes feature {features.image!r} (found: "
                            f"{', '.join(sorted(feats)) or 'none'}); pass --tfrecord-image-key.")
    image = feats[features.image].bytes_list.value[0]
    fname = ""
    if features.filename in feats and feats[features.filename].bytes_list.value:
        fname = feats[features.filename].bytes_list.value[0].decode("utf-8", "replace")
    label: str | None = None
    if features.label in feats:
        f = feats[features.label]
        if f.int64_list.value and 0 <= f.int64_list.value[0] < len(features.label_names):
            label = features.label_names[f.int64_list.value[0]]
        elif f.bytes_list.value:
            label = f.bytes_list.value[0].decode("utf-8", "replace").upper()
    label = label if label in KERMANY_LABELS else _label_from_path(fname)
    return image, label, fname


def tfrecords_to_kermany(shards: Sequence[tuple[str, Path, Path | None]], stage: Path,
                         features: TFRecordFeatures | None = None, limits: ExtractLimits | None = None,
                         progress: ProgressFn | None = None) -> dict[str, dict[str, int]]:
    """Write the images of TFRecord shards as ``stage/<split>/<LABEL>/<name>.jpeg``; return counts.

    ``shards``: (split, images file, paths file or None). Raw-bytes records are paired with the
    paths file record by record (label = the path's parent folder, as in the tutorial); other
    records are parsed as ``tf.train.Example`` with ``features``. Names from the data are reduced
    to their last component, so a crafted path cannot write outside ``stage``.
    """
    features = features or TFRecordFeatures()
    limits = limits or ExtractLimits()
    counts: dict[str, dict[str, int]] = {}
    n_total = total_bytes = 0
    for split, images_file, paths_file in shards:
        paths_iter = _iter_records(paths_file) if paths_file is not None else None
        paired = False
        for index, raw in enumerate(_iter_records(images_file)):
            n_total += 1
            total_bytes += len(raw)
            if n_total > limits.max_entries or total_bytes > limits.max_total_bytes:
                raise DownloadError(f"{images_file.name} holds more records or bytes than the extraction "
                                    f"limits allow; refusing to convert it.")
            ext = _image_ext(raw)
            if ext is not None:
                path_rec = next(paths_iter, None) if paths_iter is not None else None
                if path_rec is None:
                    raise DownloadError(f"{images_file.name} has more images than its paths file; the pair "
                                        f"does not match, delete both and rerun.")
                fname = path_rec.decode("utf-8", "replace")
                image, label, paired = raw, _label_from_path(fname), True
            else:
                image, label, fname = _example_fields(raw, features, images_file.name)
                ext = _image_ext(image)
                if ext is None:
                    raise DownloadError(f"{images_file.name}: record {index} does not hold a JPEG or PNG "
                                        f"image; check --tfrecord-image-key.")
            if label is None:
                raise DownloadError(f"{images_file.name}: record {index} has no NORMAL/PNEUMONIA label "
                                    f"(path {fname!r}); check --tfrecord-label-key.")
            _write_record(stage / split / label, _safe_filename(fname, f"{split}-{index:05d}", ext), image)
            counts.setdefault(split, {})[label] = counts.get(split, {}).get(label, 0) + 1
            emit(progress, "convert", n_total, None, images_file.name)
        if paired and next(paths_iter, None) is not None:
            raise DownloadError(f"{paths_file.name} has more paths than {images_file.name} has images; "
                                f"the pair does not match, delete both and rerun.")
    if not counts:
        raise DownloadError("the TFRecord files hold no images; check --source or --url.")
    return counts


def _write_record(folder: Path, name: str, data: bytes) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / name
    stem, suffix, k = target.stem, target.suffix, 1
    while target.exists():           # two records with one name: keep both
        target = folder / f"{stem}__{k}{suffix}"
        k += 1
    inside(folder, target).write_bytes(data)
