"""The package version: a module of its own at the bottom of the layers, so that the modules which record it
(checkpoints, run_info.json, exports, reports) need not import ``resnetlab/__init__.py``, which sits at the top."""

__version__ = "0.1.0"
