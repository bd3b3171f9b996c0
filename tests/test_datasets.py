"""Dataset discovery, Kermany name parsing, manifests, labels, inspect and `featcache data inspect`."""
from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from badcorpus import DUPLICATE_PAIR, NON_UTF8_NAME, make_bad_corpus, outcome_keyword
from conftest import make_kermany_tree, write_xray
from featcache.cli.app import run

from featcache.datasets import discover, inspect, parse_kermany_name, task_labels
from featcache.errors import ConfigError, DataError

# reasons that discovery itself gives (the rest of the corpus' skips happen at decode time)
DISCOVERY_KEYWORDS = ("hidden", "extension", "symlink loop", "broken symlink", "not a regular file",
                      "unreadable", "directory named like an image")


@pytest.mark.parametrize(("name", "expected"), [
    ("person447_virus_921_1.jpeg", ("virus", "person447")),
    ("person1000_bacteria_2931.jpeg", ("bacteria", "person1000")),
    ("IM-0115-0001.jpeg", ("normal", "IM-0115")),
    ("NORMAL2-IM-1427-0001.jpeg", ("normal", "NORMAL2-IM-1427")),
    ("IM-0439-0001-0001.jpeg", ("normal", "IM-0439")),
    ("person1_bacteria_1", ("bacteria", "person1")),
    ("cat.001.jpg", (None, None)),
    ("person12_bacteria.jpeg", (None, None)),
    ("IM-0115.jpeg", (None, None)),
    ("PERSON447_VIRUS_921.jpeg", ("virus", "person447")),  # the same patient whatever the file's case
    ("normal2-im-1427-0001.jpeg", ("normal", "NORMAL2-IM-1427")),
    # Mendeley Data v3 (ZhangLabData) names: subtype word, patient number, image number
    ("NORMAL-1003233-0001.jpeg", ("normal", "1003233")),
    ("BACTERIA-1008087-0001.jpeg", ("bacteria", "1008087")),
    ("VIRUS-1047596-0002.jpeg", ("virus", "1047596")),
    ("virus-11419-0001.JPEG", ("virus", "11419")),
    ("BACTERIA-1008087.jpeg", (None, None)),
    ("FUNGUS-1008087-0001.jpeg", (None, None)),
    # a file manager's copy is the same patient (left whole, it was a patient of its own)
    ("person1_virus_1 (1).jpeg", ("virus", "person1")),
    ("person1_virus_2 copy.jpeg", ("virus", "person1")),
    ("IM-0115-0001 copy 2.jpeg", ("normal", "IM-0115")),
    ("NORMAL2-IM-1427-0001 - Copy (2).jpeg", ("normal", "NORMAL2-IM-1427")),
    ("person1_virus_1 (1) (1).jpeg", ("virus", "person1")),
    # Firefox's second download of a file, and macOS Finder's "keep both" copy: no subtype and a patient of
    # their own before (3class refused them, and a split could put them apart from their patient)
    ("person1_virus_1(1).jpeg", ("virus", "person1")),
    ("NORMAL2-IM-1427-0001(2).jpeg", ("normal", "NORMAL2-IM-1427")),
    ("person1_bacteria_3 2.jpeg", ("bacteria", "person1")),
    ("IM-0115-0001 3.jpeg", ("normal", "IM-0115")),
    ("person1_virus_1copy.jpeg", (None, None)),
])
def test_parse_kermany_name(name, expected):
    assert parse_kermany_name(name) == expected


def test_discover_kermany_tree(kermany_tree):
    ds = discover(kermany_tree)
    assert ds.layout == "kermany"
    assert ds.root == kermany_tree.resolve()
    assert len(ds.records) == 24 and ds.skipped == []
    assert [r.relpath for r in ds.records] == sorted(r.relpath for r in ds.records)
    assert Counter(r.split for r in ds.records) == {"train": 12, "test": 12}
    assert Counter(r.subtype for r in ds.records) == {"normal": 12, "bacteria": 6, "virus": 6}
    rec = next(r for r in ds.records if r.relpath == "train/PNEUMONIA/person101_virus_8.jpeg")
    assert (rec.split, rec.label, rec.subtype, rec.group) == ("train", "PNEUMONIA", "virus", "person101")
    assert rec.path.is_absolute() and rec.path.is_file()
    normal = next(r for r in ds.records if r.relpath == "test/NORMAL/IM-1100-0001.jpeg")
    assert (normal.subtype, normal.group) == ("normal", "IM-1100")
    assert discover(kermany_tree) == ds  # deterministic


def test_root_is_one_split_folder(kermany_tree):
    ds = discover(kermany_tree / "test")
    assert {r.split for r in ds.records} == {"test"}
    assert len(ds.records) == 12 and ds.layout == "kermany"


def test_generic_folders_without_splits(tmp_path):
    for i, cls in enumerate(["cats", "dogs", "dogs"]):
        write_xray(tmp_path / "pets" / cls / f"img{i}.png", seed=i)
    write_xray(tmp_path / "pets" / "stray.png", seed=9)  # not in a class folder
    ds = discover(tmp_path / "pets")
    assert ds.layout == "folders"
    assert [(r.relpath, r.split, r.label, r.subtype, r.group) for r in ds.records] == [
        ("cats/img0.png", None, "cats", None, "img0"),
        ("dogs/img1.png", None, "dogs", None, "img1"),
        ("dogs/img2.png", None, "dogs", None, "img2"),
    ]
    assert ds.skipped == [("stray.png", "not inside a class folder")]
    y, classes = task_labels(ds.records, "folders")
    assert classes == ["cats", "dogs"] and y.tolist() == [0, 1, 1]


def test_generic_folders_with_split_folders(tmp_path):
    root = tmp_path / "d"
    write_xray(root / "Train" / "a" / "1.jpg", 1)
    write_xray(root / "Validation" / "b" / "2.jpg", 2)
    write_xray(root / "TEST" / "a" / "sub" / "3.jpg", 3)
    write_xray(root / "extra" / "a" / "4.jpg", 4)
    write_xray(root / "train" / "5.jpg", 5)
    ds = discover(root)
    assert [(r.relpath, r.split, r.label) for r in ds.records] == [
        ("TEST/a/sub/3.jpg", "test", "a"),
        ("Train/a/1.jpg", "train", "a"),
        ("Validation/b/2.jpg", "val", "b"),
    ]
    assert ds.skipped == [("extra/a/4.jpg", "outside the train/val/test folders"),
                          ("train/5.jpg", "not inside a class folder")]
    assert [r.relpath for r in ds.select(["validation"])] == ["Validation/b/2.jpg"]
    assert len(ds.select(None)) == 3
    with pytest.raises(DataError, match="no split 'nope'"):
        ds.select(["nope"])


def test_select_on_unsplit_dataset_is_an_error(tmp_path):
    write_xray(tmp_path / "a" / "1.png", 1)
    with pytest.raises(DataError, match="no split 'train'"):
        discover(tmp_path).select(["train"])


def _write_manifest(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_manifest_with_split_and_group(tmp_path):
    for i in range(3):
        write_xray(tmp_path / "imgs" / f"x{i}.png", i)
    csv_path = _write_manifest(tmp_path / "m.csv", "Path,Label,Split,Group\n"
                               "imgs/x0.png,sick,Train,p1\nimgs/x1.png,well,validation,p1\n"
                               "\n"
                               "imgs/x2.png,well,test,\n")
    ds = discover(csv_path)  # a .csv root is a manifest whose folder is the root
    assert ds.layout == "manifest" and ds.root == tmp_path.resolve()
    assert [(r.relpath, r.split, r.label, r.group) for r in ds.records] == [
        ("imgs/x0.png", "train", "sick", "p1"),
        ("imgs/x1.png", "val", "well", "p1"),
        ("imgs/x2.png", "test", "well", "x2"),
    ]
    assert discover(tmp_path, manifest=csv_path) == ds


def test_a_manifest_labelled_by_subtype_gives_the_3class_subtypes(tmp_path):
    """Labels normal/bacteria/virus with file names of the user's own: 3-class needs the subtypes, which
    came from Kermany file names only ("64 image(s) have no subtype")."""
    for i in range(3):
        write_xray(tmp_path / "imgs" / f"scan{i}.png", i)
    csv_path = _write_manifest(tmp_path / "m.csv", "path,label\nimgs/scan0.png,normal\n"
                               "imgs/scan1.png,Bacteria\nimgs/scan2.png,virus\n")
    assert [r.subtype for r in discover(csv_path).records] == ["normal", "bacteria", "virus"]


def test_manifest_without_split_keeps_kermany_parsing(tmp_path):
    write_xray(tmp_path / "a" / "person9_virus_20.jpeg", 1)
    write_xray(tmp_path / "a" / "IM-0001-0001.jpeg", 2)
    (tmp_path / "a" / "notes.txt").write_text("x")
    csv_path = _write_manifest(tmp_path / "a" / "list.csv", "path,label\nperson9_virus_20.jpeg,PNEUMONIA\n"
                               "IM-0001-0001.jpeg,NORMAL\nnotes.txt,NORMAL\n")
    ds = discover(csv_path)
    got = {r.relpath: (r.split, r.subtype, r.group) for r in ds.records}
    assert got == {"person9_virus_20.jpeg": (None, "virus", "person9"),
                   "IM-0001-0001.jpeg": (None, "normal", "IM-0001")}
    assert ds.skipped == [("notes.txt", "not an image file extension (.txt)")]
    y, classes = task_labels(ds.records, "3class")
    assert classes == ["normal", "bacteria", "virus"] and sorted(y.tolist()) == [0, 2]


@pytest.mark.parametrize(("content", "match"), [
    ("file,label\nx.png,a\n", "lacks the column"),
    ("path,split\nx.png,train\n", "lacks the column.*label"),
    ("path,label\nx.png,\n", "line 2 has an empty path or label"),
    ("path,label\nmissing.png,a\n", "1 missing file.*relative paths are read from the manifest's folder"),
    # an absolute path is read as it is: the message said paths must be relative
    ("path,label\n/nonexistent-dir/gone.png,a\n", "1 missing file.*'/nonexistent-dir/gone.png'; no such"),
    ("path,label\nx.png,a\nx.png,b\n", "lists 'x.png' twice"),
    ("", "is empty"),
    ("path,label\n", "lists no images; add one row per image"),
    # a typo put those rows in no split fit uses: left out of training and test without a word
    ("path,label,split\nx.png,a,tset\n", "line 2 has split 'tset'; use train, val"),
    # spreadsheet and editing slips: each named instead of "lacks the column" / "empty path" / "missing"
    ("path;label\nx.png;a\n", "lacks the column.*'path;label' looks semicolon-separated: save it with comma"),
    ("path\tlabel\nx.png\ta\n", "looks tab-separated"),
    ('path,label\n"x.png,a\nx.png,b\n', "line 2 opens a quote .* never closed"),
    ("path,label\nx.png,a\npath,label\n", "line 3 repeats the header row"),
    # a comma in a path shifted the row: 'a,b.png,NORMAL' read as path 'a', label 'b.png', NORMAL dropped
    ("path,label\nx.png,a\na,b.png,NORMAL\n", "line 3 has 3 values but its header names 2 columns "
     r"\(path,label\); quote a path or label that holds a comma"),
])
def test_bad_manifests(tmp_path, content, match):
    write_xray(tmp_path / "x.png", 1)
    csv_path = _write_manifest(tmp_path / "m.csv", content)
    with pytest.raises(DataError, match=match) as err:
        discover(csv_path)
    assert "\n" not in str(err.value)


def test_a_manifest_row_with_trailing_empty_cells_is_read(tmp_path):
    """Spreadsheets add empty cells at a row's end ("x.png,a,,"): harmless, so not refused as extra values."""
    write_xray(tmp_path / "x.png", 1)
    write_xray(tmp_path / "y.png", 2)
    ds = discover(_write_manifest(tmp_path / "m.csv", "path,label\nx.png,a,,\ny.png,b,\n"))
    assert [(r.relpath, r.label) for r in ds.records] == [("x.png", "a"), ("y.png", "b")]


def test_manifest_with_windows_backslashes_says_so(tmp_path):
    write_xray(tmp_path / "sub" / "x.png", 1)
    csv_path = _write_manifest(tmp_path / "m.csv", "path,label\nsub\\x.png,a\n")
    with pytest.raises(DataError, match=r"1 missing file.*1 of them name an existing file once their "
                                        r"backslashes are slashes, e\.g\. 'sub\\x\.png': write paths with /"):
        discover(csv_path)


def test_manifest_not_utf8_and_missing(tmp_path):
    (tmp_path / "m.csv").write_bytes(b"path,label\n\xff\xfe.png,a\n")
    with pytest.raises(DataError, match="not UTF-8"):
        discover(tmp_path / "m.csv")
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path, manifest=tmp_path / "nope.csv")


def test_folder_above_a_dataset_is_refused(kermany_tree, tmp_path):
    # Kaggle's archive unpacks to chest_xray/chest_xray/{train,test}: the outer folder is no dataset
    outer = tmp_path / "download"
    shutil.copytree(kermany_tree, outer / "chest_xray")
    with pytest.raises(DataError, match=r"folder above a dataset: its class folder 'chest_xray' holds "
                       r"test/, train/; pass the dataset folder itself: '.*download/chest_xray'"):
        discover(outer)
    # one split folder with its class folders, one level down, the same
    shutil.copytree(kermany_tree / "train", tmp_path / "up" / "mytrain")
    with pytest.raises(DataError, match=r"'mytrain' holds NORMAL/, PNEUMONIA/"):
        discover(tmp_path / "up")
    assert len(discover(outer / "chest_xray").records) == len(discover(kermany_tree).records)
    # classes first, then splits (NORMAL/train/...): stepping into 'NORMAL' as advised then failed
    for split in ("train", "test"):
        for label in ("NORMAL", "PNEUMONIA"):
            shutil.copytree(kermany_tree / split / label, tmp_path / "cf" / label / split)
    with pytest.raises(DataError, match=r"holds its splits inside its class folders \(NORMAL, PNEUMONIA hold "
                       r"test/ ...\); featcache reads the split first, then the class: 'test/NORMAL/', not "
                       r"'NORMAL/test/'.* CSV manifest"):
        discover(tmp_path / "cf")
    # deeper folders inside a class folder stay allowed when they are not splits or Kermany classes
    write_xray(tmp_path / "pets" / "dogs" / "2024" / "a.png", seed=1)
    write_xray(tmp_path / "pets" / "cats" / "b.png", seed=2)
    assert [r.label for r in discover(tmp_path / "pets").records] == ["cats", "dogs"]


def test_missing_empty_and_useless_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        discover(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no images found"):
        discover(tmp_path / "empty")
    (tmp_path / "junk" / "a").mkdir(parents=True)
    (tmp_path / "junk" / "a" / "README.txt").write_text("hi")
    with pytest.raises(DataError, match=r"1 files skipped, e\.g\. 'a/README.txt'"):
        discover(tmp_path / "junk")
    # one class's folder passed instead of the dataset: the error names the folder above it
    for i in range(2):
        write_xray(tmp_path / "ds" / "train" / "NORMAL" / f"n{i}.jpeg", seed=i)
    (tmp_path / "ds" / "train" / "NORMAL" / "Thumbs.db").write_bytes(b"x")
    with pytest.raises(DataError) as exc:
        discover(tmp_path / "ds" / "train" / "NORMAL")
    assert "2 image(s)" in str(exc.value) and str(exc.value).endswith(f"'{tmp_path / 'ds' / 'train'}'.")
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(DataError, match="is not a folder"):
        discover(tmp_path / "file.png")


def test_a_folder_holding_a_manifest_beside_its_images_names_the_manifest(tmp_path):
    """A manifest beside its images, with the folder passed instead of the CSV: images/ was read as the one
    class 'images' without a word (fit refused it only after the extraction), and loose images got the
    advice to pass the folder above, which makes the folder itself the one class."""
    sub = tmp_path / "xrays"
    for i in range(4):
        write_xray(sub / "images" / f"x{i}.png", seed=i)
    rows = "".join(f"images/x{i}.png,{'sick' if i % 2 else 'well'}\n" for i in range(4))
    csv_path = _write_manifest(sub / "labels.csv", "\ufeffPath,Label\r\n" + rows.replace("\n", "\r\n"))
    with pytest.raises(DataError, match=r"holds the manifest 'labels.csv' .* one class, 'images'; .* pass "
                       r"the CSV in place of the folder: '.*xrays/labels.csv'"):
        discover(sub)
    assert sorted(r.label for r in discover(csv_path).records) == ["sick", "sick", "well", "well"]
    loose = tmp_path / "loose"
    for i in range(2):
        write_xray(loose / f"x{i}.png", seed=i)
    _write_manifest(loose / "meta.csv", "patient,age\np1,3\n")  # not a manifest: the usual advice stays
    with pytest.raises(DataError, match="pass the folder above it"):
        discover(loose)
    _write_manifest(loose / "labels.csv", "path,label\nx0.png,a\nx1.png,b\n")
    with pytest.raises(DataError, match=r"holds the manifest 'labels.csv' .* no image in it lies in a class "
                       r"folder; .*'.*loose/labels.csv'"):
        discover(loose)
    # two classes by folder: a CSV beside them changes nothing
    write_xray(sub / "more" / "y.png", seed=9)
    assert {r.label for r in discover(sub).records} == {"images", "more"}


def test_symlinked_file_outside_root_and_hidden_folder(tmp_path):
    outside = write_xray(tmp_path / "elsewhere" / "real.jpeg", 3)
    root = tmp_path / "d"
    write_xray(root / "A" / "1.jpeg", 1)
    os.symlink(outside, root / "A" / "linked.jpeg")
    write_xray(root / ".cache" / "A" / "2.jpeg", 2)
    ds = discover(root)
    assert [r.relpath for r in ds.records] == ["A/1.jpeg", "A/linked.jpeg"]
    assert ds.records[1].path.read_bytes() == outside.read_bytes()
    assert ds.skipped == [(".cache/", "hidden folder")]


def test_bad_corpus_discovery(tmp_path):
    expected = make_bad_corpus(tmp_path / "bad")
    ds = discover(tmp_path / "bad")
    skipped = dict(ds.skipped)
    found = {r.relpath for r in ds.records}
    assert set(skipped) | found == set(expected), "every corpus file is either a record or a skip"
    for rel, outcome in expected.items():
        kind, keyword = outcome_keyword(outcome)
        if kind == "ok":
            assert rel in found, rel
        elif any(k in keyword for k in DISCOVERY_KEYWORDS):
            assert rel in skipped and keyword in skipped[rel].lower(), (rel, skipped.get(rel))
        else:  # decode-time problems are not discovery's business
            assert rel in found, rel
    odd = "train/NORMAL/" + os.fsdecode(NON_UTF8_NAME)
    rec = next(r for r in ds.records if r.relpath == odd)
    assert os.fsencode(rec.path).endswith(NON_UTF8_NAME) and rec.path.is_file()
    info = inspect(ds)
    assert sorted(DUPLICATE_PAIR) in info["duplicates"]
    json.dumps(info)  # surrogate-escaped names must still serialise
    # inspect decodes each unique file: what extract would skip is listed with its reason, not counted
    inspected = {s["path"]: s["reason"] for s in info["skipped"]}
    for rel, outcome in expected.items():
        kind, keyword = outcome_keyword(outcome)
        if kind == "ok":
            assert rel not in inspected, (rel, inspected.get(rel))
        else:
            assert rel in inspected and keyword in inspected[rel].lower(), (rel, inspected.get(rel))
    assert info["n_images"] == sum(outcome == "ok" for outcome in expected.values())
    assert info["decode_checked"] is True
    hashed_only = inspect(ds, decode=False)  # the old, hash-only pass counts undecodable files as images
    assert hashed_only["n_images"] > info["n_images"] and hashed_only["decode_checked"] is False


def test_task_labels(tmp_path):
    ds_records = discover(make_kermany_tree(tmp_path / "k", n_normal=2, n_pneu=4, splits=("train",))).records
    y, classes = task_labels(ds_records, "binary")
    assert classes == ["NORMAL", "PNEUMONIA"]
    assert y.dtype == np.int64
    assert y.tolist() == [0 if r.label == "NORMAL" else 1 for r in ds_records]
    y3, classes3 = task_labels(ds_records, "3class")
    assert classes3 == ["normal", "bacteria", "virus"]
    assert [classes3[i] for i in y3] == [r.subtype for r in ds_records]
    with pytest.raises(ConfigError, match="unknown task 'five'"):
        task_labels(ds_records, "five")
    with pytest.raises(DataError, match="all are NORMAL"):
        task_labels([r for r in ds_records if r.label == "NORMAL"], "binary")
    with pytest.raises(DataError, match="no images"):
        task_labels([], "folders")
    # a manifest's NORMAL / Normal: one class to binary, two to --task folders (an audit): refused
    from dataclasses import replace

    first = next(i for i, r in enumerate(ds_records) if r.label == "NORMAL")
    mixed = [replace(r, label="Normal") if i == first else r for i, r in enumerate(ds_records)]
    assert task_labels(mixed, "binary")[0].tolist() == y.tolist()
    with pytest.raises(DataError, match="the labels 'NORMAL', 'Normal' differ only in case"):
        task_labels(mixed, "folders")


def test_mendeley_v3_names_give_subtypes_and_patients(tmp_path):
    """The v3 archive (CellData/chest_xray) names files NORMAL-/BACTERIA-/VIRUS-<patient>-<n>: before they
    were parsed, every image was its own patient (a patient's images could sit on both sides of a fold)
    and the 3class task refused the whole tree for want of subtypes."""
    names = {"NORMAL": ["NORMAL-28501-0001.jpeg", "NORMAL-28501-0002.jpeg"],
             "PNEUMONIA": ["BACTERIA-7422-0001.jpeg", "BACTERIA-7422-0002.jpeg", "VIRUS-40699-0001.jpeg"]}
    for i, (label, files) in enumerate(names.items()):
        for j, name in enumerate(files):
            write_xray(tmp_path / "train" / label / name, 10 * i + j)
    records = discover(tmp_path).records
    assert {r.path.name: (r.subtype, r.group, r.has_patient_id) for r in records} == {
        "NORMAL-28501-0001.jpeg": ("normal", "28501", True),
        "NORMAL-28501-0002.jpeg": ("normal", "28501", True),
        "BACTERIA-7422-0001.jpeg": ("bacteria", "7422", True),
        "BACTERIA-7422-0002.jpeg": ("bacteria", "7422", True),
        "VIRUS-40699-0001.jpeg": ("virus", "40699", True)}
    y3, classes3 = task_labels(records, "3class")
    assert [classes3[i] for i in y3] == [r.subtype for r in records]


def test_task_3class_needs_subtypes(tmp_path):
    write_xray(tmp_path / "PNEUMONIA" / "scan7.jpeg", 1)
    write_xray(tmp_path / "NORMAL" / "IM-0001-0001.jpeg", 2)
    with pytest.raises(DataError, match="1 image.* no subtype, e.g. 'PNEUMONIA/scan7.jpeg'"):
        task_labels(discover(tmp_path).records, "3class")


def test_inspect_duplicates_and_leaks(kermany_tree):
    # the same bytes in train and test (a cross-split duplicate) and one patient in both splits
    shutil.copy(kermany_tree / "train/NORMAL/IM-1000-0001.jpeg",
                kermany_tree / "test/NORMAL/IM-1999-0001.jpeg")
    write_xray(kermany_tree / "test/PNEUMONIA/person100_bacteria_900.jpeg", seed=77)
    events = []
    info = inspect(discover(kermany_tree), progress=events.append)
    assert info["layout"] == "kermany" and info["n_images"] == 26 and info["n_unique"] == 25
    assert info["counts"]["train"]["PNEUMONIA"] == {"bacteria": 3, "virus": 3}
    assert info["counts"]["test"]["NORMAL"] == {"normal": 7}
    assert info["duplicates"] == [["test/NORMAL/IM-1999-0001.jpeg", "train/NORMAL/IM-1000-0001.jpeg"]]
    assert info["cross_split_duplicates"] == info["duplicates"]
    assert info["cross_split_patients"] == {"person100": ["test", "train"]}
    assert info["n_patients"] == 25  # 24 + IM-1999; person100 counted once
    assert info["patients_per_split"] == {"test": 14, "train": 12}
    hashed = [e for e in events if e.phase == "hash"]
    assert hashed[-1].done == hashed[-1].total == 26
    assert events[-1].phase == "decode" and events[-1].done == events[-1].total == 25  # once per unique file
    assert info["conflicting_duplicates"] == []  # the duplicate is NORMAL on both sides
    assert info["cross_split_duplicates_with_test"] == 1


def test_inspect_calls_only_overlaps_with_test_a_leak(kermany_tree, capsys):
    """fit pools train and val: a patient in both (as in Kaggle's archive) leaks nothing, yet inspect
    printed it in red among "patients in several splits"."""
    write_xray(kermany_tree / "val/PNEUMONIA/person100_bacteria_901.jpeg", seed=78)  # person100 is in train
    assert run(["data", "inspect", str(kermany_tree)]) == 0
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "patients in several splits 1 (train/val only: fit pools those, no leak)" in out
    write_xray(kermany_tree / "test/PNEUMONIA/person100_bacteria_902.jpeg", seed=79)
    assert run(["data", "inspect", str(kermany_tree)]) == 0
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "patients in several splits 1 (1 with test)" in out


def test_a_file_name_without_patient_id_is_not_a_patient_across_splits(tmp_path):
    """Without patient ids the audit counts each image as its own patient: scan1.png in train/ and in
    test/ is two images, not one child on both sides (the report said "Leak" beside "No patient ids")."""
    for split in ("train", "test"):
        for cls in ("cats", "dogs"):
            write_xray(tmp_path / split / cls / "scan1.png", seed=len(split) + len(cls))
    ds = discover(tmp_path)
    assert not any(r.has_patient_id for r in ds.records)
    info = inspect(ds)
    assert info["cross_split_patients"] == {} and info["n_patients"] == 4


def test_inspect_flags_identical_images_with_different_labels(kermany_tree, capsys):
    """The same bytes filed as NORMAL and as PNEUMONIA: one label is wrong; inspect and its table say so."""
    shutil.copy(kermany_tree / "train/NORMAL/IM-1000-0001.jpeg",
                kermany_tree / "train/PNEUMONIA/person999_virus_1.jpeg")
    info = inspect(discover(kermany_tree))
    assert info["conflicting_duplicates"] == [["train/NORMAL/IM-1000-0001.jpeg",
                                               "train/PNEUMONIA/person999_virus_1.jpeg"]]
    assert run(["data", "inspect", str(kermany_tree)]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "duplicates with different labels │ 1" in out
    assert "byte-identical images with different labels" in out


def test_cli_inspect_json(kermany_tree, capsys):
    code = run(["data", "inspect", str(kermany_tree), "--json"])
    out = capsys.readouterr().out
    assert code == 0
    info = json.loads(out)
    assert info["n_images"] == 24 and info["counts"]["test"]["PNEUMONIA"] == {"bacteria": 3, "virus": 3}


def test_cli_inspect_lists_a_cut_jpeg_as_skipped_unless_no_decode(kermany_tree, capsys, monkeypatch):
    """A truncated file hashes fine; inspect used to count it as an image that extract then skipped."""
    victim = kermany_tree / "train/NORMAL/IM-1000-0001.jpeg"
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    assert run(["data", "inspect", str(kermany_tree), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n_images"] == 23
    assert info["skipped"] == [{"path": "train/NORMAL/IM-1000-0001.jpeg", "reason": "truncated image"}]
    monkeypatch.delenv("COLUMNS", raising=False)
    assert run(["data", "inspect", str(kermany_tree)]) == 0
    lines = capsys.readouterr().out.splitlines()  # into a pipe each row is one line, not folded at 80
    assert any("skipped files" in line and "│ 1" in line for line in lines)
    assert any("train/NORMAL/IM-1000-0001.jpeg" in line and "truncated image" in line for line in lines)
    assert run(["data", "inspect", str(kermany_tree), "--no-decode"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "24 (24 unique)" in out and "files not decoded: --no-decode" in out


def test_cli_inspect_tables_escape_markup(tmp_path, capsys):
    make_bad_corpus(tmp_path / "bad", fifo=False)
    (tmp_path / "bad/train/NORMAL/[bold]evil[red].txt").write_text("x")
    with open(os.fsencode(tmp_path / "bad/train/NORMAL") + b"/\xffbad.txt", "wb") as fh:
        fh.write(b"x")  # a non-UTF-8 name in a table must not crash the console
    (tmp_path / "bad/train/NORMAL/two\nlines\x1b[2J.txt").write_text("x")  # splits a row, clears a screen
    code = run(["data", "inspect", str(tmp_path / "bad")])
    out = capsys.readouterr().out
    assert code == 0
    assert "duplicates" in out and "skipped files" in out and "symlink loop" in out
    flat = out.replace("\n", "").replace("│", "").replace(" ", "")
    assert "[bold]evil[red].txt" in flat  # printed literally: rich markup in names is escaped
    assert "\\xffbad.txt" in flat
    assert "two\\nlines\\x1b[2J.txt" in flat and "\x1b" not in out


def test_cli_inspect_manifest_and_errors(tmp_path, capsys):
    write_xray(tmp_path / "x.png", 1)
    _write_manifest(tmp_path / "m.csv", "path,label\nx.png,a\n")
    assert run(["data", "inspect", str(tmp_path), "--manifest", str(tmp_path / "m.csv"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layout"] == "manifest"
    assert run(["data", "inspect", str(tmp_path / "missing")]) == 2
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "does not exist; pass the folder" in err and "Traceback" not in err


def test_real_kermany_train_split(shared_dir):
    ds = discover(shared_dir / "data" / "kermany224" / "train")
    assert ds.layout == "kermany" and ds.skipped == []
    assert len(ds.records) == 5232
    assert Counter(r.subtype for r in ds.records) == {"normal": 1349, "bacteria": 2538, "virus": 1345}
    assert all(r.group != r.path.stem for r in ds.records)
    assert all((r.label == "NORMAL") == (r.subtype == "normal") for r in ds.records)


def test_cli_inspect_help(capsys):
    assert run(["data", "inspect", "--help"]) == 0
    out = capsys.readouterr().out
    assert "featcache data inspect data/chest_xray" in out and "[,split]" in out


def test_inspect_says_when_images_have_no_patient_id(tmp_path: Path, kermany_tree: Path, capsys) -> None:
    """alpha/001.jpg and beta/001.jpg: the audit counted 40 patients and never said they were images,
    while fit grouped the 20 file stems; inspect now says both."""
    for cls in ("alpha", "beta"):
        for i in range(3):
            write_xray(tmp_path / "cf" / cls / f"00{i}.jpg", seed=i, size=24)
    info = inspect(discover(tmp_path / "cf"))
    assert (info["n_patients"], info["n_without_patient_id"], info["stem_groups"]) == (6, 6, 3)
    named = inspect(discover(kermany_tree))
    assert named["n_without_patient_id"] == 0 and named["stem_groups"] == 0
    assert run(["data", "inspect", str(tmp_path / "cf")]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "6 image(s) without a patient id" in out and "3 group(s)" in out


def test_download_cache_and_marker_at_the_root_are_not_user_files(tmp_path):
    """`data download` keeps .downloads/, its marker and (after a kill) an extraction folder beside the
    splits; listed as skipped they made `extract --strict` fail on every fresh download. Only those exact
    names at the root are left out: the same names deeper down, or similar ones, are still listed."""
    root = make_kermany_tree(tmp_path / "k", n_normal=2, n_pneu=2)
    (root / ".downloads").mkdir()
    (root / ".downloads" / "ChestXRay2017.zip").write_bytes(b"zip")
    (root / ".featcache-download.json").write_text("{}")
    (root / ".featcache-download.json.tmp").write_text("{}")
    (root / ".featcache-extract-abc123").mkdir()
    (root / ".downloads-old").mkdir()
    (root / "train" / ".downloads").mkdir()
    ds = discover(root)
    assert len(ds.records) == 8
    assert sorted(ds.skipped) == [(".downloads-old/", "hidden folder"),
                                  ("train/.downloads/", "hidden folder")]


def test_a_valid_folder_is_the_validation_split(tmp_path):
    """train/valid/test (a common download layout) lost every valid/ image as "outside the
    train/val/test folders", though a manifest's "valid" already meant val."""
    root = tmp_path / "d"
    for i, split in enumerate(["train", "valid", "test"]):
        write_xray(root / split / "NORMAL" / f"IM-000{i}-0001.jpeg", seed=i)
        write_xray(root / split / "PNEUMONIA" / f"person{i}_virus_{i}.jpeg", seed=10 + i)
    ds = discover(root)
    assert ds.skipped == []
    assert Counter(r.split for r in ds.records) == {"train": 2, "val": 2, "test": 2}
    assert [r.relpath for r in ds.select(["val"])] == ["valid/NORMAL/IM-0001-0001.jpeg",
                                                       "valid/PNEUMONIA/person1_virus_1.jpeg"]


def test_training_and_testing_folders_are_splits_not_classes(tmp_path):
    """Training/ and Testing/ (Kaggle's brain-tumour MRI layout) were read as two classes, 'Training' and
    'Testing', so `--task folders` fitted train against test; they are the train and test splits."""
    root = tmp_path / "mri"
    for i, (split, label) in enumerate([("Training", "glioma"), ("Training", "notumor"),
                                        ("Testing", "glioma"), ("Testing", "notumor")]):
        write_xray(root / split / label / f"img{i}.jpg", seed=i)
    ds = discover(root)
    assert ds.skipped == []
    assert Counter((r.split, r.label) for r in ds.records) == {
        ("train", "glioma"): 1, ("train", "notumor"): 1, ("test", "glioma"): 1, ("test", "notumor"): 1}
    assert task_labels(ds.records, "folders")[1] == ["glioma", "notumor"]
    # the folder above such a dataset is refused as the one above train/test is
    shutil.copytree(root, tmp_path / "up" / "mri")
    with pytest.raises(DataError, match=r"its class folder 'mri' holds Testing/, Training/"):
        discover(tmp_path / "up")


def test_a_label_that_is_a_subtype_wins_over_the_file_name(tmp_path):
    """A manifest labelling person1_bacteria_1 as virus got subtype bacteria from the name, so --task
    3class and --task folders labelled the same image differently."""
    for name in ("person1_bacteria_1.jpeg", "person2_virus_2.jpeg", "person3_virus_3.jpeg"):
        write_xray(tmp_path / name, seed=len(name))
    csv_path = _write_manifest(tmp_path / "m.csv", "path,label\nperson1_bacteria_1.jpeg,virus\n"
                               "person2_virus_2.jpeg,bacteria\nperson3_virus_3.jpeg,PNEUMONIA\n")
    ds = discover(csv_path)
    assert [(r.relpath, r.subtype, r.group) for r in ds.records] == [
        ("person1_bacteria_1.jpeg", "virus", "person1"),
        ("person2_virus_2.jpeg", "bacteria", "person2"),
        ("person3_virus_3.jpeg", "virus", "person3"),  # PNEUMONIA is no subtype: the name tells it
    ]


def test_inspect_names_labels_that_differ_only_in_case(tmp_path, capsys, monkeypatch):
    """A manifest's NORMAL / Normal were two rows of the counts and nothing more: one class to binary and
    3class, two to --task folders (which now refuses them)."""
    monkeypatch.setenv("COLUMNS", "250")  # one table line per row (xdist workers have COLUMNS=80)
    for i in range(4):
        write_xray(tmp_path / "imgs" / f"x{i}.png", i)
    csv_path = _write_manifest(tmp_path / "m.csv", "path,label\nimgs/x0.png,NORMAL\nimgs/x1.png,Normal\n"
                               "imgs/x2.png,PNEUMONIA\nimgs/x3.png,PNEUMONIA\n")
    info = inspect(discover(csv_path), decode=False)
    assert info["case_twin_labels"] == [["NORMAL", "Normal"]]
    assert run(["data", "inspect", str(csv_path)]) == 0
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "labels differing only in case NORMAL, Normal: one class to --task binary and 3class" in out
    with pytest.raises(DataError, match="differ only in case"):
        task_labels(discover(csv_path).records, "folders")
    assert inspect(discover(make_kermany_tree(tmp_path / "k", n_normal=2, n_pneu=2)),
                   decode=False)["case_twin_labels"] == []
    # the same bytes filed as NORMAL and Normal: one class, so a duplicate and not "different labels"
    shutil.copy(tmp_path / "imgs" / "x0.png", tmp_path / "imgs" / "x0copy.png")
    twin = _write_manifest(tmp_path / "t.csv", "path,label\nimgs/x0.png,NORMAL\nimgs/x0copy.png,Normal\n"
                           "imgs/x2.png,PNEUMONIA\nimgs/x3.png,PNEUMONIA\n")
    info = inspect(discover(twin), decode=False)
    assert info["duplicates"] == [["imgs/x0.png", "imgs/x0copy.png"]] and info["conflicting_duplicates"] == []


def test_inspect_names_a_split_that_lacks_a_subtype(tmp_path, capsys, monkeypatch):
    """A test/PNEUMONIA/ of bacteria images alone passed data inspect without a word, and a 3-class fit then
    had neither test AUC nor virus recall. The subtype is named now, not again when its class is missing."""
    monkeypatch.setenv("COLUMNS", "250")  # one table line per row (xdist workers have COLUMNS=80)
    root = make_kermany_tree(tmp_path / "data", n_normal=3, n_pneu=4, size=16)
    assert inspect(discover(root), decode=False)["splits_lacking_subtypes"] == {}
    viral = [f for f in (root / "test" / "PNEUMONIA").iterdir() if "_virus_" in f.name]
    assert viral
    for f in viral:
        f.unlink()
    assert inspect(discover(root), decode=False)["splits_lacking_subtypes"] == {"test": ["virus"]}
    assert run(["data", "inspect", str(root)]) == 0
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert ("test split lacks subtype virus (no file named as one): --task 3class cannot compute test AUC or "
            "the recall of that class") in out
    for f in (root / "test" / "NORMAL").iterdir():
        f.unlink()
    info = inspect(discover(root), decode=False)
    assert info["splits_lacking_classes"] == {"test": ["NORMAL"]}  # said once, as a class
    assert info["splits_lacking_subtypes"] == {"test": ["virus"]}


def test_inspect_names_a_split_that_lacks_a_class(tmp_path, capsys, monkeypatch):
    """test/NORMAL/ left empty (a copy that failed) vanished without a word: data inspect listed a test split
    of PNEUMONIA alone, where fit can compute neither test AUC nor NORMAL's recall. It is named now; a
    dataset whose splits all hold every class gets no such row."""
    monkeypatch.setenv("COLUMNS", "250")  # one table line per row (xdist workers have COLUMNS=80)
    root = make_kermany_tree(tmp_path / "data", n_normal=2, n_pneu=2, size=16)
    assert inspect(discover(root), decode=False)["splits_lacking_classes"] == {}
    for f in (root / "test" / "NORMAL").iterdir():
        f.unlink()
    info = inspect(discover(root), decode=False)
    assert info["splits_lacking_classes"] == {"test": ["NORMAL"]}
    assert run(["data", "inspect", str(root)]) == 0
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert ("test split lacks NORMAL (an empty or missing class folder?): fit cannot compute test AUC or the "
            "recall of that class") in out
    # a class only the test split has: the training pool lacks it too, so "the pool still has it" is false
    alone = make_kermany_tree(tmp_path / "alone", n_normal=2, n_pneu=2, size=16)
    for f in (alone / "train" / "NORMAL").iterdir():
        f.unlink()
    assert run(["data", "inspect", str(alone)]) == 0
    out = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert ("train split lacks NORMAL (an empty or missing class folder?): only the test split has that "
            "class, so fit cannot learn it") in out
    one_split = make_kermany_tree(tmp_path / "flat", n_normal=2, n_pneu=2, splits=("train",), size=16)
    assert inspect(discover(one_split / "train"), decode=False)["splits_lacking_classes"] == {}
