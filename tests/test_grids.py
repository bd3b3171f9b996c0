"""Grid parsing (CLI and TOML), expansion and the papers' presets."""
from __future__ import annotations

from pathlib import Path

import pytest

from featcache.errors import ConfigError
from featcache.grids import PRESETS, expand, get_preset, load_grid_file, parse_grid_args

SCHEMA = {"C": "float", "max_iter": "int", "penalty": "str", "fit_intercept": "bool",
          "class_weight": "class_weight", "layers": "layers", "patience": "int?", "gamma": "float|str"}


def test_parse_grid_args_types() -> None:
    g = parse_grid_args(["C=0.1,1", "class_weight=none,balanced,1:3", "layers=1024-512,256",
                         "patience=none,5", "gamma=scale,0.01", "fit_intercept=true,no", "C=10"], SCHEMA)
    assert g["C"] == [0.1, 1.0, 10.0]
    assert g["class_weight"] == [None, "balanced", {0: 1.0, 1: 3.0}]
    assert g["layers"] == [(1024, 512), (256,)]
    assert g["patience"] == [None, 5]
    assert g["gamma"] == ["scale", 0.01]
    assert g["fit_intercept"] == [True, False]


@pytest.mark.parametrize("item, needle", [
    ("bogus=1", "unknown grid parameter 'bogus'; valid ones are: C, class_weight"),
    ("C=abc", "'C'"),
    ("max_iter=1.5", "'max_iter'"),
    ("layers=10-x", "'layers'"),
    ("layers=1024--512", "'layers'"),  # an empty size is a slip, not a shorter network
    ("layers=8-", "'layers'"),
    ("layers=-5", "'layers'"),
    ("layers=16 8", "'layers'"),  # was read as one layer of 168 units
    ("layers=1_6", "'layers'"),  # was read as 16
    ("max_iter=none", "'max_iter'"),
    ("C", "KEY=V1,V2"),
    ("C=", "no values"),
    ("C=1,,2", "include an empty one"),
    ("C=1,", "include an empty one"),
    ("C=0", "grid value 0.0 for 'C' is out of range; it must be a finite number above 0"),
    ("C=1,-2", "-2.0 for 'C' is out of range"),
    ("C=inf", "inf for 'C' is out of range"),
    ("C=nan", "nan for 'C' is out of range"),
    ("max_iter=0", "must be at least 1"),
    ("patience=-1", "must be 0 or more"),
    ("gamma=-0.5", "-0.5 for 'gamma' is out of range"),
    # a zero weight said only "not a valid class_weight": the forms it takes are named
    ("class_weight=1:0", "is not a valid class_weight; give balanced, or one weight above 0 per class in "
                         'class order (1:3, or {"0": 1, "1": 3})'),
])
def test_parse_grid_errors_name_the_key(item: str, needle: str) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_grid_args([item], SCHEMA)
    assert needle in str(exc.value)
    assert str(exc.value).count(".") >= 1 and "\n" not in str(exc.value)


def test_ranges_apply_in_grid_files_and_every_head(tmp_path: Path) -> None:
    from featcache.heads import get_head

    f = tmp_path / "g.toml"
    f.write_text("[grid]\nlr = [0.001, 0.0]\n")
    with pytest.raises(ConfigError, match="0.0 for 'lr' is out of range"):
        load_grid_file(f, get_head("mlp").schema)
    for key, bad in [("epochs", "0"), ("batch_size", "0"), ("dropout", "1"), ("l2", "-1")]:
        with pytest.raises(ConfigError, match=f"for '{key}' is out of range"):
            parse_grid_args([f"{key}={bad}"], get_head("mlp").schema)
    with pytest.raises(ConfigError, match="'n_neighbors' is out of range"):
        parse_grid_args(["n_neighbors=0"], get_head("knn").schema)
    # values at the edges stay valid
    assert parse_grid_args(["dropout=0", "l2=0", "epochs=1"], get_head("mlp").schema)["dropout"] == [0.0]


def test_expand_product_and_union() -> None:
    cfgs = expand({"C": [1.0, 2.0], "penalty": ["l2", "l1"]})
    assert cfgs == [{"C": 1.0, "penalty": "l2"}, {"C": 1.0, "penalty": "l1"},
                    {"C": 2.0, "penalty": "l2"}, {"C": 2.0, "penalty": "l1"}]
    union = expand([{"C": [1.0, 2.0]}, {"C": [2.0, 3.0]}])
    assert union == [{"C": 1.0}, {"C": 2.0}, {"C": 3.0}]


def test_a_json_or_yaml_grid_file_is_named_as_such(tmp_path: Path) -> None:
    """An mlp audit: a valid grid.json (or .yaml) got "is not valid TOML (Invalid statement ...); fix its
    syntax", a hunt for a typo in a file with none. It is named as JSON or YAML now, with the TOML form; a
    broken TOML file keeps its parser's message."""
    from featcache.heads import get_head

    mlp = get_head("mlp").schema
    files = {"grid.json": '{"grid": {"lr": [0.001], "epochs": [1]}}', "grid.yaml": "grid:\n  lr: [0.001]\n",
             "grid.yml": "grid:\n  lr: [0.001]\n", "grid.txt": '{"grid": {"lr": [0.001]}}'}
    for name, text in files.items():
        (tmp_path / name).write_text(text)
        with pytest.raises(ConfigError) as err:
            load_grid_file(tmp_path / name, mlp)
        fmt = "YAML" if name.endswith(("yaml", "yml")) else "JSON"
        assert f"looks like {fmt}, but grid files are TOML" in str(err.value), str(err.value)
        assert "lr = [0.001, 0.0001]" in str(err.value) and "fix its syntax" not in str(err.value)
    broken = tmp_path / "broken.toml"
    broken.write_text("[grid\n")
    with pytest.raises(ConfigError, match="not valid TOML .*fix its syntax"):
        load_grid_file(broken, mlp)


def test_toml_grid_files(tmp_path: Path) -> None:
    one = tmp_path / "one.toml"
    one.write_text('[grid]\nC = [0.1, 1]\nlayers = [[1024, 512], [64]]\nclass_weight = ["balanced", "1:3"]\n')
    grids = load_grid_file(one, SCHEMA)
    assert grids == [{"C": [0.1, 1.0], "layers": [(1024, 512), (64,)],
                      "class_weight": ["balanced", {0: 1.0, 1: 3.0}]}]
    assert len(expand(grids)) == 8
    many = tmp_path / "many.toml"
    many.write_text('[[grid]]\nC = [1]\npenalty = "l2"\n\n[[grid]]\nC = [2, 3]\nmax_iter = 50\n')
    assert expand(load_grid_file(many, SCHEMA)) == [
        {"C": 1.0, "penalty": "l2"}, {"C": 2.0, "max_iter": 50}, {"C": 3.0, "max_iter": 50}]
    bad = tmp_path / "bad.toml"
    bad.write_text("[grid]\nnope = [1]\n")
    with pytest.raises(ConfigError, match="nope"):
        load_grid_file(bad, SCHEMA)
    broken = tmp_path / "broken.toml"
    broken.write_text("[grid\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_grid_file(broken, SCHEMA)
    with pytest.raises(ConfigError, match="does not exist"):
        load_grid_file(tmp_path / "missing.toml", SCHEMA)


def test_mao2018_is_the_papers_33_configs() -> None:
    p = get_preset("mao2018")
    assert p.head == "mlp" and len(p.configs) == 33 and p.options["balance"] == "undersample-subtypes"
    assert set(p.options["tasks"]) == {"binary", "3class"}
    for name in ("vazquez2021", "aucouturier2020"):  # their binary results came from fine-tuned / own CNNs
        assert get_preset(name).task == "3class" and "tasks" not in get_preset(name).options
    layers = [c["layers"] for c in p.configs]
    assert {len(x) for x in layers} == {2, 5, 8}  # 3 / 6 / 9 layers counting the output layer
    assert all(layers.count(x) == 11 for x in set(layers))
    # the paper's table rows 1..11 for the 3-layer head (batch, epochs, lr)
    rows = [(c["batch_size"], c["epochs"], c["lr"]) for c in p.configs if len(c["layers"]) == 2]
    assert rows[3] == (64, 50, 0.001) and rows[10] == (1000, 400, 0.001) and rows[1] == (32, 50, 0.01)
    assert len({tuple(sorted((k, str(v)) for k, v in c.items())) for c in p.configs}) == 33


class _Rec:
    def __init__(self, label: str) -> None:
        self.label, self.subtype = label, None


def test_other_presets() -> None:
    lab = get_preset("laban2021")
    assert lab.head == "logreg" and lab.options["backbone"] == "vgg16" and lab.options["pooling"] == "flatten"
    # the paper weights a NORMAL image as 3 pneumonia images (the minority class up), not the other way
    from featcache.datasets import task_labels

    y, _ = task_labels([_Rec("NORMAL"), _Rec("PNEUMONIA")], "binary")
    normal, pneumonia = int(y[0]), int(y[1])
    assert all(c["class_weight"] == {normal: 3.0, pneumonia: 1.0} for c in lab.configs)
    vaz = get_preset("vazquez2021").configs[0]
    assert (vaz["dropout"], vaz["activation"], vaz["optimizer"], vaz["lr"], vaz["epochs"]) == \
        (0.2, "sigmoid", "sgd", 0.001, 60)
    auc = get_preset("aucouturier2020").configs[0]
    assert auc["layers"] == (256, 128) and auc["lr"] == 1e-4 and auc["patience"] is not None
    with pytest.raises(ConfigError, match="mao2018"):
        get_preset("nope")


def test_presets_fit_their_head_schema() -> None:
    heads = pytest.importorskip("featcache.heads")
    if not hasattr(heads, "get_head"):
        pytest.skip("heads not written yet")
    for preset in PRESETS.values():
        schema = heads.get_head(preset.head).schema
        for cfg in preset.configs:
            unknown = set(cfg) - set(schema)
            assert not unknown, f"{preset.name}: {unknown}"


def test_presets_through_build_configs() -> None:
    """fit's config builder gives the preset's 33 configs (and --grid still overrides a key)."""
    heads = pytest.importorskip("featcache.heads")
    from featcache.fit import FitOptions, build_configs

    mlp = heads.get_head("mlp")
    for task in ("binary", "3class"):
        cfgs = build_configs(mlp, FitOptions(preset="mao2018", task=task), get_preset("mao2018"))
        assert len(cfgs) == 33
    cfgs = build_configs(mlp, FitOptions(grid_args=["epochs=1"]), get_preset("mao2018"))
    # epochs overridden: configs that differed only by epochs collapse (7 (batch, lr) pairs x 3 depths)
    assert all(c["epochs"] == 1 for c in cfgs) and len(cfgs) == 21


def test_the_3class_logreg_default_grid_iterates_to_convergence() -> None:
    """At scikit-learn's max_iter=100, 40 of the default grid's 70 3-class CV fits on real Kermany features
    stopped unconverged: the 3-class default grid gives max_iter 1000; binary keeps the plain grid (and
    its config ids); --grid still replaces the key, and a grid file or preset is taken as written."""
    heads = pytest.importorskip("featcache.heads")
    from featcache.fit import FitOptions, build_configs

    logreg = heads.get_head("logreg")
    three = build_configs(logreg, FitOptions(task="3class"))
    assert len(three) == 14 and all(c["max_iter"] == 1000 for c in three)
    assert all("max_iter" not in c for c in build_configs(logreg, FitOptions(task="binary")))
    assert all("max_iter" not in c for c in build_configs(logreg, FitOptions()))
    for grid, want in ((["C=1"], {1000}), (["max_iter=50"], {50})):
        configs = build_configs(logreg, FitOptions(task="3class", grid_args=grid))
        assert {c["max_iter"] for c in configs} == want


def test_comma_lists_refuse_an_empty_item(tmp_path, capsys):
    """--views orig,,hflip, --head logreg,, --splits train, and --heatmap C,C were accepted with the empty
    (or repeated) item dropped: a slip then ran another job than the one typed, unlike --grid."""
    from featcache.cli.app import run

    from featcache.grids import parse_names

    assert parse_names(" orig , hflip ", "--views") == ["orig", "hflip"]
    for text in ("orig,,hflip", "orig,", ",orig"):
        with pytest.raises(ConfigError, match="--views '.*' has an empty item"):
            parse_names(text, "--views")
    with pytest.raises(ConfigError, match="--splits was given with nothing in it"):
        parse_names(" ", "--splits")
    base = ["--data", str(tmp_path), "--backbone"]
    for argv, needle in (
            (["extract", *base, "mobilenet-0.75", "--views", "orig,"], "--views 'orig,'"),
            (["run", *base, "mobilenet-0.75", "--head", "logreg,,svm"], "--head 'logreg,,svm'"),
            (["run", *base, "vgg16,,mobilenet", "--head", "logreg"], "--backbone 'vgg16,,"),
            (["report", "--runs-dir", str(tmp_path), "--heatmap", "C,C"], "two different parameter names")):
        assert run(argv) == 2
        assert needle in " ".join(capsys.readouterr().err.split())


def test_a_whole_number_with_a_decimal_point_reads_alike_in_grid_and_grid_file(tmp_path: Path) -> None:
    """A fit audit: `--grid max_iter=1000.0` (or epochs=2.0) was refused as "not a valid int" while
    `max_iter = [1000.0]` in a grid file trained max_iter=1000. Both now read a whole number written with a
    decimal point (or an exponent) as that int, one config; both refuse 2.5 with one sentence."""
    from featcache.heads import get_head

    f = tmp_path / "g.toml"
    f.write_text("[grid]\nmax_iter = [1000.0]\n")
    assert load_grid_file(f, SCHEMA) == [{"max_iter": [1000]}]
    got = parse_grid_args(["max_iter=1000.0,1e3,1000"], SCHEMA)["max_iter"]
    assert got == [1000] and type(got[0]) is int
    assert parse_grid_args(["epochs=2.0"], get_head("mlp").schema)["epochs"] == [2]
    f.write_text("[grid]\nmax_iter = [2.5]\n")
    for where in ("file", "grid"):
        with pytest.raises(ConfigError) as exc:
            load_grid_file(f, SCHEMA) if where == "file" else parse_grid_args(["max_iter=2.5"], SCHEMA)
        assert "for 'max_iter' is not a valid int; give a whole number, e.g. 2" in str(exc.value), where
