"""Fuzzing every reader a user's file reaches, with Hypothesis, on mutated real-looking files.

The property, for each reader: it either works or raises a :class:`~resnetlab.errors.ResnetlabError` (one line for
the CLI), never another exception type, never a hang (a per-example time limit), and never runs code (the
pickle-based readers are seeded with a file whose pickle would create a marker file, and the marker is checked).

The seed files are built here from generated images, in the layouts the readers expect. Each test is bounded by
``max_examples`` and derandomized, so the suite runs the same examples everywhere in about a minute; raise
``FUZZ_EXAMPLES`` (a multiplier) to search longer on a workstation.
"""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import shutil
import signal
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from PIL import Image

from resnetlab.config import DataConfig, build_config
from resnetlab.data.datasets import open_dataset
from resnetlab.errors import ResnetlabError

# Pillow and torch warn about the damage they skip over in a corrupt file; here that damage is the point.
pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning:PIL"),
              pytest.mark.filterwarnings("ignore:Detected pickle protocol:UserWarning")]

SCALE = float(os.environ.get("FUZZ_EXAMPLES", "1"))
EXAMPLE_SECONDS = 20  # far above what any example takes; only a hang gets near it


def fuzz_settings(examples: int):
    return settings(max_examples=max(1, int(examples * SCALE)), deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                           HealthCheck.data_too_large, HealthCheck.large_base_example],
                    print_blob=True)


class Hang(BaseException):
    """An example ran past EXAMPLE_SECONDS. A BaseException, so that no reader's ``except Exception`` hides it."""


@contextlib.contextmanager
def time_limit(seconds: float = EXAMPLE_SECONDS):
    def expire(signum, frame):
        raise Hang(f"no answer within {seconds} s")

    if not hasattr(signal, "setitimer"):  # Windows: no interval timers; the suite's own timeout must do
        yield
        return
    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def works_or_refuses(call):
    """``call()``'s result, or None when it raised a ResnetlabError; any other exception fails the example."""
    try:
        with time_limit():
            result = call()
    except ResnetlabError as err:
        message = str(err)
        assert message and "\n" not in message and "Traceback" not in message, message
        event(f"refused with {type(err).__name__}")  # --hypothesis-show-statistics: how many got how far
        return None
    event("read")
    return result


# ---------------------------------------------------------------------------------------------------------------
# mutations
# ---------------------------------------------------------------------------------------------------------------

# What breaks parsers of text files: separators, quotes, line ends, signs, huge and odd numbers, paths that leave
# the folder, a byte-order mark, NUL.
TEXT_TOKENS = (",", ";", "\t", "\n", "\r\n", '"', "'", "-1", "0", "42", "99999999999999999999999", "1e309", "nan",
               "-", "", " ", "\x00", "\ufeff", "../", "/etc/passwd", "Train/0/", ".png", "é", ":", "- ", "[", "]",
               "{", "}", "&a", "*a", "!!python/object:os.system", "<<: *a", "~", "null", "true", "0x1F")


LONG_CELL = "7" * 140_000  # longer than the csv module's field limit


@st.composite
def mutated_table(draw, seed: bytes):
    """A CSV ``seed`` with a few cells replaced by parser-breaking tokens, then byte-mutated: cell edits reach the
    parsing of each column (ids, boxes, tracks, paths), which byte edits alone seldom do."""
    text = seed.decode("utf-8")
    delimiter = ";" if text.count(";") > text.count(",") else ","
    rows = [line.split(delimiter) for line in text.splitlines()]
    for _ in range(draw(st.integers(1, 4))):
        row = draw(st.sampled_from(rows))
        if row:
            row[draw(st.integers(0, len(row) - 1))] = draw(st.one_of(st.sampled_from(TEXT_TOKENS + (LONG_CELL,)),
                                                                     st.text(max_size=6)))
    edited = "\n".join(delimiter.join(row) for row in rows).encode("utf-8", "surrogatepass")
    return draw(st.one_of(st.just(edited), mutated(edited, TEXT_TOKENS)))


@st.composite
def mutated(draw, seed: bytes, tokens: tuple[str, ...] = ()):
    """``seed`` with a few spans replaced by random bytes (or by parser-breaking tokens), maybe truncated."""
    data = bytearray(seed)
    inserts = st.binary(max_size=8)
    if tokens:
        inserts = st.one_of(inserts, st.sampled_from(tokens).map(lambda t: t.encode("utf-8")))
    for _ in range(draw(st.integers(0, 6))):
        position = draw(st.integers(0, len(data)))
        removed = draw(st.integers(0, 8))
        data[position:position + removed] = draw(inserts)
    if draw(st.booleans()) and data:
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def fresh_dir(workspace: Path) -> Path:
    return Path(tempfile.mkdtemp(dir=workspace))


# ---------------------------------------------------------------------------------------------------------------
# images
# ---------------------------------------------------------------------------------------------------------------


def _image_seeds() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(12, 16, 3), dtype=np.uint8)
    rgb = Image.fromarray(pixels)
    seeds = {}
    for name, image, options in (
        ("png", rgb, {}),
        ("palette.png", rgb.convert("P"), {"transparency": 0}),
        ("grey16.png", Image.fromarray((pixels[..., 0].astype(np.uint16) * 257)), {}),
        ("jpg", rgb, {"quality": 80}),
        ("progressive.jpg", rgb, {"progressive": True}),
        ("webp", rgb, {"quality": 80}),
        ("gif", rgb.convert("P"), {}),
        ("bmp", rgb, {}),
        ("tif", rgb, {}),
        ("ppm", rgb, {}),
    ):
        buffer = io.BytesIO()
        fmt = {"jpg": "JPEG", "tif": "TIFF", "ppm": "PPM"}.get(name.rsplit(".", 1)[-1], name.rsplit(".", 1)[-1].upper())
        image.save(buffer, format=fmt, **options)
        seeds[name] = buffer.getvalue()
    return seeds


IMAGE_SEEDS = _image_seeds()


@st.composite
def mutated_image(draw):
    name = draw(st.sampled_from(sorted(IMAGE_SEEDS)))
    return name, draw(mutated(IMAGE_SEEDS[name]))


@fuzz_settings(examples=120)
@given(case=mutated_image(), roi=st.one_of(st.none(), st.lists(st.integers(-5, 40), min_size=4, max_size=4)))
def test_image_decoding_survives_mutated_files(workspace, case, roi):
    from resnetlab.data.preprocessing import Preprocessing, check_image, load_image, prepare_image

    name, data = case
    path = workspace / f"image.{name.rsplit('.', 1)[-1]}"
    path.write_bytes(data)
    image = works_or_refuses(lambda: load_image(path, roi))
    if image is not None:
        assert image.mode == "RGB" and image.width >= 1 and image.height >= 1
        tensor = works_or_refuses(lambda: prepare_image(path, Preprocessing(input_size=8, contrast="equalize"), roi))
        assert tensor is None or tuple(tensor.shape) == (3, 8, 8)
    works_or_refuses(lambda: check_image(path))


# ---------------------------------------------------------------------------------------------------------------
# GTSRB (Kaggle layout), GTSRB (official layout), csv:
# ---------------------------------------------------------------------------------------------------------------


def _copy(seed: Path, workspace: Path) -> Path:
    target = fresh_dir(workspace) / seed.name
    shutil.copytree(seed, target)
    return target


@pytest.fixture(scope="module")
def gtsrb_seed(workspace) -> Path:
    from tests.test_gtsrb_loader import make_gtsrb

    root = make_gtsrb(workspace / "seed-gtsrb", rows_per_class=3, classes=(0, 14), with_track_column=True)
    for name in ("Train.csv",):
        (root / "Test.csv").write_text((root / name).read_text())
    return root


@fuzz_settings(examples=150)
@given(data=st.data(), policy=st.sampled_from(["error", "skip"]))
def test_gtsrb_kaggle_csv_survives_mutation(workspace, gtsrb_seed, data, policy):
    root = _copy(gtsrb_seed, workspace)
    target = root / data.draw(st.sampled_from(["Train.csv", "Test.csv"]))
    target.write_bytes(data.draw(mutated_table(target.read_bytes())))
    works_or_refuses(lambda: open_dataset(DataConfig(spec=f"gtsrb:{root}", on_bad_image=policy)))
    shutil.rmtree(root.parent)


@pytest.fixture(scope="module")
def official_seed(workspace) -> Path:
    from tests.test_data_formats import make_official_gtsrb

    return make_official_gtsrb(workspace / "seed-official", classes=(0, 33), tracks=2, frames=2, test_per_class=2)


@fuzz_settings(examples=100)
@given(data=st.data(), policy=st.sampled_from(["error", "skip"]))
def test_gtsrb_official_csvs_survive_mutation(workspace, official_seed, data, policy):
    root = _copy(official_seed, workspace)
    annotations = sorted(str(p.relative_to(root)) for p in root.rglob("GT-*.csv"))
    target = root / data.draw(st.sampled_from(annotations))
    target.write_bytes(data.draw(mutated_table(target.read_bytes())))
    works_or_refuses(lambda: open_dataset(DataConfig(spec=f"gtsrb:{root}", on_bad_image=policy)))
    shutil.rmtree(root.parent)


@pytest.fixture(scope="module")
def csv_seed(workspace) -> Path:
    root = workspace / "seed-csv"
    (root / "images").mkdir(parents=True)
    rows = ["Path,ClassId,ClassName,Roi.X1,Roi.Y1,Roi.X2,Roi.Y2,Group,Split"]
    for i in range(6):
        Image.new("RGB", (20 + i, 18), (40 * i, 90, 10)).save(root / "images" / f"{i}.png")
        split = ("train", "train", "train", "val", "test", "train")[i]
        rows.append(f"images/{i}.png,{i % 2},{'stop' if i % 2 else 'yield'},1,1,15,14,g{i // 2},{split}")
    (root / "list.csv").write_text("\n".join(rows) + "\n")
    return root


@fuzz_settings(examples=150)
@given(data=st.data(), policy=st.sampled_from(["error", "skip"]))
def test_csv_lists_survive_mutation(workspace, csv_seed, data, policy):
    root = _copy(csv_seed, workspace)
    target = root / "list.csv"
    target.write_bytes(data.draw(mutated_table(target.read_bytes())))
    works_or_refuses(lambda: open_dataset(DataConfig(spec=f"csv:{target}", on_bad_image=policy)))
    shutil.rmtree(root.parent)


# ---------------------------------------------------------------------------------------------------------------
# class folders
# ---------------------------------------------------------------------------------------------------------------

# Names a user's folders can have: any printable text (spaces, dots, unicode, leading dots), but no path separator
# and nothing the file system refuses outright.
folder_names = st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\"),
                       min_size=1, max_size=12).filter(lambda n: n not in (".", "..") and len(n.encode()) < 200)
PNG = IMAGE_SEEDS["png"]
file_contents = st.one_of(st.just(PNG), st.just(b""), st.binary(max_size=64), mutated(PNG))
file_names = st.tuples(folder_names, st.sampled_from([".png", ".jpg", ".JPEG", ".txt", "", ".webp", ".gif"]))


@st.composite
def class_folder_tree(draw):
    splits = draw(st.sampled_from([[""], ["train"], ["train", "test"], ["Training", "val"], ["test"]]))
    classes = draw(st.lists(folder_names, min_size=0, max_size=4, unique_by=str.lower))
    tree = {}
    for split in splits:
        for name in classes:
            if draw(st.integers(0, 5)) == 0:
                continue  # a class missing from this split
            tree[(split, name)] = draw(st.lists(st.tuples(file_names, file_contents), max_size=3))
    listing = draw(st.one_of(st.none(), st.lists(st.one_of(st.sampled_from(classes or ["x"]), folder_names),
                                                 max_size=5).map("\n".join).map(str.encode),
                             st.text(max_size=30).map(str.encode), st.binary(max_size=30)))
    tsv_rows = st.lists(st.tuples(st.sampled_from(classes or ["x"]), folder_names), max_size=4)
    names_table = draw(st.one_of(st.none(), tsv_rows.map(lambda rows: "\n".join(map("\t".join, rows)).encode()),
                                 st.text(max_size=40).map(str.encode), st.binary(max_size=30)))
    return tree, listing, names_table


@fuzz_settings(examples=120)
@given(tree=class_folder_tree(), policy=st.sampled_from(["error", "skip"]))
def test_class_folders_survive_odd_names_and_files(workspace, tree, policy):
    files, listing, names_table = tree
    root = fresh_dir(workspace)
    for (split, name), entries in files.items():
        folder = root / split / name
        folder.mkdir(parents=True, exist_ok=True)
        for (stem, suffix), content in entries:
            (folder / f"{stem}{suffix}").write_bytes(content)
    if listing is not None:
        (root / "classes.txt").write_bytes(listing)
    if names_table is not None:
        (root / "class_names.tsv").write_bytes(names_table)
    source = works_or_refuses(lambda: open_dataset(DataConfig(spec=f"folder:{root}", on_bad_image=policy)))
    if source is not None:
        assert len(source.class_ids) == source.num_classes >= 1
        assert all(0 <= label < source.num_classes for t in source.splits.values() for label in t.labels.tolist())
    shutil.rmtree(root)


# ---------------------------------------------------------------------------------------------------------------
# CIFAR pickle batches
# ---------------------------------------------------------------------------------------------------------------


class _WritesMarker:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.fixture(scope="module")
def cifar_seed(workspace):
    from tests.test_data_formats import make_cifar10_batches

    folder, _ = make_cifar10_batches(workspace / "seed-cifar", per_batch=2)
    marker = workspace / "cifar-code-ran"
    # A seed that would run code if unpickled naively: mutations of it test the refusal, not just the parser.
    hostile = pickle.dumps({"data": np.zeros((1, 3072), np.uint8), "labels": [_WritesMarker(marker)]}, protocol=2)
    return folder, marker, hostile


@st.composite
def mutated_batch(draw, folder: Path, hostile: bytes):
    names = sorted(p.name for p in folder.iterdir())
    name = draw(st.sampled_from(names))
    seed = draw(st.sampled_from([(folder / name).read_bytes(), hostile]))
    return name, draw(mutated(seed))


# Values a batch dict may hold instead of the right ones: wrong types, shapes, dtypes and sizes.
odd_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=5),
              st.binary(max_size=5),
              st.sampled_from([np.zeros((2, 3072), np.uint8), np.zeros((2, 3072), np.float32), np.zeros(3, np.int64),
                               np.full((2, 3072), 300, np.int64), np.zeros((2, 3, 32, 32), np.uint8),
                               np.array(["a", "b"]), np.array([1, -1]), np.array([10, 99])])),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=3), children, max_size=3)),
    max_leaves=6)


@fuzz_settings(examples=80)
@given(data=st.data())
def test_cifar_batches_survive_mutation_and_never_run_code(workspace, cifar_seed, data):
    seed_folder, marker, hostile = cifar_seed
    root = _copy(seed_folder, workspace)
    if data.draw(st.booleans(), label="mutate bytes"):
        name, content = data.draw(mutated_batch(seed_folder, hostile))
        (root / name).write_bytes(content)
    else:  # a well-formed pickle whose dict holds the wrong things
        name = data.draw(st.sampled_from(["data_batch_1", "test_batch", "batches.meta"]))
        with open(root / name, "rb") as handle:
            batch = pickle.load(handle, encoding="latin1")  # the test's own seed file
        key = data.draw(st.sampled_from([b"data", b"labels", b"label_names", "labels"]))
        batch = data.draw(st.one_of(st.just({**batch, key: data.draw(odd_values)}), odd_values))
        (root / name).write_bytes(pickle.dumps(batch, protocol=data.draw(st.sampled_from([2, 4, 5]))))
    works_or_refuses(lambda: open_dataset(DataConfig(spec=f"cifar10:{root.parent}")))
    assert not marker.exists(), "a CIFAR batch ran code"
    shutil.rmtree(root.parent)


# ---------------------------------------------------------------------------------------------------------------
# YAML recipes and KEY=VALUE overrides
# ---------------------------------------------------------------------------------------------------------------


def _recipe_seeds() -> list[bytes]:
    from resnetlab.recipes import RECIPE_DIR

    return [p.read_bytes() for p in sorted(RECIPE_DIR.glob("*.yaml"))]


RECIPE_SEEDS = _recipe_seeds()
YAML_TOKENS = TEXT_TOKENS + ("&a [1, 2]", "*a", "!!binary AAAA", "!!set {a}", "? ", "---\n", "...\n", "%YAML 1.1\n",
                             "data:\n  classes: &x [*x]\n", "[" * 60, "{a: " * 40, "\t", "[" * 3000, "- " * 3000,
                             "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                             "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b]\nd: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c]\n"
                             "e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d]\ndata: {classes: [*e, *e, *e, *e, *e, *e]}\n"
                             "model: {kwargs: {x: [*e, *e, *e, *e, *e, *e]}}\n", "model: {kwargs: &k {x: *k}}\n")


@fuzz_settings(examples=200)
@given(data=st.data())
def test_recipe_files_survive_mutation(workspace, data):
    from resnetlab.recipes import load_recipe

    seed = data.draw(st.sampled_from(RECIPE_SEEDS))
    path = workspace / "recipe.yaml"
    path.write_bytes(data.draw(mutated(seed, YAML_TOKENS)))
    works_or_refuses(lambda: build_config(load_recipe(str(path))))


override_keys = st.one_of(st.sampled_from(["data.spec", "data.classes", "optim.lr", "train.epochs", "model.kwargs",
                                           "optim.betas", "loss.class_weights", "data", "train", "data.x", "..",
                                           "model.kwargs.depth", ""]), st.text(max_size=12))
override_values = st.one_of(st.sampled_from(YAML_TOKENS), st.text(max_size=20),
                            st.lists(st.sampled_from(YAML_TOKENS), max_size=4).map("".join))


@fuzz_settings(examples=300)
@given(overrides=st.lists(st.tuples(override_keys, st.sampled_from(["=", "", "=="]), override_values), max_size=3))
def test_key_value_overrides_survive_odd_text(overrides):
    texts = [f"{key}{sep}{value}" for key, sep, value in overrides]
    works_or_refuses(lambda: build_config({}, {}, texts))


# ---------------------------------------------------------------------------------------------------------------
# checkpoints
# ---------------------------------------------------------------------------------------------------------------


def _checkpoint_state() -> dict:
    from tests.test_security_inputs import _good_state

    return _good_state(classes=("a", "b"))


@pytest.fixture(scope="module")
def checkpoint_seeds(workspace):
    import torch

    state = _checkpoint_state()
    marker = workspace / "checkpoint-code-ran"
    seeds = []
    for legacy in (False, True):
        buffer = io.BytesIO()
        torch.save(state, buffer, _use_new_zipfile_serialization=not legacy)
        seeds.append(buffer.getvalue())
    hostile = io.BytesIO()
    torch.save({**state, "extra": _WritesMarker(marker)}, hostile)
    seeds.append(hostile.getvalue())
    return seeds, marker


def _load_and_build(path: Path):
    from resnetlab.checkpoint import load_checkpoint, model_from_checkpoint

    return model_from_checkpoint(load_checkpoint(path))


@fuzz_settings(examples=120)
@given(data=st.data())
def test_checkpoint_bytes_survive_mutation_and_never_run_code(workspace, checkpoint_seeds, data):
    seeds, marker = checkpoint_seeds
    path = workspace / "fuzzed.pt"
    path.write_bytes(data.draw(mutated(data.draw(st.sampled_from(seeds)))))
    works_or_refuses(lambda: _load_and_build(path))
    assert not marker.exists(), "a checkpoint ran code"


def _paths(tree, prefix=()):
    """Every path to a value in a nested dict (the places a mutation may hit)."""
    yield prefix
    if isinstance(tree, dict):
        for key, value in tree.items():
            if key != "model" or prefix:  # the weights: replaced whole or per tensor below, not walked
                yield from _paths(value, (*prefix, key))


checkpoint_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(), st.text(max_size=8),
              st.sampled_from(["resnet20", "simple_cnn", "squash", "RGB", "logits", "ema", "equalize"]),
              st.builds(lambda shape: __import__("torch").zeros(shape), st.lists(st.integers(0, 3), max_size=3))),
    lambda children: st.one_of(st.lists(children, max_size=3), st.dictionaries(st.text(max_size=6), children, max_size=3)),
    max_leaves=8)


@fuzz_settings(examples=120)
@given(data=st.data())
def test_checkpoint_structures_survive_mutation(workspace, data):
    import torch

    state = _checkpoint_state()
    places = list(_paths(state))
    for _ in range(data.draw(st.integers(1, 3))):
        place = data.draw(st.sampled_from(places))
        if not place:
            continue
        node = state
        for key in place[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if not isinstance(node, dict):
            continue
        if data.draw(st.booleans()):
            node.pop(place[-1], None)
        else:
            node[place[-1]] = data.draw(checkpoint_values)
    if data.draw(st.booleans()):  # the weights too: a tensor of another shape or dtype, or not a tensor at all
        key = data.draw(st.sampled_from(sorted(state["model"])))
        state["model"][key] = data.draw(st.one_of(checkpoint_values, st.just(torch.zeros(1, dtype=torch.int8))))
    path = workspace / "structured.pt"
    torch.save(state, path)
    works_or_refuses(lambda: _load_and_build(path))


@pytest.fixture(scope="module")
def export_record_seed(workspace) -> Path:
    from tests.test_security_inputs import _fake_export

    folder = workspace / "seed-export"
    _fake_export(folder, _checkpoint_state())
    return folder


@fuzz_settings(examples=120)
@given(data=st.data())
def test_export_records_survive_mutation(workspace, export_record_seed, data):
    from resnetlab.deployment.predictor import Predictor
    from resnetlab.deployment.records import read_export_record

    folder = _copy(export_record_seed, workspace)
    record = folder / "preprocessing.json"
    record.write_bytes(data.draw(mutated(record.read_bytes(), TEXT_TOKENS + ('{"a": ' * 3000, "1e999", "-0"))))
    checked = works_or_refuses(lambda: read_export_record(folder))
    if checked is not None:  # what predict and serve build from a record that passed
        Predictor(backend=None, record=checked)
    shutil.rmtree(folder.parent)


@fuzz_settings(examples=80)
@given(case=mutated_image(), max_pixels=st.sampled_from([64, 10_000, 40_000_000]))
def test_service_upload_decoding_survives_mutated_files(case, max_pixels):
    """What `serve` does with an upload: decode it or answer with a status (UploadRejected), nothing else."""
    from resnetlab.data.preprocessing import Preprocessing
    from resnetlab.deployment.decode import UploadRejected, decode_upload

    name, data = case
    try:
        with time_limit():
            decoded = decode_upload(data, f"upload.{name}", Preprocessing(input_size=32), max_pixels=max_pixels)
    except UploadRejected as rejected:
        assert rejected.status in (400, 413, 415), rejected.status
        event(f"rejected with {rejected.status}")
        return
    event("read")
    assert decoded.image.mode == "RGB" and decoded.width * decoded.height <= max_pixels
