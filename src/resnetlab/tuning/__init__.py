"""Hyperparameter tuning: k-fold cross-validated grid or Optuna search, crash-safe and shareable between workers."""

from resnetlab.tuning.job import TuneOptions, TuneOutcome, tune_job
from resnetlab.tuning.space import SearchSpace, build_space, load_space_file, split_grid_items

__all__ = ["SearchSpace", "TuneOptions", "TuneOutcome", "build_space", "load_space_file", "split_grid_items",
           "tune_job"]
