"""Test-wide settings: offline, CPU, small thread pool, tiny models."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture
def tiny_net_args():
    """A TC-AE small enough for CPU tests: 32x32 images -> 8x8 tokens -> 4x4 -> 2x2x16 latent."""
    return {"image_size": 32, "latent_size": 2}


@pytest.fixture
def one_thread():
    """Tiny ops are dominated by intra-op threading overhead on small CPUs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
