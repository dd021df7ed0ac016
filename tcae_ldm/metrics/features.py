"""Feature networks for Frechet distances, all behind one interface (`name`, `dim`, images -> (B, dim)).

    inception         torch-fidelity's "inception-v3-compat": the TF-ported Inception of the ADM evaluator,
                      so `gfid_inception` is the number papers report. Weights: torch-fidelity's file in the
                      torch hub cache or a given path; never downloaded here.
    demo-classifier   a small CNN trained on the demo photos' 8 classes (train_demo_classifier); an offline
                      proxy for the CPU demo whose numbers are NOT comparable with Inception FIDs.
    random            a fixed-seed random conv net, for tests.

The network's name is part of every metric name (gfid_inception, rfid_demo-classifier), so a proxy
number can never pass for a paper-comparable one.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from tcae_ldm.data.transforms import to_uint8
from tcae_ldm.losses.lpips import MissingWeightsError

INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")  # torch_fidelity.feature_extractor_inceptionv3
INCEPTION_FILE = os.path.basename(INCEPTION_URL)
DEMO_CLASSIFIER_FILE = "tcae-ldm-demo-classifier.pt"


class MissingFeatureWeightsError(MissingWeightsError):
    """The weight file of a FID feature network is not on disk."""


def default_weights_path(file_name: str) -> str:
    """Where torch.hub (and so torch-fidelity) caches a file: $TORCH_HOME/hub/checkpoints/<file>."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", file_name)


class FeatureExtractor(nn.Module):
    """Frozen images -> features network; accepts uint8 (B, 3, H, W) or float in [-1, 1]."""

    name: str = ""
    dim: int = 0

    @staticmethod
    def as_float(x: torch.Tensor) -> torch.Tensor:
        return x.float().div(127.5).sub(1.0) if x.dtype == torch.uint8 else x.float()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(B, dim) float32 features; forward() always receives uint8 images."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{self.name} features expect images of shape (B, 3, H, W), got {tuple(x.shape)}")
        if x.dtype != torch.uint8:
            # generated images are scored as the PNGs they would be saved as (as the ADM evaluator does),
            # so they meet the 8-bit reference images on equal terms
            x = to_uint8(x.float())
        with torch.no_grad(), torch.autocast(x.device.type, enabled=False):
            return super().__call__(x)


class InceptionFeatures(FeatureExtractor):
    """The ADM evaluator's Inception-v3 pool3 features (2048-d) via torch-fidelity."""

    name, dim = "inception", 2048

    def __init__(self, weights_path: str | None = None):
        super().__init__()
        path = weights_path or default_weights_path(INCEPTION_FILE)
        if not os.path.isfile(path):  # torch-fidelity would download it silently; fail with a recipe instead
            raise MissingFeatureWeightsError(
                f"FID with Inception needs the weight file {INCEPTION_FILE} at {path}, which does not exist. "
                f"Download {INCEPTION_URL} on a machine with network access and copy it to {path} "
                f"(torch-fidelity's cache, $TORCH_HOME/hub/checkpoints/), or pass its path as the weights path "
                f"(--weights). Offline, the demo can use the 'demo-classifier' proxy instead.")
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

        self.net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=path)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)[0]  # (B, 2048); resizes to 299 internally like TF did


class ConvFeatureNet(nn.Module):
    """Stride-2 conv stem, then (stride-2 conv, conv) stages, global average pool -> (B, dim); optional class head."""

    def __init__(self, dim: int = 128, width: int = 16, num_classes: int = 0):
        super().__init__()
        self.dim, self.width = dim, width
        widths = [width, 2 * width, 4 * width, dim]
        layers, cin = [], 3
        for i, cout in enumerate(widths):
            for stride in ((2,) if i == 0 else (2, 1)):  # small, since it trains on a shared CPU in a minute
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

    def __init__(self, dim: int = 32, seed: int = 0):
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
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.as_float(x)).mean(dim=(2, 3))  # (B, dim)


class DemoClassifierFeatures(FeatureExtractor):
    """Penultimate features of a CNN trained to tell the 8 demo photographs apart (offline FID proxy)."""

    name = "demo-classifier"

    def __init__(self, net: ConvFeatureNet, image_size: int = 64):
        super().__init__()
        self.net, self.image_size, self.dim = net, image_size, net.dim
        self.requires_grad_(False).eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.as_float(x)
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            # one input size whatever the image size, as Inception's fixed 299 resize
            x = F.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear", antialias=True,
                              align_corners=False)
        return self.net.features(x)

    @classmethod
    def load(cls, path: str | None = None) -> "DemoClassifierFeatures":
        path = path or default_weights_path(DEMO_CLASSIFIER_FILE)
        if not os.path.isfile(path):
            raise MissingFeatureWeightsError(
                f"the demo-classifier FID network needs its weight file at {path}, which does not exist. "
                f"Train it (CPU, a minute or so): python -m tcae_ldm.metrics.features train-demo-classifier "
                f"--out {path}")
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        net = ConvFeatureNet(dim=ckpt["dim"], width=ckpt["width"], num_classes=ckpt["num_classes"])
        net.load_state_dict(ckpt["state_dict"])
        return cls(net, image_size=ckpt["image_size"])


def demo_split_tensors(image_size: int = 64, **datamodule_kwargs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{'train': (uint8 (N, 3, S, S), labels), 'val': ...}: the demo datamodule's crops, unflipped."""
    from tcae_ldm.data.demo import DemoPhotosDataModule

    dm = DemoPhotosDataModule(image_size=image_size, **datamodule_kwargs)
    dm.setup()
    return {split: (torch.from_numpy(ds.images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(ds.labels).long())
            for split, ds in (("train", dm.train_set), ("val", dm.val_set))}


def train_demo_classifier(out_path: str | None, steps: int = 200, batch_size: int = 32, lr: float = 3e-3,
                          image_size: int = 64, dim: int = 128, width: int = 16, seed: int = 0,
                          log_every: int = 0, **datamodule_kwargs) -> DemoClassifierFeatures:
    """Train the demo-classifier on the demo train crops (random flips), save it to out_path (if given),
    and return it as a feature extractor; its validation accuracy is stored in the file and on the object.
    datamodule_kwargs (e.g. train_per_class) go to DemoPhotosDataModule; the defaults are the demo's data."""
    data = demo_split_tensors(image_size, **datamodule_kwargs)
    (x_tr, y_tr), (x_va, y_va) = data["train"], data["val"]
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = ConvFeatureNet(dim=dim, width=width, num_classes=int(y_tr.max()) + 1)
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.05)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1), pct_start=0.1)
    net.train()
    for step in range(steps):
        idx = torch.randint(0, len(x_tr), (batch_size,), generator=gen)
        x = FeatureExtractor.as_float(x_tr[idx])
        flip = torch.rand(batch_size, generator=gen) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        loss = F.cross_entropy(net(x), y_tr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if log_every and (step + 1) % log_every == 0:
            print(f"step {step + 1}/{steps}  loss {loss.item():.3f}")
    net.eval()
    with torch.no_grad():
        acc = sum((net(FeatureExtractor.as_float(x_va[i:i + 256])).argmax(1) == y_va[i:i + 256]).sum().item()
                  for i in range(0, len(x_va), 256)) / len(x_va)
    if out_path:
        os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
        torch.save({"state_dict": net.state_dict(), "dim": dim, "width": width, "num_classes": net.head.out_features,
                    "image_size": image_size, "steps": steps, "val_accuracy": acc}, out_path)
    extractor = DemoClassifierFeatures(net, image_size=image_size)
    extractor.val_accuracy = acc
    return extractor


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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m tcae_ldm.metrics.features",
                                description="Train the offline demo-classifier FID proxy on the demo photos.")
    p.add_argument("command", choices=["train-demo-classifier"])
    p.add_argument("--out", default=default_weights_path(DEMO_CLASSIFIER_FILE), help="weight file to write")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    ext = train_demo_classifier(args.out, steps=args.steps, batch_size=args.batch_size,
                                image_size=args.image_size, seed=args.seed, log_every=50)
    print(f"wrote {args.out}: {ext.dim}-d features, validation accuracy {ext.val_accuracy:.3f}")


if __name__ == "__main__":
    main()
