"""The Python API: what ``import resnetlab as rl`` exposes (``resnetlab/__init__.py`` imports this package on first
use). The CLI's commands call these same functions, so a call and a command with the same options do the same.

Layer: above ``bench`` and ``tuning``, below ``cli`` (``docs/architecture.md``).
"""

from resnetlab.api.classifier import Classifier, Prediction, load
from resnetlab.api.functions import adapt
from resnetlab.api.functions import (
    calibrate,
    compare,
    create_model,
    evaluate,
    export,
    list_models,
    list_recipes,
    open_dataset,
    run,
    train,
    tune,
)
from resnetlab.api.results import Adaptation
from resnetlab.api.results import Comparison, Evaluation, Export, Run, TuneResult
from resnetlab.errors import ConfigError, DataError, ResnetlabError
from resnetlab.reporting.runs_index import RunSummary, runs

__all__ = [
    "Classifier", "Comparison", "ConfigError", "DataError", "Evaluation", "Export", "Prediction", "ResnetlabError",
    "Run", "RunSummary", "TuneResult", "calibrate", "compare", "create_model", "evaluate", "export", "list_models",
    "list_recipes", "load", "open_dataset", "run", "runs", "train", "tune",
    "Adaptation", "adapt",
]
