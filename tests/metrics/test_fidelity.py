"""Inception Score and precision / recall at values known in closed form."""
import pytest
import torch

from tcae_ldm.metrics.fidelity import inception_score, precision_recall


def test_inception_score_closed_forms():
    # the same prediction for every image: p(y|x) = p(y), KL 0, score 1
    assert inception_score(torch.randn(1, 7).expand(40, 7))[0] == pytest.approx(1.0, abs=1e-9)
    # confident predictions spread evenly over K classes: score K (one split: the shuffle cannot unbalance it)
    logits = torch.full((100, 5), -1e4)
    logits[torch.arange(100), torch.arange(100) % 5] = 0.0
    assert inception_score(logits, splits=1) == (pytest.approx(5.0, rel=1e-9), 0.0)
    with pytest.raises(ValueError, match="at least 10 samples, got 4"):
        inception_score(torch.randn(4, 3))


def test_precision_recall_closed_forms():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(50, 8, generator=g)
    assert precision_recall(ref, ref.clone()) == (1.0, 1.0)
    far = ref + 100.0  # every generated sample outside every reference ball, and the other way round
    assert precision_recall(far, ref) == (0.0, 0.0)
    # half of the samples on the reference set, half far away: precision 1/2; they cover the whole reference: recall 1
    half = torch.cat([ref[:25], ref[:25] + 100.0])
    precision, recall = precision_recall(half, ref)
    assert precision == 0.5 and recall > 0.4
    with pytest.raises(ValueError, match="more than 3 reference samples, got 3"):
        precision_recall(ref, ref[:3])
    with pytest.raises(ValueError, match="8-d, reference features 4-d"):
        precision_recall(ref, ref[:, :4])
