"""`tcae-ldm bench`: cost and speed of TC-AE next to DC-AE, of DiTs on their latents, and of the loaders
that feed them; prints tables and writes one JSON file.

    tcae-ldm bench                                    # this machine's defaults (see --help)
    tcae-ldm bench --precisions bf16 --repeats 5 --out runs/bench.json
    tcae-ldm bench --tiny --repeats 2                 # tiny presets (tests, smoke runs)
    tcae-ldm bench --joint-step                       # one joint TC-AE + iBOT training step, pass by pass
    tcae-ldm bench --autoencoders TC-AE-B/p8-c128,DC-AE/f32c32 --image-size 256 --modes encode,decode \
        --precisions fp32 --repeats 5 --threads 1 --profile   # the paper's pair, with per-op profiles

Every speed is also given as a ratio to DC-AE's figure measured in the same run (same precision, same
batch, rounds interleaved, medians), because absolute numbers on a shared machine mean little.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import tempfile
import time

import torch

from tcae_ldm.commands import CommandParser
from tcae_ldm.commands.bench import cases, joint, profiling, timing
from tcae_ldm.commands.bench.pipelines import bench_jpeg_pipelines
from tcae_ldm.commands.bench.tables import joint_tables, tables
from tcae_ldm.models.dit import DIT_PRESETS
from tcae_ldm.models.tcae import TCAE_PRESETS

PAPER_AUTOENCODERS = ["TC-AE-B/p8-c128", "TC-AE-B/p8-c128:vanilla", "DC-AE/f32c32"]
TINY_AUTOENCODERS = ["TC-AE-T/p4-c16", "TC-AE-T/p4-c16:vanilla", "DC-AE-T/f16c16"]
MODES = cases.MODES
ROUNDTRIP = cases.ROUNDTRIP
# Per machine kind: what fits a short run. On a CPU the paper-scale networks are timed at 64x64, batch 1, two
# rounds (a DC-AE f32c32 training step at 256x256 is far too slow there) and in fp32 only (bf16 autocast is many
# times slower than fp32 on CPUs without bf16 instructions); GMACs are still also reported at 256x256.
PROFILES = {
    "cuda": dict(autoencoders=PAPER_AUTOENCODERS, dits=["DiT-XL/1", "DiT-B/1"], image_size=256, dit_image_size=256,
                 batch_size=16, dit_batch_size=64, precisions=["fp32", "bf16"], repeats=5, num_workers=8),
    "cpu": dict(autoencoders=PAPER_AUTOENCODERS, dits=["DiT-B/1"], image_size=64, dit_image_size=256,
                batch_size=1, dit_batch_size=1, precisions=["fp32"], repeats=2, num_workers=0),
    "tiny": dict(autoencoders=TINY_AUTOENCODERS, dits=["DiT-T/1"], image_size=32, dit_image_size=32,
                 batch_size=2, dit_batch_size=4, repeats=3, num_workers=0),
}
INPUT_TARGET = cases.INPUT_TARGET


def _csv(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = CommandParser(prog="tcae-ldm bench", description=__doc__)
    p.add_argument("--autoencoders", type=_csv, help=f"comma list; TC-AE presets (':vanilla' = staged=False, ':ckpt' = "
                   f"activation checkpointing) and DC-AE presets {sorted(cases.DCAE_PRESETS)}, either with ':cl' = "
                   f"channels-last "
                   f"(default {','.join(PAPER_AUTOENCODERS)})")
    p.add_argument("--modes", type=_csv, default=list(MODES), help=f"autoencoder modes to time (default {','.join(MODES)})")
    p.add_argument("--dits", type=_csv, help="comma list of DiT presets (default: GPU DiT-XL/1,DiT-B/1; CPU DiT-B/1)")
    p.add_argument("--image-size", type=int, help="autoencoder image size (default: GPU 256, CPU 64)")
    p.add_argument("--dit-image-size", type=int, help="image size whose latents the DiTs are timed on (default 256)")
    p.add_argument("--batch-size", type=int, help="autoencoder batch (default: GPU 16, CPU 1)")
    p.add_argument("--dit-batch-size", type=int, help="DiT batch (default: GPU 64, CPU 1)")
    p.add_argument("--repeats", type=int, help="timed rounds per case, median kept (default: GPU 5, CPU 2)")
    p.add_argument("--precisions", type=_csv, help="fp32 and/or bf16 autocast (default: GPU fp32,bf16; CPU fp32)")
    p.add_argument("--num-workers", type=int, help="loader workers (default: GPU 8, CPU 0)")
    p.add_argument("--data", choices=["demo"], default="demo", help="image datamodule to time (the demo photos)")
    p.add_argument("--skip-throughput", action="store_true", help="parameters and GMACs only (no timing)")
    p.add_argument("--skip-jpeg", action="store_true", help="leave out the ImageNet JPEG pipelines")
    p.add_argument("--jpeg-images", type=int, help="JPEGs timed per round (default 64; --tiny 8)")
    p.add_argument("--jpeg-batch", type=int, default=32, help="per-GPU batch the workers collate (default 32)")
    p.add_argument("--jpeg-config", default="configs/tcae.yaml", help="training config whose transforms are timed")
    p.add_argument("--jpeg-cache-config", default="configs/cache_latents_tcae.yaml", help="latent-cache config")
    p.add_argument("--mfu", type=float, default=0.4, help="assumed MFU of the GPU step the JPEG workers feed")
    p.add_argument("--compile", action="store_true",
                   help="also time torch.compile'd networks (speed-up column; inference graphs frozen: weights as "
                        "constants, prepacked for the CPU's GEMM and convolution kernels)")
    p.add_argument("--profile", action="store_true",
                   help="after the timing, profile one encode + decode of every autoencoder (torch.profiler): time "
                        "per op category (matmul, attention, convolution, normalisation, activation, copies, ...) "
                        "and the slowest ops")
    p.add_argument("--profile-top", type=int, default=12, help="ops listed per network by --profile")
    p.add_argument("--threads", type=int, default=None,
                   help="intra-op CPU threads (torch.set_num_threads; default: torch's, one per core). On a CPU shared "
                        "with other jobs, 1 avoids OpenMP threads spinning at every op's barrier while another "
                        "process holds a core")
    p.add_argument("--tiny", action="store_true", help="tiny presets at 32x32 (tests, smoke runs)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--joint-step", action="store_true",
                   help="instead of the tables above: one joint training step (reconstruction + iBOT) of "
                        "--joint-config taken apart pass by pass, GMACs and time shares, with and without iBOT "
                        "(--batch-size images, --precisions, --repeats)")
    p.add_argument("--joint-config", default=None,
                   help=f"training config of --joint-step (default {joint.PAPER_CONFIG}; with --tiny "
                        f"{joint.TINY_CONFIG} on a TC-AE-T at 32x32)")
    p.add_argument("--out", default="bench.json", help="JSON output path")
    args = p.parse_args(argv)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    machine = "cuda" if args.device.type == "cuda" else "cpu"
    defaults = {**PROFILES[machine], **(PROFILES["tiny"] if args.tiny else {})}
    if machine == "cpu" and not args.tiny and cpu_has_native_bf16():
        defaults["precisions"] = ["fp32", "bf16"]  # AMX / AVX512-BF16: bf16 autocast runs on real kernels
    if args.threads is not None:
        if args.threads < 1:
            p.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    bad = [x for x in args.precisions if x not in ("fp32", "bf16")]
    if bad:
        p.error(f"--precisions must be fp32 and/or bf16, got {bad}")
    bad = [n for n in args.autoencoders if not (cases.is_dcae(n) or n.partition(":")[0] in TCAE_PRESETS)]
    if bad:
        p.error(f"unknown autoencoders {bad}: use TC-AE presets such as TC-AE-B/p8-c128[:vanilla|:ckpt] or "
                f"{sorted(cases.DCAE_PRESETS)}")
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"--modes must be among {list(MODES)}, got {bad}")
    bad = [n for n in args.dits if n not in DIT_PRESETS]
    if bad:
        p.error(f"unknown DiT presets {bad}; known: {sorted(DIT_PRESETS)}")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    if args.joint_config is None:
        args.joint_config = joint.TINY_CONFIG if args.tiny else joint.PAPER_CONFIG
    if args.jpeg_images is None:
        args.jpeg_images = 8 if args.tiny else 64
    return args


#################################################################################
#                                   Measuring                                   #
#################################################################################

_T0 = time.perf_counter()


def log(msg: str) -> None:
    """Progress on stderr: a paper-scale run on a CPU is long."""
    print(f"[bench +{time.perf_counter() - _T0:.0f}s] {msg}", file=sys.stderr, flush=True)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def cpu_has_native_bf16() -> bool | None:
    """Whether the CPU has bf16 arithmetic (AVX512-BF16 or AMX); without it oneDNN runs bf16 convolutions
    with reference kernels, orders of magnitude slower than fp32 (None: unknown)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line.split(":", 1)[1].split() for line in f if line.startswith("flags"))
    except (OSError, StopIteration):
        return None
    return "avx512_bf16" in flags or "amx_bf16" in flags


def environment(device: torch.device) -> dict:
    import diffusers

    env = {"device": device.type, "torch": torch.__version__, "diffusers": diffusers.__version__,
           "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
           "float32_matmul_precision": torch.get_float32_matmul_precision(),
           "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_native_bf16": cpu_has_native_bf16(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        env.update(device_name=name, cuda=torch.version.cuda, cudnn_benchmark=torch.backends.cudnn.benchmark,
                   device_count=torch.cuda.device_count(), peak_bf16_tflops=timing.peak_bf16_tflops(name))
    return env


def _factor(names: list[str], tiny: bool) -> int:
    """The latent downsampling factor every autoencoder gets: the DC-AE reference's, so token counts match."""
    ref = next((n for n in names if cases.is_dcae(n)), None)
    return cases.dcae_factor(ref) if ref else (16 if tiny else 32)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _mfu(gmacs_per_item: float, result: dict, peak_tflops: float | None) -> float | None:
    if not peak_tflops or "items_per_s" not in result:
        return None
    return gmacs_per_item * 2e9 * result["items_per_s"] / (peak_tflops * 1e12)


def bench_autoencoders(args, report: dict, factor: int) -> None:
    dev, peak = args.device, report["env"].get("peak_bf16_tflops")
    nets, opts, variants = {}, {}, [("eager", lambda n: n)]
    if args.compile:
        variants.append(("compiled", cases.compiled_twin))
    with torch.device(dev):  # built where they run: no host-side random init of 300M parameters
        for name in args.autoencoders:
            nets[name] = cases.build_autoencoder(name, args.image_size, factor)
            opts[name] = cases.adamw(nets[name].module.parameters(), weight_decay=0.05)
    twins = {(v, n): make(nets[n]) for v, make in variants for n in nets}
    min_round = 0.25 if dev.type == "cuda" else 0.0
    for prec in args.precisions:
        for mode in args.modes:
            log(f"autoencoders: {mode} {prec}")
            for net in nets.values():
                net.module.train(mode == "train")
            group = []
            for (variant, name), net in twins.items():
                fn = cases.ae_calls(net, args.batch_size, args.image_size, dev, prec, opts[name])[mode]
                opt = opts[name] if mode == "train" else None
                group.append(timing.Case(f"{variant}|{name}", fn, args.batch_size,
                                    lambda m=net.module, o=opt: timing.state_bytes(m, o)))
            timing.time_interleaved(group, args.repeats, dev, min_round,
                                    progress=lambda line, m=mode, p=prec: log(f"autoencoders: {m} {p}: {line}"))
            for c in group:
                variant, name = c.key.split("|", 1)
                entry = report["autoencoders"][name]
                g = entry["gmacs"]
                c.result["mfu"] = _mfu(3 * g["total"] if mode == "train" else g[mode], c.result, peak)
                key = "throughput" if variant == "eager" else "compiled"
                entry.setdefault(key, {}).setdefault(prec, {})[mode] = c.result
    if args.profile:
        prec = args.precisions[0]
        for (variant, name), net in twins.items():
            log(f"profile: {variant} {name} encode + decode {prec}")
            try:
                found = profiling.profile_autoencoder(net, args.batch_size, args.image_size, dev, prec,
                                                      args.profile_top)
            except Exception as e:  # a profiler that fails on this machine costs the profile, not the run
                found = {"error": timing.describe_error(e)}
            report["autoencoders"][name].setdefault("profile", {})[variant] = found
    del nets, opts, twins
    _free(dev)


def bench_dits(args, report: dict) -> None:
    dev, peak = args.device, report["env"].get("peak_bf16_tflops")
    groups = report["dit_latents"]
    models = {}
    with torch.device(dev):
        for dname in args.dits:
            for shape_key, g in groups.items():
                dit = cases.build_dit(dname, g["latent_shape"])
                fwd = {"eager": dit}
                if args.compile:
                    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
                    fwd["compiled"] = torch.compile(dit)  # a wrapper sharing the weights, as for the AEs
                opt = cases.adamw(dit.parameters(), weight_decay=0.0)
                models[(dname, shape_key)] = (dit, fwd, opt)
    for prec in args.precisions:
        log(f"DiTs: train {prec}")
        group = []
        for (dname, shape_key), (dit, fwd, opt) in models.items():
            dit.train()
            for variant, f in fwd.items():
                fn = cases.dit_train_call(dit, f, groups[shape_key]["latent_shape"], args.dit_batch_size, dev, prec, opt)
                group.append(timing.Case(f"{variant}|{dname}|{shape_key}", fn, args.dit_batch_size,
                                    lambda m=dit, o=opt: timing.state_bytes(m, o)))
        timing.time_interleaved(group, args.repeats, dev, 0.25 if dev.type == "cuda" else 0.0,
                                progress=lambda line, p=prec: log(f"DiTs: train {p}: {line}"))
        for c in group:
            variant, dname, shape_key = c.key.split("|")
            entry = report["dits"][f"{dname}@{shape_key}"]
            c.result["mfu"] = _mfu(3 * entry["gmacs"], c.result, peak)
            key = "throughput" if variant == "eager" else "compiled"
            entry.setdefault(key, {}).setdefault(prec, {})["train"] = c.result
    del models
    _free(dev)


def add_roundtrip(report: dict) -> None:
    """encode+decode images/s = 1 / (1/encode + 1/decode), from the two timed modes (the paper's cost unit); its
    per-round times are round r's encode + decode."""
    for entry in report["autoencoders"].values():
        for key in ("throughput", "compiled"):
            for modes in entry.get(key, {}).values():
                e, d = (modes.get(m, {}) for m in ("encode", "decode"))
                if e.get("items_per_s") and d.get("items_per_s"):
                    modes[ROUNDTRIP] = {"items_per_s": 1.0 / (1.0 / e["items_per_s"] + 1.0 / d["items_per_s"])}
                    if len(e["times_s"]) == len(d["times_s"]):
                        modes[ROUNDTRIP]["times_s"] = [a + b for a, b in zip(e["times_s"], d["times_s"])]



def add_ratios(report: dict) -> None:
    """ratio_vs_reference: a figure / the reference's same figure (same precision, mode, eager/compiled);
    speedup: compiled / eager of the same network."""
    def fill(table: dict, ref_of):
        for name, entry in table.items():
            ref = table.get(ref_of(name))
            for key in ("throughput", "compiled"):
                for prec, modes in entry.get(key, {}).items():
                    for mode, r in modes.items():
                        base = (ref or {}).get(key, {}).get(prec, {}).get(mode, {})
                        r["ratio_vs_reference"] = (r["items_per_s"] / base["items_per_s"]
                                                   if "items_per_s" in r and "items_per_s" in base else None)
                        r.update(timing.round_ratios(r, base))
                        if key == "compiled":
                            eager = entry.get("throughput", {}).get(prec, {}).get(mode, {})
                            r["speedup"] = (r["items_per_s"] / eager["items_per_s"]
                                            if "items_per_s" in r and "items_per_s" in eager else None)
    aes = report["autoencoders"]
    ref = report["reference"]
    for name, entry in aes.items():
        entry["gmacs_ratio_vs_reference"] = entry["gmacs"]["total"] / aes[ref]["gmacs"]["total"] if ref else None
    fill(aes, lambda name: ref)
    ref_shape = next((k for k, g in report["dit_latents"].items() if ref in g["of"]), None)
    fill(report["dits"], lambda name: f"{name.split('@')[0]}@{ref_shape}")


def bench_data(args, report: dict) -> None:
    """Each loader next to the fastest training step it would feed (the most demanding consumer)."""
    def fastest(entries: dict) -> tuple[str | None, float | None]:
        best = (None, None)
        for name, entry in entries.items():
            for prec, modes in entry.get("throughput", {}).items():
                v = modes.get("train", {}).get("items_per_s")
                if v and (best[1] is None or v > best[1]):
                    best = (f"{name} train {prec}", v)
        return best

    def measure(what: str, fn) -> dict:
        log(f"data: {what}")
        try:
            return fn()
        except Exception as e:  # a broken loader is a finding of the benchmark, not the end of it
            return {"items_per_s": None, "source": f"error: {timing.describe_error(e)}"}

    def row(loader: dict, feeds: tuple) -> dict:
        ratio = loader["items_per_s"] / feeds[1] if feeds[1] and loader["items_per_s"] else None
        verdict = None if ratio is None else ("ok" if ratio >= INPUT_TARGET else "INPUT-BOUND")
        return {**loader, "feeds": feeds[0], "step_items_per_s": feeds[1], "loader_over_step": ratio,
                "verdict": verdict}

    tcae = {n: e for n, e in report["autoencoders"].items() if not cases.is_dcae(n)}
    img = measure("images", lambda: cases.image_loader_throughput(args.image_size, args.batch_size, args.repeats,
                                                              args.num_workers))
    report["data"]["images"] = row({"image_size": args.image_size, "batch": args.batch_size, **img}, fastest(tcae))
    for shape_key, g in report["dit_latents"].items():
        with tempfile.TemporaryDirectory() as tmp:
            lat = measure(f"latents {shape_key}", lambda: cases.latent_loader_throughput(
                g["latent_shape"], args.dit_batch_size, args.repeats, args.num_workers, tmp))
        dits = {n: e for n, e in report["dits"].items() if n.endswith(f"@{shape_key}")}
        report["data"][f"latents {shape_key}"] = row({"batch": args.dit_batch_size, **lat}, fastest(dits))


def run(args) -> dict:
    factor = _factor(args.autoencoders, args.tiny)
    report = {"env": environment(args.device), "settings": {k: (str(v) if k == "device" else v)
                                                             for k, v in vars(args).items()},
              "reference": next((n for n in args.autoencoders if cases.is_dcae(n) and ":" not in n),
                                next((n for n in args.autoencoders if cases.is_dcae(n)), None)),
              "latent_factor": factor, "autoencoders": {}, "dit_latents": {}, "dits": {}, "data": {},
              "notes": ["train = forward + L1 + backward + AdamW(fused=True) step; the GAN and LPIPS terms cost "
                        "the same for every autoencoder, so they are left out",
                        "GMACs are multiply-accumulates of one image (or latent) forward; MFU counts a training "
                        "step as 3x the forward MACs, 2 FLOPs per MAC, against the device's dense bf16 peak",
                        "peak_mem_mb = the model's resident weights/optimizer state + what its call adds "
                        "(CUDA allocator peak; on CPU sampled RSS growth, a lower bound)"]}
    log("counting parameters and GMACs on the meta device")
    for name in args.autoencoders:
        costs = {size: cases.autoencoder_cost(name, size, factor) for size in {args.image_size, 256}}
        cost = costs[args.image_size]
        if args.image_size != 256:
            cost["gmacs_256"] = costs[256]["gmacs"]
        report["autoencoders"][name] = cost
        shape = costs.get(args.dit_image_size, {}).get("latent_shape") or \
            cases.build_latent_shape(name, args.dit_image_size, factor)
        key = "x".join(map(str, shape))
        report["dit_latents"].setdefault(key, {"latent_shape": shape, "of": []})["of"].append(name)
    for dname in args.dits:
        for key, g in report["dit_latents"].items():
            report["dits"][f"{dname}@{key}"] = {"dit": dname, "latent_shape": g["latent_shape"], "latents_of": g["of"],
                                               **cases.dit_cost(dname, g["latent_shape"])}
    if not args.skip_throughput:
        bench_autoencoders(args, report, factor)
        bench_dits(args, report)
        bench_data(args, report)
        if not args.skip_jpeg:
            log("data: ImageNet JPEG pipelines")
            bench_jpeg_pipelines(args, report)
    add_roundtrip(report)
    add_ratios(report)
    report["env"]["max_rss_mb"] = timing.max_rss_mb()
    return report


def run_joint_step(args) -> dict:
    return {"env": environment(args.device), "settings": {k: (str(v) if k == "device" else v)
                                                          for k, v in vars(args).items()},
            "joint_step": joint.bench_joint_step(args, log)}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    report = run_joint_step(args) if args.joint_step else run(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(report, f, indent=2)
    print(joint_tables(report) if args.joint_step else tables(report))
    print(f"\nwrote {args.out}")
    return report


if __name__ == "__main__":
    main()
