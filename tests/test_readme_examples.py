"""The README's own example commands run as written, on small stand-ins for the data they name.

Every ``resnetlab ...`` command in a ```bash block of README.md is matched to a rule below that says how to run it
here: on a tiny class-folder set in place of ``/data/my_photos``, the tiny synthetic set in place of GTSRB and the
demo's synthetic signs, one epoch, small images; a command that cannot run offline or would not return (a
multi-node ``torchrun``, ``serve``) is checked through ``--help``. A README command no rule knows fails the test, so
an example added to the README is run too.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from PIL import Image

from resnetlab.cli.main import main

README = Path(__file__).resolve().parents[1] / "README.md"
FAST = ["--epochs", "1", "train.threads=1", "--quiet"]


def readme_commands() -> list[str]:
    """The ``resnetlab`` commands of README.md's bash blocks, continuation lines joined and comments dropped."""
    return markdown_commands(README)


def markdown_commands(page: Path) -> list[str]:
    """The ``resnetlab`` commands of a Markdown page's bash blocks (``tests/test_doc_examples.py`` reads the docs
    pages with it)."""
    blocks = re.findall(r"```bash\n(.*?)```", page.read_text(), flags=re.S)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if not words:
                    continue
                if any(w == "resnetlab" or w.endswith("/resnetlab") for w in words):
                    commands.append(shlex.join(words))
    return commands


@dataclass
class Place:
    """The stand-ins for what the README's commands name."""

    work: Path  # the current folder the commands run in (runs/, exports/ are relative to it)
    signs: Path  # the tiny synthetic set, GTSRB layout
    photos: Path  # a tiny folder of class sub-folders
    cifar10: Path  # a tiny class-folder copy of CIFAR-10


def _replace(words: list[str], old: str, new: str) -> list[str]:
    return [word.replace(old, new) for word in words]


def _without(words: list[str], option: str, takes_value: bool = True) -> list[str]:
    if option not in words:
        return words
    i = words.index(option)
    return words[:i] + words[i + 1 + takes_value:]


def _args(words: list[str]) -> list[str]:
    """The arguments after ``resnetlab`` (``.venv/bin/resnetlab train`` and ``resnetlab train`` alike)."""
    start = next(i for i, w in enumerate(words) if w.endswith("resnetlab"))
    return words[start + 1:]


def _train(args: list[str], *, data: str | None = None, extra: list[str] = ()) -> list[str]:
    args = _without(_without(args, "--epochs"), "--data")
    if data is not None:
        args = [*args, "--data", data]
    return [*args, *FAST, *extra]


# Each rule: a pattern the command matches, and how to run it here (None: --help only, with the reason).
Rule = tuple[str, Callable[[list[str], Place], list[str]] | None, str]
RULES: list[Rule] = [
    (r"^torchrun ", None, "needs several machines; the DDP tests train with torchrun on one"),
    (r"resnetlab serve ", None, "a server does not return; the service tests start one"),
    (r"resnetlab tune ", None, "16 settings x 2 folds of ResNet-50: the slow test runs it on small data"),
    (r"resnetlab train --data folder:/data/my_photos",
     lambda a, p: _train(a, data=f"folder:{p.photos}", extra=["data.input_size=32", "data.batch_size=8"]), ""),
    (r"resnetlab train --data gtsrb:/data/GTSRB",
     lambda a, p: _train(a, data=f"gtsrb:{p.signs}", extra=["data.batch_size=32"]), ""),
    (r"resnetlab train --recipe cifar10-resnet20 --data cifar10:",
     lambda a, p: _train(a, data=f"cifar10:{p.cifar10}", extra=["data.batch_size=16"]), ""),
    (r"resnetlab train --recipe demo ",
     lambda a, p: _train(a, data=f"gtsrb:{p.signs}", extra=["data.batch_size=32"]), ""),
    (r"resnetlab train$", lambda a, p: _train(a, data=f"gtsrb:{p.signs}", extra=["data.batch_size=32"]), ""),
    (r"resnetlab data split /data/photos ",
     lambda a, p: _replace(_replace(a, "/data/photos_split", str(p.work / "photos_split")), "/data/photos",
                           str(p.photos)), ""),
    (r"resnetlab export runs/demo-XXXX/",
     lambda a, p: _replace(a, "runs/demo-XXXX", str(_a_demo_run(p))), ""),
    (r"resnetlab predict exports/signs ",
     lambda a, p: [w for w in _replace(_replace(a, "photo1.png", str(_an_image(p))), "signs/", str(p.photos / "stop"))
                   if w], ""),
]


def rule_for(command: str) -> Rule:
    matches = [rule for rule in RULES if re.search(rule[0], command)]
    assert matches, f"README command without a rule in {__file__}: {command}"
    return matches[0]


def _a_demo_run(place: Place) -> Path:
    runs = sorted((place.work / "runs").glob("demo-*"))
    assert runs, "the README's export example needs a demo run: run the README's training examples first"
    return runs[-1]


def _an_image(place: Place) -> Path:
    return next((place.photos / "stop").glob("*.png"))


def make_photos(root: Path, per_class: int = 10) -> Path:
    """Two classes of small photos of different sizes, as a user's own folder would hold."""
    for c, (name, colour) in enumerate({"stop": (200, 30, 30), "yield": (240, 240, 240)}.items()):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (40 + 3 * i, 30 + 2 * c), tuple((v + 7 * i) % 256 for v in colour)).save(
                root / name / f"{name}_{i}.png")
    return root


def make_cifar10_folders(root: Path) -> Path:
    from resnetlab.data.formats.cifar import CIFAR10_CLASSES

    for split, count in (("train", 4), ("test", 2)):
        for c, name in enumerate(CIFAR10_CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                Image.new("RGB", (32, 32), (25 * c, 10 * i, 128)).save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def place(tiny_signs, tmp_path_factory) -> Place:
    base = tmp_path_factory.mktemp("readme")
    work = base / "work"
    work.mkdir()
    return Place(work=work, signs=tiny_signs, photos=make_photos(base / "my_photos"),
                 cifar10=make_cifar10_folders(base / "cifar10"))


def test_every_readme_command_has_a_rule():
    commands = readme_commands()
    assert any(c.startswith("resnetlab train --data folder:") for c in commands)
    for command in commands:
        rule_for(command)


# The examples a fresh user runs first; the others (longer, or needing more stand-ins) run with -m slow.
FAST_EXAMPLES = ("resnetlab train --data folder:", "resnetlab data split ",
                 "resnetlab train --recipe demo ", "resnetlab export ", "resnetlab predict ")


def _cases(fast: bool) -> list[str]:
    """The fast examples and the ones checked through --help, or (``fast=False``) the rest."""
    return [c for c in readme_commands() if (c.startswith(FAST_EXAMPLES) or rule_for(c)[1] is None) == fast]


def _run(command: str, place: Place, monkeypatch, capsys) -> None:
    _, substitute, _ = rule_for(command)
    monkeypatch.chdir(place.work)
    words = shlex.split(command)
    if substitute is None:
        args = [_args(words)[0], "--help"]
    else:
        args = substitute(_args(words), place)
    code = main(args)
    err = capsys.readouterr().err
    assert code == 0, f"README command `{command}` (run here as `resnetlab {shlex.join(args)}`) exited {code}: {err}"


@pytest.mark.parametrize("command", _cases(fast=True))
def test_readme_example(command, place, monkeypatch, capsys):
    _run(command, place, monkeypatch, capsys)
    if command.startswith("resnetlab data split"):
        split = place.work / "photos_split"
        assert {p.name for p in split.iterdir()} >= {"train", "test"}


@pytest.mark.slow
@pytest.mark.parametrize("command", _cases(fast=False))
def test_readme_example_slow(command, place, monkeypatch, capsys):
    _run(command, place, monkeypatch, capsys)


@pytest.mark.slow
def test_readme_tune_example_on_small_data(place, monkeypatch, capsys):
    """The README's tune command with its grid cut to the two learning rates (one value of every other key), one
    epoch and small images."""
    command = next(c for c in readme_commands() if c.startswith("resnetlab tune "))
    monkeypatch.chdir(place.work)
    if not (place.work / "photos_split").is_dir():
        assert main(["data", "split", str(place.photos), "--out", "photos_split", "--test-fraction", "0.2"]) == 0
    args = _replace(_args(shlex.split(command)), "/data/photos_split", str(place.work / "photos_split"))
    grid = args.index("--grid")
    end = next(i for i in range(grid + 1, len(args)) if args[i].startswith("--"))
    small_grid = [item if item.startswith("optim.lr=") else item.split(",")[0] for item in args[grid + 1:end]]
    small_grid = [item.replace("train.epochs=7", "train.epochs=1") for item in small_grid]
    args = [*args[:grid + 1], *small_grid, *args[end:], "data.input_size=32", "train.threads=1", "--quiet"]
    code = main(args)
    assert code == 0, capsys.readouterr().err
    assert (place.work / "runs" / "photos-tune" / "refit" / "eval" / "metrics.json").is_file()


def test_demo_recipe_splits_by_track_as_before(tiny_signs):
    """data.split=auto in the demo recipe groups the synthetic signs by track exactly as `grouped` did, so the demo's
    splits (and results) are unchanged, while data without tracks gets a stratified split instead of an error."""
    from resnetlab.config import build_config
    from resnetlab.data.datasets import open_dataset
    from resnetlab.data.splits import plan_splits
    from resnetlab.recipes import load_recipe

    cfg = build_config(load_recipe("demo"), {"data.spec": f"gtsrb:{tiny_signs}"}, [])
    assert cfg.data.split == "auto"
    source = open_dataset(cfg.data)
    plans = [plan_splits(source.splits, strategy=strategy, val_fraction=cfg.data.val_fraction,
                         test_fraction=cfg.data.test_fraction, seed=cfg.data.split_seed, group_kind=source.group_kind)
             for strategy in (cfg.data.split, "grouped")]
    assert plans[0].strategy == plans[1].strategy == "grouped by track"
    for name in ("train", "val", "test"):
        assert getattr(plans[0], name).fingerprint() == getattr(plans[1], name).fingerprint(), name


def test_recipes_group_only_where_they_must():
    """A recipe that may meet data without groups says auto; grouped is for GTSRB recipes, whose tracks must not
    be split (they stop on a copy without track numbers rather than leak)."""
    from resnetlab.config import build_config
    from resnetlab.recipes import list_recipes, load_recipe

    for name in list_recipes():
        cfg = build_config(load_recipe(name), {}, [])
        if cfg.data.split != "auto":
            assert cfg.data.split == "grouped" and cfg.data.spec.startswith("gtsrb:"), name
