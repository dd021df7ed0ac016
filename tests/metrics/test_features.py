"""FID feature networks: Inception offline, uint8 and float inputs alike, seeded random features."""
import pytest
import torch

from tcae_ldm.metrics.features import (
    INCEPTION_FILE,
    INCEPTION_URL,
    RandomFeatures,
    build_feature_extractor,
)
from tcae_ldm.metrics.fid import metric_name
from tcae_ldm.utils.files import MissingWeightsError


def images(seed, n=48, shift=0.0):
    """Flat random colours plus noise: images whose pooled features differ from image to image."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.rand(n, 3, 1, 1, generator=g) - 0.5
    return (colour + 0.3 * torch.randn(n, 3, 16, 16, generator=g) + shift).clamp(-1, 1)


def test_missing_inception_weights_name_the_file_and_never_download(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(MissingWeightsError) as err:
        build_feature_extractor("inception")
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    assert INCEPTION_FILE in msg and INCEPTION_URL in msg and str(tmp_path / "hub" / "checkpoints") in msg
    with pytest.raises(MissingWeightsError, match="nowhere/inception.pth"):
        build_feature_extractor("inception-v3-compat", weights_path=str(tmp_path / "nowhere" / "inception.pth"))


def test_inception_wrapper_scores_uint8_and_float_alike(tmp_path, monkeypatch):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    fake = tmp_path / INCEPTION_FILE
    torch.save({}, fake)  # present on disk, no weights: load_state_dict is stubbed so the net keeps random weights
    monkeypatch.setattr(FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
    monkeypatch.setattr(FeatureExtractorInceptionV3, "INPUT_IMAGE_SIZE", 75)  # its smallest valid input, for speed
    ext = build_feature_extractor("inception", weights_path=str(fake))
    assert (ext.name, ext.dim, metric_name("gfid", ext.name)) == ("inception", 2048, "gfid_inception")
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    f_uint8, f_float = ext(x), ext(x.float() / 127.5 - 1)
    assert f_uint8.shape == (2, 2048)
    torch.testing.assert_close(f_uint8, f_float)


def test_random_features_are_fixed_by_seed_and_leave_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(1)
    torch.manual_seed(123)
    a, b = RandomFeatures(dim=8, seed=3), RandomFeatures(dim=8, seed=3)
    assert torch.equal(torch.rand(1), expected)
    x = images(2, n=4)
    torch.testing.assert_close(a(x), b(x))
    assert not torch.allclose(a(x), RandomFeatures(dim=8, seed=4)(x))

