"""Hostile and careless inputs (issue 16): a dataset file never runs code, a malformed checkpoint or export record
is one line naming the file and the field, a rejected pickle never advises ``weights_only=False``, and ``data
inspect`` describes what it can and lists the rest under problems."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from resnetlab.cli.main import main
from resnetlab.config import DataConfig
from resnetlab.data.datasets import open_dataset
from resnetlab.errors import DataError
from tests.test_data_formats import make_cifar10_batches


def _error_line(capsys) -> str:
    """stderr of a command that must have failed with one line and no traceback; that line."""
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# CIFAR batches are read without running code
# ---------------------------------------------------------------------------------------------------------------


class _RunsShell:
    """Unpickling this calls os.system, as the crafted batch of the issue did."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class _RunsPython:
    """Unpickling this calls builtins.exec on a line that writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('ran')",)


def _plant(folder, name, payload, where):
    """Put ``payload`` in the batch file ``name``: as its labels, or as the whole pickled object."""
    path = folder / name
    with open(path, "rb") as handle:
        batch = pickle.load(handle, encoding="latin1")  # the test's own, trusted file
    obj = payload if where == "whole" else {**batch, "labels": payload}
    with open(path, "wb") as handle:
        pickle.dump(obj, handle, protocol=2)


@pytest.mark.parametrize("payload", [_RunsShell, _RunsPython])
@pytest.mark.parametrize(("batch", "where"), [("data_batch_2", "labels"), ("test_batch", "whole"),
                                              ("batches.meta", "whole")])
def test_a_crafted_cifar_batch_never_runs_code_when_opened(tmp_path, payload, batch, where):
    folder, _ = make_cifar10_batches(tmp_path / "data")
    marker = tmp_path / "code-ran"
    _plant(folder, batch, payload(marker), where)
    with pytest.raises(DataError) as err:
        open_dataset(DataConfig(spec=f"cifar10:{tmp_path / 'data'}"))
    assert not marker.exists()
    message = str(err.value)
    assert "\n" not in message and str(folder / batch) in message and "not a CIFAR batch" in message
    refused = "system" if payload is _RunsShell else "exec"
    assert refused in message


def test_data_inspect_of_a_crafted_cifar_batch_is_one_line_and_runs_nothing(tmp_path, capsys):
    folder, _ = make_cifar10_batches(tmp_path / "data")
    marker = tmp_path / "code-ran"
    _plant(folder, "data_batch_1", _RunsShell(marker), "labels")
    assert main(["data", "inspect", f"cifar10:{tmp_path / 'data'}"]) == 2
    assert not marker.exists()
    line = _error_line(capsys)
    assert "data_batch_1" in line and "not a CIFAR batch" in line


def test_published_style_batches_still_load(tmp_path):
    """Python 2 pickles (str keys), Python 3 protocol-2 pickles (bytes keys, through _codecs.encode), numpy scalars
    and protocol-5 arrays are what real and re-saved batches hold; all of them load."""
    folder, arrays = make_cifar10_batches(tmp_path / "bytes-keys")
    source = open_dataset(DataConfig(spec=f"cifar10:{folder}"))
    assert len(source.splits["train"]) == 20 and source.class_names[0] == "airplane"

    resaved = tmp_path / "resaved" / "cifar-10-batches-py"
    resaved.mkdir(parents=True)
    for name, (data, labels) in arrays.items():
        batch = {"batch_label": name, "data": data, "filenames": [f"{i}.png" for i in range(len(labels))],
                 "labels": [np.int64(label) for label in labels]}  # numpy scalars, as a re-saved batch may hold
        with open(resaved / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=5)
    again = open_dataset(DataConfig(spec=f"cifar10:{resaved}"))
    assert again.splits["train"].labels.tolist() == source.splits["train"].labels.tolist()


# ---------------------------------------------------------------------------------------------------------------
# Malformed checkpoints and export records: one line naming the file and the field, in every command
# ---------------------------------------------------------------------------------------------------------------


def _good_state(classes=("stop", "yield", "priority")) -> dict:
    """What training writes, for a small model built here (no training needed to test reading it)."""
    from resnetlab.config import RunConfig
    from resnetlab.data.preprocessing import Preprocessing
    from resnetlab.checkpoint import build_meta
    from resnetlab.models import create_model

    model = create_model("simple_cnn", len(classes))
    meta = build_meta(model_name="simple_cnn", model_kwargs={}, class_ids=list(range(len(classes))),
                      class_names=list(classes), prep=Preprocessing(input_size=32), config=RunConfig().to_dict(),
                      data={"spec": "synthetic-signs", "fingerprint": "0123456789abcdef",
                            "split_fingerprints": {"test": "fedcba9876543210"}},
                      epoch=1, monitor="val_top1", best_metric=0.5)
    return {"model": model.state_dict(), "meta": meta}


def _save(path, state):
    import torch

    torch.save(state, path)
    return path


def _without(tree: dict, dotted: str) -> dict:
    import copy

    tree = copy.deepcopy(tree)
    *parents, last = dotted.split(".")
    node = tree
    for part in parents:
        node = node[part]
    del node[last]
    return tree


def _with(tree: dict, dotted: str, value) -> dict:
    import copy

    tree = copy.deepcopy(tree)
    *parents, last = dotted.split(".")
    node = tree
    for part in parents:
        node = node[part]
    node[last] = value
    return tree


MALFORMED_META = {
    # name: (how the meta is spoiled, the field the message must name)
    "input_size missing": (lambda meta: _without(meta, "preprocessing.input_size"), "meta.preprocessing.input_size is missing"),
    "num_classes a string": (lambda meta: _with(meta, "model.num_classes", "three"), "meta.model.num_classes"),
    "meta a list": (lambda meta: [1, 2, 3], "meta is a list"),
    "meta a string": (lambda meta: "meta", "meta is a str"),
    "classes not a record": (lambda meta: _with(meta, "classes", ["a", "b", "c"]), "meta.classes"),
    "mean of two numbers": (lambda meta: _with(meta, "preprocessing.mean", [0.5, 0.5]), "meta.preprocessing.mean"),
    "preprocessing with a wrong field type": (lambda meta: _with(meta, "preprocessing.resize", 7), "meta.preprocessing.resize"),
    "preprocessing a list": (lambda meta: _with(meta, "preprocessing", [32, "squash"]), "meta.preprocessing"),
    "config missing": (lambda meta: _without(meta, "config"), "meta.config is missing"),
    "config with a bad value": (lambda meta: _with(meta, "config", {"data": {"batch_size": "many"}}), "meta.config"),
    "data fingerprint missing": (lambda meta: _without(meta, "data.fingerprint"), "meta.data.fingerprint is missing"),
    "classes and model disagree": (lambda meta: _with(meta, "model.num_classes", 5), "num_classes"),
    "unknown model": (lambda meta: _with(meta, "model.name", "resnet_9000"), "meta.model"),
    "model option of another model": (lambda meta: _with(meta, "model.kwargs", {"shortcut": "B"}), "meta.model"),
    "kwargs that fetch other weights": (lambda meta: _with(meta, "model.kwargs", {"pretrained": True}), "meta.model.kwargs"),
}


@pytest.mark.parametrize("case", sorted(MALFORMED_META))
def test_a_malformed_meta_is_one_checkpoint_error_naming_the_field(tmp_path, case):
    from resnetlab.checkpoint import load_checkpoint
    from resnetlab.errors import CheckpointError

    spoil, field = MALFORMED_META[case]
    state = _good_state()
    path = _save(tmp_path / "bad.pt", {**state, "meta": spoil(state["meta"])})
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert "\n" not in message and str(path) in message and field in message


def test_a_well_formed_checkpoint_still_loads_with_its_meta(tmp_path):
    from resnetlab.checkpoint import load_checkpoint, model_from_checkpoint, preprocessing_from_meta

    state = _good_state()
    del state["meta"]["preprocessing"]["contrast"]  # written before the field existed: its default applies
    loaded = load_checkpoint(_save(tmp_path / "good.pt", state))
    model, meta = model_from_checkpoint(loaded)
    assert meta["classes"]["names"] == ["stop", "yield", "priority"]
    assert preprocessing_from_meta(meta).contrast == "none" and preprocessing_from_meta(meta).input_size == 32


def test_weights_that_are_not_a_state_dict_are_named(tmp_path):
    from resnetlab.checkpoint import load_checkpoint
    from resnetlab.errors import CheckpointError

    path = _save(tmp_path / "bad.pt", {**_good_state(), "model": [1, 2, 3]})
    with pytest.raises(CheckpointError, match="'model' entry is not a state dict"):
        load_checkpoint(path)


def _command(name, source, tmp_path):
    image = tmp_path / "sign.png"
    if not image.exists():
        from PIL import Image

        Image.new("RGB", (40, 40), (200, 10, 10)).save(image)
    return {
        "evaluate": ["evaluate", str(source), "--out", str(tmp_path / "eval")],
        "predict": ["predict", str(source), str(image)],
        "export": ["export", str(source), "--out", str(tmp_path / "export")],
        "serve": ["serve", str(source), "--port", "8765"],
    }[name]


COMMANDS = ("evaluate", "predict", "export", "serve")


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", ["input_size missing", "meta a list", "num_classes a string", "config with a bad value",
                                  "preprocessing a list"])
def test_every_command_answers_a_malformed_checkpoint_with_one_line(tmp_path, capsys, monkeypatch, command, case):
    # serve must fail before it would start a server; were it to get that far, fail the test instead of serving.
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("serve started with a malformed checkpoint"))
    spoil, field = MALFORMED_META[case]
    state = _good_state()
    path = _save(tmp_path / "bad.pt", {**state, "meta": spoil(state["meta"])})
    assert main(_command(command, path, tmp_path)) == 2
    line = _error_line(capsys)
    assert str(path) in line and field in line


class _NotAPlainCheckpoint:
    """A custom class: torch.load(weights_only=True) refuses to unpickle it."""

    def __init__(self):
        self.note = "anything"


@pytest.mark.parametrize("command", COMMANDS)
def test_a_rejected_pickle_never_advises_weights_only_false(tmp_path, capsys, monkeypatch, command):
    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("serve started with a rejected checkpoint"))
    path = _save(tmp_path / "custom.pt", {**_good_state(), "extra": _NotAPlainCheckpoint()})
    assert main(_command(command, path, tmp_path)) == 2
    line = _error_line(capsys)
    assert "weights_only=False" not in line and "weights_only" not in line
    assert str(path) in line and "not a plain resnetlab checkpoint" in line and "unsafe" in line
    assert "re-save" in line


def _fake_export(folder, state) -> dict:
    """An export folder as `resnetlab export` lays it out; the model file is a stand-in, never reached."""
    import json

    from resnetlab.deployment.records import record_from_meta

    folder.mkdir(parents=True)
    record = record_from_meta(state["meta"])
    record["artifact"] = {"format": "onnx", "file": "model.onnx", "precision": "float32"}
    (folder / "model.onnx").write_bytes(b"not reached")
    (folder / "preprocessing.json").write_text(json.dumps(record))
    return record


MALFORMED_RECORD = {
    "input_size a string": (lambda r: _with(r, "preprocessing.input_size", "32"), "record.preprocessing.input_size"),
    "input_size missing": (lambda r: _without(r, "preprocessing.input_size"), "record.preprocessing.input_size is missing"),
    "classes names missing": (lambda r: _without(r, "classes.names"), "record.classes.names is missing"),
    "output a string": (lambda r: _with(r, "output", "logits"), "record.output"),
    "artifact file outside the folder": (lambda r: _with(r, "artifact.file", "../../model.onnx"), "record.artifact.file"),
    "artifact format unknown": (lambda r: _with(r, "artifact.format", "tflite"), "record.artifact.format"),
}


@pytest.mark.parametrize("command", ["predict", "serve"])
@pytest.mark.parametrize("case", sorted(MALFORMED_RECORD))
def test_a_malformed_export_record_is_one_line_naming_the_field(tmp_path, capsys, monkeypatch, command, case):
    import json

    monkeypatch.setattr("uvicorn.run", lambda *a, **k: pytest.fail("serve started with a malformed export"))
    folder = tmp_path / "export-dir"
    record = _fake_export(folder, _good_state())
    spoil, field = MALFORMED_RECORD[case]
    (folder / "preprocessing.json").write_text(json.dumps(spoil(record)))
    assert main(_command(command, folder, tmp_path)) == 2
    line = _error_line(capsys)
    assert str(folder / "preprocessing.json") in line and field in line and "re-run `resnetlab export`" in line


# ---------------------------------------------------------------------------------------------------------------
# data inspect: --out an existing file, and a dataset too small to split
# ---------------------------------------------------------------------------------------------------------------


def _small_gtsrb(root):
    from tests.test_gtsrb_loader import make_gtsrb

    # two classes, two tracks each: 4 groups, too few to hold out 15% test and 10% validation by track
    return make_gtsrb(root, rows_per_class=6, classes=(0, 14))


@pytest.mark.parametrize("where", ["file", "below a file"])
def test_inspect_out_an_existing_file_is_one_line(tmp_path, capsys, where):
    from tests.test_gtsrb_loader import make_gtsrb

    data = make_gtsrb(tmp_path / "g", rows_per_class=12, classes=(0, 14))  # 8 tracks: a split that can be planned
    existing = tmp_path / "notes.txt"
    existing.write_text("keep me\n")
    out = existing if where == "file" else existing / "inspect"
    split = ["data.val_fraction=0.25", "data.test_fraction=0.25"]
    assert main(["data", "inspect", f"gtsrb:{data}", *split, "--out", str(out)]) == 2
    line = _error_line(capsys)
    assert str(existing) in line and "--out" in line
    assert existing.read_text() == "keep me\n"


def test_inspect_describes_a_dataset_whose_split_cannot_be_planned(tmp_path, capsys):
    data = _small_gtsrb(tmp_path / "g")
    assert main(["data", "inspect", f"gtsrb:{data}", "--json"]) == 0
    import json

    result = json.loads(capsys.readouterr().out)
    assert result["num_classes"] == 2 and result["images"] == 12
    assert [c["total"] for c in result["classes"]] == [6, 6]
    assert result["image_sizes"]["width"]["min"] == 30 and result["image_sizes"]["images"] == 12
    split_problems = [p for p in result["problems"] if "groups" in p["reason"]]
    assert len(split_problems) == 1 and "data.split=stratified" in split_problems[0]["reason"]
    # the text output says so too, and writes its files
    assert main(["data", "inspect", f"gtsrb:{data}", "--out", str(tmp_path / "o")]) == 0
    text = capsys.readouterr().out
    assert "only 4 groups" in text and (tmp_path / "o" / "samples_per_class.png").is_file()


# ---------------------------------------------------------------------------------------------------------------
# What the fuzz tests (test_fuzz_readers.py) found, each pinned by a plain example
# ---------------------------------------------------------------------------------------------------------------


def _gtsrb_with_csv_line(root, edit):
    """A GTSRB folder whose Train.csv has its first data row passed through ``edit`` (a function of the cells)."""
    from tests.test_gtsrb_loader import make_gtsrb

    make_gtsrb(root, with_track_column=True)
    lines = (root / "Train.csv").read_text().splitlines()
    lines[1] = ",".join(edit(lines[1].split(",")))
    (root / "Train.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize(("edit", "reason"), [
    (lambda cells: [*cells[:-1], "abc"], "Track must be an integer"),
    (lambda cells: ["30", "32", "99999999999999999999999", *cells[3:]], "must be integers"),
    (lambda cells: [*cells[:7], "Train/0/\x00.png", cells[8]], "is not a file name"),
])
def test_an_unusable_gtsrb_row_is_rejected_not_a_crash(tmp_path, edit, reason):
    root = _gtsrb_with_csv_line(tmp_path / "g", edit)
    with pytest.raises(DataError, match=reason):
        open_dataset(DataConfig(spec=f"gtsrb:{root}"))
    source = open_dataset(DataConfig(spec=f"gtsrb:{root}", on_bad_image="skip"))
    assert len(source.splits["train"]) == 11 and len(source.all_rejected()) == 1


def test_a_csv_field_over_the_csv_modules_limit_is_one_line(tmp_path):
    root = _gtsrb_with_csv_line(tmp_path / "g", lambda cells: [*cells[:7], "x" * 200_000, cells[8]])
    with pytest.raises(DataError, match="Train.csv: not a readable CSV file after line 1 .field larger than field limit"):
        open_dataset(DataConfig(spec=f"gtsrb:{root}"))


@pytest.mark.parametrize("cell", ["images/\x000.png", "images/0.png"])
def test_csv_list_rows_with_impossible_paths_or_boxes_are_rejected(tmp_path, cell):
    from PIL import Image

    (tmp_path / "images").mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (9, 9, 9)).save(tmp_path / "images" / f"{i}.png")
    listing = tmp_path / "list.csv"
    listing.write_text("Path,ClassId,Roi.X1,Roi.Y1,Roi.X2,Roi.Y2\n"
                       f"{cell},0,1,1,9,99999999999999999999999\nimages/1.png,0,1,1,9,9\nimages/2.png,1,,,,\n")
    source = open_dataset(DataConfig(spec=f"csv:{listing}", on_bad_image="skip"))
    assert len(source.splits["train"]) == 2
    assert ("not a file name" if "\x00" in cell else "not four pixel coordinates") in source.all_rejected()[0].reason


@pytest.mark.parametrize("listing", ["classes.txt", "class_names.tsv"])
def test_a_class_listing_that_is_not_utf8_is_one_line(tmp_path, listing):
    from PIL import Image

    for name in ("ants", "bees"):
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "0.png")
    (tmp_path / listing).write_bytes(b"ants\n\xff\xfebees\n")
    with pytest.raises(DataError, match=f"{listing}: not a UTF-8 text file"):
        open_dataset(DataConfig(spec=f"folder:{tmp_path}"))


def test_a_recipe_that_is_not_utf8_is_a_config_error(tmp_path):
    from resnetlab.errors import ConfigError
    from resnetlab.recipes import load_recipe

    recipe = tmp_path / "recipe.yaml"
    recipe.write_bytes(b"\x80data:\n  batch_size: 8\n")
    with pytest.raises(ConfigError, match="is not UTF-8"):
        load_recipe(str(recipe))


def test_an_override_with_a_line_break_is_still_one_line(capsys):
    assert main(["data", "inspect", "synthetic-signs", "data.spec\n"]) == 2
    assert "'data.spec\\n'" in _error_line(capsys)


# A few hundred bytes that stand for 9**6 (531,441) values through YAML aliases ("billion laughs").
LAUGHS = ("a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
          "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
          "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\nf: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e]\n")


def test_a_recipe_that_expands_without_end_is_refused(tmp_path):
    from resnetlab.config import build_config
    from resnetlab.errors import ConfigError
    from resnetlab.recipes import load_recipe

    recipe = tmp_path / "laughs.yaml"
    recipe.write_text("model:\n  kwargs: {" + LAUGHS.replace("\n", ", ").rstrip(", ") + "}\n")
    with pytest.raises(ConfigError, match="more than 200,000 values"):
        build_config(load_recipe(str(recipe)))
    looped = tmp_path / "loop.yaml"
    looped.write_text("model:\n  kwargs: &k {again: *k}\n")
    with pytest.raises(ConfigError, match="contains itself"):
        build_config(load_recipe(str(looped)))


def test_a_checkpoint_meta_that_expands_without_end_is_refused(tmp_path):
    from resnetlab.checkpoint import load_checkpoint
    from resnetlab.errors import CheckpointError

    leaf = [1] * 9
    for _ in range(5):
        leaf = [leaf] * 9  # shared references: pickled once, 9**6 values when expanded
    state = _good_state()
    state["meta"]["data"]["notes"] = leaf
    with pytest.raises(CheckpointError, match="more than 200,000 values"):
        load_checkpoint(_save(tmp_path / "laughs.pt", state))


def test_cifar_labels_that_expand_without_end_are_refused(tmp_path):
    folder, _ = make_cifar10_batches(tmp_path)
    labels = [1] * 9
    for _ in range(7):
        labels = [labels] * 9
    with open(folder / "data_batch_1", "wb") as handle:
        pickle.dump({"data": np.zeros((4, 3072), np.uint8), "labels": labels}, handle, protocol=2)
    with pytest.raises(DataError, match="'labels' entry is list, not an array or a list of integers"):
        open_dataset(DataConfig(spec=f"cifar10:{tmp_path}"))


def test_a_truncated_legacy_checkpoint_is_always_a_checkpoint_error(tmp_path):
    """torch.load of a cut-off file in the pre-zip format fails with EOFError, IndexError, struct.error ...,
    depending on where it was cut; each is one CheckpointError."""
    import io

    import torch

    from resnetlab.checkpoint import load_checkpoint
    from resnetlab.errors import CheckpointError

    buffer = io.BytesIO()
    torch.save(_good_state(classes=("a", "b")), buffer, _use_new_zipfile_serialization=False)
    whole = buffer.getvalue()
    path = tmp_path / "cut.pt"
    for cut in range(0, 8192, 16):  # the pickled records and the first storage headers
        path.write_bytes(whole[:cut])
        # cut inside a global's name, the weights-only reader refuses the name instead
        with pytest.raises(CheckpointError, match="cannot load checkpoint|holds objects that resnetlab does not load"):
            load_checkpoint(path)
