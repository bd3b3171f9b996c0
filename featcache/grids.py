"""Hyper-parameter grids: CLI ``--grid KEY=V1,V2``, TOML grid files, expansion and paper presets.

Values are typed by the head's ``schema`` (param -> "float" | "int" | "str" | "bool" | "layers" |
"class_weight", a trailing "?" allows None, "a|b" tries each type in order) so a typo such as
``C=abc`` or an unknown key fails at parse time with one sentence instead of deep inside training.
"""
from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from featcache.errors import ConfigError

_NONE = {"none", "null"}
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _coerce_one(key: str, raw: Any, typ: str) -> Any:
    """Coerce one value (a CLI string or a TOML value) to ``typ``; ValueError when impossible."""
    if typ == "float":
        if isinstance(raw, bool):
            raise ValueError
        return float(raw)
    if typ == "int":
        if isinstance(raw, str):
            try:
                return int(raw.strip())
            except ValueError:  # "2.0" or "1e3": a whole number, as a grid file's 2.0 is read (below)
                raw = float(raw)
        if isinstance(raw, bool) or (isinstance(raw, float) and not raw.is_integer()):
            raise ValueError
        return int(raw)
    if typ == "bool":
        if isinstance(raw, bool):
            return raw
        s = str(raw).strip().lower()
        if s in _TRUE:
            return True
        if s in _FALSE:
            return False
        raise ValueError
    if typ == "str":
        if not isinstance(raw, str) or not raw.strip():
            raise ValueError
        return raw.strip()
    if typ == "layers":
        return parse_layers(raw)
    if typ == "class_weight":
        return parse_class_weight(raw)
    raise ValueError(f"unknown schema type {typ!r} for {key}")


def parse_names(text: str, flag: str) -> list[str]:
    """``"a,b"`` -> ["a", "b"] for a comma-separated option; an empty item is a slip, refused as --grid
    refuses one (``--views orig,,hflip`` or ``--head logreg,`` silently dropped it), and so is an option
    given with nothing in it."""
    parts = [p.strip() for p in str(text).split(",")]
    if not any(parts):
        raise ConfigError(f"{flag} was given with nothing in it; name at least one, or leave the option out.")
    if not all(parts):
        raise ConfigError(f"{flag} '{text}' has an empty item; separate the names with single commas.")
    return parts


def parse_layers(raw: Any) -> tuple[int, ...]:
    """``"1024-512"`` / ``"1024,512"`` / ``[1024, 512]`` -> (1024, 512); every size a positive int.

    Raises ValueError on anything else, including empty parts.
    """
    if isinstance(raw, str):
        # Every separator must sit between two sizes: "1024,,512", "8-" or "-5" are slips, not a
        # layout (dropping the empty part would train a different network than the one asked for).
        # Each size is plain digits: "16 8" was read as 168 units and "1_6" as 16 (int() allows both).
        parts = [p.strip() for p in raw.replace(",", "-").split("-")]
        if not all(p.isascii() and p.isdigit() for p in parts):
            raise ValueError
        sizes = tuple(int(p) for p in parts)
    elif isinstance(raw, (list, tuple)):
        if any(isinstance(v, bool) or not isinstance(v, int) for v in raw):
            raise ValueError
        sizes = tuple(int(v) for v in raw)
    elif isinstance(raw, int) and not isinstance(raw, bool):
        sizes = (raw,)
    else:
        raise ValueError
    if not sizes or any(s <= 0 for s in sizes):
        raise ValueError
    return sizes


def parse_class_weight(raw: Any) -> str | dict[int, float]:
    """``"balanced"`` or ``"1:3"`` (weights of class 0, 1, ... in order) or ``{"0": 1, "1": 3}``."""
    if isinstance(raw, dict):
        out = {int(k): float(v) for k, v in raw.items()}
    elif isinstance(raw, str):
        s = raw.strip().lower()
        if s == "balanced":
            return "balanced"
        out = {i: float(v) for i, v in enumerate(s.split(":"))}
        if len(out) < 2:
            raise ValueError
    else:
        raise ValueError
    if any(v <= 0 for v in out.values()):
        raise ValueError
    return out


_POSITIVE = (lambda v: v > 0, "a finite number above 0")
_AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
_NON_NEGATIVE = (lambda v: v >= 0, "0 or more")
_RANGES: dict[str, tuple[Any, str]] = {
    "C": _POSITIVE, "lr": _POSITIVE, "tol": _POSITIVE, "intercept_scaling": _POSITIVE, "gamma": _POSITIVE,
    "epochs": _AT_LEAST_1, "batch_size": _AT_LEAST_1, "n_neighbors": _AT_LEAST_1, "max_iter": _AT_LEAST_1,
    "l2": _NON_NEGATIVE, "lr_decay": _NON_NEGATIVE, "patience": _NON_NEGATIVE,
    "reduce_lr_patience": _NON_NEGATIVE,
    "dropout": (lambda v: 0 <= v < 1, "in [0, 1)"), "l1_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
}
"""Value ranges by parameter name (the same meaning in every head that has it). Why here: C=0, lr=-1 or
epochs=0 would otherwise train nonsense or fail inside scikit-learn/Keras after the sweep started."""


def _check_range(key: str, value: Any) -> Any:
    rule = _RANGES.get(key)
    if rule is None or isinstance(value, (bool, str)) or not isinstance(value, (int, float)):
        return value
    ok, what = rule
    if not (math.isfinite(value) and ok(value)):
        raise ConfigError(f"grid value {value!r} for '{key}' is out of range; it must be {what}.")
    return value


def coerce(key: str, raw: Any, typ: str) -> Any:
    """Coerce ``raw`` to the schema type ``typ`` or raise ConfigError naming the key (also for a value
    outside the parameter's range, see ``_RANGES``)."""
    optional = typ.endswith("?")
    base = typ.rstrip("?")
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in _NONE):
        if optional or base == "class_weight":
            return None
        raise ConfigError(f"grid parameter '{key}' does not accept None; give a {base} value.")
    for alt in base.split("|"):
        try:
            value = _coerce_one(key, raw, alt)
        except (ValueError, TypeError):
            continue
        return _check_range(key, value)
    # "class_weight=1:0" said only "not a valid class_weight": the forms it takes are named
    hint = ("; give balanced, or one weight above 0 per class in class order (1:3, or "
            "{\"0\": 1, \"1\": 3})" if base == "class_weight" else
            "; give a whole number, e.g. 2 (2.0 reads as 2)" if base == "int" else "")
    raise ConfigError(f"grid value {raw!r} for '{key}' is not a valid {base.replace('|', ' or ')}{hint}.")


def _check_key(key: str, schema: dict) -> str:
    if key not in schema:
        raise ConfigError(f"unknown grid parameter '{key}'; valid ones are: {', '.join(sorted(schema))}.")
    return schema[key]


def _split_values(text: str, typ: str) -> list[str]:
    """Split ``V1,V2``; a class_weight ``{...}`` JSON value is taken whole."""
    text = text.strip()
    if text.startswith("[") and text.endswith("]"):  # JSON list, e.g. '["balanced", {"0": 1, "1": 3}]'
        try:
            values = json.loads(text)
        except json.JSONDecodeError:
            values = None
        if isinstance(values, list):
            return values
    if not text:
        return []  # "C=": the caller names the key
    values = [s.strip() for s in text.split(",")]
    if "" in values:  # "C=1,,2" or "C=1,": a typo would otherwise shrink the grid without a word
        raise ConfigError(f"--grid values '{text}' include an empty one; separate values with single commas.")
    return values


def parse_grid_args(items: list[str], schema: dict) -> dict[str, list]:
    """``["C=0.1,1", "class_weight=none,balanced,1:3"]`` -> {"C": [0.1, 1.0], "class_weight": [...]}.

    Repeating a key adds values (order kept, duplicates dropped). Unknown keys or values of the wrong
    type raise ConfigError naming the key and the valid keys.
    """
    grid: dict[str, list] = {}
    for item in items:
        key, sep, values = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--grid expects KEY=V1,V2 (for example C=0.1,1,10), got {item!r}.")
        typ = _check_key(key, schema)
        raw_values = _split_values(values, typ)
        if not raw_values:
            raise ConfigError(f"--grid {key}= has no values; write for example {key}=V1,V2.")
        bucket = grid.setdefault(key, [])
        for raw in raw_values:
            v = coerce(key, raw, typ)
            if v not in bucket:
                bucket.append(v)
    return grid


def _typed_grid(raw: dict, schema: dict | None, where: str) -> dict[str, list]:
    out: dict[str, list] = {}
    for key, values in raw.items():
        if not isinstance(values, list) or (schema and schema.get(key, "").rstrip("?") == "layers"
                                            and values and isinstance(values[0], int)):
            values = [values]  # a scalar, or a single layers list such as [1024, 512]
        if schema is not None:
            typ = _check_key(key, schema)
            values = [coerce(key, v, typ) for v in values]
        out[key] = values
    if not out:
        raise ConfigError(f"{where} has an empty grid; give at least one KEY = [values].")
    return out


def load_grid_file(path: str | Path, schema: dict | None = None) -> list[dict[str, list]]:
    """Read a TOML grid file: ``[grid]`` with KEY = [values], or several ``[[grid]]`` tables (their
    union). Values are checked against ``schema`` when given."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser as the tomli backport (a dependency there)
        import tomli as tomllib

    p = Path(path)
    try:
        data = tomllib.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"grid file {p} does not exist; check the --grid-file path.") from None
    except IsADirectoryError:
        raise ConfigError(f"grid file {p} is a folder; give --grid-file a .toml file.") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        other = _other_format(p)
        if other:  # "fix its syntax" sent a user with a valid grid.json hunting for a typo
            raise ConfigError(f"grid file {p} looks like {other}, but grid files are TOML: write a [grid] "
                              "table and one KEY = [values] line per key under it, e.g. lr = [0.001, 0.0001] "
                              "(mlp) or C = [0.1, 1.0] (logreg, svm).") from None
        raise ConfigError(f"grid file {p} is not valid TOML ({exc}); fix its syntax.") from None
    grids = data.get("grid")
    if isinstance(grids, dict):
        grids = [grids]
    if not isinstance(grids, list) or not grids or not all(isinstance(g, dict) for g in grids):
        raise ConfigError(f"grid file {p} needs a [grid] table or [[grid]] tables of KEY = [values].")
    return [_typed_grid(g, schema, f"grid file {p}") for g in grids]


def _other_format(path: Path) -> str | None:
    """"JSON" or "YAML" when a grid file that TOML cannot read is one of those (by its suffix, or JSON by
    its content), else None. Why: the README's other files are often JSON or YAML, and a grid written
    that way is no syntax slip but another format."""
    if path.suffix.lower() in (".yaml", ".yml"):
        return "YAML"
    if path.suffix.lower() == ".json":
        return "JSON"
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return "JSON"


def _freeze(v: Any) -> Any:
    if isinstance(v, dict):
        return tuple(sorted((str(k), _freeze(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    return v


def expand(grid: dict[str, list] | Sequence[dict[str, list]]) -> list[dict]:
    """Cartesian product of every sub-grid, in a deterministic order; duplicate configs dropped."""
    grids = [grid] if isinstance(grid, dict) else list(grid)
    seen: set = set()
    out: list[dict] = []
    for g in grids:
        keys = list(g)
        for combo in itertools.product(*(g[k] for k in keys)):
            cfg = dict(zip(keys, combo, strict=True))
            fz = _freeze(cfg)
            if fz not in seen:
                seen.add(fz)
                out.append(cfg)
    return out


def larger_max_iter(configs: Sequence[Any]) -> int:
    """Ten times the largest ``max_iter`` the configs ran with (where unset: scikit-learn's LogisticRegression
    default 100, the svm head's 5,000 for a linear kernel): the value an unconverged search's note
    suggests. Why computed: a fixed "e.g. --grid max_iter=1000" advised the value the 3-class default grid
    already runs with (and less than a linear SVM's default)."""
    unset = {"linear": 5000}  # by kernel: an rbf SVM's unset max_iter has no limit, so never stops at one
    ran = [c["max_iter"] if c.get("max_iter") is not None else unset.get(c.get("kernel"))
           for c in configs if isinstance(c, dict)]
    return 10 * max([v for v in ran if isinstance(v, int) and not isinstance(v, bool)] or [100])


def to_jsonable(params: dict) -> dict:
    """Params with tuples as lists and dict keys as strings (for run.json and config hashes)."""
    def conv(v: Any) -> Any:
        if isinstance(v, dict):
            return {str(k): conv(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [conv(x) for x in v]
        return v
    return {k: conv(v) for k, v in params.items()}


# --- presets ----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Preset:
    """A paper's setup: head, configs and the fit options it implies (backbone, balance, ...)."""

    name: str
    head: str
    task: str | None            # None: use --task (the paper ran binary and 3-class)
    description: str
    configs: list[dict] = field(default_factory=list)
    options: dict = field(default_factory=dict)


_MAO_LAYERS = [(1024, 512), (1024, 512, 256, 128, 64), (1024, 512, 256, 128, 64, 32, 16, 8)]
_MAO_BEL = [(64, 50, 0.01), (32, 50, 0.01), (64, 50, 0.1), (64, 50, 0.001), (64, 50, 0.0001),
            (64, 100, 0.01), (64, 200, 0.01), (1000, 200, 0.01), (1000, 200, 0.001), (1000, 400, 0.01),
            (1000, 400, 0.001)]

PRESETS: dict[str, Preset] = {
    "mao2018": Preset(
        name="mao2018", head="mlp", task=None,
        description="Mao & Kim (paper 000): InceptionV3 GAP features, dense heads of 3/6/9 layers, Adam, "
                    "33 (batch, epochs, lr) configs, undersampling to balance; binary or 3class.",
        configs=[{"layers": layers, "batch_size": b, "epochs": e, "lr": lr, "optimizer": "adam"}
                 for layers in _MAO_LAYERS for (b, e, lr) in _MAO_BEL],
        options={"backbone": "inceptionv3", "pooling": "avg", "image_size": 300,
                 "balance": "undersample-subtypes",
                 "tasks": ["binary", "3class"]},
    ),
    "laban2021": Preset(
        name="laban2021", head="logreg", task="binary",
        description="Laban et al. (paper 003): VGG16 features to the last pool (7x7x512 flatten) and "
                    "LogisticRegression tuned with GridSearchCV, a NORMAL image weighted as 3 pneumonia "
                    "images.",
        # "treating an instance of normal as 3 instance of pneumonia": NORMAL is class 0 of the binary
        # task. (The paper's array "[1,3]" reads the other way in LabelBinarizer's sorted order; its
        # prose and its reason, the 1:3 imbalance against NORMAL, say normal gets the weight.)
        configs=expand({"C": [0.001, 0.01, 0.1, 1.0, 10.0], "class_weight": [{0: 3.0, 1: 1.0}]}),
        options={"backbone": "vgg16", "pooling": "flatten", "image_size": 224, "balance": "none"},
    ),
    "vazquez2021": Preset(
        name="vazquez2021", head="mlp", task="3class",
        description="Vazquez (paper 002): ResNet50 2048-d features, dense head with dropout 0.2, sigmoid "
                    "hidden layers, softmax output, SGD lr 1e-3, 60 epochs, best-validation checkpoint.",
        configs=[{"layers": (1024, 512), "dropout": 0.2, "activation": "sigmoid",
                  "output_activation": "softmax", "optimizer": "sgd", "lr": 0.001, "epochs": 60,
                  "batch_size": 32, "checkpoint": True}],
        # 3-class only: the paper's binary result (0.923) is its fine-tuned ResNet50's, not a head's on
        # frozen features (this preset's method is its second stage, the 3-class one)
        options={"backbone": "resnet50", "pooling": "avg", "image_size": 224, "balance": "oversample"},
    ),
    "aucouturier2020": Preset(
        name="aucouturier2020", head="mlp", task="3class",
        description="Aucouturier & Baloche (paper 004): frozen InceptionV3 flatten at 224 px, dense 256 -> "
                    "128 with dropout, Adam lr 1e-4 with decay 1e-5, batch 64, early stopping.",
        configs=[{"layers": (256, 128), "dropout": 0.5, "activation": "relu", "optimizer": "adam",
                  "lr": 0.0001, "lr_decay": 1e-5, "batch_size": 64, "epochs": 100, "patience": 3,
                  "checkpoint": True}],
        # 3-class only: the paper's binary result (about 82%) is its own CNN_1's; InceptionV3 ran 3-class
        options={"backbone": "inceptionv3", "pooling": "flatten", "image_size": 224, "balance": "none"},
    ),
}


def get_preset(name: str) -> Preset:
    """The preset called ``name`` or ConfigError listing the valid names."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"unknown preset '{name}'; choose one of: {', '.join(sorted(PRESETS))}.") from None
