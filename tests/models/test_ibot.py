"""iBOT heads: weight-normalised prototypes, shared or separate heads, pickling, old checkpoint keys."""
import pickle

import pytest
import torch
import torch.nn as nn
from torch.nn.utils.parametrizations import weight_norm

from tcae_ldm.models.ibot import WeightNormLinear, iBOTHead, iBOTHeads


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_head_weight_norm_shapes_and_frozen_magnitude():
    head = iBOTHead(16, 32, hidden_dim=24, bottleneck_dim=8, nlayers=3)
    g = head.last_layer.weight_g
    assert not g.requires_grad and torch.all(g == 1)
    assert torch.allclose(head.last_layer.weight.norm(dim=1), torch.ones(32), atol=1e-5)
    assert sum(isinstance(m, nn.Linear) for m in head.mlp) == 3
    assert head(torch.randn(5, 16)).shape == (5, 32)
    assert head(torch.randn(2, 7, 16)).shape == (2, 7, 32)
    # The frozen magnitude gets no gradient; the directions do.
    head(torch.randn(4, 16)).sum().backward()
    assert g.grad is None and head.last_layer.weight_v.grad is not None
    assert iBOTHead(16, 32, norm_last_layer=False).last_layer.weight_g.requires_grad


def test_weight_norm_linear_matches_torch_and_loads_its_keys():
    """Same arithmetic as torch's weight_norm parametrization, whose state-dict keys (in checkpoints written
    with it) load into the plain module."""
    torch.manual_seed(0)
    ref = weight_norm(nn.Linear(8, 5, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original0.uniform_(0.5, 2.0)
    mine = WeightNormLinear(8, 5)
    mine.load_state_dict(ref.state_dict())
    assert list(dict(mine.named_parameters())) == ["weight_g", "weight_v"]  # original0, original1 order
    x = torch.randn(3, 8)
    assert torch.allclose(mine(x), ref(x), atol=1e-6)
    assert torch.allclose(mine.weight.norm(dim=1), ref.parametrizations.weight.original0[:, 0], atol=1e-6)


def test_heads_pickle_for_spawned_processes():
    """ddp_spawn pickles the module to send it to its processes: the heads must survive the trip unchanged."""
    heads = iBOTHeads(16, 32, hidden_dim=24, bottleneck_dim=8)
    copy = pickle.loads(pickle.dumps(heads))
    cls, patches = torch.randn(2, 16), torch.randn(2, 3, 16)
    for a, b in zip(heads(cls, patches), copy(cls, patches)):
        assert torch.equal(a, b)
    assert not copy.cls_head.last_layer.weight_g.requires_grad


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
    # Tokens may come as a flat selection (the masked ones), none included.
    assert torch.allclose(shared(cls, patches[:, 2])[1], p[:, 2], atol=1e-6)
    assert shared(cls, patches[:0, 0])[1].shape == (0, 32)
    c, p = separate(cls, patches)
    assert c.shape == (3, 32) and p.shape == (3, 5, 20)
    with pytest.raises(ValueError, match="shared=False"):
        iBOTHeads(16, 32, patch_out_dim=20, shared=True)

