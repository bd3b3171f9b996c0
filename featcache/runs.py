"""The run store: one folder per trained head, complete only when run.json says "done".

Layout (``--runs-dir``, default ``./runs``)::

    <run_id>/run.json              config, choices, cache digests, versions, command, artifacts + sha256,
                                   records (sha256 of metrics.json and the prediction CSVs)
    <run_id>/metrics.json          {"val", "test", "cv_results", "history", "train"}
    <run_id>/predictions_val.csv   relpath,key,y_true,p_<class>...,y_pred,group
    <run_id>/predictions_test.csv
    <run_id>/indices.npz           the exact train / val / test record indices used (and CV folds)
    <run_id>/seen_keys.npz         content keys of the training (train + val) and test images, for predict
    <run_id>/model/...             the head's files

Why: a sweep can be killed at any moment, so ``status`` is written LAST and atomically (temp file +
os.replace): a folder without ``"status": "done"`` is never shown as a result and a resumed sweep
retrains that config. Model files are loaded only after their recorded SHA-256 matches, so a
swapped or tampered file (a pickle can run code) is refused instead of loaded, and a report leaves out
a run whose metrics or prediction files changed after the fit.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import os
import platform
import shlex
import shutil
import socket
import tempfile
import time
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from featcache.errors import RunError, naming
from featcache.hashing import sha256_file

RUN_FORMAT = 1


def canonical_json(obj: Any) -> str:
    """Stable JSON (sorted keys, no spaces) for hashing configs."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=_json_default)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


_THRESHOLD_LANDMARKS = (0.0, 0.5, 1.0)  # values a reader acts on: "p >= 1" calls nothing positive


def threshold_text(threshold: float | None, missing: str = "n/a") -> str:
    """A threshold as the report's tables, captions and plot titles, fit's table, `runs show` and predict
    show it: 4 significant digits (0.37, 0.4988), more where those would round it onto 0, 0.5 or 1 without
    being it. Why: 0.9999969 was shown as "1" (who applies p >= 1 calls nothing positive, yet sensitivity
    at it was 0.88) and 0.4988 as "0.50", the default it is not. ``missing``: the text for a run without
    one."""
    if threshold is None or not np.isfinite(threshold):
        return missing
    for digits in range(4, 18):
        text = f"{threshold:.{digits}g}"
        if float(text) == threshold or float(text) not in _THRESHOLD_LANDMARKS:
            return text
    return repr(float(threshold))


def format_value(value: Any, *, float_format: str = "g", none: str = "None") -> str:
    """Compact human form of a parameter or metric value: 0.001, 1024-512, 0:1,1:3.

    One formatter for the CLI tables and the reports, so a config reads the same everywhere.
    """
    if value is None:
        return none
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float):
        return format(value, float_format)
    if isinstance(value, (list, tuple)):
        return "-".join(format_value(v, float_format=float_format, none=none) for v in value)
    if isinstance(value, dict):
        return ",".join(f"{k}:{format_value(v, float_format=float_format, none=none)}"
                        for k, v in value.items())
    return str(value)


def params_string(params: dict, *, sep: str = ", ", float_format: str = "g", none: str = "None") -> str:
    """``key=value`` pairs in a stable (sorted) order."""
    return sep.join(f"{k}={format_value(v, float_format=float_format, none=none)}"
                    for k, v in sorted(params.items()))


def config_hash(config: dict) -> str:
    """sha256 of the canonical JSON of a run's defining config (hex)."""
    return hashlib.sha256(canonical_json(config).encode()).hexdigest()


RECORD_FILES = ("metrics.json", "predictions_val.csv", "predictions_test.csv")
SEEN_KEYS = "seen_keys.npz"  # content keys of the images a run was fitted and selected on, and tested on
FEATURE_REFERENCE = "feature_reference.npz"  # the training features' PCA and limits (featcache.typicality)
_NPZ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)
"""What np.load of a cut-short, emptied or foreign .npz raises (zipfile's and numpy's errors alike)."""


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON via a temp file in the same folder + fsync + os.replace: readers see old or new."""
    path = Path(path)
    with naming(path):
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        try:
            os.fchmod(fd, _FILE_MODE)  # mkstemp makes it 0600; the run's other files are 0644 (umask)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(obj, fh, indent=2, sort_keys=False, default=_json_default, allow_nan=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # read once at import: os.umask can only be read by setting it


def library_versions() -> dict:
    """Versions that determine results (recorded in every run)."""
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("featcache", "numpy", "scikit-learn", "keras", "tensorflow", "jax", "h5py", "scipy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            continue
    return out


RESULT_LIBRARIES = ("numpy", "scipy", "scikit-learn")
"""Libraries whose version can change any head's numbers; an mlp's also depend on ``mlp_libraries``."""
MLP_LIBRARIES = ("keras", "tensorflow", "jax")
_TRAINER_LIBRARY = {"fused": "tensorflow", "fused-jax": "jax"}  # run.json's trainer paths besides keras.fit


def mlp_libraries(info: dict) -> tuple[str, ...]:
    """The libraries a dense-head run's numbers came from: Keras, its backend (``environment``), and the
    fused trainer's library (``trainer``). Why not all of MLP_LIBRARIES: a run trained on TensorFlow does
    not move when only JAX is upgraded, and a note saying so would send users to retrain for nothing. A
    run without those records (or on another backend) keeps the old answer, all of them."""
    env = info.get("environment") if isinstance(info.get("environment"), dict) else {}
    backend = env.get("keras_backend")
    if backend not in MLP_LIBRARIES[1:]:
        return MLP_LIBRARIES
    trainer = info.get("trainer") if isinstance(info.get("trainer"), dict) else {}
    paths = {str(how.get("path")) for how in trainer.values() if isinstance(how, dict)}
    used = {"keras", str(backend)} | {lib for path, lib in _TRAINER_LIBRARY.items() if path in paths}
    return tuple(lib for lib in MLP_LIBRARIES if lib in used)


def version_changes(info: dict, current: dict) -> list[str]:
    """'featcache 0.1.0 (now 0.2.0)' for featcache and each library a run's numbers depend on whose version
    differs from ``current`` (``library_versions()``). Why: the run identity leaves versions out (an upgrade
    would otherwise orphan every run), so a rerun after an upgrade finds the old run "already done"."""
    recorded = info.get("versions") if isinstance(info.get("versions"), dict) else {}
    libs = ("featcache", *RESULT_LIBRARIES, *(mlp_libraries(info) if info.get("head") == "mlp" else ()))
    return [f"{lib} {recorded[lib]} (now {current.get(lib) or 'not installed'})" for lib in libs
            if recorded.get(lib) and recorded[lib] != current.get(lib)]


def done_with_other_versions(runs_dir: str | Path, run_ids: Sequence[str],
                             current: dict | None = None) -> list[str]:
    """A note when runs found already done were trained with other versions than this process has: they
    are kept, not trained again, so the user must be told their numbers come from the old versions."""
    if not run_ids:
        return []
    current = library_versions() if current is None else current
    changed = {}
    for rid in run_ids:
        try:
            diff = version_changes(load_run(runs_dir, rid).info, current)
        except (OSError, ValueError, RunError):  # unreadable record: done_hashes already vouched for it
            continue
        if diff:
            changed[rid] = diff
    if not changed:
        return []
    rid, diff = next(iter(changed.items()))
    return [f"{len(changed)} of the {len(run_ids)} run(s) found already done were trained with other "
            f"versions ({rid}: {', '.join(diff)}) and are kept as they are; to train them again with these "
            "versions, add --retrain (the old runs are moved aside, not deleted)."]


def keras_backend(load: bool = False) -> str:
    """The backend Keras runs on in this process, or would run on (``load``: import Keras to ask it).

    Why not just $KERAS_BACKEND: Keras also takes it from ``keras.json`` in $KERAS_HOME (or ~/.keras), and
    dense-head numbers differ between backends, so a run records the one that was really used. Without
    Keras imported (a logistic-regression fit never needs it) Keras' own rule is followed: the variable,
    else the file, else TensorFlow.
    """
    import sys

    if load or "keras" in sys.modules:
        import keras

        return str(keras.backend.backend())
    if os.environ.get("KERAS_BACKEND"):
        return os.environ["KERAS_BACKEND"]
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    if not os.access(home, os.W_OK):  # where Keras itself then looks
        home = os.path.join(tempfile.gettempdir(), ".keras")
    with contextlib.suppress(OSError, ValueError, AttributeError), \
            open(os.path.join(home, "keras.json"), encoding="utf-8") as fh:
        return str(json.load(fh).get("backend") or "tensorflow")
    return "tensorflow"


ENV_VARIABLES = ("KERAS_BACKEND", "TF_ENABLE_ONEDNN_OPTS", "OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                 "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES", "XLA_FLAGS", "FEATCACHE_MLP_PRECISION",
                 "FEATCACHE_MLP_TRAINER")


def replay_command(info: dict) -> str:
    """A run's command as one shell line that reruns it: the recorded variables in front (a precision set
    by $FEATCACHE_MLP_PRECISION, or BLAS threads, are in no flag, yet they move the numbers; the Keras
    backend of an mlp or `run` even when keras.json chose it), and ``cd``
    into its working folder first (the command's relative paths are relative to it). "" when none."""
    cmd = info.get("command")
    text = shlex.join(map(str, cmd)) if isinstance(cmd, list) else str(cmd or "")
    env = info.get("environment") if isinstance(info.get("environment"), dict) else {}
    variables = dict(env.get("variables")) if isinstance(env.get("variables"), dict) else {}
    backend = env.get("keras_backend")
    extracts = isinstance(cmd, list) and len(cmd) > 1 and str(cmd[1]) in ("run", "demo")
    computes = info.get("head") == "mlp" or extracts
    if backend and "KERAS_BACKEND" not in variables and computes:
        # Keras also takes its backend from keras.json, which the replaying machine may not share, and a
        # dense head's (or a run's extraction's) numbers depend on it
        variables["KERAS_BACKEND"] = str(backend)
    if text and variables:
        text = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in sorted(variables.items())) + " " + text
    if text and env.get("cwd"):
        text = f"cd {shlex.quote(str(env['cwd']))} && {text}"
    return text


def _blas_threads() -> dict[str, int]:
    """Threads of each BLAS/OpenMP library loaded (threadpoolctl, a scikit-learn dependency). Why: the
    logistic-regression grid's float32 Grams sum in another order with another thread count, which moves
    its probabilities at about 1e-7 (measured: 6e-7 with OPENBLAS_NUM_THREADS=1 against 2 threads)."""
    try:
        from threadpoolctl import threadpool_info

        return {str(i.get("internal_api") or i.get("prefix")): int(i["num_threads"])
                for i in threadpool_info() if "num_threads" in i}
    except Exception:  # noqa: BLE001 - a record, never a reason to fail a fit
        return {}


def environment() -> dict:
    """What besides the versions moves a run's numbers or is needed to rerun its command (run.json).

    Measured: ``TF_ENABLE_ONEDNN_OPTS=0`` or another Keras backend changes features and MLP results in
    the last digits and beyond; the number of BLAS threads (CPUs, ``OPENBLAS_NUM_THREADS``, ``taskset``)
    changes logistic-regression probabilities at about 1e-7; the command's relative paths need its
    working folder; an editable install's version number does not change with its code, so the source
    revision is recorded where there is one.
    """
    from featcache.resources import cpu_model, cpus

    out: dict = {"cwd": os.getcwd(), "cpus": cpus(), "machine": platform.machine(),
                 "cpu_model": cpu_model(), "system": f"{platform.system()} {platform.release()}",
                 "keras_backend": keras_backend(),
                 "blas_threads": _blas_threads(),
                 "variables": {k: os.environ[k] for k in ENV_VARIABLES if k in os.environ}}
    revision = source_revision()
    if revision:
        out["source_revision"] = revision
    return out


def source_revision(root: Path | None = None) -> str | None:
    """``<commit>`` or ``<commit>-dirty`` when featcache runs from a git checkout (an editable install).

    Dirty: a tracked file changed, or a Python file git does not track yet sits in the package folders
    (a new module the code may import: it was not counted, so such a run claimed the clean commit). Other
    untracked files (notes, data, runs) do not count. ``root``: the checkout (default: this package's).
    """
    import subprocess

    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    if not (root / ".git").exists():
        return None

    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        commit = git("rev-parse", "--short=12", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
        untracked = git("status", "--porcelain", "--untracked-files=all", "--", "featcache", "cli")
    except (OSError, subprocess.SubprocessError):
        return None
    dirty |= any(line.startswith("?? ") and line.endswith(".py") for line in untracked.splitlines())
    return f"{commit}-dirty" if dirty else commit or None


RETIRED_DIR = ".retrained"
"""Where ``fit --retrain`` moves the runs it replaces (a dot-folder: no listing, report or resume reads
it)."""


def new_run_id(runs_dir: Path, head: str, chash: str) -> str:
    """``<UTC yyyymmdd-HHMMSS>-<head>-<hash8>``; a numeric suffix avoids a same-second collision, with the
    runs --retrain moved aside too (a config retrained in the second it was trained got its old id)."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    return _free_name(f"{stamp}-{head}-{chash[:8]}", Path(runs_dir), Path(runs_dir) / RETIRED_DIR)


def _free_name(base: str, *folders: Path) -> str:
    """``base``, or ``base-2``, ``base-3``... : the first name no folder of ``folders`` holds yet."""
    name, i = base, 1
    while any((folder / name).exists() for folder in folders):
        i += 1
        name = f"{base}-{i}"
    return name


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


@dataclass
class Run:
    """A run folder and its run.json. ``run["head"]`` reads run.json keys for convenience."""

    id: str
    path: Path
    info: dict = field(repr=False)

    def __getitem__(self, key: str) -> Any:
        return self.info[key]

    def get(self, key: str, default: Any = None) -> Any:
        return self.info.get(key, default)

    @property
    def status(self) -> str:
        return str(self.info.get("status"))

    def metrics(self) -> dict:
        """metrics.json (empty dict when absent); RunError naming the folder when it is damaged."""
        p = self.path / "metrics.json"
        if not p.exists():
            return {}
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
        if not isinstance(data, dict):
            raise RunError(f"run '{self.id}' has a damaged metrics.json; delete {self.path} and fit again "
                           "(the rerun trains that config anew).")
        return data

    def predictions(self, split: str) -> list[dict]:
        """Rows of predictions_<split>.csv (``val`` or ``test``); [] when absent.

        relpath and group come back as the fit saw them (a formula-safe leading quote undone).
        """
        p = self.path / f"predictions_{split}.csv"
        if not p.exists():
            return []
        with open(p, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
        for row in rows:
            for col in ("relpath", "group"):
                if isinstance(row.get(col), str):
                    row[col] = sheet_unquote(row[col])
        return rows

    def indices(self) -> dict[str, np.ndarray]:
        """The index arrays saved in indices.npz (train, val, test, fold_*)."""
        with np.load(self.path / "indices.npz", allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def seen_keys(self) -> dict[str, set[str]] | None:
        """{"training": keys, "test": keys}: the content keys (SHA-256 of the image bytes, the caches' row
        keys) of the images the run was fitted and selected on (its train and validation images), and of
        its test images. None for a run fitted before they were recorded, or whose file is unreadable
        (cut short, emptied: zipfile's and numpy's errors alike).
        Why: predict says which images the run has seen, whose predictions are no held-out estimate."""
        try:
            with np.load(self.path / SEEN_KEYS, allow_pickle=False) as z:
                return {name: {bytes(row).hex() for row in z[name]} for name in ("training", "test")}
        except _NPZ_ERRORS:
            return None


    def feature_reference(self) -> Any:
        """The run's :class:`featcache.typicality.FeatureReference`, or None: a run fitted before featcache
        wrote one, with too few training images for one, or whose file is unreadable.
        Why: predict says which images lie outside what the run was trained on."""
        from featcache.typicality import FeatureReference

        try:
            return FeatureReference.load(self.path / FEATURE_REFERENCE)
        except _NPZ_ERRORS:
            return None


class RunWriter:
    """Builds one run folder: run.json ("running") first, then files, then run.json ("done") last."""

    def __init__(self, runs_dir: Path, info: dict):
        self.runs_dir = Path(runs_dir)
        self.runs_dir.mkdir(parents=True, exist_ok=True)
        self.id = new_run_id(self.runs_dir, info["head"], info["config_hash"])
        self.path = self.runs_dir / self.id
        self.path.mkdir()
        self.info = {
            "format": RUN_FORMAT,
            "id": self.id,
            "status": "running",
            "created": _now(),
            "finished": None,
            **info,
            "artifacts": {},
            "owner": this_process(),
        }
        try:
            write_json_atomic(self.path / "run.json", self.info)
        except BaseException:  # a full disk, say: no run.json means no run, so leave no empty folder
            with contextlib.suppress(OSError):
                self.path.rmdir()
            raise

    def write_metrics(self, metrics: dict) -> None:
        write_json_atomic(self.path / "metrics.json", metrics)

    def write_predictions(
        self,
        split: str,
        relpaths: Sequence[str],
        keys: Sequence[str],
        y_true: np.ndarray,
        proba: np.ndarray,
        y_pred: np.ndarray,
        classes: Sequence[str],
        groups: Sequence[str] | None = None,
    ) -> None:
        """Per-image predictions (+ the patient/group id, for patient-level bootstrap CIs in reports).

        Probabilities are written exactly (shortest round-trip form): rounded, they made ties between
        classes near 1.0, so metrics recomputed from the CSV (the report's) differed from metrics.json.

        The file is valid UTF-8 whatever the file names: a name's non-UTF-8 bytes are written as ``\\xff``
        escapes. Written raw, they made the CSV unreadable to csv/pandas and to the report itself. A name
        or group a spreadsheet would run as a formula is written with a leading quote (`sheet_safe`).
        """
        target = self.path / f"predictions_{split}.csv"
        with naming(target), open(target, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            extra = ["group"] if groups is not None else []
            w.writerow(["relpath", "key", "y_true", *[f"p_{c}" for c in classes], "y_pred", *extra])
            for i in range(len(keys)):
                w.writerow(
                    [sheet_safe(_utf8(relpaths[i])), keys[i], int(y_true[i]),
                     *[repr(float(v)) for v in proba[i]], int(y_pred[i]),
                     *([sheet_safe(_utf8(groups[i]))] if groups is not None else [])]
                )

    def write_seen_keys(self, training: Sequence[str], test: Sequence[str]) -> None:
        """:data:`SEEN_KEYS`: the 32-byte content keys of the run's training (train and validation) and test
        images, for :meth:`Run.seen_keys` (167 KB for Kermany's 5,232 images, half the size of hex text)."""
        target = self.path / SEEN_KEYS
        with naming(target):
            np.savez(target, **{name: np.array([np.frombuffer(bytes.fromhex(k), np.uint8) for k in keys],
                                               dtype=np.uint8).reshape(len(keys), 32)
                                for name, keys in (("training", training), ("test", test))})

    def write_feature_reference(self, reference: Any) -> None:
        """:data:`FEATURE_REFERENCE` from a :class:`featcache.typicality.FeatureReference` (nothing for None:
        too few training images to set its limits)."""
        if reference is None:
            return
        target = self.path / FEATURE_REFERENCE
        with naming(target):
            reference.save(target)

    def write_indices(self, **arrays: np.ndarray) -> None:
        target = self.path / "indices.npz"
        with naming(target):
            np.savez(target, **{k: np.asarray(v, dtype=np.int64) for k, v in arrays.items()})

    def save_head(self, head: Any) -> list[str]:
        """Call ``head.save(model/)`` and record the sha256 of every file written."""
        model_dir = self.path / "model"
        with naming(model_dir):
            model_dir.mkdir(exist_ok=True)
            files = head.save(model_dir)
        arts = {}
        for f in files:
            f = Path(f)
            arts[f.relative_to(self.path).as_posix()] = sha256_file(f)
        self.info["artifacts"] = arts
        return list(arts)

    def finish(self, **extra: Any) -> Run:
        """Write run.json with status "done" (the commit point of the run).

        It records the SHA-256 of metrics.json and the prediction CSVs (``records``): the report reads
        its numbers from them, and a file edited or cut short later must not be published as the run's.
        """
        self.info.update(extra)
        self.info["records"] = {
            name: sha256_file(self.path / name) for name in RECORD_FILES if (self.path / name).is_file()
        }
        self.info["status"] = "done"
        self.info["finished"] = _now()
        write_json_atomic(self.path / "run.json", self.info)
        return Run(self.id, self.path, self.info)

    def discard(self) -> None:
        """Remove the unfinished folder. Why: a fit stopped by Ctrl-C, SIGTERM or a full disk left a
        "running" folder (and its half-written model) that only a rerun of the same config removed: the
        report listed it as left out, and on a full disk it kept the disk full. SIGKILL still leaves one,
        for ``clean_stale``."""
        with contextlib.suppress(OSError):
            shutil.rmtree(self.path)

    def fail(self, reason: str) -> None:
        """Mark the run failed (e.g. training diverged); it is kept for inspection, never resumed into."""
        self.info["status"] = "failed"
        self.info["error"] = reason
        self.info["finished"] = _now()
        write_json_atomic(self.path / "run.json", self.info)


SHEET_TRIGGERS = ("=", "+", "-", "@", "\t", "\r")


def sheet_safe(text: str) -> str:
    """``text`` with a leading ``'`` when a spreadsheet would run it as a formula (``=HYPERLINK(...``).

    Why: people open predictions_*.csv in a spreadsheet, and a class folder or file name is data the
    user may not control. Unlike leaderboard.csv's cells, these are read back by the report, so the
    mapping must invert exactly: a text that already starts with ``'`` gets one more (`sheet_unquote`).
    """
    return "'" + text if text[:1] in (*SHEET_TRIGGERS, "'") else text


def sheet_unquote(text: str) -> str:
    """The inverse of `sheet_safe`: the leading ``'`` it added removed.

    Only before a formula character or another ``'``, which is all `sheet_safe` quotes: files written
    before it existed keep a name such as ``'quoted/a.png`` as it was (runs pair by name).
    """
    return text[1:] if text[:1] == "'" and text[1:2] in (*SHEET_TRIGGERS, "'") else text


def _utf8(text: Any) -> str:
    """``text`` with the raw bytes of a non-UTF-8 file name (surrogate escapes) written as ``\\xff``."""
    return str(text).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _iter_run_dirs(runs_dir: Path) -> Iterator[tuple[Path, dict | None]]:
    root = Path(runs_dir)
    if not root.is_dir():
        return
    for d in sorted(root.iterdir()):
        if not d.is_dir() or d.name.startswith("."):
            continue
        try:
            info = json.loads((d / "run.json").read_text(encoding="utf-8"))
            yield d, info if isinstance(info, dict) else None
        except (OSError, ValueError):
            yield d, None


def list_runs(runs_dir: str | Path, *, include_incomplete: bool = False) -> list[Run]:
    """Runs sorted by id (= creation time). Only ``done`` runs unless ``include_incomplete``."""
    out = []
    for d, info in _iter_run_dirs(Path(runs_dir)):
        if info is None:
            if include_incomplete:
                out.append(Run(d.name, d, {"id": d.name, "status": "corrupt"}))
            continue
        if info.get("status") == "done" or include_incomplete:
            out.append(Run(d.name, d, info))
    return out


def grid_index(info: dict) -> int | None:
    """A run's place in its grid (``run.json``'s ``grid.index``), or None when it has none (older runs,
    runs trained alone): what orders runs of one sweep that tie on everything else."""
    grid = info.get("grid")
    index = grid.get("index") if isinstance(grid, dict) else None
    return index if isinstance(index, int) else None


def run_time(run: Run) -> datetime | None:
    """When a run was made: run.json's ``created``, else its ``finished`` (aware, UTC when the text has no
    offset), else the UTC time its folder name starts with (fit's ``yyyymmdd-HHMMSS-``; a run.json that
    cannot be read); None when none of them is readable."""
    for key in ("created", "finished"):
        value = run.info.get(key)
        if not isinstance(value, str):
            continue
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            continue
        return when if when.tzinfo is not None else when.replace(tzinfo=timezone.utc)
    try:
        return datetime.strptime(run.id[:15], "%Y%m%d-%H%M%S").replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def by_time(runs: Iterable[Run]) -> list[Run]:
    """``runs`` oldest first by `run_time` (to the second); runs of one second by their place in their grid
    (a fused sweep finishes several per second, not in grid order), then by folder name (which also orders
    the runs with no readable time, which come last).

    Why not the folder name alone (`list_runs`): a name starts with its UTC creation time only while it is
    the name fit gave it; a folder renamed, or copied in from another runs folder under another name, sorted
    by its new name, so a listing did not show runs in the order they were made.
    """
    def key(run: Run) -> tuple[bool, float, int, str]:
        when = run_time(run)
        index = grid_index(run.info)
        return (when is None, when.timestamp() if when is not None else 0.0,
                index if index is not None else -1, run.id)

    return sorted(runs, key=key)


def load_run(runs_dir: str | Path, run_id: str) -> Run:
    """The run ``run_id`` or RunError (unknown id, or a run that never finished).

    ``run_id`` may also be the run's folder inside ``runs_dir`` as a shell completes it
    (``runs/20250101-...-logreg-0123abcd/``): the same run, named by its path; or any part of the id that
    only one run has (its 8-hex hash, say), as ``report --id`` takes it.
    """
    runs_dir = Path(runs_dir)
    folder = Path(run_id.rstrip("/")) if run_id and "/" in run_id.rstrip("/") else None
    if folder is not None and not (folder / "run.json").is_file():
        folder = None  # a path that is no run folder: refused below like any unknown id
    if folder is not None and folder.parent.resolve() == runs_dir.resolve():
        run_id = folder.name
    retired = runs_dir / RETIRED_DIR / run_id
    if (folder is None and run_id not in {"", ".", ".."} and "/" not in run_id and "\\" not in run_id
            and not (runs_dir / run_id / "run.json").is_file()
            and (retired / "run.json").is_file()):  # before the part match: "<id>" must not find "<id>-2"
        raise RunError(f"run '{run_id}' was moved to {runs_dir / RETIRED_DIR} by `fit --retrain`; use it "
                       f"with --runs-dir {shlex.quote(str(runs_dir / RETIRED_DIR))}, or move its folder "
                       f"back into {runs_dir}.")
    if folder is None and run_id and not (runs_dir / run_id / "run.json").is_file():
        run_id = _unique_part(runs_dir, run_id)  # the hash or a part of the id, as `report --id` takes it
    d = runs_dir / run_id
    if (
        not run_id
        or "/" in run_id
        or "\\" in run_id
        or run_id in {".", ".."}
        or not (d / "run.json").is_file()
    ):
        if folder is not None:
            raise RunError(f"{folder} is a run of another runs folder than {runs_dir}; add --runs-dir "
                           f"{shlex.quote(str(folder.parent))}.")
        if runs_dir.exists() and not runs_dir.is_dir():
            raise RunError(f"--runs-dir {runs_dir} is a file, not a folder; point --runs-dir at the folder "
                           "`featcache fit` wrote the run into.")
        if not runs_dir.is_dir():  # a mistyped --runs-dir: listing it would not help
            raise RunError(f"runs folder {runs_dir} does not exist; point --runs-dir at the folder "
                           "`featcache fit` wrote the run into.")
        unfinished = _unfinished_part(runs_dir, run_id)
        if unfinished:  # `runs ls` lists this folder as unfinished: "no run" contradicted it
            raise RunError(f"run '{unfinished}' is unfinished (its folder has no run.json: training now, or "
                           "interrupted); rerun the fit command to finish it.")
        where = "" if runs_dir == Path("runs") else f" --runs-dir {shlex.quote(str(runs_dir))}"
        raise RunError(f"no run '{run_id}' in {runs_dir}; `featcache runs ls{where}` lists them.")
    try:
        info = json.loads((d / "run.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        info = None
    if not isinstance(info, dict):
        raise RunError(f"run '{run_id}' has an unreadable run.json; delete {d} and fit again.")
    if info.get("status") != "done":
        raise RunError(
            f"run '{run_id}' did not finish (status {info.get('status')!r}); "
            "rerun the same `featcache fit` command to complete it."
        )
    return Run(run_id, d, info)


def _unfinished_part(runs_dir: Path, part: str) -> str | None:
    """The id of the one run folder without run.json (training, or interrupted) that is ``part`` or
    contains it, else None: the id `runs ls` lists as unfinished, whole or in part."""
    if not part or "/" in part or "\\" in part or part.startswith(".") or not Path(runs_dir).is_dir():
        return None  # hidden folders (checkpoints, locks, retired runs) are no runs
    if (Path(runs_dir) / part).is_dir():
        return part
    names = _folders_containing(runs_dir, part, finished=False)
    return names[0] if len(names) == 1 else None


def _folders_containing(runs_dir: Path, part: str, *, finished: bool) -> list[str]:
    """The names, sorted, of the run folders (hidden ones are no runs) whose name contains ``part``: the
    finished ones (with run.json) or the unfinished ones (without)."""
    return sorted(d.name for d in Path(runs_dir).iterdir() if part in d.name and not d.name.startswith(".")
                  and d.is_dir() and (d / "run.json").is_file() == finished)


def _unique_part(runs_dir: Path, part: str) -> str:
    """The id of the one run folder whose name contains ``part`` (``8f18c1b7`` for
    ``20261206-180757-logreg-8f18c1b7``), ``part`` itself when none does, RunError when several do."""
    if not Path(runs_dir).is_dir() or "/" in part or "\\" in part:
        return part
    names = _folders_containing(runs_dir, part, finished=True)
    if len(names) > 1:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise RunError(f"'{part}' is part of {len(names)} run ids ({shown}); give more of the id.")
    return names[0] if names else part


def changed_records(path: Path, info: dict) -> list[str]:
    """Why each result file recorded in run.json's ``records`` can no longer be trusted ([] when none).

    A run written before records existed has none, so nothing is checked here; the report then compares
    the prediction CSVs with metrics.json instead.
    """
    problems = []
    records = info.get("records")
    records = {} if records is None else records  # absent: a run from before records existed
    if not isinstance(records, dict):  # a hand edit: nothing can be checked, so nothing is trusted
        return ["run.json's records are malformed"]
    for name, digest in records.items():
        if name not in RECORD_FILES:
            continue  # only our own file names: a record must not make us open arbitrary paths
        file = path / name
        if not file.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(file) != digest:
            problems.append(f"{name} was changed after the fit (its SHA-256 differs from run.json's record)")
    return problems


def edited_run_json(info: dict, metrics: dict) -> list[str]:
    """Where run.json contradicts metrics.json (whose SHA-256 run.json records): run.json edited by hand.

    Why: run.json cannot record its own digest, and a changed ``threshold.chosen`` or ``params`` was
    published as the run's (a test sensitivity at 0.9 beside the interval recorded at the real
    threshold, the CV grid view saying the search chose another config). The threshold metrics.json's
    at-threshold numbers were computed at, and the configs its CV results rank first, are the fit's own.
    """
    if not isinstance(metrics, dict):
        return []
    problems = []
    chosen = (info.get("threshold") or {}).get("chosen") if isinstance(info.get("threshold"), dict) else None
    for split in ("test", "val"):
        at = (metrics.get(split) or {}).get("at_threshold") if isinstance(metrics.get(split), dict) else None
        if isinstance(at, dict) and isinstance(at.get("threshold"), (int, float)):
            if chosen != at["threshold"]:
                problems.append(f"run.json's chosen threshold ({chosen}) is not the {at['threshold']} "
                                "metrics.json was computed at: run.json was edited after the fit")
            break
    cv = metrics.get("cv_results")
    if isinstance(cv, dict) and isinstance(cv.get("params"), list) and isinstance(cv.get("rank_test_score"),
                                                                                    list):
        best = [p for p, r in zip(cv["params"], cv["rank_test_score"], strict=False) if r == 1]
        if best and info.get("params") not in best:
            problems.append("run.json's params are not a config its CV search ranked first (metrics.json): "
                            "run.json was edited after the fit")
    return problems


def verify_artifacts(run: Run) -> None:
    """RunError unless every recorded model file exists and matches its recorded sha256."""
    arts = run.info.get("artifacts") or {}
    if not arts:
        raise RunError(f"run '{run.id}' records no model files; fit it again.")
    for rel, digest in arts.items():
        p = (run.path / rel).resolve()
        if run.path.resolve() not in p.parents:
            raise RunError(
                f"run '{run.id}' records a model file outside its folder ({rel}); refusing to load it."
            )
        if not p.is_file():
            raise RunError(f"model file {rel} of run '{run.id}' is missing; fit the run again.")
        if sha256_file(p) != digest:
            raise RunError(
                f"model file {rel} of run '{run.id}' does not match its recorded SHA-256 "
                "(modified or replaced); refusing to load it. Train it again with its fit command plus "
                f"--retrain (`featcache runs show {run.id}` prints the command): without --retrain, fit "
                "finds the run done and skips it."
            )


def load_head(run: Run) -> Any:
    """Verify every model file's sha256, then load the head with its family's loader."""
    verify_artifacts(run)
    from featcache.heads import load_fitted

    return load_fitted(run.info["head"], run.path / "model")


def run_problems(run: Run) -> list[str]:
    """Why a done run's results cannot be trusted ([] when they can): result files changed after the fit
    or missing, or model files gone. The report leaves such a run out, and so do listings."""
    problems = changed_records(run.path, run.info) + missing_artifacts(run.path, run.info)
    if not problems and (run.path / "metrics.json").is_file():
        try:
            problems += edited_run_json(run.info, run.metrics())
        except RunError as exc:
            problems.append(str(exc))
    return problems


def missing_artifacts(path: Path, info: dict) -> list[str]:
    """The recorded model files that are gone from a run folder (or why the record cannot say)."""
    artifacts = info.get("artifacts")
    artifacts = {} if artifacts is None else artifacts
    if not isinstance(artifacts, dict):
        return ["run.json's artifacts are malformed"]
    return [f"model file {rel} is missing" for rel in artifacts if not (Path(path) / str(rel)).is_file()]


def retire_runs(runs_dir: str | Path, config_hashes: set[str]) -> list[str]:
    """Move every finished run of ``config_hashes`` into ``RETIRED_DIR`` and return their ids.

    Why moved, not deleted: a retrain after an upgrade is often made to compare the old numbers with the new
    ones, and a retrain that is then interrupted must not have lost the old runs. Why before training, not
    after: a sweep interrupted halfway then resumes as any other (the configs without a run are trained),
    instead of leaving an old and a new run of one config side by side in the report. Damaged runs are
    moved too (they would be trained again anyway). A rename in one folder: nothing is copied.
    """
    root = Path(runs_dir)
    moved = []
    for r in list_runs(root):
        if r.info.get("config_hash") not in config_hashes:
            continue
        # a suffix when the same run is retired twice (moved back by hand, then retrained again)
        dest = root / RETIRED_DIR / _free_name(r.id, root / RETIRED_DIR)
        dest.parent.mkdir(exist_ok=True)
        r.path.rename(dest)
        moved.append(r.id)
    return moved


def done_hashes(runs_dir: str | Path, wanted: Iterable[str] | None = None,
                damaged: list[tuple[str, str]] | None = None) -> dict[str, str]:
    """config_hash -> run id of every done run whose result files are intact (what a resumed sweep skips).

    A done run whose ``metrics.json`` or prediction CSVs changed after the fit, or whose model files are
    gone, is not done: the report leaves it out, so "already done" would keep its config out of every
    report for good. Its config trains again, and (run id, why) goes to ``damaged``. ``wanted``: check only
    these configs' runs (hashing every run's files at each fit would grow with the folder).
    """
    keep = None if wanted is None else set(wanted)
    out: dict[str, str] = {}
    for r in list_runs(runs_dir):
        h = r.info.get("config_hash")
        if not h or (keep is not None and h not in keep):
            continue
        problems = run_problems(r)
        if problems:
            if damaged is not None:
                damaged.append((r.id, problems[0]))
            continue
        out[h] = r.id
    return out


def resumed_epoch(run: Run | dict) -> int:
    """The epoch a run's fused chunk was resumed at from a checkpoint (0: trained from the start)."""
    selection = (run.get("trainer") or {}).get("selection") or {}
    return int(selection.get("resumed_from_epoch") or 0)


def _describe_one(t: dict, *, detail: bool) -> str:
    details = [str(t["precision"])] if t.get("precision") else []
    if detail and t.get("group_size"):
        details.append(f"chunk of {t['group_size']}")
    text = str(t.get("path", "?")) + (f" ({', '.join(details)})" if details else "")
    if detail and t.get("resumed_from_epoch"):
        text += f", resumed at epoch {t['resumed_from_epoch']} from a checkpoint"
    return text


def training_settings(run: dict) -> dict[str, str]:
    """The settings besides the head's params that shape what it trained on and how it was scored, where
    not the default: --balance, --train-views, --aug-views (oversampling) and --tta views.

    Why: three logreg runs, plain, undersampled and trained on flipped copies too, each read "C=1,
    class_weight=None" in every table and in `runs show`, with different numbers (a reproducibility audit).
    """
    out: dict[str, str] = {}
    balance = run.get("balance")
    if isinstance(balance, str) and balance not in ("", "none"):
        out["balance"] = balance

    def views(key: str) -> list[str]:
        value = run.get(key)
        return [str(v) for v in value] if isinstance(value, list) else []

    if views("train_views") not in ([], ["orig"]):
        out["train_views"] = "+".join(views("train_views"))
    if views("aug_views"):
        out["aug_views"] = "+".join(views("aug_views"))
    if run.get("tta") and views("tta_views"):
        out["tta"] = "+".join(["orig", *views("tta_views")])
    return out


# what a test bootstrap resampled (fit's "resampled" value) -> (short words, words for a report's prose)
_RESAMPLED_WORDS = {
    "patients": ("patients", "test patients (all images of a patient together)"),
    "file-name groups": ("images grouped by file name (no patient ids)",
                         "test images grouped by file name (the data has no patient ids)"),
    "images": ("images", "test images (each image on its own)"),
}


def resampled_words(unit: str, *, detail: bool = False) -> str:
    """A recorded "resampled" unit in words, one table for `runs show` and the report.

    Why: "file-name groups" must never read as patients, and two tables of wordings drift apart. Mixed
    units ("patients and file-name groups (...)") are spelled out as recorded.
    """
    if unit in _RESAMPLED_WORDS:
        return _RESAMPLED_WORDS[unit][int(detail)]
    return f"test {unit}: patients together, the rest by file name" if detail else unit


def describe_trainer(trainer: dict, *, detail: bool = True) -> str:
    """How an MLP run was trained, from run.json's ``trainer``: e.g. 'fused (bfloat16, chunk of 18), resumed
    at epoch 40 from a checkpoint; saved model refit: keras.fit (float32)'. ``detail=False`` keeps what
    shapes the numbers (path and precision) and drops chunk size and resumption, for grouping runs."""
    selection, saved = trainer.get("selection") or {}, trainer.get("saved_model") or {}
    text = _describe_one(selection, detail=detail)
    if saved and _describe_one(saved, detail=detail) != _describe_one(selection, detail=detail):
        text += f"; saved model refit: {_describe_one(saved, detail=detail)}"
    return text


def _whole(value: Any) -> int | None:
    """A recorded count (an int, not a bool or a hand-edited string); None otherwise."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None


# mlp.refit_plan's "epochs_from" in the words of `runs show`'s epochs row (its own has parentheses)
_REFIT_EPOCHS_FROM = {"best hold-out epoch (checkpoint)": "the hold-out model's best epoch",
                      "epochs the hold-out ran": "the epochs the hold-out model ran"}


def _count(value: Any) -> int | None:
    """A whole count from a record (not a bool, not negative), else None."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def cv_search_text(info: dict, metrics: Any) -> str | None:
    """What a CV head's grid search was and found, from run.json's selection and metrics.json's cv_results:
    "6 config(s) × 5 folds (30 fits); best mean CV accuracy 0.9512 (sd 0.0123 over the folds), config 2 of
    6, tied with 1 other(s) ...; 3 of the 30 fits stopped before converging ...". None for a run without a
    CV search (an mlp's hold-out).

    Why: run.json recorded the grid's size, the best mean score and ``cv_unconverged_fits``, but `runs
    show` showed none of them, so a user judging one run could not tell a choice among 30 configs from a
    single config, nor that the scores it was chosen by came from unconverged models."""
    sel = info.get("selection") if isinstance(info.get("selection"), dict) else {}
    cv = metrics.get("cv_results") if isinstance(metrics, dict) else None
    cv = cv if isinstance(cv, dict) else {}
    params = cv.get("params") if isinstance(cv.get("params"), list) else None
    n_configs = _count(sel.get("n_configs")) or (len(params) if params else None)
    if sel.get("method") != "grouped_kfold" and not n_configs:
        return None
    folds = sel.get("folds")
    n_folds = len(folds) if isinstance(folds, list) else _count(folds)
    total = n_configs * n_folds if n_configs and n_folds else None
    parts = [f"{n_configs or '?'} config(s) × {n_folds or '?'} folds" + (f" ({total} fits)" if total else "")]
    best = sel.get("best_score", metrics.get("cv_best_score") if isinstance(metrics, dict) else None)
    index = _count(sel.get("best_index"))
    if isinstance(best, int | float) and not isinstance(best, bool):
        text = f"best mean CV {sel.get('scoring') or info.get('metric') or 'score'} {best:.4f}"
        stds = cv.get("std_test_score")
        if index is not None and isinstance(stds, list) and index < len(stds) \
                and isinstance(stds[index], int | float):
            text += f" (sd {stds[index]:.4f} over the folds)"
        if index is not None:
            text += f", config {index + 1} of {n_configs or '?'}"
        ranks = cv.get("rank_test_score")
        tied = sum(r == 1 for r in ranks) - 1 if isinstance(ranks, list) else 0
        if tied > 0:
            text += f", tied with {tied} other(s) (the first of them taken, as GridSearchCV does)"
        parts.append(text)
    same = sel.get("cv_same_models")
    if isinstance(same, list) and same:
        groups = [" and ".join(str(i + 1) for i in g) for g in same if isinstance(g, list)
                  and all(_count(i) is not None for i in g)]
        parts.append(f"configs {'; '.join(groups)} ran as the same model in every fold (k capped at the "
                     "folds' training rows): their scores tie by construction")
    stopped = _count(sel.get("cv_unconverged_fits"))
    if stopped:
        parts.append(f"{stopped} of the {total or '?'} fits stopped before converging (at max_iter): the "
                     "scores the config was chosen by are of unconverged models")
    elif stopped == 0:
        parts.append("every fit converged")
    return "; ".join(parts)


def epochs_text(info: dict, history: Any) -> str | None:
    """How an mlp run's epochs went, from run.json and metrics.json's ``history``: e.g. '13 of 200 epochs
    (stopped early, patience 3); weights of epoch 10 kept (lowest validation loss); tested model: refit on
    160 images (training + validation) for 10 epochs (best hold-out epoch)'. None for other heads and
    for runs without a history.

    Why: the params say what was asked (``epochs=200``), not what ran. An early-stopped run trained 13
    epochs, kept epoch 10's weights, and with ``--refit`` the tested model trained on other images for
    another number of epochs; `runs show` and the report showed none of it, so a Methods section written
    from them said 200 epochs.
    """
    if info.get("head") != "mlp" or not isinstance(history, dict):
        return None
    losses = history.get("loss")
    if not isinstance(losses, list) or not losses:
        return None
    hp = info.get("hyperparameters") if isinstance(info.get("hyperparameters"), dict) else {}
    params = info.get("params") if isinstance(info.get("params"), dict) else {}
    setting = {**params, **hp}
    ran, planned = len(losses), _whole(setting.get("epochs"))
    patience = _whole(setting.get("patience"))
    text = f"{ran} of {planned} epochs" if planned else f"{ran} epochs"
    if patience is not None:
        text += (f" (stopped early, patience {patience})" if planned and ran < planned
                 else f" (patience {patience}: never stopped early)")
    if setting.get("checkpoint") is True:
        val = [v if isinstance(v, int | float) and np.isfinite(v) else np.inf
               for v in history.get("val_loss") or []]
        if val and min(val) < np.inf:  # the first lowest, as the best-weights callbacks keep it
            text += f"; weights of epoch {int(np.argmin(val)) + 1} kept (lowest validation loss)"
    else:
        text += "; weights of the last epoch kept"
    rates = [v for v in history.get("lr") or [] if isinstance(v, int | float)]
    lowered = sum(b < a for a, b in zip(rates, rates[1:], strict=False))
    if setting.get("reduce_lr_patience") is not None and lowered:
        text += f"; learning rate lowered {lowered} time(s) on plateaus, to {rates[-1]:.3g}"
    sel = info.get("selection") if isinstance(info.get("selection"), dict) else {}
    plan = sel.get("refit_plan")
    if sel.get("refit") and isinstance(plan, dict) and _whole(plan.get("epochs")):
        n = sel.get("refit_n_train_images")
        why = ("as configured" if plan.get("as_configured")
               else _REFIT_EPOCHS_FROM.get(str(plan.get("epochs_from")), str(plan.get("epochs_from") or "?")))
        text += (f"; tested model: refit on {n if _whole(n) else 'all'} images (training + validation) for "
                 f"{plan['epochs']} epochs ({why})")
    return text


CHECKPOINTS_DIR = ".checkpoints"
"""Folder inside a runs folder where fit keeps epoch checkpoints of unfinished MLP sweeps, one subfolder per
sweep id (hidden: run listings skip it)."""


def checkpoint_dir(runs_dir: str | Path, sweep_id: str) -> Path:
    """Where the sweep ``sweep_id`` keeps its fused chunks' epoch checkpoints."""
    return Path(runs_dir) / CHECKPOINTS_DIR / sweep_id


@dataclass
class PendingSweep:
    """A sweep that left epoch checkpoints: interrupted and not rerun to the end yet, or running now."""

    sweep_id: str
    size_bytes: int
    last_saved: float          # mtime of its newest checkpoint (epoch seconds)
    command: list[str] | None  # the fit command that resumes it, when its checkpoints recorded one
    running_pid: int | None = None  # the fit process still training it on this host, if there is one
    other_host: str | None = None   # the host its fit ran on, if not this one (its process cannot be checked)

    @property
    def may_be_running(self) -> bool:
        """Its fit runs here now, or ran on another host and might still: deleting its checkpoints then
        needs ``force``."""
        return self.running_pid is not None or self.other_host is not None


def _sweep_about(folder: Path) -> dict:
    """A checkpoint folder's label (``sweep.json``), or {} when it has none or a damaged one."""
    from featcache.heads.mlp_checkpoint import ABOUT_FILE

    try:
        about = json.loads((folder / ABOUT_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return about if isinstance(about, dict) else {}


def this_process() -> dict:
    """Who owns a run folder or a sweep's checkpoints: this host and process id, so a later command can tell
    a live owner from a killed one."""
    return {"host": socket.gethostname(), "pid": os.getpid()}


def live_owner(owner: object) -> int | None:
    """The pid in ``owner`` (as ``this_process`` wrote it) when that process still runs on this host; None
    when it is gone, or on another host (where it cannot be checked from here)."""
    if not isinstance(owner, dict) or owner.get("host") != socket.gethostname():
        return None
    try:
        pid = int(owner.get("pid", -1))
    except (TypeError, ValueError):
        return None
    return pid if _pid_alive(pid) else None


def _sweep_lock_holder(runs_dir: str | Path, sweep_id: str) -> dict | None:
    """What the live holder of ``sweep_id``'s lock says about itself (pid, host), or None when no fit holds
    it (no lock file, a killed fit's free lock, or no ``flock`` here)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: sweep_lock guards nothing there either
        return None
    info = _live_holder(fcntl, Path(runs_dir) / LOCKS_DIR / f"{sweep_id}.lock")
    return None if info is None else info or {"host": socket.gethostname()}


def pending_checkpoints(runs_dir: str | Path) -> list[PendingSweep]:
    """Every sweep with checkpoints left in ``runs_dir``, oldest first. They can be large (hundreds of MB
    per chunk), so listings mention them, with the command that resumes each and whether its fit is still
    running."""
    root = Path(runs_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return []
    out = []
    for d in (p for p in root.iterdir() if p.is_dir()):
        files = [f.stat() for f in d.glob("*.npz") if f.is_file()]
        if files:
            about = _sweep_about(d)  # no label (or a damaged one): still listed
            command, owner = about.get("command"), about.get("owner")
            host = owner.get("host") if isinstance(owner, dict) else None
            running = live_owner(owner)
            # a resumed fit relabels the folder only at its first save (minutes): until then the label
            # names the killed fit, while the sweep's lock is held by the one training it now
            holder = _sweep_lock_holder(runs_dir, d.name) if running is None else None
            if holder is not None:
                host = holder.get("host", socket.gethostname())
                if host == socket.gethostname():  # the lock is held, so it runs even where no pid is read
                    pid = holder.get("pid")
                    running = pid if isinstance(pid, int) and not isinstance(pid, bool) else 0
            out.append(PendingSweep(d.name, sum(f.st_size for f in files), max(f.st_mtime for f in files),
                                    [str(a) for a in command] if isinstance(command, list) else None,
                                    running,
                                    str(host) if host is not None and host != socket.gethostname() else None))
    return sorted(out, key=lambda p: (p.last_saved, p.sweep_id))


def running_process(pid: int) -> str:
    """'process 1234', or 'a process' for a fit that holds the sweep's lock before its claim is written."""
    return f"process {pid}" if pid else "a process starting now"


def remove_sweep_checkpoints(runs_dir: str | Path, sweep_id: str) -> None:
    """Delete one sweep's checkpoint folder, and the ``.checkpoints`` folder too once no sweep keeps any: what
    fit does when its grid finished and what ``drop_checkpoints`` does per sweep."""
    folder = checkpoint_dir(runs_dir, sweep_id)
    shutil.rmtree(folder, ignore_errors=True)
    with contextlib.suppress(OSError):
        folder.parent.rmdir()  # only when empty


def drop_checkpoints(runs_dir: str | Path, sweep_ids: list[str] | None = None,
                     force: bool = False) -> list[PendingSweep]:
    """Delete the epoch checkpoints of the sweeps ``sweep_ids`` (None: of every sweep known not to be
    training now) and return what was deleted. Why a command: an abandoned sweep's checkpoints stay until
    deleted, and they can take gigabytes. Deleting never touches finished runs; a sweep rerun later trains
    its unfinished configs from epoch 0 instead, with the same numbers.

    A named sweep that is unknown, still training on this host, or started on another host (whose process
    cannot be checked from here) is refused, unless ``force``, with a :class:`RunError` before anything is
    deleted; with ``sweep_ids=None`` such sweeps are left alone.
    """
    root = Path(runs_dir) / CHECKPOINTS_DIR
    pending = {p.sweep_id: p for p in pending_checkpoints(runs_dir)}
    if sweep_ids is None:
        chosen = [p for p in pending.values() if not p.may_be_running]
    else:
        sweep_ids = [_sweep_by_part(pending, s) for s in sweep_ids]
        unknown = [s for s in dict.fromkeys(sweep_ids) if s not in pending]
        if unknown:
            raise RunError(f"no checkpoints of sweep {', '.join(unknown)} in {root}; `featcache runs ls` "
                           "lists the sweeps that keep some")
        chosen = [pending[s] for s in dict.fromkeys(sweep_ids)]
        busy = [p for p in chosen if p.running_pid is not None]
        if busy and not force:
            who = ", ".join(f"{p.sweep_id} ({running_process(p.running_pid)})" for p in busy)
            raise RunError(f"sweep {who} is still running on this machine and writes these checkpoints; "
                           "stop it first, or pass --force")
        away = [p for p in chosen if p.other_host is not None]
        if away and not force:
            who = ", ".join(f"{p.sweep_id} (host {p.other_host})" for p in away)
            raise RunError(f"sweep {who} was started on another machine, and whether it still runs cannot be "
                           "checked from here; pass --force once you know it is not running")
    for p in chosen:
        remove_sweep_checkpoints(runs_dir, p.sweep_id)
    return chosen


def _sweep_by_part(pending: dict, part: str) -> str:
    """The one pending sweep id that starts with ``part`` (``3f2a9c`` for ``3f2a9c1d0b7e``), ``part`` itself
    when it is an id or starts none; RunError when it starts several. Why: `runs show` takes part of a run
    id, and drop-checkpoints refused the first characters of a sweep id that `runs ls` had printed."""
    if part in pending or not part:
        return part
    found = sorted(s for s in pending if s.startswith(part))
    if len(found) > 1:
        raise RunError(f"'{part}' starts {len(found)} sweep ids ({', '.join(found[:3])}"
                       f"{' and more' if len(found) > 3 else ''}); give more of the id")
    return found[0] if found else part


LOCKS_DIR = ".locks"
"""Folder inside a runs folder with one lock file per sweep that a fit is training now (hidden: run
listings skip it)."""


@contextlib.contextmanager
def sweep_lock(runs_dir: str | Path, sweep_id: str, config_hashes: Iterable[str] = ()) -> Iterator[None]:
    """Hold the sweep ``sweep_id`` and the configs it trains (``config_hashes``) for this process, or raise
    :class:`RunError` at once when another fit trains the same sweep or any of these configs now. Why: the
    same sweep command started twice (a second terminal, a forgotten tmux window), or two overlapping grids
    (``lr=0.1,0.01`` and ``lr=0.01,0.001``) started side by side, would train the shared configs twice into
    duplicate runs, and one sweep's twin would share its epoch checkpoints.

    An advisory ``flock`` on ``.locks/<sweep_id>.lock``, which lists the held config hashes; a new fit
    probes the other lock files for live holders that claim any of its configs. The operating system drops
    a lock when its process dies, so a killed fit never leaves a stale lock, and a rerun resumes as before.
    Of two overlapping fits started in the same instant, each writes its claim before it probes the other's,
    so at least one of them sees the overlap. On a file system without working ``flock`` (some network
    mounts), or a platform without ``fcntl``, the lock guards nothing; there the rule is to run a sweep once
    at a time.
    """
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return

    folder = Path(runs_dir) / LOCKS_DIR
    path = folder / f"{sweep_id}.lock"
    fd = _acquire_lock_file(fcntl, path, sweep_id)
    try:
        if fd is not None:
            wanted = sorted(set(config_hashes))
            claim = {**this_process(), "sweep_id": sweep_id, "configs": wanted}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(claim).encode(), 0)
            _refuse_overlap(fcntl, path, set(wanted))
        yield
    finally:
        if fd is not None:
            with contextlib.suppress(OSError):
                path.unlink()  # still holding the lock, so no one else holds this file
            os.close(fd)
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when no other sweep is training


def _holder(fd: int) -> dict:
    """What a lock file says about its holder (``sweep_lock``'s claim), or {} when unreadable."""
    try:
        info = json.loads(os.pread(fd, max(os.fstat(fd).st_size, 1), 0) or b"{}")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def _who(info: dict) -> str:
    return f"process {info['pid']} on {info.get('host')}" if info.get("pid") else "another process"


def _acquire_lock_file(fcntl: Any, path: Path, sweep_id: str) -> int | None:
    """Open and ``flock`` ``path`` (the file of a lock that is not held, even a killed fit's, is taken over);
    None where ``flock`` is not supported. Busy: a few short retries first, since another fit's probe
    (``_refuse_overlap``) holds a lock file for an instant."""
    for attempt in range(6):
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except FileNotFoundError:  # the first lock here, or a finishing fit removed the empty folder just now
            path.parent.mkdir(parents=True, exist_ok=True)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            info = _holder(fd)
            os.close(fd)
            if attempt < 5:
                time.sleep(0.02)
                continue
            raise RunError(f"sweep {sweep_id} is being trained now by {_who(info)}; wait for it to finish "
                           "(this command then finds every config done), or stop it and rerun this command "
                           "to resume") from None
        except OSError:  # no flock here (some network file systems): go on unguarded
            os.close(fd)
            return None
        # the holder before us may have unlinked the file between our open and our flock: lock the new one
        try:
            if os.path.samestat(os.fstat(fd), os.stat(path)):
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)
    raise RunError(f"could not take the lock {path} of sweep {sweep_id}; is another fit starting and "
                   "finishing this sweep over and over?")


def _refuse_overlap(fcntl: Any, own: Path, wanted: set[str]) -> None:
    """RunError when a live fit of another sweep claims any config in ``wanted``. A lock file whose lock is
    free is a killed fit's: its claim is void."""
    if not wanted:
        return
    for other in sorted(own.parent.glob("*.lock")):
        info = None if other == own else _live_holder(fcntl, other)
        if info is None:
            continue
        shared = wanted & {str(h) for h in info.get("configs") or []}
        if shared:
            raise RunError(
                f"{len(shared)} of this sweep's {len(wanted)} config(s) are being trained now by "
                f"sweep {info.get('sweep_id', other.stem)} ({_who(info)}); wait for it to finish "
                "(this command then skips them), or stop it")


def _live_holder(fcntl: Any, path: Path) -> dict | None:
    """What the live holder of the lock file ``path`` claims ({} when unreadable), or None when no process
    holds it (a killed fit's free lock, a file removed meanwhile, no ``flock`` here). A shared probe: it
    holds the file for an instant, which a fit taking the lock retries over."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # finished and removed meanwhile
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: a live fit
            return _holder(fd)
        except OSError:
            return None
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # never signal a process group (kill(-1, ...) addresses every process)
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(runs_dir: str | Path, config_hashes: set[str] | None = None) -> list[str]:
    """Remove folders of runs killed before they finished (status "running", owner process gone,
    same host) so a resumed sweep leaves the runs folder consistent. Returns the removed ids.

    Only folders with a featcache run.json are touched; a live owner or another host is left alone.
    """
    removed = []
    host = socket.gethostname()
    for d, info in _iter_run_dirs(Path(runs_dir)):
        if info is None or info.get("status") != "running" or "config_hash" not in info:
            continue
        if config_hashes is not None and info["config_hash"] not in config_hashes:
            continue
        owner = info.get("owner") or {}
        if owner.get("host") != host or live_owner(owner) is not None:
            continue
        shutil.rmtree(d)
        removed.append(d.name)
    return removed
