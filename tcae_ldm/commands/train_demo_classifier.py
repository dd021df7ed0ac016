"""`tcae-ldm train-demo-classifier`: the offline FID proxy of the CPU demo, a small CNN that tells the eight
demo photographs apart; its penultimate features are the `demo-classifier` network of tcae_ldm.metrics.features.

    tcae-ldm train-demo-classifier --out runs/demo/fid/demo-classifier.pt
"""
from __future__ import annotations

import os

from tcae_ldm.commands import CommandParser


def train_demo_classifier(out_path: str | None, steps: int = 200, batch_size: int = 32, lr: float = 3e-3,
                          image_size: int = 64, dim: int = 128, width: int = 16, seed: int = 0,
                          log_every: int = 0, **datamodule_kwargs):
    """Train the demo-classifier on the demo train crops (random flips), save it to out_path (if given),
    and return it as a feature extractor; its validation accuracy is stored in the file and on the object.
    datamodule_kwargs (e.g. train_per_class) go to DemoPhotosDataModule; the defaults are the demo's data.
    It trains on one CPU thread, so the weights (and every proxy FID measured with them) are the same on any machine."""
    from tcae_ldm.utils.seeding import one_thread

    with one_thread():
        return _train(out_path, steps, batch_size, lr, image_size, dim, width, seed, log_every, **datamodule_kwargs)


def _train(out_path, steps, batch_size, lr, image_size, dim, width, seed, log_every, **datamodule_kwargs):
    import torch
    import torch.nn.functional as F

    from tcae_ldm.data.demo import demo_split_tensors
    from tcae_ldm.metrics.features import ConvFeatureNet, DemoClassifierFeatures, FeatureExtractor

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
            print(f"step {step + 1}/{steps}  loss {loss.item():.3f}", flush=True)
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


def main(argv: list[str] | None = None):
    p = CommandParser(prog="tcae-ldm train-demo-classifier", description=__doc__)
    p.add_argument("--out", default=None, help="weight file to write (default: the file the demo-classifier network "
                                               "loads, in the torch hub cache: $TORCH_HOME/hub/checkpoints/)")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps")
    p.add_argument("--batch-size", type=int, default=32, help="crops per step")
    p.add_argument("--image-size", type=int, default=64, help="crop side; the demo's autoencoders use 64")
    p.add_argument("--seed", type=int, default=0, help="seeds the initialisation and the batches")
    args = p.parse_args(argv)
    from tcae_ldm.metrics.features import DEMO_CLASSIFIER_FILE
    from tcae_ldm.utils.files import torch_hub_file

    args.out = args.out or torch_hub_file(DEMO_CLASSIFIER_FILE)
    ext = train_demo_classifier(args.out, steps=args.steps, batch_size=args.batch_size,
                                image_size=args.image_size, seed=args.seed, log_every=50)
    print(f"wrote {args.out}: {ext.dim}-d features, validation accuracy {ext.val_accuracy:.3f}")
    return ext


if __name__ == "__main__":
    main()
