"""Decoder finetuning carries the joint phase's critic over: its weights when the phase starts, and its AdamW moments
once the optimizers exist. A fresh critic would first have to catch up with a decoder that already fools a trained
one, so the GAN term would be noise for thousands of steps; the carried-over critic lets the GAN term start at the
phase's first step (`disc_start` counts this phase's generator updates: the step counter starts at 0 in each phase).
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

PREFIX = "loss.discriminator."


def carry_over_critic(discriminator: torch.nn.Module | None, ckpt: dict, path: str) -> dict | None:
    """Load the joint checkpoint's critic weights into `discriminator`; returns the critic's optimizer state to give
    to its optimizer later (None when there is nothing to carry over). A critic of another shape is refused."""
    if discriminator is None:
        return None
    weights = {k[len(PREFIX):]: v for k, v in ckpt.get("state_dict", {}).items() if k.startswith(PREFIX)}
    if not weights:
        log.warning("%s has no critic (its run had no GAN term): decoder finetuning starts a fresh one", path)
        return None
    try:
        discriminator.load_state_dict(weights)
    except RuntimeError as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"the critic of {path} does not fit this run's (model.loss.disc_channels / disc_layers / "
                         f"disc_norm must be the joint phase's): {reason}") from None
    states = ckpt.get("optimizer_states") or []
    log.info("decoder finetuning continues the critic of %s%s", path, " and its optimizer state" if len(states) > 1
             else "")
    return states[1] if len(states) > 1 else None


def load_moments(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Give `optimizer` the per-parameter state (AdamW moments, step) of `state`, keeping this run's hyper-parameters
    (learning rate, betas, weight decay): the phase has its own schedule."""
    mine = optimizer.state_dict()
    if [len(g["params"]) for g in state["param_groups"]] != [len(g["params"]) for g in mine["param_groups"]]:
        log.warning("the carried-over critic's optimizer state has other parameter groups: its moments start at 0")
        return
    optimizer.load_state_dict({"state": state["state"], "param_groups": mine["param_groups"]})
