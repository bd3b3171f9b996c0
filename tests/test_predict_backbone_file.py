"""`predict --backbone-file PATH`: how a given file is matched to the run's backbone, and what is said when
it is not the run's. The cache records are built here (no backbone, no Keras): _backbone_config only reads
them and hashes the files given."""

from __future__ import annotations

from pathlib import Path

import pytest

from featcache.errors import ConfigError, RunError
from featcache.hashing import sha256_file
from featcache.predict import _backbone_config


def _files(tmp_path: Path) -> tuple[Path, Path]:
    right, wrong = tmp_path / "mine.weights.h5", tmp_path / "other.weights.h5"
    right.write_bytes(b"the run's weights")
    wrong.write_bytes(b"another network's weights")
    return right, wrong


def _file_cache(weights_file: Path, weights: str = "file") -> dict:
    return {"name": "mobilenet-0.75", "config": {"backbone": "mobilenet-0.75", "weights": weights,
                                                 "weights_file_sha256": sha256_file(weights_file),
                                                 "pooling": "avg", "image_size": 32}}


def test_a_backbone_file_that_does_not_exist_is_named(tmp_path: Path) -> None:
    """A mistyped --backbone-file got the message for no file at all ("pass that file with
    --backbone-file PATH"); for a run on ImageNet or random weights it was ignored without a word."""
    right, _ = _files(tmp_path)
    gone = tmp_path / "typo.weights.h5"
    for cache in (_file_cache(right), {"name": "mobilenet-0.75", "config": {"backbone": "mobilenet-0.75",
                                                                           "weights": "imagenet"}}):
        with pytest.raises(ConfigError, match=f"--backbone-file {gone} does not exist"):
            _backbone_config(cache, [gone])
    with pytest.raises(ConfigError, match="does not exist"):  # beside the right file too: a usage error
        _backbone_config(_file_cache(right), [right, gone])


def test_a_wrong_backbone_file_is_told_apart_from_none(tmp_path: Path) -> None:
    """A file of another digest got the same message as no file: now both digests are named (12 hex)."""
    right, wrong = _files(tmp_path)
    want, got = sha256_file(right)[:12], sha256_file(wrong)[:12]
    with pytest.raises(RunError) as info:
        _backbone_config(_file_cache(right), [wrong])
    text = str(info.value)
    assert f"built from a weights file (sha256 {want}...)" in text
    assert f"(given: {wrong} has sha256 {got}..., not the run's)." in text
    with pytest.raises(RunError) as info:  # none given: the sentence as before
        _backbone_config(_file_cache(right))
    assert str(info.value).endswith("pass that file with --backbone-file PATH.")
    with pytest.raises(RunError, match=f"built from a saved model .*{got}..., not the run's"):
        _backbone_config(_file_cache(right, "saved"), [wrong])
    config = _backbone_config(_file_cache(right), [wrong, right])  # the right one among others is used
    assert config.weights == str(right)


def test_a_saved_model_with_weights_names_which_given_file_is_which(tmp_path: Path) -> None:
    model, wrong = _files(tmp_path)
    weights = tmp_path / "its.weights.h5"
    weights.write_bytes(b"the saved model's own weights")
    cache = {"name": "saved-net", "config": {"backbone": "saved-net", "weights": "file",
                                             "model_file_sha256": sha256_file(model),
                                             "weights_file_sha256": sha256_file(weights)}}
    with pytest.raises(RunError) as info:
        _backbone_config(cache, [model, wrong])
    assert (f"(given: {model} is the run's saved model; {wrong} has sha256 {sha256_file(wrong)[:12]}..., not "
            "the run's).") in str(info.value)
    assert _backbone_config(cache, [weights, model]).weights == str(weights)
