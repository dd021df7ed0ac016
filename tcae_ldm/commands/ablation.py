"""`tcae-ldm ablation`: the paper's ablation table (STC x SSL, patch sizes, channels) from autoencoder run folders.

    tcae-ldm ablation runs/ae_none runs/ae_stc runs/ae_ssl runs/ae_both --dit runs/dit_none runs/dit_both \
        --out runs/ablation

One row per autoencoder run (a Lightning log folder holding config.yaml and metrics.csv), written as ablation.md and
ablation.csv:
    rFID / PSNR / SSIM / LPIPS  the last test/* values of <run>/test/metrics.csv (`tcae-ldm test`, configs/eval.yaml)
    A1 / A2 / effective rank    diagnostics.json in the run folder or one below (`tcae-ldm diagnose --out <run>/...`)
    parameters, GMACs           counted on the meta device from the run's net, net_args and image size (encode + decode)
    training GMACs              the last train/compute_gmacs of the run's metrics.csv (+ its init_from run's)
    gFID                        final gFID of a --dit run whose latent cache was made from a checkpoint inside this run
                                folder (the cache's metadata.json names it)
A value whose input is missing is n/a, with a footnote naming the command that produces it.
"""
from __future__ import annotations

import csv
import glob
import json
import os

from tcae_ldm.commands import CommandParser, fail
from tcae_ldm.commands.compare import CONFIG_FILE, load_run
from tcae_ldm.metrics.convergence import METRICS_FILE, find_metrics, read_metrics, run_training_gmacs
from tcae_ldm.utils.files import lookup, read_lenient_yaml

TEST_FOLDER, DIAGNOSTICS_FILE = "test", "diagnostics.json"
SOURCES = {  # column -> the command that produces its input
    "test": "tcae-ldm test --config <run's config> --config configs/eval.yaml --ckpt_path <run>/checkpoints/last.ckpt",
    "diagnose": "tcae-ldm diagnose --ckpt <run>/checkpoints/last.ckpt --out <run>/diagnostics",
    "compute": "a training run of this version (it logs train/compute_gmacs)",
    "gfid": "--dit <DiT run on a cache of this autoencoder's checkpoint>",
}
COLUMNS = [("run", None), ("net", None), ("ssl", None), ("rfid", "test"), ("psnr", "test"), ("ssim", "test"),
           ("lpips", "test"), ("A1", "diagnose"), ("A2", "diagnose"), ("effective_rank", "diagnose"),
           ("params_M", None), ("gmacs", None), ("training_gmacs", "compute"), ("gfid", "gfid")]


def _last(metrics: dict, prefix: str) -> dict[str, float]:
    """The last logged value of every column starting with prefix."""
    out = {}
    for values in metrics.values():
        out.update({k: v for k, v in values.items() if k.startswith(prefix)})
    return out


def cost(config: dict) -> tuple[float | None, float | None]:
    """(parameters in millions, encode + decode GMACs per image) of the run's autoencoder, on the meta device."""
    import torch  # here, not at import: `tcae-ldm ablation --help` stays free of torch's import time

    from tcae_ldm.metrics.flops import count_gmacs, count_params
    from tcae_ldm.models.zoo import create_autoencoder

    model = lookup(config, "model.init_args") or {}
    size = lookup(config, "data.init_args.image_size") or (model.get("net_args") or {}).get("image_size")
    if not model.get("net") or not size:
        return None, None
    args = {k: v for k, v in (model.get("net_args") or {}).items() if k != "pretrained"}
    with torch.device("meta"):
        net = create_autoencoder(model["net"], **args)
    x = torch.empty(1, 3, size, size, device="meta")
    z = torch.empty(1, *net.latent_shape(size), device="meta")
    return count_params(net) / 1e6, count_gmacs(net.encoder, x) + count_gmacs(net.decoder, z)


def ablation_row(run_dir: str, dit_runs: list) -> dict:
    folder = os.path.dirname(find_metrics(run_dir))
    config = read_lenient_yaml(os.path.join(folder, CONFIG_FILE))
    row = {"run": os.path.basename(os.path.abspath(folder)), "net": lookup(config, "model.init_args.net"),
           "ssl": "yes" if lookup(config, "model.init_args.ssl") else "no"}
    test_csv = os.path.join(folder, TEST_FOLDER, METRICS_FILE)
    test = _last(read_metrics(test_csv), "test/") if os.path.isfile(test_csv) else {}
    row["rfid"] = next((v for k, v in test.items() if k.startswith("test/rfid_") and k != "test/rfid_images"), None)
    row.update(psnr=test.get("test/psnr"), ssim=test.get("test/ssim"), lpips=test.get("test/lpips_vgg"))
    diag = sorted(glob.glob(os.path.join(folder, DIAGNOSTICS_FILE))
                  + glob.glob(os.path.join(folder, "*", DIAGNOSTICS_FILE)))
    results = json.load(open(diag[0])) if diag else {}
    row.update(A1=results.get("probe_tokens"), A2=results.get("probe_latent"),
               effective_rank=(results.get("spectrum") or {}).get("effective_rank"))
    row["params_M"], row["gmacs"] = cost(config)
    row["training_gmacs"] = run_training_gmacs(folder)
    inside = os.path.abspath(folder) + os.sep
    made_by = [os.path.abspath(str((r.cache.get("autoencoder") or {}).get("path", ""))) for r in dit_runs]
    matches = [r for r, path in zip(dit_runs, made_by) if path.startswith(inside)]
    row["gfid"] = float(matches[0].curve["gfid"][-1]) if matches else None
    return row


def write_ablation(rows: list[dict], out_dir: str) -> str:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "ablation.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[c for c, _ in COLUMNS])
        w.writeheader()
        w.writerows([{k: "n/a" if v is None else round(v, 6) if isinstance(v, float) else v for k, v in r.items()}
                     for r in rows])
    missing = {src for r in rows for c, src in COLUMNS if src and r[c] is None}
    marks = {src: "*" * (i + 1) for i, src in enumerate(s for s in SOURCES if s in missing)}

    def cell(column, source, value):
        if value is None:
            return f"n/a{marks[source]}"
        if column in ("A1", "A2"):
            return f"{100 * value:.1f}%"
        return f"{value:.4g}" if isinstance(value, float) else str(value)
    lines = ["# Autoencoder ablation", "", "| " + " | ".join(c for c, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(cell(c, s, r[c]) for c, s in COLUMNS) + " |" for r in rows]
    lines += [""] + [f"{m} n/a: run `{SOURCES[s]}`" for s, m in marks.items()]
    lines += ["", "rfid / psnr / ssim / lpips: the run's final test; A1 / A2: linear probes (tokens / latent); gmacs: "
              "encode + decode per image at the run's image size; training_gmacs: the run's train/compute_gmacs; "
              "gfid: final gFID of the DiT run on its latents."]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(out_dir, "ablation.md"), "w") as f:
        f.write(text)
    return text


def main(argv: list[str] | None = None) -> None:
    p = CommandParser(prog="tcae-ldm ablation", description=__doc__)
    p.add_argument("runs", nargs="+", metavar="AE_RUN", help="autoencoder run folders (config.yaml + metrics.csv)")
    p.add_argument("--dit", nargs="*", default=[], metavar="DIT_RUN", help="DiT run folders whose gFID to report")
    p.add_argument("--out", required=True, help="folder for ablation.md and ablation.csv")
    args = p.parse_args(argv)
    try:
        dit_runs = [load_run(d) for d in args.dit]
        for r in dit_runs:
            if not r.nets:
                raise ValueError(f"{r.path}: {METRICS_FILE} has no gen/gfid_ column (is it a DiT run?)")
            r.select("inception" if "inception" in r.nets else r.nets[0])
        rows = [ablation_row(d, dit_runs) for d in args.runs]
    except (ValueError, FileNotFoundError, OSError, json.JSONDecodeError) as e:
        fail("tcae-ldm ablation", str(e))
    print(write_ablation(rows, args.out), end="")


if __name__ == "__main__":
    main()
