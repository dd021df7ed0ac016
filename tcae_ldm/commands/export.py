"""`tcae-ldm export`: a trained model as a folder that loads without the training code, with a model card.

    tcae-ldm export --ckpt runs/imagenet/tcae/checkpoints/last.ckpt --out tcae-b --cache runs/imagenet/latents_tcae
    tcae-ldm export --ckpt runs/imagenet/dcae/checkpoints/last.ckpt --out dcae-f32c32     # an AutoencoderDC folder
    tcae-ldm export --ckpt runs/imagenet/dit_tcae/checkpoints/last.ckpt --out dit-xl-1    # `tcae-ldm sample --ckpt dit-xl-1`

An autoencoder checkpoint (its EMA weights when it has them) becomes a diffusers folder, config.json +
diffusion_pytorch_model.safetensors, that `AutoencoderTC.from_pretrained` (TC-AE) or diffusers'
`AutoencoderDC.from_pretrained` (DC-AE) reads and that `autoencoder: {kind, path}` accepts; with --cache, the
cache's per-channel mean / std go into its config as latents_mean / latents_std (normalised latents are
(z - mean) / std). A TC-AE folder of the earlier layout (model.safetensors) is converted the same way. A DiT
checkpoint becomes config.json (hyper-parameters, latent statistics, the cache's autoencoder) + model.safetensors
(the EMA weights) + autoencoder/, a copy of the decoder its latents need that config.json names relatively: the
folder samples wherever it is copied (`tcae-ldm sample --ckpt FOLDER`). The decoder is the one the training cache
recorded, or --autoencoder-kind / --autoencoder-path where that one is not on this machine. Each folder gets a
README.md model card: the Hub's metadata block (license, library_name, tags), architecture, parameters, GMACs,
training steps and the last value, at or before the exported step, of every metric in the run's metrics.csv (beside
checkpoints/, or --metrics). Every file is world-readable (0644), as a published model's files are.
"""
from __future__ import annotations

import csv
import os
import shutil
import tempfile

from tcae_ldm.commands import CommandParser, fail

PROG = "tcae-ldm export"
LICENSE = "mit"  # the project's (pyproject.toml); the Hub's identifier
DECODER_DIR = "autoencoder"  # a DiT export's copy of its decoder, named relatively in its config.json
# The constructor arguments a card shows for each kind of autoencoder (config.json holds them all).
CARD_KEYS = {
    "AutoencoderTC": ("image_size", "patch_size", "latent_size", "latent_channels", "width", "num_heads",
                      "depth_fine", "depth_coarse", "mlp_ratio", "qk_norm", "pos_embed", "staged", "cls_token"),
    "AutoencoderDC": ("latent_channels", "encoder_block_types", "encoder_block_out_channels",
                      "encoder_layers_per_block", "decoder_block_out_channels", "decoder_layers_per_block"),
}


def build_parser() -> CommandParser:
    p = CommandParser(prog=PROG, description=__doc__)
    p.add_argument("--ckpt", required=True,
                   help="AutoencoderModule or DiffusionModule checkpoint (.ckpt), or a TC-AE folder to convert")
    p.add_argument("--out", required=True, help="output folder (must not exist, or be empty, unless --overwrite)")
    p.add_argument("--cache", default=None,
                   help="latent cache of this autoencoder whose per-channel mean / std become latents_mean / "
                        "latents_std (autoencoders only; a DiT carries its training cache's)")
    p.add_argument("--metrics", default=None,
                   help="the run's metrics.csv for the model card (default: beside the checkpoints/ folder)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing, non-empty --out folder")
    p.add_argument("--autoencoder-kind", choices=["tcae", "dcae", "sdvae"], default=None,
                   help="DiTs: kind of the decoder to copy into the export (default: the one the cache recorded)")
    p.add_argument("--autoencoder-path", default=None,
                   help="DiTs: checkpoint, folder or hub id of that decoder, where the recorded one is not here")
    return p


#################################################################################
#                                The model card                                 #
#################################################################################

def read_metrics(path: str, max_step: int | None = None) -> dict[str, dict]:
    """metric -> {last, step, logged}: the last value logged of every column of a Lightning metrics.csv, counting
    only rows at or before max_step (the exported checkpoint's: later rows describe other weights)."""
    out: dict[str, dict] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = row.get("step")
            if max_step is not None and step not in ("", None) and float(step) > max_step:
                continue
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                try:
                    value = float(value)
                except ValueError:
                    continue
                entry = out.setdefault(key, {"logged": 0})
                entry.update(last=value, step=int(float(step)) if step not in ("", None) else None)
                entry["logged"] += 1
    return dict(sorted(out.items()))


def metrics_section(path: str | None, max_step: int | None = None) -> str:
    if path is None or not os.path.isfile(path):
        return "## Metrics\n\nNo metrics.csv was found for this run" + (f" ({path})" if path else "") + ".\n"
    rows = read_metrics(path, max_step)
    upto = f" at or before step {max_step} (the exported weights')" if max_step is not None else ""
    lines = [f"## Metrics logged\n\nThe last value{upto} of every metric in `{os.path.abspath(path)}`.\n",
             "| metric | last value | at step | times logged |", "|---|---|---|---|"]
    lines += [f"| {k} | {v['last']:.6g} | {v['step']} | {v['logged']} |" for k, v in rows.items()]
    return "\n".join(lines) + "\n"


def logged_step(ckpt: dict | None) -> int | None:
    """The step at which metrics.csv records this checkpoint: Lightning logs at the number of batches that stepped,
    which trainer.global_step exceeds for the autoencoder (both its optimizers count); None without a checkpoint."""
    if not ckpt:
        return None
    loop = ((ckpt.get("loops") or {}).get("fit_loop") or {}).get("epoch_loop.state_dict") or {}
    return loop.get("_batches_that_stepped", ckpt.get("global_step"))


def hub_metadata(meta: dict) -> str:
    """The YAML block the Hugging Face Hub reads at the top of a model card (flat keys, lists of strings)."""
    lines = ["---"]
    for key, value in meta.items():
        lines += [f"{key}:", *(f"- {v}" for v in value)] if isinstance(value, list) else [f"{key}: {value}"]
    return "\n".join([*lines, "---"]) + "\n"


def model_card(title: str, usage: str, facts: dict, metrics_file: str | None, meta: dict | None = None,
               max_step: int | None = None) -> str:
    table = "\n".join(f"| {k} | {v} |" for k, v in facts.items())
    return (f"{hub_metadata(meta) if meta else ''}# {title}\n\n```python\n{usage}\n```\n\n| | |\n|---|---|\n{table}\n\n"
            f"{metrics_section(metrics_file, max_step)}")


def _args_text(config: dict, keys) -> str:
    return ", ".join(f"{k}={config[k]}" for k in keys if k in config)


#################################################################################
#                                  Autoencoders                                 #
#################################################################################

def _gmacs_on_meta(model, image_size: int, latent_shape) -> tuple[float, float]:
    """(encode, decode) GMACs of one image, counted on a meta-device twin of the model (no compute)."""
    import torch

    from tcae_ldm.metrics.flops import count_gmacs
    from tcae_ldm.utils.kwargs import parameter_names

    args = parameter_names(type(model))  # an AutoencoderDC's config also holds the latent statistics
    with torch.device("meta"):
        twin = type(model)(**{k: v for k, v in model.config.items() if k in args})
    x = torch.empty(1, 3, image_size, image_size, device="meta")
    return count_gmacs(twin.encoder, x), count_gmacs(twin.decoder, torch.empty(1, *latent_shape, device="meta"))


def _cache_stats(ae, cache: str) -> tuple[list[float], list[float], int]:
    """The cache's per-channel mean / std and its latent count; refused when another encoder made the cache."""
    from tcae_ldm.latents.cache import read_metadata, read_stats
    from tcae_ldm.latents.frozen import describe_identity

    meta = read_metadata(cache)
    made_by = meta.get("autoencoder") or {}
    if made_by.get("encoder_hash") != ae.identity()["encoder_hash"]:
        raise ValueError(f"latent cache {cache} was made by {describe_identity(made_by)}, not by the encoder of "
                         f"{describe_identity(ae.identity())}: its statistics describe other latents")
    mean, std = read_stats(cache)
    return mean.tolist(), std.tolist(), int(meta.get("count", 0))


def export_autoencoder(source: str, ckpt: dict | None, out: str, cache: str | None, name: str) -> dict:
    """Write the autoencoder of `source` (a checkpoint whose contents are `ckpt`, or a TC-AE folder) into `out`;
    returns its model card (title, usage with the folder called `name`, facts)."""
    from tcae_ldm.latents.frozen import load_autoencoder
    from tcae_ldm.models.zoo import autoencoder_family

    hp = (ckpt or {}).get("hyper_parameters") or {}
    kind = autoencoder_family(hp["net"]) if ckpt is not None else "tcae"
    ae = load_autoencoder(kind, source)
    model, cls = ae.model, type(ae.model).__name__
    stats = _cache_stats(ae, cache) if cache else None
    if stats and cls == "AutoencoderTC":
        model.set_latent_stats(stats[0], stats[1])  # and the scalar scaling_factor / shift_factor pipelines read
    elif stats:  # AutoencoderDC keeps its published scaling_factor (part of its identity)
        model.register_to_config(latents_mean=stats[0], latents_std=stats[1])
    ae.save_pretrained(out)

    image_size = getattr(model, "image_size", None) or hp.get("image_size") or 256
    c, h, w = ae.latent_shape(image_size)
    enc, dec = _gmacs_on_meta(model, image_size, (c, h, w))
    if ckpt is None:
        source_text, steps = f"the folder `{source}`", "not recorded in a folder"
    else:
        weights = "EMA" if any(k.startswith("ema.module.") for k in ckpt["state_dict"]) else "online"
        source_text, steps = f"`{os.path.abspath(source)}` ({weights} weights)", ckpt.get("step_count", "?")
    facts = {
        "exported from": source_text,
        "architecture": f"{ae.name}: {cls}({_args_text(model.config, CARD_KEYS.get(cls, ()))})",
        "parameters": f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M",
        f"GMACs, one {image_size}x{image_size} image": f"encode {enc:.4g}, decode {dec:.4g}, total {enc + dec:.4g}",
        "latent": f"{c} x {h} x {w} ({3 * image_size * image_size / (c * h * w):.0f}x fewer floats than the image)",
        "training steps": steps,
        "latents_mean / latents_std": (f"from the latent cache `{os.path.abspath(cache)}` ({stats[2]} images and "
                                       f"their flips)" if stats else "not set (export with --cache CACHE_DIR)"),
    }
    import_line = ("from tcae_ldm import AutoencoderTC" if cls == "AutoencoderTC" else f"from diffusers import {cls}")
    usage = (f"{import_line}\n\nae = {cls}.from_pretrained(\"{name}\")\n"
             f"z = ae.encode(x).latent      # x: (B, 3, {image_size}, {image_size}) in [-1, 1] -> (B, {c}, {h}, {w})\n"
             f"x_rec = ae.decode(z).sample")
    if stats:
        usage += ("\nmean = torch.tensor(ae.config.latents_mean).view(1, -1, 1, 1)\n"
                  "std = torch.tensor(ae.config.latents_std).view(1, -1, 1, 1)\n"
                  "z_normalised = (z - mean) / std  # what a latent diffusion model trains on")
    meta = {"license": LICENSE, "library_name": "diffusers", "tags": ["tcae-ldm", "autoencoder", ae.kind]}
    return {"title": f"{ae.name} ({cls})", "usage": usage, "facts": facts, "meta": meta}


#################################################################################
#                                      DiTs                                     #
#################################################################################

def copy_decoder(module, out: str, spec: dict | None) -> dict:
    """Save the decoder of the DiT's latents (spec, else the one its hyper-parameters or cache recorded) into
    out/autoencoder/ as a diffusers folder; returns the spec that names it relatively."""
    from tcae_ldm.latents.frozen import load_autoencoder

    spec = dict(spec or module.hparams.get("autoencoder") or module.cache_info.get("metadata", {}).get("autoencoder_spec")
                or {})
    if not spec:
        raise ValueError("this DiT records no decoder for its latents: give one with --autoencoder-kind KIND "
                         "--autoencoder-path PATH")
    try:
        ae = load_autoencoder(**spec)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"the decoder of this DiT's latents ({spec['kind']} {spec['path']}) cannot be loaded "
                                f"here ({str(e).splitlines()[0]}); give it with --autoencoder-kind "
                                f"{spec['kind']} --autoencoder-path PATH") from None
    module.set_decoder(ae)  # refuses a decoder of another latent space
    ae.model.save_pretrained(os.path.join(out, DECODER_DIR))
    return {"kind": spec["kind"], "path": DECODER_DIR, "dtype": spec.get("dtype", "fp32")}


def export_dit(source: str, ckpt: dict, out: str, name: str, decoder: dict | None = None) -> dict:
    """Write the DiT of a DiffusionModule checkpoint (EMA weights) and a copy of its decoder into `out`, loadable by
    `tcae-ldm sample` wherever the folder is; returns its model card (title, usage with the folder called `name`,
    facts)."""
    import torch

    from tcae_ldm.latents.frozen import describe_identity
    from tcae_ldm.lit.loading import export_diffusion_module, load_diffusion_module
    from tcae_ldm.metrics.flops import count_gmacs
    from tcae_ldm.models.dit import create_dit

    module = load_diffusion_module(source)
    steps, seen = ckpt.get("global_step", "?"), ckpt.get("images_seen", "?")
    module.hparams.autoencoder = copy_decoder(module, out, decoder)
    export_diffusion_module(module, out, extra={"step": steps, "images_seen": seen})
    hp = module.hparams
    c, h, w = hp.latent_shape
    with torch.device("meta"):
        twin = create_dit(hp.dit, **{**(hp.dit_args or {}), "input_size": h, "in_channels": c,
                                     "num_classes": hp.num_classes}).eval()
    gmacs = count_gmacs(twin, torch.empty(1, c, h, w, device="meta"), torch.rand(1, device="meta"),
                        torch.zeros(1, dtype=torch.long, device="meta"))
    made_by = (module.cache_info.get("metadata") or {}).get("autoencoder")
    weights = "EMA" if module.ema is not None else "online"
    facts = {
        "exported from": f"`{os.path.abspath(source)}` ({weights} weights)",
        "architecture": f"{hp.dit} ({_args_text(dict(hp.dit_args or {}), sorted(hp.dit_args or {})) or 'preset'}), "
                        f"on {c} x {h} x {w} latents, {hp.num_classes} classes",
        "parameters": f"{sum(p.numel() for p in module.eval_net.parameters()) / 1e6:.2f} M",
        "GMACs, one forward": f"{gmacs:.4g}",
        "objective / sampler": f"{hp.objective} / {module.sampler}, {hp.sample_steps} steps, cfg_scale {hp.cfg_scale}",
        "training steps": f"{steps} ({seen} images seen)",
        "latents of": describe_identity(made_by) if made_by else "not recorded",
        "decoder": f"`{DECODER_DIR}/`, a copy of {describe_identity(module.autoencoder.identity())}",
    }
    usage = (f"# tcae-ldm sample --ckpt {name} --out samples --num 50000\n"
             f"import torch\nfrom tcae_ldm.lit.loading import load_diffusion_module\n\n"
             f"module = load_diffusion_module(\"{name}\")\n"
             f"images = module.sample(torch.arange(8), seed=0)  # (8, 3, H, W) in [-1, 1], decoded")
    meta = {"license": LICENSE, "library_name": "tcae-ldm",
            "tags": ["tcae-ldm", "dit", "latent-diffusion", "class-conditional", module.autoencoder.kind]}
    return {"title": f"{hp.dit} on {c}x{h}x{w} latents", "usage": usage, "facts": facts, "meta": meta}


#################################################################################
#                                    Command                                    #
#################################################################################

def publish_modes(folder: str) -> None:
    """Folders 0755 and files 0644 under folder: mkdtemp and atomic writes create them 0700 / 0600."""
    for root, dirs, files in os.walk(folder):
        os.chmod(root, 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)


def _publish(out: str, overwrite: bool, write) -> None:
    """Run write(folder) in a temporary folder beside `out`, then move it to `out`: an interrupted export leaves no
    half-written folder, and an existing export is replaced only with --overwrite, once the new one is complete."""
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.normpath(out))}.", suffix=".partial", dir=parent)
    try:
        write(tmp)
        publish_modes(tmp)
        if os.path.isdir(out):
            shutil.rmtree(out) if overwrite else os.rmdir(out)  # rmdir: only an empty folder goes without --overwrite
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def checkpoint_in_out(out: str, ckpt: str) -> str | None:
    """Why an export must not replace `out` (it holds the checkpoint being exported, or any .ckpt), or None."""
    if not os.path.isdir(out):
        return None
    root, source = os.path.realpath(out), os.path.realpath(ckpt)
    if os.path.commonpath([root, source]) == root:
        return f"--out {out} holds the checkpoint being exported ({ckpt})"
    for folder, _, files in os.walk(out):
        found = sorted(f for f in files if f.endswith(".ckpt"))
        if found:
            return f"--out {out} holds a checkpoint ({os.path.join(folder, found[0])})"
    return None


def main(argv: list[str] | None = None) -> str:
    args = build_parser().parse_args(argv)
    clash = checkpoint_in_out(args.out, args.ckpt)
    if clash:  # an export replaces its folder: it never deletes a checkpoint, even with --overwrite
        fail(PROG, f"{clash}, which replacing the folder would delete: choose an --out that holds no checkpoint")
    if os.path.exists(args.out) and not (os.path.isdir(args.out) and (args.overwrite or not os.listdir(args.out))):
        fail(PROG, f"{args.out} already exists and is not empty: choose another --out or pass --overwrite")
    from tcae_ldm.lit.loading import (
        CheckpointError,
        checkpoint_kind,
        read_expected_checkpoint,
    )

    try:
        ckpt, kind = None, "folder"
        if not os.path.isdir(args.ckpt):
            ckpt = read_expected_checkpoint(args.ckpt, "an AutoencoderModule or DiffusionModule checkpoint (.ckpt)")
            kind, what = checkpoint_kind(ckpt)
            if kind not in ("autoencoder", "diffusion"):
                raise CheckpointError(f"{args.ckpt} is {what}; export takes an AutoencoderModule or DiffusionModule "
                                      f"checkpoint, or a TC-AE folder")
        if kind == "diffusion" and args.cache:
            raise ValueError("--cache is for autoencoders: a DiT export carries the statistics of its training cache")
        metrics = args.metrics or (os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.ckpt))),
                                                "metrics.csv") if ckpt is not None else None)
        if args.metrics and not os.path.isfile(args.metrics):
            raise FileNotFoundError(f"--metrics {args.metrics} does not exist")

        if bool(args.autoencoder_kind) != bool(args.autoencoder_path) or (args.autoencoder_kind and kind != "diffusion"):
            raise ValueError("--autoencoder-kind and --autoencoder-path go together, and only with a DiT checkpoint")
        decoder = {"kind": args.autoencoder_kind, "path": args.autoencoder_path} if args.autoencoder_path else None

        def write(folder: str) -> None:
            name = os.path.basename(os.path.normpath(args.out))
            card = (export_dit(args.ckpt, ckpt, folder, name, decoder) if kind == "diffusion"
                    else export_autoencoder(args.ckpt, ckpt, folder, args.cache, name))
            with open(os.path.join(folder, "README.md"), "w") as f:
                f.write(model_card(card["title"], card["usage"], card["facts"], metrics, card["meta"],
                                   logged_step(ckpt)))

        _publish(args.out, args.overwrite, write)
    except (CheckpointError, FileNotFoundError, ValueError, KeyError, OSError) as e:
        fail(PROG, str(e.args[0]) if isinstance(e, KeyError) else str(e))
    files = sorted(os.listdir(args.out))
    print(f"wrote {args.out}: {', '.join(files)}", flush=True)
    return args.out


if __name__ == "__main__":
    main()
