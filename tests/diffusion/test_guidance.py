"""Classifier-free guidance: one doubled batch, combined as uncond + s * (cond - uncond)."""
import torch

from tcae_ldm.diffusion import guided_prediction

NULL = 7  # null label used by the closed-form models below


class LabelModel:
    """Predicts its label as a constant image and records the batches it is called with."""

    def __init__(self):
        self.calls = []

    def __call__(self, x, t, y):
        self.calls.append(y.clone())
        return y.float().view(-1, 1, 1, 1).expand_as(x).clone()


def test_guided_prediction_combines_doubled_batch():
    model = LabelModel()
    x, t, y = torch.zeros(2, 3, 2, 2), torch.full((2,), 0.5), torch.tensor([1, 2])
    out = guided_prediction(model, x, t, y, cfg_scale=3.0, null_label=NULL)
    assert model.calls[-1].tolist() == [1, 2, NULL, NULL]  # one call, cond then null labels
    expected = NULL + 3.0 * (y.float() - NULL)
    assert torch.allclose(out, expected.view(-1, 1, 1, 1).expand_as(out))
    out = guided_prediction(model, x, t, y, cfg_scale=3.0, null_label=NULL, cfg_interval=(0.0, 0.4))
    assert model.calls[-1].tolist() == [1, 2] and torch.allclose(out[:, 0, 0, 0], y.float())

