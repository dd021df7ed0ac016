"""`tcae-ldm train-demo-classifier`: the demo's offline FID network trains, saves and loads."""
import pytest
import torch

from tcae_ldm.commands.train_demo_classifier import train_demo_classifier
from tcae_ldm.metrics.features import build_feature_extractor
from tcae_ldm.metrics.fid import metric_name
from tcae_ldm.utils.files import MissingWeightsError


def test_demo_classifier_trains_saves_and_loads(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "cache"))
    with pytest.raises(MissingWeightsError, match="train-demo-classifier"):
        build_feature_extractor("demo-classifier")
    path = str(tmp_path / "demo_cls.pt")
    trained = train_demo_classifier(path, steps=4, batch_size=8, image_size=32, dim=32, width=8,
                                    train_per_class=4, val_per_class=2)
    loaded = build_feature_extractor("demo-classifier", weights_path=path)
    assert (loaded.name, loaded.dim) == ("demo-classifier", 32)
    assert 0.0 <= trained.val_accuracy <= 1.0
    x = torch.randint(0, 256, (3, 3, 48, 48), dtype=torch.uint8)  # other sizes are resized to its 32x32
    f = loaded(x)
    assert f.shape == (3, 32) and f.dtype == torch.float32
    torch.testing.assert_close(f, trained(x))
    assert not any(p.requires_grad for p in loaded.parameters())
    assert metric_name("rfid", loaded.name) == "rfid_demo-classifier"

