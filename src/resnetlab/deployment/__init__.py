"""Deployment: prediction, export (ONNX, TorchScript, AOTInductor, int8), the export cache and the HTTP service.

Every path from an image to a class goes through one :class:`~resnetlab.deployment.predictor.Predictor`, whose
preprocessing is the record stored in the checkpoint (or copied into an export's ``preprocessing.json``) and applied
by :mod:`resnetlab.data.preprocessing`, the code evaluation uses. Backends (eager torch, ONNX Runtime, TorchScript)
differ only in how they compute logits from the same normalized tensor, and every export is checked against the
eager model before it is written, so a deployed model cannot silently disagree with the evaluated one.

Sub-modules are imported where they are used: the service needs FastAPI, quantization needs onnxruntime.
"""
