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



def test_guide_channels_and_extra_outputs_come_from_the_conditional_pass():
    """DiT's forward_with_cfg: guidance on the first 3 channels; the 4th and the variance channels are the
    conditional pass's."""

    def model(x, t, y):  # 8 channels: 4 "eps" + 4 "variance", each equal to the label
        return y.float().view(-1, 1, 1, 1).expand(x.shape[0], 8, *x.shape[2:]).clone()

    x, t, y = torch.zeros(2, 4, 2, 2), torch.full((2,), 0.5), torch.tensor([1, 2])
    out = guided_prediction(model, x, t, y, cfg_scale=1.5, null_label=NULL, guide_channels=3)
    assert out.shape == (2, 8, 2, 2)
    guided = NULL + 1.5 * (y.float() - NULL)
    assert torch.allclose(out[:, :3, 0, 0], guided[:, None].expand(2, 3))
    assert torch.allclose(out[:, 3:, 0, 0], y.float()[:, None].expand(2, 5))
    full = guided_prediction(model, x, t, y, cfg_scale=1.5, null_label=NULL)  # default: the 4 latent channels
    assert torch.allclose(full[:, :4, 0, 0], guided[:, None].expand(2, 4))
    assert torch.allclose(full[:, 4:, 0, 0], y.float()[:, None].expand(2, 4))
