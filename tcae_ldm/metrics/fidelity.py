"""Inception Score and precision / recall of generated images, computed by torch-fidelity's own functions on the
features and logits of the project's feature networks (tcae_ldm.metrics.features), so that with the "inception"
network they are torch-fidelity's numbers on the ADM evaluator's Inception-v3.

Settings are torch-fidelity's defaults, which are the ADM evaluator's: IS over 10 splits (split size 5000 for 50k
samples) of the softmax of the unbiased 1008-way logits, samples shuffled with seed 2020; precision / recall
(Kynkaanniemi et al. 2019) with k = 3 nearest neighbours on the pool features (2048-d), in batches of 10000.
Metric names carry the network, as the FID's do: is_inception, precision_inception, recall_inception.
"""
from __future__ import annotations

import torch

IS_SPLITS, IS_SEED, PRC_NEIGHBOURS, PRC_BATCH = 10, 2020, 3, 10000


def inception_score(logits: torch.Tensor, splits: int = IS_SPLITS) -> tuple[float, float]:
    """(mean, std) over splits of exp(E_x KL(p(y|x) || p(y))) from class logits (N, K)."""
    from torch_fidelity.metric_isc import (
        KEY_METRIC_ISC_MEAN,
        KEY_METRIC_ISC_STD,
        isc_features_to_metric,
    )

    if logits.shape[0] < splits:
        raise ValueError(f"the Inception Score over {splits} splits needs at least {splits} samples, got {logits.shape[0]}")
    out = isc_features_to_metric(logits.cpu(), splits=splits, shuffle=True, rng_seed=IS_SEED)
    return out[KEY_METRIC_ISC_MEAN], out[KEY_METRIC_ISC_STD]


def precision_recall(generated: torch.Tensor, reference: torch.Tensor, neighbours: int = PRC_NEIGHBOURS,
                     batch_size: int = PRC_BATCH) -> tuple[float, float]:
    """(precision, recall) of generated features (N, D) against reference features (M, D): the share of generated
    samples inside the k-NN balls of the reference set, and of reference samples inside the generated set's.
    Distances are computed on the tensors' device, in batches, as torch-fidelity's save_cpu_ram path does."""
    from torch_fidelity.metric_prc import calculate_precision_recall_part

    for name, f in (("generated", generated), ("reference", reference)):
        if f.shape[0] <= neighbours:
            raise ValueError(f"precision/recall with k={neighbours} needs more than {neighbours} {name} samples, "
                             f"got {f.shape[0]}")
    if generated.shape[1] != reference.shape[1]:
        raise ValueError(f"generated features are {generated.shape[1]}-d, reference features {reference.shape[1]}-d")
    precision, recall = calculate_precision_recall_part(generated.float(), reference.float(), neighbours, batch_size)
    return float(precision), float(recall)
