"""`tcae-ldm sample`: class-conditional samples of a DiT checkpoint (EMA weights) on every GPU of the node.

    tcae-ldm sample --ckpt runs/imagenet/dit_tcae/checkpoints/last.ckpt --out samples --num 50000
    tcae-ldm sample --ckpt DiT-XL-2-256x256.pt --out samples --num 50000 --cfg-scale 1.5   # the published DiT

Runs as Lightning predict (tcae_ldm.lit.sampling): every index is drawn once, on one GPU, with a seed that does
not depend on the number of GPUs; multi-node runs take --num-nodes under torchrun or SLURM. Writes
<out>/images/000000.png ..., <out>/grid.png and <out>/samples_{N}x{H}x{W}x3.npz (ADM's layout: arr_0 uint8
(N, H, W, 3), plus labels (N,)) that `tcae-ldm fid` and ADM's evaluator read. Latents are decoded by the
autoencoder that made the training cache (recorded in the checkpoint) unless another is given; a
facebookresearch/DiT checkpoint is sampled as DiT does (DDPM, learned variance, 250 steps, guidance on 3 of
its 4 channels) and decoded by SD-VAE (stabilityai/sd-vae-ft-ema from the Hugging Face cache, or a folder).
"""
from __future__ import annotations

import sys

from tcae_ldm.commands import CommandParser, fail

PROG = "tcae-ldm sample"
PRECISIONS = {"fp32": "32-true", "tf32": "32-true", "bf16": "bf16-mixed"}


def build_parser() -> CommandParser:
    p = CommandParser(prog=PROG, description=__doc__)
    p.add_argument("--ckpt", required=True, help="DiffusionModule checkpoint (.ckpt), a folder of `tcae-ldm export`, "
                                                 "or a facebookresearch/DiT .pt")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--num", type=int, default=64, help="number of samples")
    p.add_argument("--labels", default="balanced",
                   help="'balanced' (every class equally often, as the gFID callback), 'uniform' (seeded draws, "
                        "as DiT's sample_ddp.py) or comma-separated class indices, cycled")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the checkpoint's)")
    p.add_argument("--sampler", default=None, help="euler / heun (flow), ddpm / ddim (ddpm)")
    p.add_argument("--cfg-scale", type=float, default=None, help="classifier-free guidance scale; 1 = none")
    p.add_argument("--cfg-interval", type=float, nargs=2, default=None, metavar=("T_LO", "T_HI"),
                   help="apply guidance only for model time t in [T_LO, T_HI]")
    p.add_argument("--cfg-channels", type=int, default=None,
                   help="guide only the first k latent channels (default: the checkpoint's; DiT's: 3)")
    p.add_argument("--seed", type=int, default=0, help="chunk b of --batch-size samples uses noise seed + b")
    p.add_argument("--batch-size", type=int, default=64, help="samples per chunk (per GPU and call)")
    p.add_argument("--autoencoder-kind", choices=["tcae", "dcae", "sdvae"], default=None,
                   help="decoder kind (default: the autoencoder recorded in the checkpoint)")
    p.add_argument("--autoencoder-path", default=None,
                   help="TC-AE checkpoint/folder, DC-AE or SD-VAE hub id/folder")
    p.add_argument("--autoencoder-dtype", choices=["fp32", "bf16"], default="fp32",
                   help="bf16 runs the decoder under autocast")
    p.add_argument("--cache-dir", default=None,
                   help="latent cache whose stats de-normalise the samples (default: those stored in the checkpoint)")
    p.add_argument("--accelerator", default="auto", help="Lightning accelerator: auto, gpu, cpu")
    p.add_argument("--devices", default="auto", help="devices per node: auto (every GPU), a count, or a list")
    p.add_argument("--num-nodes", type=int, default=1, help="nodes (launch with torchrun or SLURM)")
    p.add_argument("--strategy", default="auto", help="Lightning strategy (auto: DDP when there are several devices)")
    p.add_argument("--precision", choices=sorted(PRECISIONS), default=None,
                   help="DiT precision: bf16 autocast (default on GPUs), fp32, or tf32 (fp32 with TF32 matmuls, as "
                        "DiT's sample_ddp.py); decoding is always fp32")
    p.add_argument("--grid-size", type=int, default=64, help="samples shown in grid.png")
    return p


def _devices(text: str):
    if text == "auto":
        return "auto"
    return [int(v) for v in text.strip("[]").split(",") if v.strip()] if "," in text else int(text)


def main(argv: list[str] | None = None) -> str | None:
    args = build_parser().parse_args(argv)
    for name in ("num", "batch_size"):
        if getattr(args, name) < 1:
            fail(PROG, f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if bool(args.autoencoder_path) != bool(args.autoencoder_kind):
        fail(PROG, "--autoencoder-kind and --autoencoder-path go together")
    import lightning as L  # heavy imports after --help and the argument checks
    import torch

    from tcae_ldm.lit.loading import CheckpointError, load_diffusion_module
    from tcae_ldm.lit.progress import ProgressLine
    from tcae_ldm.lit.sampling import SampleDataModule, SampleWriter, sample_labels

    spec = ({"kind": args.autoencoder_kind, "path": args.autoencoder_path, "dtype": args.autoencoder_dtype}
            if args.autoencoder_path else None)
    try:
        module = load_diffusion_module(args.ckpt, autoencoder=spec)
        if spec or args.cache_dir:
            module.set_decoder(spec, cache_dir=args.cache_dir)
        module.set_sampling(args.steps, args.sampler, args.cfg_scale, args.cfg_interval, args.cfg_channels)
        labels = sample_labels(args.labels, args.num, module.num_classes, args.seed)
        module.autoencoder  # noqa: B018  (load the decoder now: a missing file fails here, on one line)
    except (CheckpointError, FileNotFoundError, ValueError, KeyError) as e:
        fail(PROG, str(e.args[0]) if isinstance(e, KeyError) else str(e))

    on_gpu = args.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available()
    precision = args.precision or ("bf16" if on_gpu else "fp32")
    if precision == "tf32":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    writer = SampleWriter(args.out, labels, args.grid_size)
    # a bar on a terminal; in a log file, progress lines, so that the result line below has a line of its own
    bar = [] if sys.stderr.isatty() else [ProgressLine(every_n_steps=max(1, -(-args.num // args.batch_size) // 10))]
    trainer = L.Trainer(accelerator=args.accelerator, devices=_devices(args.devices), num_nodes=args.num_nodes,
                        strategy=args.strategy, precision=PRECISIONS[precision], logger=False, callbacks=[writer, *bar],
                        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=True)
    trainer.predict(module, SampleDataModule(labels, args.batch_size, args.seed), return_predictions=False)
    if trainer.is_global_zero:
        print(f"wrote {args.num} samples to {writer.npz_path}", flush=True)
    return writer.npz_path


if __name__ == "__main__":
    main()
