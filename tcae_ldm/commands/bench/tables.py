"""The fixed-width tables `tcae-ldm bench` prints, rendered from its JSON report alone, so a saved report
prints the same: `tables(json.load(open("bench.json")))`."""
from __future__ import annotations

from tcae_ldm.commands.bench.cases import INPUT_TARGET, MODES, ROUNDTRIP
from tcae_ldm.commands.bench.joint import PASSES
from tcae_ldm.commands.bench.pipelines import TARGET_MARGIN


def _f(v, spec: str = ".1f") -> str:
    return "-" if v is None else format(v, spec)


def _big(v) -> str:
    """Ratios from 0.01 to 10^5 in a narrow column."""
    return "-" if v is None else (f"{v:,.0f}" if v >= 100 else f"{v:.2f}")


def _shape(shape) -> str:
    return "x".join(map(str, shape))


def _speed(r: dict, spread: bool = False) -> str:
    """items/s and, in brackets, the ratio to the reference measured in the same run (with spread: the median and
    range of the round-by-round ratios)."""
    if not r:
        return "-"
    if "error" in r:
        return "error"
    if spread and "ratio_rounds_median" in r:
        return (f"{r['items_per_s']:.3g} ({r['ratio_rounds_median']:.2f}x, {r['ratio_rounds_min']:.2f}-"
                f"{r['ratio_rounds_max']:.2f})")
    return f"{r['items_per_s']:.3g} ({_f(r.get('ratio_vs_reference'), '.2f')}x)"


def render(title: str, headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join([title, line(headers), "  ".join("-" * w for w in widths), *map(line, rows)])


def _cost(report: dict) -> str:
    size = report["settings"]["image_size"]
    rows = [[n, _f(e["params_m"]), _shape(e["latent_shape"]), _f(e["gmacs"]["encode"], ".4g"),
             _f(e["gmacs"]["decode"], ".4g"), _f(e["gmacs"]["total"], ".4g"),
             _f(e.get("gmacs_256", e["gmacs"])["total"], ".4g"), _f(e["gmacs_ratio_vs_reference"], ".2f")]
            for n, e in report["autoencoders"].items()]
    return render(f"Cost (GMACs per image at {size}px; e+d@256 = encode + decode at 256px; x ref = e+d / reference)",
                  ["autoencoder", "params M", "latent", "GMACs enc", "GMACs dec", "GMACs e+d", "e+d@256", "x ref"],
                  rows)


def _autoencoders(report: dict) -> str:
    s, aes = report["settings"], report["autoencoders"]
    with_mfu = report["env"].get("peak_bf16_tflops") is not None
    rows = []
    for n, e in aes.items():
        for key, prec, m in [(k, p, m) for k in ("throughput", "compiled") for p, m in e.get(k, {}).items()]:
            name = n if key == "throughput" else f"{n} (compiled)"  # compiled: x the compiled reference
            row = [name, prec, *(_speed(m.get(k, {})) for k in MODES), _speed(m.get(ROUNDTRIP, {}), spread=True),
                   "/".join(_f(m.get(k, {}).get("peak_mem_mb"), ".0f") for k in MODES)]
            rows.append(row + (["/".join(_f(m.get(k, {}).get("mfu"), ".1%") for k in MODES)] if with_mfu else []))
    return render(f"Autoencoder throughput, images/s (x {report['reference']}, same run; median of {s['repeats']}, "
                  f"batch {s['batch_size']}; enc+dec: median and range of the ratios of the interleaved rounds)",
                  ["autoencoder", "prec", "encode", "decode", "train step", "enc+dec", "peak MB e/d/t"]
                  + (["MFU e/d/t"] if with_mfu else []), rows)


def _dits(report: dict) -> str:
    s = report["settings"]
    with_mfu = report["env"].get("peak_bf16_tflops") is not None
    rows = []
    for e in report["dits"].values():
        for prec, m in (e.get("throughput") or {"-": {}}).items():
            r = m.get("train", {})
            rows.append([e["dit"], _shape(e["latent_shape"]), ",".join(e["latents_of"]), _f(e["params_m"]),
                         _f(e["gmacs"], ".4g"), prec, _speed(r), _f(r.get("peak_mem_mb"), ".0f")]
                        + ([_f(r.get("mfu"), ".1%")] if with_mfu else []))
    return render(f"DiT training step, latents/s (x the same DiT on the reference's latents; latents of "
                  f"{s['dit_image_size']}px images, batch {s['dit_batch_size']})",
                  ["DiT", "latent", "latents of", "params M", "GMACs", "prec", "train step", "peak MB"]
                  + (["MFU"] if with_mfu else []), rows)


def _data(report: dict) -> str:
    data = report["data"]
    rows = [[k, _f(d["items_per_s"], ".4g"), d.get("feeds") or "-", _f(d.get("step_items_per_s"), ".3g"),
             _big(d.get("loader_over_step")), d.get("verdict") or "-"] for k, d in data.items()]
    return "\n".join([render(f"Input pipelines vs the fastest training step they feed (target >= {INPUT_TARGET:.0f}x)",
                             ["loader", "items/s", "feeds", "step items/s", "loader/step", "verdict"], rows)]
                     + [f"  {k}: {d['source']}, {d.get('num_workers', 0)} workers" for k, d in data.items()])


def _jpeg_pipelines(report: dict) -> str | None:
    section = report.get("jpeg_pipelines")
    if not section:
        return None
    f = _f
    rows = []
    for name, e in section["pipelines"].items():
        px = e.get("pixels") or {}
        for variant in ("reference", "fast"):
            r = e.get(variant, {})
            speed = "error" if "error" in r else f(r.get("items_per_s"))
            fast = variant == "fast"
            rows.append([name if variant == "reference" else "", variant, speed,
                         f(e["speedup"], ".2f") + "x" if fast else "1.00x",
                         f(e.get("device_ms_per_image"), ".2f") if fast else "-",
                         f"{f(px.get('mean_abs_levels'), '.2f')} / {f(px.get('psnr_db'))} dB" if fast else "-"])
    sizes = ", ".join(f"{k} x{v}" for k, v in section["sizes"].items())
    parts = [render(f"JPEG input pipelines, images/s of one loader worker (1 process, 1 thread; {section['images']} "
                    f"JPEGs of the bundled photos at {sizes}, quality {section['quality']}; batches of "
                    f"{section['batch']}; transforms of {section['config']} and {section['cache_config']})",
                    ["pipeline", "path", "img/s", "x ref", "device ms/img", "fast vs ref: mean |d| levels / PSNR"],
                    rows),
             "  reference: full JPEG decode, PIL resampling and colour augmentations in the worker, float32 tensors; "
             "fast: draft-mode decode where the crops allow it, torch's uint8 resampling, uint8 tensors, colour "
             "augmentations batched on the device after the transfer (device ms/img: that work, timed on this run's "
             f"device, {report['settings']['device']})"]
    cost = section["step_cost"]
    rows = [[p["pass"], f(p["fwd_gmacs"]), f"x{p['times']}", f(p["fwd_gmacs"] * p["times"])] for p in cost["passes"]]
    rows.append(["total per image", "", "", f(cost["gmacs_per_image"])])
    parts.append(render(f"{cost['net']} joint training step, GMACs per image (counted; x = passes per step)",
                        ["pass", "fwd GMACs", "x", "GMACs"], rows))
    feed = section.get("feed")
    if feed:
        parts.append(
            f"GPU feed: {feed['gpu']} at {feed['peak_bf16_tflops']:.0f} TFLOP/s dense bf16 and an assumed MFU of "
            f"{feed['mfu']:.0%} trains on {feed['gpu_images_per_s']:.0f} images/s; one worker of the fast multi-crop "
            f"path delivers {feed['worker_images_per_s']:.1f} (this CPU), so {feed['workers_needed']:.1f} workers feed "
            f"it and {feed['workers_for_margin']:.1f} give the {TARGET_MARGIN:.0f}x margin; num_workers="
            f"{feed['num_workers']} (of {feed['cores_per_gpu']} cores per GPU) delivers "
            f"{feed['delivered_images_per_s']:.0f} images/s = {feed['margin']:.2f}x -> {feed['verdict']}")
    return "\n".join(parts)


def _compiled(report: dict) -> str | None:
    rows = []
    for table in ("autoencoders", "dits"):
        for n, e in report[table].items():
            for prec, m in e.get("compiled", {}).items():
                rows.append([n, prec] + [("error" if "error" in m[k] else f"{_f(m[k].get('speedup'), '.2f')}x")
                                         if k in m else "-" for k in (*MODES, ROUNDTRIP)])
    if not rows:
        return None
    return render("torch.compile speed-up (compiled / eager items/s; errors listed below)",
                  ["network", "prec", "encode", "decode", "train step", "enc+dec"], rows)


def _profiles(report: dict) -> str | None:
    """`--profile`: each network's encode + decode time by op category, then its slowest ops."""
    profiled = {(n, v): p for n, e in report["autoencoders"].items() for v, p in e.get("profile", {}).items()
                if "error" not in p}
    if not profiled:
        return None
    names = [n if v == "eager" else f"{n} ({v})" for n, v in profiled]
    cats = list(dict.fromkeys(c for p in profiled.values() for c in p["categories"]))
    rows = [[c, *(f"{p['categories'].get(c, 0.0):.4g} ({p['categories'].get(c, 0.0) / p['total_ms']:.0%})"
                  for p in profiled.values())] for c in cats]
    rows.append(["total", *(f"{p['total_ms']:.4g}" for p in profiled.values())])
    prec = report["settings"]["precisions"][0]
    parts = [render(f"Profile of one encode + decode, ms of self time by op category ({prec}, batch "
                    f"{report['settings']['batch_size']}, {report['settings']['image_size']}px; torch.profiler)",
                    ["category", *names], rows)]
    for name, p in zip(names, profiled.values()):
        parts.append(render(f"{name}: slowest ops", ["op", "category", "calls", "self ms", "share"],
                            [[r["op"][:60], r["category"], str(r["calls"]), f"{r['self_ms']:.4g}",
                              f"{r['self_ms'] / p['total_ms']:.1%}"] for r in p["top"]]))
    return "\n\n".join(parts)


def _errors(report: dict) -> list[str]:
    return [f"error: {n} {variant} {prec} {mode}: {r['error']}"
            for table in ("autoencoders", "dits") for n, e in report[table].items()
            for variant in ("throughput", "compiled") for prec, m in e.get(variant, {}).items()
            for mode, r in m.items() if "error" in r] + \
        [f"error: profile of {n} ({v}): {p['error']}" for n, e in report["autoencoders"].items()
         for v, p in e.get("profile", {}).items() if "error" in p]


def tables(report: dict) -> str:
    s, env = report["settings"], report["env"]
    where = env.get("device_name") or env["cpu"]
    head = (f"tcae-ldm bench on {where} ({env['device']}, {env['torch_threads']} threads), torch {env['torch']}; "
            f"reference {report['reference'] or '-'}")
    parts = [head, _cost(report)]
    if any("throughput" in e for e in report["autoencoders"].values()):
        parts.append(_autoencoders(report))
    parts.append(_dits(report))
    if report["data"]:
        parts.append(_data(report))
    parts.append(_jpeg_pipelines(report))
    parts.append(_compiled(report))
    parts.append(_profiles(report))
    footer = [f"max RSS {env['max_rss_mb']:.0f} MB", *_errors(report), *(f"note: {t}" for t in report["notes"])]
    if env["device"] == "cpu" and "bf16" in s["precisions"] and env.get("cpu_native_bf16") is False:
        footer.append(f"WARNING: this CPU ({env.get('cpu_capability')}) has no bf16 instructions (AVX512-BF16 / AMX): "
                      f"bf16 convolutions run on reference kernels, so bf16 figures and ratios measure kernel "
                      f"coverage, not the networks")
    return "\n\n".join(p for p in parts if p) + "\n\n" + "\n".join(footer)


def joint_tables(report: dict) -> str:
    """`tcae-ldm bench --joint-step`: one joint training step pass by pass (GMACs per image, time shares)."""
    j = report["joint_step"]
    g, step = j["gmacs"], j["gmacs"]["step"]
    parts = [f"One joint TC-AE step of {j['config']}: {j['net']} at {j['image_size']}px, 2 global {j['global_size']}px "
             f"+ {j['num_local']} local {j['local_size']}px crops, {j['out_dim']} prototypes; batch {j['batch']}, "
             f"step {j['step']} (GAN on); {g['n_masked']} masked tokens per image counted"]
    for prec, t in j["timing"].items():
        s, joint = t["median_s"], t["median_s"].get("step_joint")
        rows = []
        for name, part, what in PASSES:
            c = g["passes"].get(name, {})
            rows.append([name, "iBOT" if part == "ssl" else ("rec" if part == "rec" else "both"),
                         _f(c.get("forward"), ".4g"), _f(c.get("train"), ".4g"),
                         _f(c["train"] / step["joint"] if c else None, ".1%"), _f(_ms(s.get(name)), ".4g"),
                         _f(t.get("share", {}).get(name), ".1%"), what])
        rows.append(["rest (rec)", "rec", "-", _f(step["rest_of_reconstruction"], ".4g"),
                     _f(step["rest_of_reconstruction"] / step["joint"], ".1%"), _f(_ms(t.get("rest_of_reconstruction")), ".4g"),
                     _f(t["rest_of_reconstruction"] / joint if "rest_of_reconstruction" in t else None, ".1%"),
                     "adaptive GAN weight (second backward through LPIPS and critic), L1"])
        rows.append(["rest (iBOT)", "iBOT", "-", "-", "-", _f(_ms(t.get("rest_of_ssl")), ".4g"),
                     _f(t["rest_of_ssl"] / joint if "rest_of_ssl" in t else None, ".1%"),
                     "masks, centering, iBOT's share of the update"])
        for key, label in (("step_reconstruction_only", "reconstruction_only"), ("step_joint", "joint")):
            r = t["results"].get(key, {})
            rows.append([f"STEP {label}", "", "-", _f(step[label], ".4g"), _f(step[label] / step["joint"], ".1%"),
                         "error" if "error" in r else _f(_ms(s.get(key)), ".4g"),
                         _f(s[key] / joint if s.get(key) and joint else None, ".1%"), ""])
        parts.append(render(f"{prec}: GMACs per image (train = forward + backward), time per step in ms (median of "
                            f"{report['settings']['repeats']} interleaved rounds)",
                            ["pass", "part", "GMACs fwd", "GMACs train", "of joint", "ms", "of joint", "what"], rows))
        parts.append(f"joint / reconstruction-only step: time {_f(t.get('ratio'), '.2f')}x, GMACs "
                     f"{step['ratio']:.2f}x (the floor the method sets: iBOT's passes cannot be skipped)")
    return "\n\n".join(parts)


def _ms(v):
    return None if v is None else 1e3 * v
