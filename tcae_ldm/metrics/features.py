"""Feature networks for Frechet distances, all behind one interface (`name`, `dim`, images -> (B, dim)).

    inception         torch-fidelity's "inception-v3-compat": the TF-ported Inception of the ADM evaluator,
                      so `gfid_inception` is the number papers report. Weights: torch-fidelity's file in the
                      torch hub cache or a given path; never downloaded here.
    demo-classifier   a small CNN trained on the demo photos' 8 classes (`tcae-ldm train-demo-classifier`); an
                      offline proxy for the CPU demo whose numbers are NOT comparable with Inception FIDs.
    random            a fixed-seed random conv net, for tests.

The network's name is part of every metric name (gfid_inception, rfid_demo-classifier), so a proxy
number can never pass for a paper-comparable one. Each network also gives class logits (`ext(x, logits=True)`),
which the Inception Score reads: Inception's 1008 ("logits_unbiased", torch-fidelity's and the ADM evaluator's
IS layer), the demo classifier's 8, the random network's 10 from a fixed random head.
"""
from __future__ import annotations

import io
import os
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

from tcae_ldm.data.transforms import to_uint8
from tcae_ldm.utils.checkpoints import UntrustedFileError, load_torch_file
from tcae_ldm.utils.files import require_weights, torch_hub_file
from tcae_ldm.utils.seeding import one_thread

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")  # torch_fidelity.feature_extractor_inceptionv3
INCEPTION_FILE = os.path.basename(INCEPTION_URL)
DEMO_CLASSIFIER_FILE = "tcae-ldm-demo-classifier.pt"


def first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [""])[0][:200]


class FeatureExtractor(nn.Module):
    """Frozen images -> features network; accepts uint8 (B, 3, H, W) or float in [-1, 1]."""

    name: str = ""
    dim: int = 0

    @staticmethod
    def as_float(x: torch.Tensor) -> torch.Tensor:
        return x.float().div(127.5).sub(1.0) if x.dtype == torch.uint8 else x.float()

    def __call__(self, x: torch.Tensor, logits: bool = False):
        """(B, dim) float32 features, or (features, (B, K) class logits); forward() always receives uint8 images."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name} features expect images of shape (B, 3, H, W), got {tuple(x.shape)}")
        if x.dtype != torch.uint8:
            # generated images are scored as the PNGs they would be saved as (as the ADM evaluator does),
            # so they meet the 8-bit reference images on equal terms
            x = to_uint8(x.float())
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            return super().__call__(x, logits)


class InceptionFeatures(FeatureExtractor):
    """The ADM evaluator's Inception-v3 pool3 features (2048-d) via torch-fidelity."""

    name, dim = "inception", 2048

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        # torch-fidelity would download it silently; fail with a recipe instead
        path = require_weights(
            weights_path or torch_hub_file(INCEPTION_FILE), f"FID with Inception ({INCEPTION_FILE})",
            f"Download {INCEPTION_URL} on a machine with network access and copy it there (torch-fidelity's "
            f"cache, $TORCH_HOME/hub/checkpoints/), or pass its path as the weights path (--weights). Offline, "
            f"the demo can use the 'demo-classifier' proxy instead.")
        from torch_fidelity.feature_extractor_inceptionv3 import (
            FeatureExtractorInceptionV3,
        )

        # torch-fidelity unpickles the file it is given with weights_only=False: it gets our own re-serialisation
        # of what the project's loader read without executing anything
        try:
            state, weights = load_torch_file(path, what=f"Inception weight file ({INCEPTION_FILE})"), io.BytesIO()
            torch.save(state, weights)
            weights.seek(0)
            del state
            self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                                   feature_extractor_weights_path=weights)
        except UntrustedFileError:
            raise
        except Exception as e:  # noqa: BLE001  (torch.load and load_state_dict raise several types)
            raise ValueError(f"{path} is not torch-fidelity's Inception weight file {INCEPTION_FILE} "
                             f"({type(e).__name__}: {first_line(e)})") from None

    def forward(self, x: torch.Tensor, logits: bool = False):
        features, class_logits = self.net(x)  # (B, 2048), (B, 1008); resizes to 299 internally like TF did
        return (features, class_logits) if logits else features


class ConvFeatureNet(nn.Module):
    """Stride-2 conv stem, then (stride-2 conv, conv) stages, global average pool -> (B, dim); optional class head."""

    def __init__(self, dim: int = 128, width: int = 16, num_classes: int = 0):
        super().__init__()
        self.dim, self.width = dim, width
        widths = [width, 2 * width, 4 * width, dim]
        layers, cin = [], 3
        for i, cout in enumerate(widths):
            for stride in ((2,) if i == 0 else (2, 1)):  # small: it trains on a CPU
                layers += [nn.Conv2d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm2d(cout), nn.ReLU()]
                cin = cout
        self.trunk = nn.Sequential(*layers)
        self.head = nn.Linear(dim, num_classes) if num_classes else None

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x).mean(dim=(2, 3))  # (B, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, num_classes)


class RandomFeatures(FeatureExtractor):
    """Two random conv layers with seeded weights: cheap, deterministic features for tests."""

    name = "random"

    def __init__(self, dim: int = 32, seed: int = 0, num_classes: int = 10):
        super().__init__()
        self.dim = dim
        with torch.random.fork_rng(devices=[]):  # a fixed net without disturbing the caller's RNG stream
            torch.manual_seed(seed)
            # shallow on purpose: deep random nets squash tiny test images to near-constant features
            self.net = nn.Sequential(nn.Conv2d(3, 32, 3, stride=2, padding=1), nn.ReLU(),
                                     nn.Conv2d(32, dim, 3, stride=2, padding=1), nn.ReLU())
            for m in self.net:
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                    nn.init.normal_(m.bias, std=0.1)
            self.head = nn.Linear(dim, num_classes)  # logits for the Inception Score's tests
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor, logits: bool = False):
        features = self.net(self.as_float(x)).mean(dim=(2, 3))  # (B, dim)
        return (features, self.head(features)) if logits else features


class DemoClassifierFeatures(FeatureExtractor):
    """Penultimate features of a CNN trained to tell the 8 demo photographs apart (offline FID proxy)."""

    name = "demo-classifier"

    def __init__(self, net: ConvFeatureNet, image_size: int = 64):
        super().__init__()
        self.net, self.image_size, self.dim = net, image_size, net.dim
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor, logits: bool = False):
        x = self.as_float(x)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            # one input size whatever the image size, as Inception's fixed 299 resize
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        # One reduction order on a CPU: the demo's proxy FIDs do not depend on the machine's thread count.
        with one_thread() if x.device.type == "cpu" else nullcontext():
            features = self.net.features(x)
            return (features, self.net.head(features)) if logits else features

    @classmethod
    def load(cls, path: str | None = None) -> "DemoClassifierFeatures":
        path = path or torch_hub_file(DEMO_CLASSIFIER_FILE)
        require_weights(path, "the demo-classifier FID network",
                        f"Train it on the CPU: tcae-ldm train-demo-classifier --out {path}")
        try:
            ckpt = load_torch_file(path, what="demo-classifier weight file")
            net = ConvFeatureNet(dim=ckpt["dim"], width=ckpt["width"], num_classes=ckpt["num_classes"])
            net.load_state_dict(ckpt["state_dict"])
        except UntrustedFileError:
            raise
        except Exception as e:  # noqa: BLE001  (torch.load, a missing key and load_state_dict raise several types)
            raise ValueError(f"{path} is not a demo-classifier weight file from `tcae-ldm train-demo-classifier` "
                             f"({type(e).__name__}: {first_line(e)})") from None
        return cls(net, image_size=ckpt["image_size"])


FEATURE_EXTRACTORS = {
    "inception": lambda weights_path=None, **kw: InceptionFeatures(weights_path),
    "demo-classifier": lambda weights_path=None, **kw: DemoClassifierFeatures.load(weights_path),
    "random": lambda weights_path=None, **kw: RandomFeatures(**kw),
}
_ALIASES = {"inception-v3-compat": "inception", "inception-v3": "inception"}


def build_feature_extractor(name: str, weights_path: str | None = None, **kwargs) -> FeatureExtractor:
    """A frozen feature network by name (see FEATURE_EXTRACTORS); kwargs go to its constructor (random: dim, seed)."""
    key = _ALIASES.get(name, name)
    if key not in FEATURE_EXTRACTORS:
        raise KeyError(f"unknown FID feature network {name!r}; choose one of {sorted(FEATURE_EXTRACTORS)}")
    return FEATURE_EXTRACTORS[key](weights_path=weights_path, **kwargs)

