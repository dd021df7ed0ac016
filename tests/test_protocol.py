"""The shipped comparisons hold what they say they hold equal.

The paper's rule (TC-AE at 0.2-0.4x DC-AE's encode + decode GMACs, the same latent, the same training budget) is
checked on every pair the project ships, from the resolved configs and networks built on the meta device; iBOT's
statistics (a 4x4 grid under the heads for a global view, 2x2 for a local one, half of the global views masked with
blocks over 10-50% of their tokens) are checked on every demo TC-AE as its training step would draw them.
"""
import os

import pytest
import torch
import yaml

from tcae_ldm.cli import lightning_main
from tcae_ldm.losses.ssl import SSLConfig, draw_masks
from tcae_ldm.metrics.flops import count_gmacs
from tcae_ldm.models.zoo import autoencoder_family, create_autoencoder
from tests.tiny import REPO

COST_RATIO = (0.2, 0.4)  # the paper's pair: 164 / 607 = 0.27

# (TC-AE config stack, DC-AE config stack, latent shapes must match in full or only in their token grid)
PAIRS = {
    "cpu-demo": (["configs/demo/tcae.yaml"], ["configs/demo/dcae.yaml"], "full"),
    "gpu-demo": (["configs/demo/tcae.yaml", "configs/demo/gpu/tcae.yaml"],
                 ["configs/demo/dcae.yaml", "configs/demo/gpu/dcae.yaml"], "full"),
    "cpu-demo decoder finetuning": (["configs/demo/tcae_decoder_ft.yaml"],
                                    ["configs/demo/tcae_decoder_ft.yaml", "configs/demo/dcae_decoder_ft.yaml"], "full"),
    "gpu-demo decoder finetuning": (["configs/demo/tcae_decoder_ft.yaml", "configs/demo/gpu/tcae_decoder_ft.yaml"],
                                    ["configs/demo/tcae_decoder_ft.yaml", "configs/demo/dcae_decoder_ft.yaml",
                                     "configs/demo/gpu/tcae_decoder_ft.yaml", "configs/demo/gpu/dcae_decoder_ft.yaml"],
                                    "full"),
    # the paper's own pair: 8x8x128 against 8x8x32, the same 64 tokens
    "paper": (["configs/tcae.yaml"], ["configs/dcae.yaml"], "grid"),
}
# What a pair may differ in: the network, its arguments, iBOT and its views, where it writes, and what DC-AE's
# evaluation config adds. Everything else (steps, batch, data, losses, optimisers, schedule) is held equal.
MAY_DIFFER = ("model.init_args.net", "model.init_args.ssl", "data.init_args.views", "trainer.logger",
              "model.init_args.init_from")
TCAE_DEMOS = {"cpu": ["configs/demo/tcae.yaml"], "gpu": ["configs/demo/tcae.yaml", "configs/demo/gpu/tcae.yaml"]}


def _resolved(stack, capsys, subcommand="fit"):
    with pytest.raises(SystemExit):
        lightning_main([subcommand, *[a for c in stack for a in ("--config", os.path.join(REPO, c))], "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


def _flatten(tree, prefix=""):
    if isinstance(tree, dict):
        return {k: v for key, sub in tree.items() for k, v in _flatten(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: tree}


def _network(cfg):
    """The autoencoder a config trains, on the meta device, and its image size."""
    args, size = cfg["model"]["init_args"], cfg["data"]["init_args"]["image_size"]
    extra = {"image_size": size} if autoencoder_family(args["net"]) == "tcae" else {}
    net_args = {k: v for k, v in (args.get("net_args") or {}).items() if k != "pretrained"}  # weights, not shape
    with torch.device("meta"):
        return create_autoencoder(args["net"], **net_args, **extra), size


def _cost(net, size):
    """Encode + decode GMACs of one image, and the latent shape."""
    x = torch.empty(1, 3, size, size, device="meta")
    with torch.no_grad():
        z = net.encoder(x)
    return count_gmacs(net.encoder, x) + count_gmacs(net.decoder, z), tuple(z.shape[1:])


@pytest.mark.parametrize("pair", PAIRS)
def test_each_shipped_pair_keeps_the_papers_cost_rule(pair, capsys):
    tc_stack, dc_stack, match = PAIRS[pair]
    tc_cfg = _resolved(tc_stack, capsys)
    dc_cfg = _resolved(dc_stack, capsys)
    (tc_gmacs, tc_latent), (dc_gmacs, dc_latent) = _cost(*_network(tc_cfg)), _cost(*_network(dc_cfg))
    assert autoencoder_family(tc_cfg["model"]["init_args"]["net"]) == "tcae"
    assert autoencoder_family(dc_cfg["model"]["init_args"]["net"]) == "dcae"
    assert COST_RATIO[0] <= tc_gmacs / dc_gmacs <= COST_RATIO[1], (pair, tc_gmacs, dc_gmacs)
    assert (tc_latent if match == "full" else tc_latent[1:]) == (dc_latent if match == "full" else dc_latent[1:])
    tc, dc = _flatten(tc_cfg), _flatten(dc_cfg)
    held = {k for k in tc.keys() | dc.keys() if not k.startswith(MAY_DIFFER)}
    assert {k for k in held if tc.get(k) != dc.get(k)} == set()
    assert tc["model.init_args.max_steps"] == dc["model.init_args.max_steps"]
    assert tc["data.init_args.global_batch_size"] == dc["data.init_args.global_batch_size"]


def _ssl_grids(cfg):
    """Token grids that the iBOT heads read for a global and a local view of this config."""
    net, _ = _network(cfg)
    ssl = SSLConfig(**{k: v for k, v in cfg["model"]["init_args"]["ssl"].items() if k != "alpha"})
    stride = net.encoder.stage_stride(ssl.heads_on)
    views = cfg["data"]["init_args"]["views"]
    with torch.no_grad():
        grids = [net.encoder.forward_features(torch.empty(1, 3, s, s, device="meta"), upto=ssl.heads_on)[ssl.heads_on]
                 .shape[1:3] for s in (views["global_size"], views["local_size"])]
    assert [tuple(g) for g in grids] == [(s // stride, s // stride) for s in (views["global_size"], views["local_size"])]
    return ssl, [tuple(g) for g in grids]


@pytest.mark.parametrize("demo", TCAE_DEMOS)
def test_demo_ibot_has_ibots_grids_and_mask_statistics(demo, capsys, monkeypatch):
    ssl, (global_grid, local_grid) = _ssl_grids(_resolved(TCAE_DEMOS[demo], capsys))
    assert min(global_grid) >= 4 and min(local_grid) >= 2, (global_grid, local_grid)
    # The masks of 4096 global views, as the training step draws them (seed 0, steps 0..63, 64 views a step).
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    masks = torch.cat([draw_masks(ssl, 64, global_grid[0], step) for step in range(64)]).flatten(1)
    covered = masks.float().mean(1)
    masked = covered > 0
    assert abs(masked.float().mean().item() - 0.5) < 0.03  # iBOT: half of the global views
    assert covered[masked].max() <= 0.5  # blocks over at most 50% of the tokens ...
    assert 0.2 <= covered[masked].mean() <= 0.35  # ... 30% on average (BEiT's blocks stop short of the target)
    assert (masks[masked].sum(1) >= 2).float().mean() > 0.8  # mostly blocks, not single tokens
