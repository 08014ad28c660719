"""Every example of the documentation runs: the ```python blocks of README.md and docs/**/*.md, and the
``resnetlab`` commands of the docs pages' ```bash blocks (README's own commands: ``tests/test_readme_examples.py``).

Python: the blocks of a page run in order in one namespace (as in a notebook), in an empty folder holding
``sign.png`` (a traffic-sign image, the stand-in for the reader's). The data they name is replaced by small
stand-ins (``STAND_INS``: the tiny synthetic set for GTSRB and Belgian signs, a tiny folder of photos), and
``rl.train`` / ``rl.tune`` run one epoch on one thread, on a small synthetic set and small images (``_small``);
an example naming a ``/data/`` path without a stand-in fails. Pages that need a trained ``runs/gtsrb`` (new
domain, deployment) get one, trained on the tiny set.

Commands: each is matched to a rule (``DOC_RULES``) that runs it on the same stand-ins with one epoch, or through
``--help`` where it cannot run here (a server, a benchmark), with the reason; a docs command without a rule fails,
so a command added to the docs is run too.

The default suite runs README's and getting-started's Python and checks that every command has a rule; the other
pages run with ``-m slow``.
"""

from __future__ import annotations

import re
import shlex
import shutil
from pathlib import Path
from typing import Any

import pytest

from tests.test_readme_examples import (
    FAST,
    _args,
    _without,
    make_cifar10_folders,
    make_photos,
    markdown_commands,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
FAST_PYTHON_PAGES = ("README.md", "docs/getting-started.md")
SYNTHETIC_PER_CLASS = 24  # the demo's synthetic set in the examples: 24 training images per class, not 300


def page_id(page: Path) -> str:
    return str(page.relative_to(ROOT))


def python_blocks(page: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", page.read_text(), flags=re.S)


# ---------------------------------------------------------------------------------------------------------------
# stand-ins
# ---------------------------------------------------------------------------------------------------------------


class StandIns:
    """The small data the examples run on, made once per module."""

    def __init__(self, base: Path, tiny_signs: Path):
        self.base = base
        self.signs = tiny_signs
        self.photos = make_photos(base / "photos", per_class=16)
        self.cifar10 = make_cifar10_folders(base / "cifar10")
        self._cifar100: Path | None = None
        self.photos_split = base / "photos_split"
        from resnetlab.cli.main import main

        assert main(["data", "split", str(self.photos), "--out", str(self.photos_split), "--test-fraction", "0.2",
                     "--seed", "0"]) == 0
        self.sign_png = base / "sign.png"
        from PIL import Image

        first = sorted((tiny_signs / "Test").rglob("*.png"))[0]
        Image.open(first).convert("RGB").save(self.sign_png)

    @property
    def cifar100(self) -> Path:
        if self._cifar100 is None:
            from PIL import Image

            from resnetlab.data.formats.cifar import CIFAR100_CLASSES

            root = self.base / "cifar100"
            for split, count in (("train", 3), ("test", 1)):
                for c, name in enumerate(CIFAR100_CLASSES):
                    (root / split / name).mkdir(parents=True)
                    for i in range(count):
                        Image.new("RGB", (32, 32), (2 * c, 60 + 40 * i, 128)).save(root / split / name / f"{i}.png")
            self._cifar100 = root
        return self._cifar100

    def paths(self) -> dict[str, str]:
        """What the docs name -> the stand-in, longest first so that a longer name is replaced before its prefix."""
        table = {
            "/data/GTSRB": str(self.signs),
            "../shared/data/gtsrb-dev": str(self.signs),
            "../shared/data/gtsrb-train": str(self.signs),
            "/data/signs-belgium/labels.csv": str(self.signs / "Test.csv"),
            "/data/photos_split": str(self.photos_split),
            "/data/photos": str(self.photos),
            "../shared/data/hymenoptera_data/train": str(self.photos),
            "/data/imagenet": str(self.photos),
            "/data/cifar10": str(self.cifar10),
        }
        return dict(sorted(table.items(), key=lambda item: -len(item[0])))


@pytest.fixture(scope="module")
def stand_ins(tiny_signs, tmp_path_factory) -> StandIns:
    return StandIns(tmp_path_factory.mktemp("doc-data"), tiny_signs)


def _substitute(text: str, stand_ins: StandIns) -> str:
    for name, path in stand_ins.paths().items():
        text = text.replace(name, path)
    return text


# ---------------------------------------------------------------------------------------------------------------
# Python blocks
# ---------------------------------------------------------------------------------------------------------------


def _small(function, *, tune: bool = False):
    """``rl.train`` / ``rl.tune`` as the examples call them, at the size of a test: one epoch, one thread, no
    progress bar, a 24-per-class synthetic set, 32 px class folders, a grid cut to two settings and two folds."""

    def call(data: str | None = None, *args: Any, **kwargs: Any):
        kwargs["epochs"] = 1
        kwargs["progress"] = False
        kwargs.setdefault("train__threads", 1)
        if data in (None, "synthetic-signs"):
            kwargs.setdefault("data__synthetic_per_class", SYNTHETIC_PER_CLASS)
        elif str(data).startswith("folder:"):
            kwargs.setdefault("data__input_size", 32)
            kwargs.setdefault("data__batch_size", 8)
        if tune:
            grid = kwargs.get("grid") or {}
            kwargs["grid"] = {key: list(values)[:2] if i == 0 else list(values)[:1]
                              for i, (key, values) in enumerate(grid.items())}
            kwargs["folds"] = min(kwargs.get("folds", 3), 2)
            if str(data).startswith("folder:"):
                kwargs["grid"].pop("data.batch_size", None)
        return function(data, *args, **kwargs)

    return call


def _small_dataset(function):
    def call(spec: str, *args: Any, **kwargs: Any):
        if spec == "synthetic-signs":
            overrides = dict(kwargs.get("overrides") or {})
            overrides.setdefault("data.synthetic_per_class", SYNTHETIC_PER_CLASS)
            kwargs["overrides"] = overrides
        return function(spec, *args, **kwargs)

    return call


@pytest.fixture(scope="module")
def gtsrb_run(stand_ins, tmp_path_factory) -> Path:
    """The ``runs/gtsrb`` the new-domain and deployment pages start from: the GTSRB page's run, on the tiny set."""
    from resnetlab.api import train

    out = tmp_path_factory.mktemp("gtsrb-run") / "gtsrb"
    train(f"gtsrb:{stand_ins.signs}", recipe="gtsrb-fast", epochs=1, train__threads=1, progress=False, out=out)
    return out


NEEDS_GTSRB_RUN = ("docs/workflows/new-domain.md", "docs/workflows/deployment.md")


def _workdir(tmp_path: Path, page: Path, stand_ins: StandIns, request) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(stand_ins.sign_png, work / "sign.png")
    if page_id(page) in NEEDS_GTSRB_RUN:
        shutil.copytree(request.getfixturevalue("gtsrb_run"), work / "runs" / "gtsrb")
    return work


def _run_python(page: Path, stand_ins: StandIns, tmp_path: Path, monkeypatch, request) -> dict[str, Any]:
    import resnetlab
    from resnetlab import api

    monkeypatch.chdir(_workdir(tmp_path, page, stand_ins, request))
    monkeypatch.setattr(resnetlab, "train", _small(api.train), raising=False)
    monkeypatch.setattr(resnetlab, "tune", _small(api.tune, tune=True), raising=False)
    monkeypatch.setattr(resnetlab, "open_dataset", _small_dataset(api.open_dataset), raising=False)
    namespace: dict[str, Any] = {"__name__": "__doc_example__"}
    for i, block in enumerate(python_blocks(page)):
        source = _substitute(block, stand_ins)
        left = re.findall(r"[\"'](/data/[^\"']*)", source)
        assert not left, f"{page_id(page)} python block {i + 1} names {left}: give it a stand-in in {__file__}"
        try:
            exec(compile(source, f"{page_id(page)}, python block {i + 1}", "exec"), namespace)
        except Exception as error:
            raise AssertionError(f"{page_id(page)}, python block {i + 1} failed:\n{block}") from error
    return namespace


PYTHON_PAGES = [page for page in PAGES if python_blocks(page)]


def test_the_docs_have_python_examples():
    ids = {page_id(page) for page in PYTHON_PAGES}
    assert {"README.md", "docs/getting-started.md", "docs/workflows/gtsrb.md", "docs/workflows/own-photos.md",
            "docs/workflows/new-domain.md", "docs/workflows/deployment.md"} <= ids


@pytest.mark.parametrize("page", [p for p in PYTHON_PAGES if page_id(p) in FAST_PYTHON_PAGES], ids=page_id)
def test_python_examples(page, stand_ins, tmp_path, monkeypatch, request):
    namespace = _run_python(page, stand_ins, tmp_path, monkeypatch, request)
    run = namespace["run"]
    assert 0.0 <= run.metrics["top1"] <= 1.0 and run.status == "finished"


@pytest.mark.slow
@pytest.mark.parametrize("page", [p for p in PYTHON_PAGES if page_id(p) not in FAST_PYTHON_PAGES], ids=page_id)
def test_python_examples_slow(page, stand_ins, tmp_path, monkeypatch, request):
    _run_python(page, stand_ins, tmp_path, monkeypatch, request)


# ---------------------------------------------------------------------------------------------------------------
# resnetlab commands of the docs pages
# ---------------------------------------------------------------------------------------------------------------


def _latest(work: Path, pattern: str) -> str:
    found = sorted(work.glob(pattern))
    assert found, f"nothing matches {pattern} in {work}: the page's earlier commands should have made it"
    return str(found[-1].relative_to(work))


def _standin_command(args: list[str], stand_ins: StandIns, work: Path) -> list[str]:
    """A docs command, run here: data paths to stand-ins, ``<time>`` to what the earlier commands wrote, and
    training at test size."""
    words = []
    for word in args:
        if word.startswith("[") and word.endswith("]"):
            continue  # [--json]: an optional flag in the docs' notation
        if "<time>" in word:
            word = _latest(work, word.replace("<time>", "*"))
        if "cifar100:/data/cifar100" in word:
            word = f"cifar100:{stand_ins.cifar100}"
        word = word.replace("/data/photos_split", str(work / "photos_split"))  # the page's own split command makes it
        words.append(_substitute(word, stand_ins))
    command = words[0]
    data = next((w for w in words if w.startswith(("folder:", "cifar10:", "cifar100:"))), None)
    small_images = ["data.input_size=32", "data.batch_size=8"] if data else ["data.batch_size=32"]
    if command == "train":
        if "--data" not in words and "--resume" not in words:  # the demo's synthetic set, at the examples' size
            small_images.append(f"data.synthetic_per_class={SYNTHETIC_PER_CLASS}")
        return [*_without(words, "--epochs"), *FAST, *small_images]
    if command == "tune":
        grid = words.index("--grid")
        end = next((i for i in range(grid + 1, len(words)) if words[i].startswith("--")), len(words))
        items = [w for w in words[grid + 1:end] if not w.startswith(("data.batch_size=", "train.epochs="))]
        small_grid = [w if i == 0 else w.split(",")[0] for i, w in enumerate(items)]
        rest = [w for w in words[end:] if not w.startswith("data.input_size=")]
        rest = _without(rest, "--folds")
        return [*words[:grid + 1], *small_grid, *rest, "--folds", "2", *FAST, *small_images]
    if command == "data" and words[1] == "synth":
        return [*words, "--per-class", "8"]
    if command == "data" and words[1] == "profile":
        return [*words, "--files", "16", "--batches", "2", "--steps", "2"]
    return words


# Each rule: a pattern the command matches, and whether it runs (True) or is checked through --help (the reason).
DOC_RULES: list[tuple[str, bool | str]] = [
    (r"resnetlab serve ", "a server does not return; tests/test_deploy_service.py starts one"),
    (r"resnetlab bench ", "a benchmark times minutes of work; tests/test_bench_train.py and test_deploy_bench.py run "
                          "it small"),
    (r"resnetlab train --resume ", "resumes a stopped run; tests/test_engine_resume.py and test_kill_resume.py stop "
                                   "runs and resume them"),
    (r"resnetlab train( |$)", True),
    (r"resnetlab tune ", True),
    (r"resnetlab evaluate ", True),
    (r"resnetlab compare ", True),
    (r"resnetlab export ", True),
    (r"resnetlab predict ", True),
    (r"resnetlab data (split|synth|profile|sample) ", True),
    (r"resnetlab calibrate ", True),
    (r"resnetlab adapt ", True),
    (r"resnetlab runs( |$)", True),
]


def doc_rule(command: str) -> tuple[str, bool | str]:
    matches = [rule for rule in DOC_RULES if re.search(rule[0], command)]
    assert matches, f"docs command without a rule in {__file__}: {command}"
    return matches[0]


COMMAND_PAGES = [page for page in sorted(DOCS.rglob("*.md")) if markdown_commands(page)]


def test_every_docs_command_has_a_rule_and_a_stand_in(stand_ins):
    commands = [c for page in COMMAND_PAGES for c in markdown_commands(page)]
    assert any(c.startswith("resnetlab evaluate ") and "csv:" in c for c in commands)
    for command in commands:
        doc_rule(command)
        left = re.findall(r"(?<![\w.])/data/\S*", _substitute(command, stand_ins).replace("cifar100:/data/cifar100", ""))
        assert not left, f"docs command `{command}` names {left}: give it a stand-in in {__file__}"


def _run_commands(page: Path, stand_ins: StandIns, tmp_path: Path, monkeypatch, capsys, request, *, run: bool):
    from resnetlab.cli.main import main

    work = _workdir(tmp_path, page, stand_ins, request) if run else tmp_path
    monkeypatch.chdir(work)
    for command in markdown_commands(page):
        _, runs = doc_rule(command)
        args = _args(shlex.split(command))
        if runs is True and not run:
            continue
        args = _standin_command(args, stand_ins, work) if runs is True else [args[0], "--help"]
        code = main(args)
        err = capsys.readouterr().err
        assert code == 0, f"{page_id(page)}: `{command}` (run here as `resnetlab {shlex.join(args)}`) exited {code}: {err}"


@pytest.mark.parametrize("page", COMMAND_PAGES, ids=page_id)
def test_docs_commands_that_cannot_run_here_have_help(page, stand_ins, tmp_path, monkeypatch, capsys, request):
    _run_commands(page, stand_ins, tmp_path, monkeypatch, capsys, request, run=False)


@pytest.mark.slow
@pytest.mark.parametrize("page", COMMAND_PAGES, ids=page_id)
def test_docs_commands(page, stand_ins, tmp_path, monkeypatch, capsys, request):
    _run_commands(page, stand_ins, tmp_path, monkeypatch, capsys, request, run=True)
