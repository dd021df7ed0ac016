"""`tcae-ldm sample`: class-conditional samples from a DiffusionModule checkpoint (EMA weights).

    tcae-ldm sample --ckpt runs/dit_tcae/checkpoints/last.ckpt --out samples/ --num 50000 --labels uniform

Writes <out>/images/000000.png ..., <out>/grid.png and <out>/samples_{N}x{H}x{W}x3.npz (ADM's layout:
arr_0 uint8 (N, H, W, 3), plus labels (N,)) that FID tools read directly. Latents are decoded by the
autoencoder that made the training cache (recorded in the checkpoint) unless another is given.
"""
from __future__ import annotations

import argparse
import math
import os

import numpy as np
import torch
from PIL import Image
from torchvision.utils import make_grid, save_image

from tcae_ldm.commands import CommandParser
from tcae_ldm.data.transforms import to_uint8


def parse_labels(text: str, num: int, num_classes: int, seed: int) -> torch.Tensor:
    """'uniform': labels drawn uniformly from the seed; '0,1,2': that list repeated to num samples."""
    if text == "uniform":
        return torch.randint(num_classes, (num,), generator=torch.Generator().manual_seed(seed))
    try:
        given = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--labels must be 'uniform' or comma-separated class indices, got {text!r}") from None
    bad = [v for v in given if not 0 <= v < num_classes]
    if not given or bad:
        raise ValueError(f"--labels {text!r}: class indices must lie in [0, {num_classes}), got {bad or 'none'}")
    return torch.tensor(given, dtype=torch.long).repeat(math.ceil(num / len(given)))[:num]


def build_parser() -> argparse.ArgumentParser:
    p = CommandParser(prog="tcae-ldm sample", description=__doc__)
    p.add_argument("--ckpt", required=True, help="DiffusionModule checkpoint (.ckpt)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num", type=int, default=64, help="number of samples")
    p.add_argument("--labels", default="uniform", help="'uniform' or comma-separated class indices, cycled")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint's)")
    p.add_argument("--sampler", default=None, help="euler / heun (flow), ddpm / ddim (ddpm)")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale; 1 = none")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("T_LO", "T_HI"),
                   help="apply guidance only for model time t in [T_LO, T_HI]")
    p.add_argument("--seed", type=int, default=0, help="batch b uses noise seed + b")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--autoencoder-kind", choices=["tcae", "dcae"], default=None,
                   help="decoder kind (default: the autoencoder recorded in the checkpoint)")
    p.add_argument("--autoencoder-path", default=None, help="TC-AE checkpoint/folder or DC-AE hub id/folder")
    p.add_argument("--autoencoder-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 runs the decoder under autocast")
    p.add_argument("--cache-dir", default=None,
                   help="latent cache whose stats de-normalise the samples (default: those stored in the checkpoint)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="DiT autocast dtype (default: bf16 on CUDA, fp32 elsewhere)")
    p.add_argument("--grid-size", type=int, default=64, help="samples shown in grid.png")
    return p


def main(argv: list[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    from tcae_ldm.lit.diffusion import DiffusionModule  # heavy imports after --help

    module = DiffusionModule.load_from_checkpoint(args.ckpt, map_location="cpu")
    module.to(args.device).eval()
    if args.autoencoder_path or args.cache_dir:
        if bool(args.autoencoder_path) != bool(args.autoencoder_kind):
            raise SystemExit("--autoencoder-kind and --autoencoder-path go together")
        spec = ({"kind": args.autoencoder_kind, "path": args.autoencoder_path, "dtype": args.autoencoder_dtype}
                if args.autoencoder_path else None)
        module.set_decoder(spec, cache_dir=args.cache_dir)
    labels = parse_labels(args.labels, args.num, module.num_classes, args.seed)
    precision = args.precision or ("bf16" if args.device.startswith("cuda") else "fp32")
    autocast = torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16, enabled=precision == "bf16")

    img_dir = os.path.join(args.out, "images")
    os.makedirs(img_dir, exist_ok=True)
    arrays = []
    for b, start in enumerate(range(0, args.num, args.batch_size)):
        y = labels[start: start + args.batch_size]
        with autocast:
            z = module.sample(y, seed=args.seed + b, steps=args.steps, sampler=args.sampler,
                              cfg_scale=args.cfg_scale, cfg_interval=args.cfg_interval, decode=False)
        images = to_uint8(module.decode(z.float())).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3)
        for i, img in enumerate(images):
            Image.fromarray(img).save(os.path.join(img_dir, f"{start + i:06d}.png"))
        arrays.append(images)
        print(f"sampled {start + len(y)}/{args.num}", flush=True)
    arr = np.concatenate(arrays)
    n, h, w, _ = arr.shape
    shown = torch.from_numpy(arr[: args.grid_size]).permute(0, 3, 1, 2).float() / 255
    save_image(make_grid(shown, nrow=int(math.ceil(math.sqrt(len(shown))))), os.path.join(args.out, "grid.png"))
    npz = os.path.join(args.out, f"samples_{n}x{h}x{w}x3.npz")
    np.savez(npz, arr_0=arr, labels=labels.numpy())
    print(f"wrote {n} samples to {npz}")
    return npz


if __name__ == "__main__":
    main()
