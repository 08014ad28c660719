"""The Python API (``import resnetlab as rl``): the notebook path, every input kind of predict, the result objects,
and that the CLI and the API resolve the same options to the same config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import resnetlab as rl
from resnetlab.cli.main import main

TINY = {"model": "simple_cnn", "batch_size": 32, "train__threads": 1, "eval__gradcam": False,
        "eval__deployment_check": False}


@pytest.fixture(scope="module")
def api_run(tiny_signs, tmp_path_factory):
    out = tmp_path_factory.mktemp("api") / "run"
    return rl.train(f"gtsrb:{tiny_signs}", epochs=1, out=out, progress=False,
                    overrides={"train.max_steps_per_epoch": 3}, **TINY)


@pytest.fixture(scope="module")
def image(tiny_signs) -> Path:
    return sorted((tiny_signs / "Test").glob("*.png"))[0]


@pytest.fixture(scope="module")
def classifier(api_run):
    return rl.load(api_run.dir, backend="torch")


def test_import_is_lazy_and_fast():
    code = ("import sys, resnetlab as rl; assert 'torch' not in sys.modules and 'resnetlab.api' not in sys.modules; "
            "print(rl.__version__); rl.list_recipes; assert 'resnetlab.api' in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == rl.__version__
    for name in rl.__all__:
        assert getattr(rl, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'trian'"):
        rl.trian  # noqa: B018


def test_the_notebook_path(api_run, image):
    run = api_run
    assert 0.0 <= run.metrics["top1"] <= 1.0
    assert run.status == "finished" and run.report_path.is_file() and run.checkpoint.is_file()
    assert run.history[0]["epoch"] == 1 and isinstance(run.history[0]["val_loss"], float)
    assert run.config["model"]["name"] == "simple_cnn" and run.config["train"]["max_steps_per_epoch"] == 3
    assert run.per_class and {"precision", "recall"} <= set(run.per_class[0])
    assert repr(run).startswith(f"Run('{run.dir}', model=simple_cnn, data=gtsrb:") and "top1=" in repr(run)
    assert repr(rl.run(run.dir)) == repr(run)

    prediction = rl.load(run.dir).predict(image, topk=3)
    assert isinstance(prediction, rl.Prediction)
    assert len(prediction.topk) == 3 and prediction.topk[0] == (prediction.label, prediction.confidence)
    assert prediction.path == str(image) and "Prediction(label=" in repr(prediction)


def test_run_refuses_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(rl.ResnetlabError, match="not a resnetlab run directory"):
        rl.run(tmp_path)


def test_predict_takes_paths_pil_numpy_tensors_and_lists(classifier, image):
    from resnetlab.data.preprocessing import load_image

    pil = load_image(image)
    array = np.array(pil)
    tensor = torch.from_numpy(array).permute(2, 0, 1).contiguous()
    single = [classifier.predict(x, topk=2) for x in (str(image), image, pil, array, tensor)]
    assert all(isinstance(p, rl.Prediction) for p in single)
    assert {p.label for p in single} == {single[0].label}
    assert all(p.confidence == pytest.approx(single[0].confidence, abs=1e-5) for p in single)
    assert single[2].path is None
    batch = classifier.predict([image, pil, array, tensor], topk=2)
    assert [p.label for p in batch] == [single[0].label] * 4

    with pytest.raises(rl.DataError, match="uint8"):
        classifier.predict(tensor.float())
    with pytest.raises(rl.DataError, match="cannot predict a dict"):
        classifier.predict({})


def test_classifier_exposes_model_classes_and_preprocessing(classifier, image):
    from resnetlab.data.preprocessing import load_image

    assert classifier.model.training is False
    assert next(classifier.model.parameters()).dtype == torch.float32
    assert classifier.preprocessing["input_size"] == 32 and len(classifier.classes) > 1
    x = classifier.transform(load_image(image))
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    with torch.no_grad():
        # calibrated: the run stored a temperature, which predict applies
        probabilities = (classifier.model(x[None]) / classifier.predictor.temperature).softmax(dim=1)[0]
    prediction = classifier.predict(image)
    assert classifier.classes[int(probabilities.argmax())] == prediction.label
    assert float(probabilities.max()) == pytest.approx(prediction.confidence, abs=1e-4)
    assert repr(classifier).startswith("Classifier(") and "backend=torch" in repr(classifier)


def test_evaluate_compare_and_export(api_run, image, tmp_path):
    evaluation = rl.evaluate(api_run, split="val", out=tmp_path / "ev", data__on_bad_image="skip")
    assert 0.0 <= evaluation.metrics["top1"] <= 1.0 and evaluation.report_path.is_file()
    assert evaluation.per_class and repr(evaluation).startswith("Evaluation(")
    with pytest.raises(rl.ConfigError, match="--split 'train'"):
        rl.evaluate(api_run, split="train")
    with pytest.raises(rl.ConfigError, match="preprocessing"):
        rl.evaluate(api_run, out=tmp_path / "no", data__input_size=64)

    comparison = rl.compare([api_run, evaluation], out=tmp_path / "cmp")
    assert comparison.table and comparison.table[0]["metric"] and comparison.report_path.is_file()
    assert "Comparison(" in repr(comparison)
    with pytest.raises(rl.ConfigError, match="at least two"):
        rl.compare([api_run])

    exported = rl.export(api_run, "onnx", tmp_path / "onnx")
    assert exported.record["artifact"]["format"] == "onnx" and exported.model_path.is_file()
    assert "format=onnx" in repr(exported)
    assert rl.load(exported.dir).predict(image).label == rl.load(api_run.dir, backend="torch").predict(image).label
    with pytest.raises(rl.ConfigError, match="--format 'tflite'"):
        rl.export(api_run, "tflite", tmp_path / "x")
    # a classifier of a checkpoint exports beside the run's checkpoints/ unless told where
    scripted = rl.export(rl.load(api_run.checkpoint, backend="torch"), "torchscript")
    assert scripted.dir == (api_run.dir / "exports" / "torchscript").resolve()
    with pytest.raises(rl.ConfigError, match="already an export"):
        rl.export(rl.load(exported.dir), "onnx")


def test_open_dataset_in_a_dataloader_loop(tiny_signs, classifier):
    dataset = rl.open_dataset(f"gtsrb:{tiny_signs}", split="val", transform=classifier.transform,
                              overrides={"data.val_fraction": 0.2})
    assert len(dataset) > 0 and dataset.classes == classifier.classes
    seen = 0
    for images, labels in torch.utils.data.DataLoader(dataset, batch_size=16):
        assert images.shape[1:] == (3, 32, 32) and labels.dtype == torch.int64
        seen += len(labels)
    assert seen == len(dataset)
    raw, label = rl.open_dataset(f"gtsrb:{tiny_signs}", split="test")[0]
    assert isinstance(raw, Image.Image) and isinstance(label, int)
    with pytest.raises(rl.ConfigError, match="split 'holdout'"):
        rl.open_dataset(f"gtsrb:{tiny_signs}", split="holdout")


def test_registries_and_create_model():
    assert "resnet20" in rl.list_models() and "demo" in rl.list_recipes()
    model = rl.create_model("resnet20", num_classes=7)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)
    with pytest.raises(rl.ConfigError, match="resnet5"):
        rl.create_model("resnet5", num_classes=3)


def test_options_kwargs_and_overrides_resolve_like_keys():
    from resnetlab.api.functions import train_config

    cfg = train_config(epochs=2, optim__lr=0.05, train__ema=True, overrides={"data.classes": [1, 2]})
    assert (cfg.train.epochs, cfg.optim.lr, cfg.train.ema, cfg.data.classes) == (2, 0.05, True, [1, 2])
    assert train_config(overrides=["optim.lr=0.05", "data.classes=[1,2]"]).data.classes == [1, 2]
    # overrides win over section__key keywords, which win over the flags
    assert train_config(epochs=3, train__epochs=4).train.epochs == 4
    assert train_config(train__epochs=4, overrides={"train.epochs": 5}).train.epochs == 5
    assert train_config(progress=False).logging.quiet is True
    assert train_config(overrides={"train.time_budget": None}).train.time_budget is None


@pytest.mark.parametrize("kwargs, fragment", [
    ({"epoch": 2}, "'epoch'"),
    ({"optim__lrr": 0.1}, "optim.lrr"),
    ({"overrides": "optim.lr=0.1"}, "not a single string"),
    ({"train__epochs": "many"}, "train.epochs"),
])
def test_a_bad_option_is_a_config_error_naming_it(kwargs, fragment, tmp_path):
    with pytest.raises(rl.ConfigError, match=fragment.replace(".", r"\.")) as caught:
        rl.train(out=tmp_path / "run", **kwargs)
    assert len(str(caught.value).splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_resume_takes_the_runs_own_config(tmp_path):
    with pytest.raises(rl.ConfigError, match="do not combine it with --recipe"):
        rl.train(resume=tmp_path, recipe="demo")
    with pytest.raises(rl.ConfigError, match="no config.yaml there"):
        rl.train(resume=tmp_path)


def test_cli_and_api_resolve_the_same_config(tmp_path, monkeypatch):
    seen = []
    monkeypatch.setattr("resnetlab.jobs.train.train_job", lambda cfg, out, **_: seen.append(cfg.to_dict()) or out)
    assert main(["train", "--recipe", "road-signs-4class", "--epochs", "2", "--seed", "5", "--quiet",
                 "--batch-size", "16", "optim.lr=0.05", "data.classes=[1,2]", "--out", str(tmp_path / "a")]) == 0
    rl.train(recipe="road-signs-4class", epochs=2, seed=5, progress=False, batch_size=16, optim__lr=0.05,
             overrides={"data.classes": [1, 2]}, out=tmp_path / "b")
    rl.train(recipe="road-signs-4class", epochs=2, seed=5, progress=False, batch_size=16,
             overrides=["optim.lr=0.05", "data.classes=[1,2]"], out=tmp_path / "c")
    assert seen[0] == seen[1] == seen[2]
    assert seen[0]["optim"]["lr"] == 0.05 and seen[0]["train"]["epochs"] == 2 and seen[0]["logging"]["quiet"]


def test_tune_a_tiny_grid(tiny_signs, tmp_path):
    result = rl.tune(f"gtsrb:{tiny_signs}", grid={"optim.lr": [0.05, 0.1]}, folds=2, epochs=1,
                     out=tmp_path / "tune", progress=False, overrides={"train.max_steps_per_epoch": 2}, **TINY)
    assert len(result.trials) == 2 and result.best["params"]["optim.lr"] in (0.05, 0.1)
    assert result.refit is None and result.outcome.settled
    assert repr(result).startswith(f"TuneResult('{tmp_path / 'tune'}', trials=2, best={{optim.lr=")
    with pytest.raises(rl.ConfigError, match="list of values"):
        rl.tune(grid={"optim.lr": 0.1}, out=tmp_path / "bad")
    with pytest.raises(rl.ConfigError, match="unknown option 'metrc'.*metric"):
        rl.tune(metrc="val_loss", out=tmp_path / "bad")


def test_cli_and_api_resolve_the_same_tune(tmp_path, monkeypatch):
    from resnetlab.tuning import TuneOutcome

    seen = []

    def fake_tune_job(base, space, options):
        seen.append((base.to_dict(), space.to_dict(), options.folds, options.metric))
        return TuneOutcome(out=options.out, trials_run=0)

    monkeypatch.setattr("resnetlab.tuning.tune_job", fake_tune_job)
    assert main(["tune", "--epochs", "2", "--folds", "2", "--metric", "val_loss", "--quiet", "--out",
                 str(tmp_path / "a"), "--grid", "optim.lr=0.01,0.1", "train.ema=true", "optim.momentum=0.8"]) == 0
    rl.tune(grid={"optim.lr": [0.01, 0.1], "train.ema": [True]}, folds=2, metric="val_loss", epochs=2,
            progress=False, optim__momentum=0.8, out=tmp_path / "b")
    assert seen[0] == seen[1]
    assert seen[0][0]["train"]["ema"] is True and seen[0][0]["optim"]["momentum"] == 0.8


def test_tables_as_data_frames_or_a_one_line_hint(api_run, monkeypatch):
    try:
        import pandas
    except ImportError:
        pandas = None
    if pandas is not None:
        frame = api_run.history_df
        assert isinstance(frame, pandas.DataFrame) and list(frame["epoch"]) == [1]
        assert len(api_run.per_class_df) == len(api_run.per_class)
    monkeypatch.setitem(sys.modules, "pandas", None)  # pandas is optional: as if it were not installed
    with pytest.raises(ImportError, match="pip install pandas") as caught:
        api_run.per_class_df  # noqa: B018
    assert len(str(caught.value).splitlines()) == 1
