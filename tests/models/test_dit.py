"""DiT: shapes, adaLN-Zero init, label dropout, CFG, and the paper's parameter / GMACs table."""
import numpy as np
import pytest
import torch
import torch.nn as nn

from tcae_ldm.metrics.flops import count_gmacs, count_params
from tcae_ldm.models.dit import (
    DIT_PRESETS,
    DiT,
    LabelEmbedder,
    TimestepEmbedder,
    create_dit,
    dit_from_official,
)

NUM_CLASSES = 10


def tiny(patch_size: int = 1, **overrides) -> DiT:
    kwargs = dict(input_size=8, in_channels=4, num_classes=NUM_CLASSES, patch_size=patch_size)
    return create_dit("DiT-T/1", **{**kwargs, **overrides})


def randomize(model: nn.Module) -> nn.Module:
    """Give the zero-initialised layers weights so outputs depend on the inputs."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.1)
    return model


def inputs(batch: int = 2, channels: int = 4, size: int = 8):
    torch.manual_seed(1)
    return torch.randn(batch, channels, size, size), torch.rand(batch), torch.randint(0, NUM_CLASSES, (batch,))


# Paper (Peebles & Xie, Tables 1 and 4): 32x32x4 latents, learned sigma, 1000 classes.
PAPER_PARAMS_M = {"DiT-S/2": 33, "DiT-B/2": 130, "DiT-L/2": 458, "DiT-XL/2": 675}


PAPER_GMACS = {"DiT-S/2": 6.06, "DiT-B/2": 23.01, "DiT-XL/2": 118.64, "DiT-S/4": 1.41, "DiT-XL/4": 29.05}


def paper_model(name: str) -> DiT:
    with torch.device("meta"):  # no memory, no init compute
        return create_dit(name, input_size=32, in_channels=4, learn_sigma=True, num_classes=1000)


@pytest.mark.parametrize("patch_size", [1, 2, 4])
@pytest.mark.parametrize("learn_sigma", [False, True])
def test_output_shape(patch_size, learn_sigma):
    model = randomize(tiny(patch_size, learn_sigma=learn_sigma))
    x, t, y = inputs()
    out = model(x, t, y)
    assert out.shape == (2, 8 if learn_sigma else 4, 8, 8)
    assert model.out_channels == out.shape[1]


def test_adaln_zero_init_gives_zero_output():
    model = tiny(2, learn_sigma=True)
    for layer in [b.adaLN_modulation[-1] for b in model.blocks] + [model.final_layer.adaLN_modulation[-1]]:
        assert torch.count_nonzero(layer.weight) == 0 and torch.count_nonzero(layer.bias) == 0
    assert torch.count_nonzero(model.final_layer.linear.weight) == 0
    assert torch.count_nonzero(model(*inputs())) == 0
    # The embedders and attention are not zero: only the residual branches and the output start closed.
    assert model.y_embedder.embedding_table.weight.std() > 0.01
    assert model.blocks[0].attn.qkv.weight.abs().sum() > 0


def test_pos_embed_is_fixed_buffer():
    model = tiny(2)
    assert "pos_embed" not in dict(model.named_parameters())
    assert "pos_embed" not in model.state_dict()  # rebuilt at construction, never loaded stale
    assert model.pos_embed.shape == (1, 16, 64)


def test_label_dropout_uses_null_index():
    emb = LabelEmbedder(NUM_CLASSES, 16, dropout_prob=0.1)
    assert emb.embedding_table.num_embeddings == NUM_CLASSES + 1
    labels = torch.tensor([3, 4, 5])
    assert emb.token_drop(labels, force_drop_ids=torch.tensor([1, 0, 1])).tolist() == [NUM_CLASSES, 4, NUM_CLASSES]
    null_row = emb.embedding_table.weight[NUM_CLASSES]
    emb.dropout_prob = 1.0  # every label dropped in training, none in eval
    assert torch.equal(emb(labels, train=True), null_row.expand(3, -1))
    assert torch.equal(emb(labels, train=False), emb.embedding_table.weight[labels])
    assert LabelEmbedder(NUM_CLASSES, 16, dropout_prob=0.0).embedding_table.num_embeddings == NUM_CLASSES


def test_timestep_time_scale():
    a, b = TimestepEmbedder(32, time_scale=1000.0), TimestepEmbedder(32, time_scale=1.0)
    b.load_state_dict(a.state_dict())
    assert torch.allclose(a(torch.tensor([0.25, 0.9])), b(torch.tensor([250.0, 900.0])), atol=1e-5)


def test_grad_checkpointing_matches():
    x, t, y = inputs()
    plain = randomize(tiny(2)).train()
    ckpt = randomize(tiny(2, grad_checkpointing=True)).train()
    ckpt.y_embedder.dropout_prob = plain.y_embedder.dropout_prob = 0.0
    plain(x, t, y).square().sum().backward()
    ckpt(x, t, y).square().sum().backward()
    for p, q in zip(plain.parameters(), ckpt.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-5)


def test_registry_and_validation():
    assert {"DiT-T/1", "DiT-T/2", "DiT-S/2", "DiT-XL/1", "DiT-XL/2", "DiT-XL/4"} <= set(DIT_PRESETS)
    with pytest.raises(KeyError, match="DiT-XL/2"):
        create_dit("DiT-XXL/2", input_size=32, in_channels=4)
    with pytest.raises(ValueError, match="patch_size"):
        tiny(3)


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS_M))
def test_paper_param_counts(name):
    assert count_params(paper_model(name)) / 1e6 == pytest.approx(PAPER_PARAMS_M[name], rel=0.01)


@pytest.mark.parametrize("name", sorted(PAPER_GMACS))
def test_paper_gmacs(name):
    # Measured within 0.1% of the paper (table in dit.py); 1% covers the paper's two-decimal rounding
    # and leaves no room for a missing term (attention scores alone are ~10% of DiT-S/2).
    with torch.device("meta"):
        x, t, y = torch.randn(1, 4, 32, 32), torch.rand(1), torch.zeros(1, dtype=torch.long)
    assert count_gmacs(paper_model(name), x, t, y) == pytest.approx(PAPER_GMACS[name], rel=0.01)



def mae_sincos(dim: int, grid: int) -> np.ndarray:
    """DiT's position table as its models.py describes it (MAE's recipe): positions on a meshgrid with x first,
    half the channels per axis, each half [sin, cos] of pos * 10000^(-k / (dim / 4)), computed in float64."""
    xs, ys = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))
    omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))

    def axis(pos):
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([axis(xs), axis(ys)], axis=1)  # (grid * grid, dim)


def official_checkpoint(learn_sigma: bool = True, input_size: int = 8, num_classes: int = NUM_CLASSES):
    """A random DiT-T/2 saved as facebookresearch/DiT saves its models: the same weight names plus pos_embed."""
    model = randomize(tiny(2, learn_sigma=learn_sigma, input_size=input_size, num_classes=num_classes,
                           class_dropout_prob=0.1, pos_embed_layout="dit"))
    grid = input_size // 2
    state = {**model.state_dict(), "pos_embed": torch.from_numpy(mae_sincos(64, grid)).float().unsqueeze(0)}
    return model, state


def test_dit_layout_pos_embed_is_dits_table():
    model = tiny(2, pos_embed_layout="dit")
    np.testing.assert_array_equal(model.pos_embed[0].numpy(), mae_sincos(64, 4).astype(np.float32))  # bitwise
    assert not torch.allclose(tiny(2).pos_embed, model.pos_embed)  # timm's order differs
    with pytest.raises(ValueError, match="pos_embed_layout must be one of"):
        tiny(2, pos_embed_layout="mae")


@pytest.mark.parametrize("wrapped", [False, True])
def test_official_checkpoint_maps_onto_a_preset(wrapped):
    model, state = official_checkpoint()
    ckpt = {"model": {}, "ema": state, "args": None} if wrapped else state  # train.py's layout, or a release
    name, kwargs, ours = dit_from_official(ckpt)
    assert name == "DiT-T/2" and "pos_embed" not in ours
    assert kwargs == dict(input_size=8, in_channels=4, learn_sigma=True, num_classes=NUM_CLASSES,
                          class_dropout_prob=0.1, pos_embed_layout="dit")
    loaded = create_dit(name, **kwargs)
    loaded.load_state_dict(ours)  # strict: every key maps
    x, t, y = inputs()
    torch.testing.assert_close(loaded.eval()(x, t, y), model.eval()(x, t, y))
    bad = {**state, "pos_embed": state["pos_embed"].flip(-1)}
    with pytest.raises(ValueError, match="not DiT's 2-D sin-cos table"):
        dit_from_official(bad)
    with pytest.raises(ValueError, match="not a facebookresearch/DiT checkpoint"):
        dit_from_official({"state_dict": {}})


def test_the_published_dit_xl2_layout_maps_onto_our_preset():
    """DiT-XL-2-256x256.pt's layout (shapes on the meta device, the real position table): DiT-XL/2, 4x32x32
    latents, learned sigma, 1000 classes, and 675,129,632 parameters with its pos_embed, as released."""
    with torch.device("meta"):
        ours = create_dit("DiT-XL/2", input_size=32, in_channels=4, learn_sigma=True, num_classes=1000)
    state = {**ours.state_dict(), "pos_embed": torch.from_numpy(mae_sincos(1152, 16)).float().unsqueeze(0)}
    assert sum(v.numel() for v in state.values()) == 675_129_632
    name, kwargs, mapped = dit_from_official(state)
    assert name == "DiT-XL/2" and kwargs == dict(input_size=32, in_channels=4, learn_sigma=True, num_classes=1000,
                                                 class_dropout_prob=0.1, pos_embed_layout="dit")
    assert mapped.keys() == ours.state_dict().keys()
