"""`tcae-ldm diagnose`: linear probes (A1 on image tokens, A2 on latents) and the latent spectrum of a trained
autoencoder, on the demo photos or an ImageNet-style folder. Beside diagnostics.json / diagnostics.md it draws
spectrum.png (the latent's variance per principal component and per channel, and their cumulative share) and
probes.png (validation and training accuracy of each linear probe against chance).

    tcae-ldm diagnose --ckpt runs/demo/tcae/checkpoints/last.ckpt --out runs/demo/diagnostics
    tcae-ldm diagnose --ckpt last.ckpt --data-root /data/imagenet --image-size 256 --max-images 10000 --out diag
"""
from __future__ import annotations

import os

from tcae_ldm.commands import CommandParser, fail

TOKEN_STAGES = ("fine", "coarse")  # tcae_ldm.metrics.diagnostics.TOKEN_STAGES, named here for --help without torch


def build_datamodule(args, image_size: int):
    from tcae_ldm.data.demo import DemoPhotosDataModule
    from tcae_ldm.data.images import ImageFolderDataModule

    if args.data_root:
        return ImageFolderDataModule(root=args.data_root, image_size=args.image_size or image_size,
                                     global_batch_size=args.batch_size, num_workers=args.num_workers, hflip=False)
    return DemoPhotosDataModule(image_size=args.image_size or image_size, train_per_class=args.train_per_class,
                                val_per_class=args.val_per_class, global_batch_size=args.batch_size, hflip=False,
                                num_workers=args.num_workers)


def main(argv: list[str] | None = None) -> dict:
    p = CommandParser(prog="tcae-ldm diagnose", description=__doc__)
    p.add_argument("--ckpt", required=True, help="AutoencoderModule checkpoint; EMA weights are used when present")
    p.add_argument("--out", required=True, help="folder for diagnostics.json and diagnostics.md")
    p.add_argument("--data", choices=["demo"], default="demo", help="the bundled photos, unless --data-root")
    p.add_argument("--data-root", help="ImageNet-style folder with train/<class>/ and val/<class>/ instead of demo")
    p.add_argument("--image-size", type=int, help="image side (default: the network's training size)")
    p.add_argument("--tokens", choices=TOKEN_STAGES, default="fine", help="image tokens probed for A1")
    p.add_argument("--max-images", type=int, help="at most this many images per split (seeded random subset)")
    p.add_argument("--train-per-class", type=int, default=128, help="demo training crops per class")
    p.add_argument("--val-per-class", type=int, default=16, help="demo validation crops per class")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--num-workers", type=int, default=0)
    p.add_argument("--device", default=None)
    args = p.parse_args(argv)
    import torch

    from tcae_ldm.lit.loading import CheckpointError, load_autoencoder_module
    from tcae_ldm.metrics.diagnostics import diagnose, format_table, write_report

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        module = load_autoencoder_module(args.ckpt, metrics_lpips=None, metrics_fid=None)
    except CheckpointError as e:
        fail("tcae-ldm diagnose", str(e))
    net = module.eval_net.to(args.device)
    image_size = args.image_size or getattr(module.net, "image_size", None)
    if image_size is None:
        fail("tcae-ldm diagnose", f"{module.hparams.net} has no training image size of its own: pass --image-size")
    dm = build_datamodule(args, image_size)
    results = {"checkpoint": os.path.abspath(args.ckpt), "step": module.step_count,
               **diagnose(net, dm, tokens=args.tokens, max_images=args.max_images, batch_size=args.batch_size,
                          num_workers=args.num_workers, progress=True)}
    write_report(results, args.out)
    figures = write_figures(results, args.out)
    print(format_table(results) + f"figures: {', '.join(figures)}", flush=True)
    return results


def write_figures(results: dict, out_dir: str) -> list[str]:
    """spectrum.png and probes.png in out_dir (small: a few tens of KB each); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")  # files only, also on machines without a display
    import matplotlib.pyplot as plt
    import numpy as np

    s = results["spectrum"]
    eig, var = np.asarray(s["eigenvalues"]), np.asarray(s["channel_variance"])
    rank = np.arange(1, len(eig) + 1)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(8, 3.2), dpi=80)
    ax1.semilogy(rank, eig, label="principal components")
    ax1.semilogy(rank, var, label="channels (largest first)", linestyle="--")
    ax1.set(xlabel="rank", ylabel="share of the variance", title=f"effective rank {s['effective_rank']:.1f} / {s['channels']}")
    ax1.legend(fontsize=8)
    ax2.plot(rank, np.cumsum(eig), label="principal components")
    ax2.plot(rank, np.cumsum(var), label="channels", linestyle="--")
    for level in (0.9, 0.99):
        ax2.axhline(level, color="grey", linewidth=0.6)
    ax2.set(xlabel="rank", ylabel="cumulative share", ylim=(0, 1.02), title="cumulative variance")
    fig.tight_layout()
    paths = [os.path.join(out_dir, "spectrum.png"), os.path.join(out_dir, "probes.png")]
    fig.savefig(paths[0])
    plt.close(fig)

    names = {"probe_tokens": f"A1: {results['tokens']} tokens", "probe_latent": "A2: latent",
             "probe_latent_pooled": "pooled latent"}
    shown = [(label, results[k], results[f"{k}_train"]) for k, label in names.items() if results.get(k) is not None]
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=80)
    x = np.arange(len(shown))
    ax.bar(x - 0.2, [100 * v for _, v, _ in shown], width=0.4, label="validation")
    ax.bar(x + 0.2, [100 * t for _, _, t in shown], width=0.4, label="train", alpha=0.6)
    ax.axhline(100 * results["chance"], color="grey", linestyle=":", label="chance")
    ax.set_xticks(x, [label for label, _, _ in shown], fontsize=8)
    ax.set(ylabel="top-1 accuracy (%)", ylim=(0, 100), title="linear probes")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(paths[1])
    plt.close(fig)
    return paths
