import torch

from resnetlab.evaluation.tta import tta_log_probabilities, tta_views


def test_views_are_crops_and_mirrors_of_the_image():
    images = torch.arange(2 * 3 * 16 * 16, dtype=torch.float32).view(2, 3, 16, 16)
    assert len(tta_views(images, flip=False, crops=False)) == 1
    crops = tta_views(images, flip=False, crops=True)
    assert len(crops) == 5 and all(v.shape == images.shape for v in crops)
    # the bottom-right crop is the image shifted by the padding (2 px at 16 px)
    assert torch.equal(crops[4][..., :-2, :-2], images[..., 2:, 2:])
    both = tta_views(images, flip=True, crops=True)
    assert len(both) == 10 and torch.equal(both[5], images.flip(-1))


def test_averaged_prediction_is_a_distribution():
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 4))
    log_probs = tta_log_probabilities(model, torch.randn(5, 3, 8, 8), flip=True, crops=True)
    assert torch.allclose(log_probs.exp().sum(dim=1), torch.ones(5), atol=1e-5)
