"""Report and comparison rendering from synthetic run directories."""

from __future__ import annotations

import base64
import csv
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from sklearn.metrics import f1_score

from resnetlab.errors import ResnetlabError
from resnetlab.evaluation.gradcam import save_gradcam_npz
from resnetlab.evaluation.metrics import evaluate_predictions
from resnetlab.reporting import compare_runs, render_report
from resnetlab.reporting import plots
from resnetlab.reporting.document import Document
from resnetlab.reporting.report import _training
from resnetlab.reporting.runfiles import RunFiles

torch.set_num_threads(1)

# A name with a pipe checks Markdown table escaping.
CLASS_NAMES = ["Speed limit (30km/h)", "Stop | halt", "No entry", "Yield", "Priority road", "Keep right"]
WEAK_CLASS = 3  # "Yield" is mostly predicted as class 4, so its F1 falls below the 0.9 finding threshold


def _write_images(folder, count):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        path = folder / f"img_{i:03d}.png"
        Image.new("RGB", (24, 24), ((40 * i) % 256, (90 * i) % 256, 200)).save(path)
        paths.append(str(path))
    return paths


def _logits(rng, targets, confuse_weak=True):
    logits = rng.normal(size=(len(targets), len(CLASS_NAMES)))
    logits[np.arange(len(targets)), targets] += 4.0
    if confuse_weak:
        weak = np.flatnonzero(targets == WEAK_CLASS)[::2]
        logits[weak, 4] += 8.0
    return logits * 1.5


def make_eval_dir(out_dir, seed, *, labels_present=None, with_val=True, paths=None, n=240):
    rng = np.random.default_rng(seed)
    classes = labels_present if labels_present is not None else list(range(len(CLASS_NAMES)))
    targets = rng.choice(classes, n)
    logits = _logits(rng, targets)
    val_kwargs = {}
    if with_val:
        val_targets = rng.integers(0, len(CLASS_NAMES), 200)
        val_kwargs = dict(val_logits=_logits(rng, val_targets), val_targets=val_targets)
    image_paths = [paths[i % len(paths)] for i in range(n)] if paths else None
    result = evaluate_predictions(logits, targets, CLASS_NAMES, image_paths, labels_present=labels_present,
                                  **val_kwargs)
    result.save(out_dir)
    return logits, targets, result


def make_run_dir(run_dir, seed=0, epochs=8, best_epoch=4):
    paths = _write_images(run_dir.parent / f"images_{run_dir.name}", 24)
    _, _, result = make_eval_dir(run_dir / "eval", seed, paths=paths)
    config = {
        "recipe": "unit-test",
        "data": {"spec": "folder:/data/signs", "image_size": 32},
        "model": {"name": "resnet18", "pretrained": False},
        "augment": {"preset": "light"},
        "optim": {"name": "sgd", "lr": 0.1},
        "schedule": {"name": "cosine"},
        "loss": {"label_smoothing": 0.1},
        "train": {"epochs": epochs},
        "eval": {"tta": False},
        "logging": {"tensorboard": False},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    with open(run_dir / "metrics.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["epoch", "lr", "train_loss", "train_top1", "val_loss", "val_top1", "val_top5",
                         "epoch_seconds", "images_per_second"])
        for epoch in range(1, epochs + 1):
            # Validation peaks at best_epoch while training accuracy keeps rising: an overfitting gap.
            val_top1 = 0.80 - 0.01 * abs(epoch - best_epoch)
            writer.writerow([epoch, 0.1 / epoch, 1.0 / epoch, min(0.99, 0.6 + 0.05 * epoch), 0.5, val_top1,
                             0.97, 10.0 + seed, 500.0])
    run_info = {"hostname": "unit", "device": "cpu", "torch_version": torch.__version__, "train_seconds": 95.0,
                "best_epoch": best_epoch, "monitor": "val_top1", "num_params": 11_000_000,
                "class_names": CLASS_NAMES, "split_sizes": {"train": 1000, "val": 200, "test": 240}}
    (run_dir / "run_info.json").write_text(json.dumps(run_info))
    wrong = [i for i, row in enumerate(result.predictions) if not row["correct"]][:4]
    images = np.stack([np.asarray(Image.open(result.predictions[i]["path"]).convert("RGB")) for i in wrong])
    save_gradcam_npz(run_dir / "eval" / "gradcam.npz", images, np.random.default_rng(1).random(images.shape[:3]),
                     [result.predictions[i]["true"] for i in wrong], [result.predictions[i]["pred"] for i in wrong],
                     [result.predictions[i]["confidence"] for i in wrong])
    return run_dir


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    run_dir = make_run_dir(tmp_path_factory.mktemp("runs") / "run_a")
    markdown_path, html_path = render_report(run_dir)
    return run_dir, markdown_path.read_text(), html_path.read_text()


EXPECTED_FIGURES = ["training-curves", "time-to-accuracy", "per-class-f1", "confusion-matrix", "reliability-diagram", "risk-coverage",
                    "misclassified-gallery", "gradcam", "sample-predictions"]


def _section(markdown, title):
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", markdown, flags=re.M | re.S)
    assert match, f"section {title!r} missing"
    return match.group(1)


def _table_rows(text):
    rows = []
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            cells = re.split(r"(?<!\\)\|", line.strip()[1:-1])
            rows.append([cell.strip().replace("\\|", "|") for cell in cells])
    return rows


def test_report_files_and_plots(rendered):
    run_dir, markdown, _ = rendered
    for name in ("training_curves", "time_to_accuracy", "confusion_matrix", "per_class_f1", "reliability_diagram", "risk_coverage",
                 "misclassified", "gradcam", "sample_predictions"):
        with Image.open(run_dir / "plots" / f"{name}.png") as image:
            assert image.format == "PNG" and image.width > 200
        assert f"](plots/{name}.png)" in markdown


def test_report_numbers_match_metrics_json(rendered):
    run_dir, markdown, _ = rendered
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    seen = set()
    for section in ("Test results", "Confidence and calibration"):
        for label, value, key in _table_rows(_section(markdown, section))[1:]:
            key = key.strip("`")
            seen.add(key)
            if value.endswith("%"):
                assert float(value[:-1]) / 100 == pytest.approx(metrics[key], abs=5.1e-5), key
            elif re.fullmatch(r"[\d,]+", value):
                assert int(value.replace(",", "")) == metrics[key], key
            else:
                assert float(value) == pytest.approx(metrics[key], abs=5.1e-5), key
    assert {"top1", "top5", "balanced_accuracy", "macro_precision", "macro_recall", "macro_f1", "weighted_f1",
            "nll", "ece", "brier", "num_samples", "num_classes", "error_at_reject_1pct", "error_at_reject_2pct",
            "error_at_reject_5pct", "mean_confidence_correct", "mean_confidence_incorrect", "confidence_gap",
            "temperature", "ece_after_temperature"} <= seen


def test_report_tables_follow_eval_files(rendered):
    run_dir, markdown, _ = rendered
    with open(run_dir / "eval" / "per_class.csv", newline="") as handle:
        per_class = {row["class"]: row for row in csv.DictReader(handle)}
    all_classes = markdown.split("### All classes", 1)[1].split("##", 1)[0]
    rows = _table_rows(all_classes)[1:]
    assert [row[1] for row in rows] == CLASS_NAMES
    for row in rows:
        assert float(row[4]) == pytest.approx(float(per_class[row[1]]["f1"]), abs=5.1e-5)
    worst = _table_rows(markdown.split("### Worst classes", 1)[1].split("###", 1)[0])[1]
    assert worst[1] == CLASS_NAMES[WEAK_CLASS]
    with open(run_dir / "eval" / "most_confused.csv", newline="") as handle:
        top_pair = next(csv.DictReader(handle))
    pair_row = _table_rows(markdown.split("### Most confused pairs", 1)[1].split("##", 1)[0])[1]
    assert pair_row[:3] == [top_pair["true"], top_pair["pred"], top_pair["count"]]
    assert "11 (best)" not in markdown and "4 (best)" in markdown


def test_findings_are_derived_from_the_numbers(rendered):
    run_dir, markdown, _ = rendered
    findings = _section(markdown, "Findings")
    per_class = sorted(_read_csv(run_dir / "eval" / "per_class.csv"), key=lambda row: float(row["f1"]))
    weak = [row for row in per_class if float(row["f1"]) < 0.9]
    assert weak and weak[0]["class"] == CLASS_NAMES[WEAK_CLASS]
    listed = ", ".join(f"{row['class']} ({float(row['f1']):.3f})" for row in weak)
    assert f"{len(weak)} of 6 classes have test F1 below 0.9: {listed}." in findings
    assert "Most confused pairs: Yield predicted as Priority road" in findings
    assert "Overfitting" in findings  # last epoch: train 0.99 vs val 0.76
    assert "The best epoch (4) is 4 epochs before the last (8)" in findings
    assert "Temperature scaling (T = " in findings


def test_html_is_self_contained(rendered):
    _, markdown, html = rendered
    assert not re.search(r"""(src|href|action|poster)\s*=\s*["']?\s*(https?:)?//""", html, flags=re.I)
    assert "url(" not in html and "@import" not in html
    sources = re.findall(r'<img src="([^"]+)"', html)
    assert len(sources) == markdown.count("![") == len(EXPECTED_FIGURES)
    for source in sources:
        assert source.startswith("data:image/png;base64,")
        with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))) as image:
            image.verify()
    assert "Stop | halt" in html


def _chromium():
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install -y chromium)")
def test_html_renders_in_headless_chromium(rendered, tmp_path):
    run_dir, _, _ = rendered
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    command = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
               "--disable-background-networking", "--disable-component-update", "--disable-sync",
               f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", (run_dir / "report.html").as_uri()]
    dom = subprocess.run(command, capture_output=True, text=True, timeout=180, check=True).stdout
    # The page's own script counts the images the browser decoded once the page has loaded.
    total = re.search(r'data-figures-total="(\d+)"', dom)
    decoded = re.search(r'data-figures-rendered="(\d+)"', dom)
    assert total and decoded, "the report's load script did not run"
    assert int(total.group(1)) == int(decoded.group(1)) == len(EXPECTED_FIGURES)
    for key in EXPECTED_FIGURES:
        assert f'id="fig-{key}"' in dom
    assert f"{100 * metrics['top1']:.2f}%" in dom


def test_eval_only_directory_omits_missing_sections(tmp_path):
    make_eval_dir(tmp_path / "eval_only", seed=5, with_val=False)
    markdown_path, html_path = render_report(tmp_path / "eval_only")
    markdown = markdown_path.read_text()
    for absent in ("## Training", "## Configuration", "Hardware", "temperature_scaled", "`temperature`",
                   "Grad-CAM"):
        assert absent not in markdown
    assert "## Test results" in markdown and "## Per-class results" in markdown
    # No image paths were recorded, so the misclassified images are listed without a gallery.
    assert "misclassified-gallery" not in html_path.read_text()
    assert (tmp_path / "eval_only" / "plots" / "confusion_matrix.png").is_file()


def test_report_of_a_directory_without_results_is_a_user_error(tmp_path):
    with pytest.raises(ResnetlabError, match="metrics.csv"):
        render_report(tmp_path)


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_compare_clean_and_shifted_per_class_deltas(tmp_path):
    clean_logits, clean_targets, _ = make_eval_dir(tmp_path / "clean", seed=1)
    shifted_classes = [0, 2, 3]
    shift_logits, shift_targets, _ = make_eval_dir(tmp_path / "shift", seed=2, labels_present=shifted_classes)
    compare_md = compare_runs([tmp_path / "clean", tmp_path / "shift"], tmp_path / "cmp")

    clean_f1 = f1_score(clean_targets, clean_logits.argmax(1), average=None, labels=range(len(CLASS_NAMES)))
    shift_f1 = f1_score(shift_targets, shift_logits.argmax(1), average=None, labels=shifted_classes)
    rows = {row["class"]: row for row in _read_csv(tmp_path / "cmp" / "per_class_delta.csv")}
    assert list(rows) == CLASS_NAMES
    for position, label in enumerate(shifted_classes):
        row = rows[CLASS_NAMES[label]]
        assert float(row["delta_f1_shift"]) == pytest.approx(shift_f1[position] - clean_f1[label])
        assert float(row["f1_clean"]) == pytest.approx(clean_f1[label])
    for label in set(range(len(CLASS_NAMES))) - set(shifted_classes):
        assert rows[CLASS_NAMES[label]]["delta_f1_shift"] == "" and rows[CLASS_NAMES[label]]["f1_shift"] == ""

    table = {row["metric"]: row for row in _read_csv(tmp_path / "cmp" / "compare.csv")}
    assert float(table["top1"]["delta_shift"]) == pytest.approx(
        np.mean(shift_logits.argmax(1) == shift_targets) - np.mean(clean_logits.argmax(1) == clean_targets))
    markdown = compare_md.read_text()
    assert "## Per-class deltas" in markdown and "ΔF1 shift" in markdown
    biggest_drop = min(shifted_classes, key=lambda c: shift_f1[shifted_classes.index(c)] - clean_f1[c])
    first_row = _table_rows(markdown.split("## Per-class deltas", 1)[1])[1]
    assert first_row[0] == CLASS_NAMES[biggest_drop]
    html = (tmp_path / "cmp" / "compare.html").read_text()
    assert 'id="fig-per-class-delta"' in html and not re.search(r'src="https?:', html)


def test_compare_runs_overlays_training_curves(tmp_path):
    run_a = make_run_dir(tmp_path / "a" / "run", seed=0)
    run_b = make_run_dir(tmp_path / "b" / "run", seed=3, epochs=6, best_epoch=5)
    compare_md = compare_runs([run_a, run_b], tmp_path / "cmp")
    markdown = compare_md.read_text()
    assert "a/run" in markdown and "b/run" in markdown  # same directory names get their parent added
    assert (tmp_path / "cmp" / "plots" / "compare_curves.png").is_file()
    table = {row["metric"]: row for row in _read_csv(tmp_path / "cmp" / "compare.csv")}
    assert table["epochs"]["a/run"] == "8" and float(table["epochs"]["delta_b/run"]) == -2
    assert float(table["best_epoch"]["delta_b/run"]) == 1
    with pytest.raises(ResnetlabError):
        compare_runs([run_a], tmp_path / "cmp1")


def test_confusion_matrix_grows_with_the_class_count(tmp_path):
    rng = np.random.default_rng(0)
    names = [f"Traffic sign class number {i}" for i in range(43)]
    small = plots.confusion_matrix(rng.integers(0, 5, (5, 5)), names[:5], names[:5], tmp_path / "small.png")
    large = plots.confusion_matrix(rng.integers(0, 5, (43, 43)), names, names, tmp_path / "large.png")
    with Image.open(small) as small_image, Image.open(large) as large_image:
        # About 30 px per class at 43 classes keeps the 7 pt tick labels from overlapping.
        assert large_image.height >= 43 * 30 and large_image.width >= 43 * 30
        assert large_image.height > 2 * small_image.height


def test_time_to_accuracy_accumulates_training_seconds():
    from resnetlab.reporting.plots import time_to_accuracy_curves

    history = {"epoch": np.array([1, 2, 3]), "epoch_seconds": np.array([10.0, 12.0, 11.0]),
               "val_top1": np.array([0.5, 0.8, 0.9]), "ema_val_top1": np.array([np.nan, np.nan, np.nan])}
    curves = time_to_accuracy_curves(history)
    assert list(curves) == ["validation top-1"]  # an EMA column without values draws no line
    assert curves["validation top-1"]["seconds"].tolist() == [10.0, 22.0, 33.0]
    assert time_to_accuracy_curves({"epoch": np.array([1]), "val_top1": np.array([0.5])}) == {}


def _training_text(tmp_path, *, best_weights: str, keep: str) -> str:
    history = {"epoch": np.array([1.0, 2.0, 3.0]), "val_top1": np.array([0.90, 0.95, 0.93]),
               "ema_val_top1": np.array([0.91, 0.96, 0.97]), "epoch_seconds": np.array([10.0, 10.0, 10.0])}
    run = RunFiles(root=tmp_path, eval_dir=None, config={"train": {"keep": keep}}, history=history,
                   run_info={"best_epoch": 3, "best_weights": best_weights, "monitor": "val_top1"})
    doc = Document(title="t")
    _training(doc, run, tmp_path)
    return " ".join(getattr(block, "text", "") for block in doc.blocks)


def test_training_section_names_the_weights_that_were_kept(tmp_path):
    # EMA weights kept as best: their figure is the one quoted, and the optimum is over raw and EMA weights
    text = _training_text(tmp_path, best_weights="ema", keep="best")
    assert "epoch 3 was kept as best: its EMA weights have the highest `val_top1`" in text
    assert "(97.00%; raw weights 93.00%)" in text and "optimum" not in text
    # raw weights kept: the raw figure, and the raw epoch 2 was higher
    text = _training_text(tmp_path, best_weights="raw", keep="best")
    assert "because it has the highest `val_top1` (93.00%)" in text and "optimum over all epochs was 95.00%" in text
    text = _training_text(tmp_path, best_weights="ema", keep="last")
    assert "its EMA weights, with `ema_val_top1` 97.00%" in text
