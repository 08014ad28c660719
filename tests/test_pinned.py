"""Pinned behaviour: numbers that a refactor must not change.

The synthetic set's images and ``resnet20``'s outputs at a fixed seed are compared with values recorded here. When
one of these fails, something changed what the code computes: if that was meant, record the new values (and, for the
synthetic set, bump the generator version); if not, the change has a bug.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch
from PIL import Image

from resnetlab.data.synthetic import GENERATOR_VERSION, generate_synthetic_signs
from resnetlab.models import create_model

# sha256 over the decoded RGB pixels (not the PNG bytes, which depend on zlib) and the CSV rows of a small set
SYNTHETIC_DIGEST = "81fe791cdd68f7dd3f7cd6730db7232e5f9b3ea304bd4e3661dd2ba912d74ba8"
SYNTHETIC_DIGEST_VERSION = 1

# resnet20 (10 classes) built after torch.manual_seed(0), in eval mode, on the input below: its logits
RESNET20_LOGITS = [
    [0.9116154, -1.6423968, -0.9073572, -0.5717527, 1.3227824, 1.6873984, 0.9023148, 1.4600945, -0.2662567, -1.4974701],
    [0.8252847, -1.5798817, -0.9610131, -0.6944252, 1.3220568, 1.5761262, 0.7810188, 1.3794581, -0.2756625, -1.3297782],
]


def synthetic_digest(root) -> str:
    digest = hashlib.sha256()
    for csv_name in ("Train.csv", "Test.csv"):
        digest.update((root / csv_name).read_bytes().replace(b"\r\n", b"\n"))
    for path in sorted(p for p in root.rglob("*.png")):
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("RGB"))
        digest.update(str(path.relative_to(root)).encode())
        digest.update(str(pixels.shape).encode())
        digest.update(pixels.tobytes())
    return digest.hexdigest()


def test_the_synthetic_images_are_pinned(tmp_path):
    root = generate_synthetic_signs(tmp_path / "set", per_class=2, test_per_class=1, seed=7)
    got = synthetic_digest(root)
    assert GENERATOR_VERSION == SYNTHETIC_DIGEST_VERSION and got == SYNTHETIC_DIGEST, (
        f"the synthetic set's images changed (digest {got}): if that was meant, bump the synthetic version "
        "(GENERATOR_VERSION in resnetlab/data/synthetic.py) and record the new digest and version here")


def resnet20_logits() -> torch.Tensor:
    torch.manual_seed(0)
    model = create_model("resnet20", 10).eval()
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 32, 32, generator=generator)
    with torch.no_grad():
        return model(x)


def test_resnet20_logits_are_pinned():
    got = resnet20_logits()
    expected = torch.tensor(RESNET20_LOGITS)
    assert got.shape == expected.shape
    assert torch.allclose(got, expected, atol=1e-5, rtol=0), (
        f"resnet20's logits at a fixed seed changed (largest difference {(got - expected).abs().max():.2e}): a "
        "change in the model's layers, initialization or the order in which it draws random numbers")
