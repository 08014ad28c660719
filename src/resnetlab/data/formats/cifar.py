"""``cifar10:PATH`` and ``cifar100:PATH``: the published python pickle batches, or class-folder copies of them.

PATH may hold (or be) ``cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``, ``batches.meta``) or
``cifar-100-python/`` (``train``, ``test``, ``meta``), as the archives unpack; or class folders (``train/<class>/``,
``test/<class>/``, optionally ``classes.txt``) of PNG/JPEG copies. ``data.download=true`` fetches the archive into
PATH through torchvision when neither is there. CIFAR-100 is read with its 100 fine labels, or its 20 coarse
superclasses with ``data.cifar100_labels=coarse`` (for class folders through the published fine-to-coarse table).

How pickled images become samples: every other part of resnetlab (statistics, evaluation galleries, Grad-CAM,
``predict`` on a listed file, the report re-rendered later) works from image *paths*. So the first time a set of
pickle batches is read, its images are written once as PNG files (lossless, about 2.5 KB each) into
``<cache>/cifar/<content hash of the batch files>/<batch>/<index>.png`` and the sample table points at them; the
index in the file name is the image's position in its batch. Later reads find the folder by the same hash and write
nothing. The folder appears in one rename when complete, so an interrupted run never leaves half of it behind.
"""

from __future__ import annotations

import functools
import hashlib
import os
import pickle
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from resnetlab.config import DataConfig, shown
from resnetlab.data.cache import cache_root
from resnetlab.data.formats._registry import register_format
from resnetlab.data.formats.folder import find_split_dirs, read_class_folders
from resnetlab.data.records import DatasetSource, SampleTable
from resnetlab.errors import DataError, first_line

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# The CIFAR-100 superclasses and their five classes each (Krizhevsky 2009, https://www.cs.toronto.edu/~kriz/cifar.html).
CIFAR100_SUPERCLASSES: dict[str, tuple[str, ...]] = {
    "aquatic_mammals": ("beaver", "dolphin", "otter", "seal", "whale"),
    "fish": ("aquarium_fish", "flatfish", "ray", "shark", "trout"),
    "flowers": ("orchid", "poppy", "rose", "sunflower", "tulip"),
    "food_containers": ("bottle", "bowl", "can", "cup", "plate"),
    "fruit_and_vegetables": ("apple", "mushroom", "orange", "pear", "sweet_pepper"),
    "household_electrical_devices": ("clock", "keyboard", "lamp", "telephone", "television"),
    "household_furniture": ("bed", "chair", "couch", "table", "wardrobe"),
    "insects": ("bee", "beetle", "butterfly", "caterpillar", "cockroach"),
    "large_carnivores": ("bear", "leopard", "lion", "tiger", "wolf"),
    "large_man-made_outdoor_things": ("bridge", "castle", "house", "road", "skyscraper"),
    "large_natural_outdoor_scenes": ("cloud", "forest", "mountain", "plain", "sea"),
    "large_omnivores_and_herbivores": ("camel", "cattle", "chimpanzee", "elephant", "kangaroo"),
    "medium_mammals": ("fox", "porcupine", "possum", "raccoon", "skunk"),
    "non-insect_invertebrates": ("crab", "lobster", "snail", "spider", "worm"),
    "people": ("baby", "boy", "girl", "man", "woman"),
    "reptiles": ("crocodile", "dinosaur", "lizard", "snake", "turtle"),
    "small_mammals": ("hamster", "mouse", "rabbit", "shrew", "squirrel"),
    "trees": ("maple_tree", "oak_tree", "palm_tree", "pine_tree", "willow_tree"),
    "vehicles_1": ("bicycle", "bus", "motorcycle", "pickup_truck", "train"),
    "vehicles_2": ("lawn_mower", "rocket", "streetcar", "tank", "tractor"),
}
# The published label order is alphabetical for all three lists.
CIFAR100_CLASSES = tuple(sorted(name for names in CIFAR100_SUPERCLASSES.values() for name in names))
CIFAR100_COARSE_CLASSES = tuple(sorted(CIFAR100_SUPERCLASSES))
COARSE_OF_FINE = {fine: coarse for coarse, names in CIFAR100_SUPERCLASSES.items() for fine in names}

LABEL_KEYS = ("labels", "fine_labels", "coarse_labels")
_LAYOUTS = {
    "cifar10": {"folder": "cifar-10-batches-py", "train": [f"data_batch_{i}" for i in range(1, 6)],
                "test": ["test_batch"], "meta": "batches.meta"},
    "cifar100": {"folder": "cifar-100-python", "train": ["train"], "test": ["test"], "meta": "meta"},
}


def find_batches(root: Path, kind: str) -> Path | None:
    """The folder holding the pickle batches of ``kind`` (``cifar10``/``cifar100``) at or below ``root``."""
    layout = _LAYOUTS[kind]
    for folder in (root, root / layout["folder"]):
        if folder.is_dir() and all((folder / name).is_file() for name in layout["train"] + layout["test"]):
            return folder
    return None


def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    """``_codecs.encode`` as Python 3 protocol-2 pickles use it for ``bytes`` (numpy's raw pixels among them):
    only the latin1 round trip, not an arbitrary codec."""
    if not isinstance(text, str) or encoding.replace("-", "").replace("_", "").lower() not in ("latin1", "iso88591"):
        raise pickle.UnpicklingError(f"_codecs.encode({type(text).__name__}, {encoding!r}) is not a latin1 byte string")
    return text.encode("latin1")


@functools.cache
def _batch_globals() -> dict[tuple[str, str], object]:
    """Every global a CIFAR batch may name, and the object it stands for: the pieces numpy rebuilds arrays and
    scalars from (under the module names of numpy 1 and numpy 2 pickles alike) and the bytes of Python 3 pickles."""
    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy 1
        from numpy.core import multiarray, numeric

    allowed: dict[tuple[str, str], object] = {("_codecs", "encode"): _latin1_encode}
    for package in ("numpy.core", "numpy._core"):
        allowed |= {(f"{package}.multiarray", "_reconstruct"): multiarray._reconstruct,
                    (f"{package}.multiarray", "scalar"): multiarray.scalar,
                    (f"{package}.numeric", "_frombuffer"): numeric._frombuffer}
    return allowed | {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype}


class _BatchUnpickler(pickle.Unpickler):
    """Reads what the published batches hold (dicts, lists, strings, numbers, numpy arrays) and refuses any other
    global: unpickling calls whatever a pickle names, so a crafted batch could otherwise run any code."""

    def __init__(self, handle, path: Path):
        # The published batches are Python 2 pickles; latin1 turns their byte strings into str keys losslessly.
        super().__init__(handle, encoding="latin1")
        self.path = path
        self.allowed = _batch_globals()

    def find_class(self, module: str, name: str) -> object:
        try:
            return self.allowed[(module, name)]
        except KeyError:
            refused = shown(f"{module}.{name}")  # quoted and bounded: the names come from the file
            raise DataError(f"'{self.path}' is not a CIFAR batch: it asks to load {refused}, which CIFAR batches "
                            "never hold (only lists, numbers, strings and numpy arrays), so resnetlab "
                            "refused to read it; use the batches of the published archive") from None

    def persistent_load(self, pid: object) -> object:
        raise pickle.UnpicklingError("persistent ids are not part of a CIFAR batch")


def _load_batch(path: Path) -> dict[str, object]:
    try:
        with open(path, "rb") as handle:
            batch = _BatchUnpickler(handle, path).load()
    except DataError:
        raise
    except MemoryError:
        raise DataError(f"'{path}' is not a readable CIFAR pickle batch (it asks for more memory than there is); "
                        "re-download or re-extract the archive") from None
    except Exception as err:  # noqa: BLE001 - the bytes are the user's: any failure to unpickle them is the file's
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"'{path}' is not a readable CIFAR pickle batch ({type(err).__name__}: {reason[:200]}); "
                        "re-download or re-extract the archive") from None
    if not isinstance(batch, dict):
        raise DataError(f"'{path}' is not a CIFAR batch (a pickled dict with 'data' and labels)")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in batch.items()}


def _as_array(batch: dict[str, object], key: str, dtype: type, path: Path) -> np.ndarray:
    value = batch[key]
    # An array, or a flat list of integers (the published label lists). Nested lists are refused before numpy sees
    # them: pickle references let a small file hold lists that expand to billions of items.
    if not isinstance(value, np.ndarray) and not (
            isinstance(value, list) and all(isinstance(item, (int, np.integer)) for item in value)):
        raise DataError(f"'{path}': the '{key}' entry is {type(value).__name__}, not an array or a list of integers; "
                        "re-download or re-extract the archive")
    try:
        with np.errstate(all="ignore"):
            array = np.asarray(value)
            if array.dtype.kind not in "biu" or (array.size and (array.min() < np.iinfo(dtype).min
                                                                 or array.max() > np.iinfo(dtype).max)):
                raise ValueError(f"values of type {array.dtype} where integers {np.iinfo(dtype).min}.."
                                 f"{np.iinfo(dtype).max} belong")
            return array.astype(dtype)
    except (ValueError, TypeError, OverflowError) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise DataError(f"'{path}': the '{key}' entry is not an array of integers ({reason[:200]}); "
                        "re-download or re-extract the archive") from None


def _batch_arrays(batch: dict[str, object], path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    if "data" not in batch or label_key not in batch:
        raise DataError(f"'{path}' lacks the '{'data' if 'data' not in batch else label_key}' entry of a CIFAR batch "
                        f"(it has: {', '.join(sorted(map(str, batch)))})")
    data = _as_array(batch, "data", np.uint8, path)
    labels = _as_array(batch, label_key, np.int64, path)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or labels.ndim != 1 or len(data) != len(labels):
        raise DataError(f"'{path}': 'data' has shape {data.shape} for labels of shape {labels.shape}; a CIFAR batch "
                        "holds N rows of 3072 bytes (32x32, red then green then blue planes) and N labels")
    return data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels


def _label_lists(batch: dict[str, object], path: Path, images: int) -> dict[str, np.ndarray]:
    """Every label list of the batch (fine and coarse ones in CIFAR-100), one label per image."""
    lists = {key: _as_array(batch, key, np.int64, path) for key in LABEL_KEYS if key in batch}
    for key, labels in lists.items():
        if labels.shape != (images,):
            raise DataError(f"'{path}': '{key}' has shape {labels.shape} for {images} images; a CIFAR batch holds "
                            "one label per image")
    return lists


def _content_hash(paths: list[Path]) -> str:
    digest = hashlib.sha1()
    for path in paths:
        digest.update(path.name.encode())
        with open(path, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return digest.hexdigest()[:16]


def materialise_batches(folder: Path, kind: str, *, threads: int = 2) -> Path:
    """Write every image of the pickle batches as ``<cache>/cifar/<hash>/<batch>/<index:05d>.png`` (once)."""
    layout = _LAYOUTS[kind]
    batch_files = [folder / name for name in layout["train"] + layout["test"]]
    target = cache_root() / "cifar" / f"{kind}-{_content_hash(batch_files)}"
    if (target / "complete").is_file():
        return target
    label_key = "labels" if kind == "cifar10" else "fine_labels"
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        for batch_file in batch_files:
            batch = _load_batch(batch_file)
            images, _ = _batch_arrays(batch, batch_file, label_key)
            out = partial / batch_file.name
            out.mkdir(parents=True)
            # The label lists too, so that later reads need neither unpickle the batches nor hold their pixels.
            np.savez(out / "labels.npz", **_label_lists(batch, batch_file, len(images)))

            def write(i: int, images=images, out=out) -> None:
                # compress_level 1: a fifth of the encoding time of the default for a few % more bytes.
                Image.fromarray(images[i]).save(out / f"{i:05d}.png", compress_level=1)

            with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
                list(pool.map(write, range(len(images)), chunksize=256))
        (partial / "complete").write_text(f"{folder}\n")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)  # a batch that cannot be read leaves nothing in the cache
        raise
    try:
        os.replace(partial, target)
    except OSError:  # another process finished the same folder first: use theirs
        shutil.rmtree(partial, ignore_errors=True)
        if not (target / "complete").is_file():
            raise
    return target


def _meta_names(folder: Path, kind: str, key: str, default: tuple[str, ...]) -> list[str]:
    meta_file = folder / _LAYOUTS[kind]["meta"]
    if meta_file.is_file():
        names = _load_batch(meta_file).get(key)
        if isinstance(names, list) and len(names) == len(default):
            if not all(isinstance(name, (str, bytes)) for name in names):
                raise DataError(f"'{meta_file}': '{key}' is not a list of class names (strings); re-download or "
                                "re-extract the archive")
            return [name.decode("latin1") if isinstance(name, bytes) else name for name in names]
    return list(default)


def read_cifar_pickles(folder: Path, kind: str, spec: str, labels: str = "fine") -> DatasetSource:
    layout = _LAYOUTS[kind]
    if kind == "cifar10":
        label_key, names = "labels", _meta_names(folder, kind, "label_names", CIFAR10_CLASSES)
    elif labels == "coarse":
        label_key, names = "coarse_labels", _meta_names(folder, kind, "coarse_label_names", CIFAR100_COARSE_CLASSES)
    else:
        label_key, names = "fine_labels", _meta_names(folder, kind, "fine_label_names", CIFAR100_CLASSES)
    images_root = materialise_batches(folder, kind)
    splits = {}
    for split in ("train", "test"):
        paths, all_labels = [], []
        for name in layout[split]:
            with np.load(images_root / name / "labels.npz") as stored:
                batch_labels = stored[label_key] if label_key in stored else np.zeros(0, dtype=np.int64)
            if len(batch_labels) == 0 or batch_labels.min() < 0 or batch_labels.max() >= len(names):
                raise DataError(f"'{folder / name}': '{label_key}' is missing or outside 0..{len(names) - 1}")
            paths += [str(images_root / name / f"{i:05d}.png") for i in range(len(batch_labels))]
            all_labels.append(batch_labels)
        splits[split] = SampleTable(paths, np.concatenate(all_labels))
    return DatasetSource(spec=spec, root=folder, class_ids=list(names), class_names=list(names), splits=splits,
                         notes=[f"{kind} pickle batches in {folder}; images as PNG files in {images_root}"])


def read_cifar_folders(root: Path, kind: str, spec: str, labels: str = "fine") -> DatasetSource:
    source = read_class_folders(root, spec)
    if kind == "cifar100" and labels == "coarse":
        unknown = [name for name in source.class_ids if name not in COARSE_OF_FINE]
        if unknown:
            raise DataError(f"{spec}: class folder(s) {unknown[:5]} are not CIFAR-100 fine classes, so their "
                            "superclass is unknown; use data.cifar100_labels=fine")
        coarse_index = {name: i for i, name in enumerate(CIFAR100_COARSE_CLASSES)}
        fine_to_coarse = np.asarray([coarse_index[COARSE_OF_FINE[name]] for name in source.class_ids], dtype=np.int64)
        for table in source.splits.values():
            table.labels = fine_to_coarse[table.labels]
        present = sorted(set(fine_to_coarse.tolist()))
        if present != list(range(len(CIFAR100_COARSE_CLASSES))):  # keep indices dense when some superclasses lack folders
            dense = np.full(len(CIFAR100_COARSE_CLASSES), -1, dtype=np.int64)
            dense[present] = np.arange(len(present))
            for table in source.splits.values():
                table.labels = dense[table.labels]
        source.class_ids = [CIFAR100_COARSE_CLASSES[i] for i in present]
        source.class_names = list(source.class_ids)
    return source


def open_cifar(kind: str, argument: str, cfg: DataConfig) -> DatasetSource:
    root = Path(argument).expanduser()
    spec = f"{kind}:{argument}"
    folder = find_batches(root, kind)
    has_class_folders = root.is_dir() and bool(find_split_dirs(root))
    if folder is None and not has_class_folders and cfg.download:
        download_cifar(root, kind)
        folder = find_batches(root, kind)
    if folder is not None:
        return read_cifar_pickles(folder, kind, spec, cfg.cifar100_labels)
    if has_class_folders:
        return read_cifar_folders(root, kind, spec, cfg.cifar100_labels)
    if not root.is_dir():
        raise DataError(f"{kind} folder '{root}' does not exist; check the path in --data, or add data.download=true")
    raise DataError(f"'{root}' holds neither {_LAYOUTS[kind]['folder']}/ (the python pickle batches) nor train/ and "
                    f"test/ class folders; point --data {kind}:PATH at one of them, or add data.download=true")


def download_cifar(root: Path, kind: str) -> None:
    """Fetch and unpack the python version of the archive into ``root`` through torchvision (needs internet)."""
    from torchvision.datasets import CIFAR10, CIFAR100

    dataset = CIFAR10 if kind == "cifar10" else CIFAR100
    root.mkdir(parents=True, exist_ok=True)
    try:
        dataset(str(root), train=True, download=True)
    except (OSError, RuntimeError, ValueError) as err:
        raise DataError(f"could not download {kind} into '{root}': {first_line(err)}; "
                        f"check the internet connection, or unpack {dataset.filename} there by hand") from None


@register_format("cifar10", "CIFAR-10: the python pickle batches (cifar-10-batches-py) or train/ test/ class folders")
def open_cifar10(argument: str, cfg: DataConfig) -> DatasetSource:
    return open_cifar("cifar10", argument, cfg)


@register_format("cifar100", "CIFAR-100 (fine labels; data.cifar100_labels=coarse for the 20 superclasses): "
                             "pickle batches (cifar-100-python) or class folders")
def open_cifar100(argument: str, cfg: DataConfig) -> DatasetSource:
    return open_cifar("cifar100", argument, cfg)
