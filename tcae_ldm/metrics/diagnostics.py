"""Latent-space diagnostics behind the paper's claims about TC-AE latents (`tcae-ldm diagnose`, and a callback).

    semantic structure   linear-probe top-1 of mean-pooled image tokens (A1) and of the flattened latent (A2),
                         fitted on the train split and scored on the validation split, next to chance
    collapse             the latent's per-channel variance spectrum and the effective rank of its channel
                         covariance (Roy & Vetterli 2007: exp of the entropy of the normalised eigenvalues)
"""
from __future__ import annotations

import copy
import json
import os
import sys

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from tcae_ldm.data.images import collate_skipping
from tcae_ldm.utils.progress import Progress

TOKEN_STAGES = ("fine", "coarse")


#################################################################################
#                               Feature extraction                              #
#################################################################################

def _net_of(module_or_net):
    """The network to measure: a LightningModule's eval_net (the EMA when it has one), else the object itself."""
    return getattr(module_or_net, "eval_net", module_or_net)


@torch.no_grad()
def extract_features(net, loader, max_images: int | None = None, tokens: str = "fine") -> dict:
    """Encode the first max_images images of `loader` in eval mode.

    Returns tokens (N, D) mean-pooled `tokens`-stage image tokens (None when the network has no
    `encoder.forward_features`, e.g. a DC-AE), latents (N, c*h*w), latents_pooled (N, c), latent_grid
    (N, c, h, w) and labels (N,), all float32 / int64 on the CPU.
    """
    if tokens not in TOKEN_STAGES:
        raise ValueError(f"tokens must be one of {TOKEN_STAGES}, got {tokens!r}")
    net = _net_of(net)
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    staged = hasattr(getattr(net, "encoder", None), "forward_features")
    toks, lats, labels, seen = [], [], [], 0
    try:
        for batch in loader:
            if not batch or "image" not in batch:  # every item of the batch was an unreadable file
                continue
            x, y = batch["image"], batch["label"]
            if max_images is not None:
                x, y = x[: max_images - seen], y[: max_images - seen]
            x = x.to(device)
            if staged:
                feats = net.encoder.forward_features(x, upto="latent")
                toks.append(feats[tokens].float().mean(dim=(1, 2)).cpu())  # (B, H, W, D) -> (B, D)
                z = feats["latent"]
            else:
                z = net.encoder(x)
            lats.append(z.float().cpu())  # (B, c, h, w)
            labels.append(y.long().cpu())
            seen += len(y)
            if max_images is not None and seen >= max_images:
                break
    finally:
        net.train(was_training)  # a callback measures mid-training; leave the mode as it was
    if not lats:
        raise ValueError("the loader yielded no images to diagnose")
    grid = torch.cat(lats)
    return {"tokens": torch.cat(toks) if toks else None, "latents": grid.flatten(1),
            "latents_pooled": grid.mean(dim=(2, 3)), "latent_grid": grid, "labels": torch.cat(labels)}


#################################################################################
#                                  Linear probe                                 #
#################################################################################

def linear_probe(train_x: torch.Tensor, train_y: torch.Tensor, val_x: torch.Tensor, val_y: torch.Tensor,
                 num_classes: int | None = None, weight_decay: float = 1e-4, max_iter: int = 100,
                 device: torch.device | str | None = None, return_train_acc: bool = False):
    """Top-1 on (val_x, val_y) of multinomial logistic regression fitted on standardised train features.

    The objective (mean cross-entropy + weight_decay / 2 * |W|^2) is convex and starts from zero weights,
    so full-batch L-BFGS gives the same probe on every run without a seed. Fitted in float32 on `device`
    (default: where train_x is). max_iter bounds the cost: on separable features a small weight decay
    lets the weights grow for many iterations while the accuracy no longer changes.
    """
    if len(train_x) == 0 or len(val_x) == 0:
        raise ValueError("linear_probe needs at least one train and one validation example")
    k = num_classes or int(max(train_y.max(), val_y.max())) + 1
    dev = torch.device(device) if device is not None else train_x.device
    xt, xv = train_x.flatten(1).to(dev, torch.float32), val_x.flatten(1).to(dev, torch.float32)
    mean, std = xt.mean(0), xt.std(0, unbiased=False)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))  # a constant feature stays 0, not inf
    xt, xv = (xt - mean) / std, (xv - mean) / std
    yt, yv = train_y.to(dev).long(), val_y.to(dev).long()
    w = torch.zeros(xt.shape[1], k, dtype=xt.dtype, device=dev, requires_grad=True)
    b = torch.zeros(k, dtype=xt.dtype, device=dev, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=max_iter, history_size=20, tolerance_grad=1e-5,
                            tolerance_change=1e-9, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xt @ w + b, yt) + 0.5 * weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():  # the probe may be fitted inside a no_grad evaluation loop
        opt.step(closure)
    with torch.no_grad():
        val_acc = float(((xv @ w + b).argmax(1) == yv).double().mean())
        train_acc = float(((xt @ w + b).argmax(1) == yt).double().mean())
    return (val_acc, train_acc) if return_train_acc else val_acc


#################################################################################
#                                    Spectrum                                   #
#################################################################################

def _dims_for(fractions: torch.Tensor, level: float) -> int:
    """Smallest number of leading entries of a descending, sum-1 spectrum that reach `level`."""
    return min(int((fractions.cumsum(0) < level - 1e-9).sum()) + 1, len(fractions))


def latent_spectrum(latents: torch.Tensor) -> dict:
    """Variance spectrum and effective rank of (N, c, h, w) latents, every image position a sample.

    channel_variance: per-channel variances, descending, summing to 1; eigenvalues: the same for the
    channel covariance's eigenvalues (principal directions). effective_rank is in [1, c]; a collapsed
    latent that uses one direction scores 1, an isotropic one scores c.
    """
    if latents.dim() != 4:
        raise ValueError(f"latents must be (N, c, h, w), got shape {tuple(latents.shape)}")
    c = latents.shape[1]
    x = latents.detach().double().permute(0, 2, 3, 1).reshape(-1, c)  # (N*h*w, c)
    x = x - x.mean(0)
    n = x.shape[0]
    var = x.pow(2).sum(0) / max(n - 1, 1)
    eig = torch.linalg.eigvalsh(x.T @ x / max(n - 1, 1)).clamp_min(0).flip(0)  # descending
    total = float(var.sum())
    if total <= 0:  # every latent identical: no direction carries variance
        var_frac = eig_frac = torch.zeros(c, dtype=torch.float64)
        erank = 0.0
    else:
        var_frac = var.sort(descending=True).values / total
        eig_frac = eig / eig.sum()
        p = eig_frac[eig_frac > 0]
        erank = float(torch.exp(-(p * p.log()).sum()))
    return {"channels": c, "samples": n, "total_variance": total,
            "channel_variance": var_frac.tolist(), "eigenvalues": eig_frac.tolist(),
            "effective_rank": erank, "effective_rank_ratio": erank / c,
            "channels_90": _dims_for(var_frac, 0.90), "channels_99": _dims_for(var_frac, 0.99),
            "components_90": _dims_for(eig_frac, 0.90), "components_99": _dims_for(eig_frac, 0.99)}


#################################################################################
#                                  Diagnose                                     #
#################################################################################

def _eval_subset(dataset, eval_transform, max_images: int | None, seed: int):
    """The dataset without training augmentation, reduced to an even random subset of max_images items.

    Image folders are sorted by class, so the first N images would cover only the first classes.
    """
    if eval_transform is not None and hasattr(dataset, "transform"):
        dataset = copy.copy(dataset)  # shallow: the datamodule's own dataset keeps its augmentation
        dataset.transform = eval_transform
    if max_images is not None and max_images < len(dataset):
        g = torch.Generator().manual_seed(seed)
        dataset = Subset(dataset, torch.randperm(len(dataset), generator=g)[:max_images].sort().values.tolist())
    return dataset


def diagnose(module_or_net, datamodule, tokens: str = "fine", max_images: int | None = None,
             batch_size: int = 64, num_workers: int | None = None, seed: int = 0, progress: bool = False) -> dict:
    """Linear probes (fitted on the train split, scored on val) and the latent spectrum of an autoencoder.

    max_images caps each split (a seeded random subset). The global RNG state is left untouched, so
    running this inside training does not change the run. progress: print a line now and then (on stderr).
    """
    net = _net_of(module_or_net)
    device = next(net.parameters()).device
    if getattr(datamodule, "train_set", None) is None or getattr(datamodule, "val_set", None) is None:
        datamodule.setup("fit")
    eval_tf = getattr(datamodule.val_set, "transform", None)
    workers = getattr(datamodule, "num_workers", 0) if num_workers is None else num_workers
    feats = {}
    with torch.random.fork_rng(devices=[]):  # DataLoader iterators draw a base seed from the global RNG
        for split, ds in (("train", datamodule.train_set), ("val", datamodule.val_set)):
            loader = DataLoader(_eval_subset(ds, eval_tf, max_images, seed), batch_size=batch_size, shuffle=False,
                                num_workers=workers, collate_fn=collate_skipping)
            feats[split] = extract_features(net, Progress(loader, f"encode {split}") if progress else loader,
                                            max_images, tokens)
    tr, va = feats["train"], feats["val"]
    k = int(getattr(datamodule, "num_classes", 0) or 0) or int(max(tr["labels"].max(), va["labels"].max())) + 1
    val_counts = torch.bincount(va["labels"], minlength=k)
    results = {"tokens": tokens, "token_dim": None if tr["tokens"] is None else tr["tokens"].shape[1],
               "latent_shape": list(tr["latent_grid"].shape[1:]), "num_classes": k,
               "train_images": len(tr["labels"]), "val_images": len(va["labels"]),
               "chance": 1.0 / k, "majority": float(val_counts.max()) / len(va["labels"])}
    probes = {"probe_tokens": "tokens", "probe_latent": "latents", "probe_latent_pooled": "latents_pooled"}
    for name, key in probes.items():
        if tr[key] is None:
            results[name] = results[f"{name}_train"] = None
            continue
        if progress:
            print(f"fitting {name} on {tuple(tr[key].shape)} features", file=sys.stderr, flush=True)
        results[name], results[f"{name}_train"] = linear_probe(
            tr[key], tr["labels"], va[key], va["labels"], k, device=device, return_train_acc=True)
    results["spectrum"] = latent_spectrum(torch.cat([tr["latent_grid"], va["latent_grid"]]))
    return results


#################################################################################
#                                    Report                                     #
#################################################################################

def _fmt(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def format_table(results: dict) -> str:
    s, t = results["spectrum"], results["tokens"]
    c = s["channels"]
    rows = [
        (f"A1: linear probe on mean-pooled {t} tokens (val top-1)", _fmt(results["probe_tokens"]),
         f"train {_fmt(results['probe_tokens_train'])}"),
        ("A2: linear probe on the flattened latent (val top-1)", _fmt(results["probe_latent"]),
         f"train {_fmt(results['probe_latent_train'])}"),
        ("linear probe on the spatially pooled latent (val top-1)", _fmt(results["probe_latent_pooled"]),
         f"train {_fmt(results['probe_latent_pooled_train'])}"),
        ("chance (1 / classes)", _fmt(results["chance"]),
         f"{results['num_classes']} classes; majority class {_fmt(results['majority'])}"),
        ("effective rank / c", f"{s['effective_rank']:.2f} / {c} = {s['effective_rank_ratio']:.3f}",
         "exp(entropy) of the channel-covariance eigenvalues"),
        ("channels for 90% / 99% of the variance", f"{s['channels_90']} / {s['channels_99']} of {c}",
         "per-channel variances, largest first"),
        ("principal components for 90% / 99%", f"{s['components_90']} / {s['components_99']} of {c}",
         "eigenvalues of the channel covariance"),
    ]
    lines = ["| diagnostic | value | note |", "|---|---|---|"] + [f"| {a} | {b} | {n} |" for a, b, n in rows]
    return "\n".join(lines) + "\n"


def write_report(results: dict, out_dir: str) -> dict:
    """diagnostics.json (everything, spectra included) and diagnostics.md (the summary table) in out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "diagnostics.json"), "md": os.path.join(out_dir, "diagnostics.md")}
    with open(paths["json"], "w") as f:
        json.dump(results, f, indent=2)
    c, h, w = results["latent_shape"]
    head = ("# Latent diagnostics" + (f", step {results['step']}" if "step" in results else "") + "\n\n"
            f"Latent {c}x{h}x{w}; probes fitted on {results['train_images']} train images, scored on "
            f"{results['val_images']} validation images; spectrum over {results['spectrum']['samples']} "
            f"latent positions.\n\n")
    with open(paths["md"], "w") as f:
        f.write(head + format_table(results))
    return paths
