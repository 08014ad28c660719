"""resnetlab: from labelled images to a trained, tuned, honestly evaluated and deployable ResNet classifier.

The Python face of the library, for notebooks and scripts::

    import resnetlab as rl

    run = rl.train(epochs=1)                     # the offline demo; any config key as section__key=value
    print(run.metrics["top1"])
    rl.load(run.dir).predict("sign.png", topk=3)

Every name below is implemented in :mod:`resnetlab.api` and imported from there on first use, so that
``import resnetlab`` stays fast: it imports neither torch nor any other heavy dependency until a function is called.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from resnetlab._version import __version__

# The library logs (under "resnetlab.") and leaves showing it to the application: the command line attaches its
# console, a notebook sees nothing unless it asks. This handler only keeps Python's last-resort handler from
# printing the library's warnings when nothing is configured.
logging.getLogger(__name__).addHandler(logging.NullHandler())

# The public API: each name is an attribute of resnetlab.api, imported when first asked for.
_API_NAMES = (
    "Classifier", "Comparison", "ConfigError", "DataError", "Evaluation", "Export", "Prediction", "ResnetlabError",
    "Run", "RunSummary", "TuneResult", "calibrate", "compare", "create_model", "evaluate", "export", "list_models",
    "list_recipes", "load", "open_dataset", "run", "runs", "train", "tune",
    "Adaptation", "adapt",
)

__all__ = ["__version__", *_API_NAMES]

if TYPE_CHECKING:  # for type checkers and IDEs only; at run time __getattr__ imports these on demand
    from resnetlab.api import (  # noqa: F401
        Classifier, Comparison, ConfigError, DataError, Evaluation, Export, Prediction, ResnetlabError, Run,
        RunSummary, TuneResult, calibrate, compare, create_model, evaluate, export, list_models, list_recipes, load,
        open_dataset, run, runs, train, tune,
    )
    from resnetlab.api import Adaptation, adapt  # noqa: F401


def __getattr__(name: str) -> Any:
    """Import :mod:`resnetlab.api` when one of its names is first used (PEP 562), and cache the name here."""
    if name in _API_NAMES:
        from resnetlab import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'resnetlab' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API_NAMES))
