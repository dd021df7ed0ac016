"""iBOT heads: weight-normalised prototypes, shared or separate heads."""
import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from tcae_ldm.models.ibot import iBOTHead, iBOTHeads


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_head_weight_norm_shapes_and_frozen_magnitude():
    head = iBOTHead(16, 32, hidden_dim=24, bottleneck_dim=8, nlayers=3)
    assert parametrize.is_parametrized(head.last_layer, "weight")
    assert not hasattr(head.last_layer, "weight_g")  # not the deprecated torch.nn.utils.weight_norm
    g = head.last_layer.parametrizations.weight.original0
    assert not g.requires_grad and torch.all(g == 1)
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(32), atol=1e-5)
    assert sum(isinstance(m, nn.Linear) for m in head.mlp) == 3
    assert head(torch.randn(5, 16)).shape == (5, 32)
    assert head(torch.randn(2, 7, 16)).shape == (2, 7, 32)
    # The frozen magnitude gets no gradient; the directions do.
    head(torch.randn(4, 16)).sum().backward()
    assert g.grad is None and head.last_layer.parametrizations.weight.original1.grad is not None
    assert iBOTHead(16, 32, norm_last_layer=False).last_layer.parametrizations.weight.original0.requires_grad


def test_shared_vs_separate_heads():
    kw = dict(hidden_dim=24, bottleneck_dim=8, nlayers=2)
    shared = iBOTHeads(16, 32, shared=True, **kw)
    separate = iBOTHeads(16, 32, patch_out_dim=20, shared=False, **kw)
    assert n_params(separate) - n_params(shared) == n_params(iBOTHead(16, 20, **kw))
    cls, patches = torch.randn(3, 16), torch.randn(3, 5, 16)
    c, p = shared(cls, patches)
    assert c.shape == (3, 32) and p.shape == (3, 5, 32)
    # A shared head treats a [CLS] token exactly like a patch token.
    assert torch.allclose(shared(cls, cls[:, None])[1][:, 0], c, atol=1e-6)
    c, p = separate(cls, patches)
    assert c.shape == (3, 32) and p.shape == (3, 5, 20)
    with pytest.raises(ValueError, match="shared=False"):
        iBOTHeads(16, 32, patch_out_dim=20, shared=True)

