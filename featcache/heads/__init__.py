"""Classifier heads trained on cached features; one module per head family.

``get_head(name)`` returns a head object (CVHead or MLPHead, see docs/ARCHITECTURE.md);
``load_fitted(name, directory)`` loads a head that featcache saved (sha256 checked by the caller).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from featcache.errors import ConfigError

HEAD_NAMES = ("logreg", "mlp", "svm", "knn")


def _head_class(name: str) -> Any:
    if name == "logreg":
        from featcache.heads.logreg import LogRegHead
        return LogRegHead
    if name == "mlp":
        from featcache.heads.mlp import MLPHead
        return MLPHead
    if name == "svm":
        from featcache.heads.svm import SVMHead
        return SVMHead
    if name == "knn":
        from featcache.heads.knn import KNNHead
        return KNNHead
    raise ConfigError(f"unknown head '{name}'; choose one of: {', '.join(HEAD_NAMES)}.")


def get_head(name: str) -> Any:
    """A head instance by name (ConfigError lists the valid names)."""
    return _head_class(str(name).strip().lower())()


def load_fitted(name: str, directory: str | Path) -> Any:
    """Load the FittedHead that ``save`` wrote into ``directory`` for head ``name``."""
    if str(name).strip().lower() == "mlp":
        from featcache.heads.mlp import KerasHead
        return KerasHead.load(Path(directory))
    _head_class(name)
    from featcache.heads.base import SklearnHead
    return SklearnHead.load(Path(directory))


__all__ = ["HEAD_NAMES", "get_head", "load_fitted"]
