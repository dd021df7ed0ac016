"""The ImageNet JPEG input pipelines of `tcae-ldm bench`: images/s of one loader worker for the exact transforms
of the paper-scale configs, the slow (reference) path against the fast one in the same run, what the fast path
changes in the pixels, and whether the configured workers keep a GPU fed.

The JPEGs are made from the bundled photographs at ImageNet's usual sizes. A worker's rate is measured in one
process with one thread (what a DataLoader worker runs): decode, transform and collate of a whole folder per
round, rounds of every case interleaved, medians kept.
"""
from __future__ import annotations

import dataclasses
import math
import os
import tempfile

import torch
import torchvision
import yaml
from PIL import Image

from tcae_ldm.commands.bench.timing import (
    Case,
    peak_bf16_tflops,
    sync,
    time_interleaved,
)
from tcae_ldm.data.demo import load_demo_photos
from tcae_ldm.data.images import ImageFolderDataset, collate_skipping
from tcae_ldm.data.views import MultiCropConfig, train_transform, views_to_unit
from tcae_ldm.losses.ssl import SSLConfig
from tcae_ldm.metrics.flops import count_gmacs
from tcae_ldm.models.discriminator import PatchDiscriminator
from tcae_ldm.models.ibot import iBOTHeads
from tcae_ldm.models.zoo import create_autoencoder

# ImageNet train is mostly 500 px on the long side (500x375, 500x333 and their portraits), with a tail of larger
# photographs; each photo is written at every size of this cycle.
JPEG_SIZES = [(500, 375), (500, 333), (375, 500), (500, 375), (333, 500), (640, 480), (800, 600), (1024, 768)]
JPEG_QUALITY = 90
TARGET_MARGIN = 2.0     # the workers should deliver 2x what the GPU consumes
CORES_PER_GPU = 12      # the node the target is set for
GPU = "NVIDIA H100 80GB HBM3"  # whose step the workers feed (dense bf16 peak from timing.PEAK_BF16_TFLOPS)
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def _config(path: str) -> dict:
    for candidate in (path, os.path.join(REPO, path)):
        if os.path.isfile(candidate):
            with open(candidate) as f:
                return yaml.safe_load(f)
    raise FileNotFoundError(f"config {path!r} not found (looked in the working directory and in {REPO})")


def make_jpeg_folder(root: str, count: int) -> dict:
    """root/train/<photo>/<i>.JPEG: `count` JPEGs cycling through JPEG_SIZES and the bundled photographs."""
    photos = list(load_demo_photos().items())
    sizes = {}
    for i in range(count):
        name, photo = photos[i % len(photos)]
        size = JPEG_SIZES[(i // len(photos) + i) % len(JPEG_SIZES)]
        os.makedirs(os.path.join(root, "train", name), exist_ok=True)
        Image.fromarray(photo).resize(size, Image.BICUBIC).save(os.path.join(root, "train", name, f"{i:04d}.JPEG"),
                                                                quality=JPEG_QUALITY)
        sizes[f"{size[0]}x{size[1]}"] = sizes.get(f"{size[0]}x{size[1]}", 0) + 1
    return sizes


def pipelines_of(config: dict, cache_config: dict) -> dict:
    """name -> (the fast path's transform, the reference's): the training transform of configs/tcae.yaml, the same
    without iBOT views, and the latent cache's (no flip)."""
    data = config["data"]["init_args"]
    views = MultiCropConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in data["views"].items()})
    size, hflip = data["image_size"], data.get("hflip", True)
    cache_size = cache_config["data"]["init_args"]["images"]["init_args"]["image_size"]
    slow_views = dataclasses.replace(views, color_on_device=False)
    return {"multi-crop": (train_transform(size, hflip, views, True), train_transform(size, hflip, slow_views)),
            "recon only": (train_transform(size, hflip, None, True), train_transform(size, hflip, None)),
            "latent cache": (train_transform(cache_size, False, None, True), train_transform(cache_size, False, None))}


class _FloatTransform:
    """A transform whose output is float32 in the worker: the reference path's cost (no uint8 transport)."""

    def __init__(self, inner):
        self.inner = inner

    def draw(self, size, rng):
        return self.inner.draw(size, rng)

    def decode_reduction(self, size, params):
        return self.inner.decode_reduction(size, params)

    def apply(self, img, params):
        return views_to_unit(self.inner.apply(img, params))


def _pass(ds: ImageFolderDataset, batch: int, epoch: int = 0):
    """One worker's work for the whole folder: items and their collation into batches."""
    def run():
        for start in range(0, len(ds), batch):
            collate_skipping([ds[(epoch, i)] for i in range(start, min(start + batch, len(ds)))])
    return run


def _pixel_change(fast: ImageFolderDataset, slow: ImageFolderDataset, n: int) -> dict:
    """What the fast path changes (draft decode, torch's resampling), in 8-bit levels over the first n items' views
    with the same random choices: mean |difference| and PSNR."""
    total, sq, count = 0.0, 0.0, 0
    for i in range(n):
        a, b = views_to_unit(collate_skipping([fast[(0, i)]])), collate_skipping([slow[(0, i)]])
        for key in ("image", "global", "local"):
            if key in b and b[key].numel():
                d = (a[key].double() - b[key].double()) * 127.5
                total, sq, count = total + d.abs().sum().item(), sq + (d ** 2).sum().item(), count + d.numel()
    mse = sq / count
    return {"mean_abs_levels": total / count, "psnr_db": 10 * math.log10(255 ** 2 / mse) if mse > 0 else None}


#################################################################################
#                        What one GPU consumes (computed)                         #
#################################################################################

def joint_step_cost(config: dict) -> dict:
    """GMACs one image costs in a joint TC-AE training step of this config, pass by pass: forward GMACs counted on
    the meta device, times the forward-equivalents the step spends on each (3: forward + backward of a trained
    pass; 1: the teacher's forward; 3 for LPIPS: forwards of the image and the reconstruction and a backward
    through the latter; 8 for the critic: its update on real and fake images plus the generator's GAN term)."""
    model, views = config["model"]["init_args"], config["data"]["init_args"]["views"]
    ssl, loss = SSLConfig(**(model.get("ssl") or {})), model.get("loss") or {}
    size, g, lsz, n_local = (config["data"]["init_args"]["image_size"], views["global_size"], views["local_size"],
                             views["num_local"])
    with torch.device("meta"):  # built without memory or compute; counted outside the context, as cases.py does
        net = create_autoencoder(model["net"], **{**(model.get("net_args") or {}), "cls_token": True})
        heads = iBOTHeads(net.width, ssl.out_dim, ssl.patch_out_dim, shared=ssl.shared_head, hidden_dim=ssl.hidden_dim,
                          bottleneck_dim=ssl.bottleneck_dim, nlayers=ssl.head_layers)
        critic = PatchDiscriminator(channels=loss.get("disc_channels", 64), num_layers=loss.get("disc_layers", 3),
                                    norm=loss.get("disc_norm", "group"))
        vgg = torchvision.models.vgg16().features
    for m in (net, heads, critic, vgg):
        m.eval().requires_grad_(False)
    enc = net.encoder

    def tokens(side):
        return count_gmacs(lambda x: enc.forward_features(x, upto=ssl.heads_on), torch.empty(1, 3, side, side,
                                                                                              device="meta"))

    grid = enc.forward_features(torch.empty(1, 3, g, g, device="meta"), upto=ssl.heads_on)[ssl.heads_on].shape[1:3]
    cls, patches = torch.empty(1, net.width, device="meta"), torch.empty(1, grid[0] * grid[1], net.width, device="meta")
    head_g, head_l = count_gmacs(heads, cls, patches), count_gmacs(heads.cls_head, cls)
    x = torch.empty(1, 3, size, size, device="meta")
    rows = [("autoencoder (encode + decode)", count_gmacs(net, x), 3),
            (f"student encoder, 2 global {g}px views", 2 * tokens(g), 3),
            (f"student encoder, {n_local} local {lsz}px views", n_local * tokens(lsz), 3),
            ("student heads", 2 * head_g + n_local * head_l, 3),
            (f"teacher encoder + heads, 2 global {g}px views", 2 * (tokens(g) + head_g), 1)]
    if loss.get("lpips_weight", 0):
        rows.append(("LPIPS VGG16 (two forwards, a backward through one)", count_gmacs(vgg, x), 3))
    if loss.get("gan_weight", 0):
        rows.append(("critic (real + fake update, generator term)", count_gmacs(critic, x), 8))
    total = sum(gm * m for _, gm, m in rows)
    return {"net": model["net"], "passes": [{"pass": p, "fwd_gmacs": gm, "times": m} for p, gm, m in rows],
            "gmacs_per_image": total}


def feed_verdict(cost: dict, worker_images_per_s: float, num_workers: int, mfu: float) -> dict:
    peak = peak_bf16_tflops(GPU)
    demand = mfu * peak * 1e12 / (2e9 * cost["gmacs_per_image"])  # images/s one GPU trains on
    needed = demand / worker_images_per_s
    delivered = num_workers * worker_images_per_s
    ok = delivered >= TARGET_MARGIN * demand and num_workers <= CORES_PER_GPU
    return {"gpu": GPU, "peak_bf16_tflops": peak, "mfu": mfu, "gpu_images_per_s": demand,
            "worker_images_per_s": worker_images_per_s, "workers_needed": needed,
            "workers_for_margin": TARGET_MARGIN * needed, "num_workers": num_workers, "cores_per_gpu": CORES_PER_GPU,
            "delivered_images_per_s": delivered, "margin": delivered / demand,
            "verdict": "ok" if ok else "INPUT-BOUND"}


#################################################################################
#                                   The section                                  #
#################################################################################

def bench_jpeg_pipelines(args, report: dict) -> None:
    """Fills report['jpeg_pipelines'] (see the module docstring)."""
    config, cache_config = _config(args.jpeg_config), _config(args.jpeg_cache_config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker's setting
    try:
        with tempfile.TemporaryDirectory() as tmp:
            sizes = make_jpeg_folder(tmp, args.jpeg_images)
            root = os.path.join(tmp, "train")
            batch = min(args.jpeg_batch, args.jpeg_images)
            sets, cases = {}, []
            for name, (fast_t, slow_t) in pipelines_of(config, cache_config).items():
                fast, slow = ImageFolderDataset(root, fast_t), ImageFolderDataset(root, _FloatTransform(slow_t))
                sets[name] = (fast, slow)
                cases += [Case(f"{name}|reference", _pass(slow, batch), len(slow)),
                          Case(f"{name}|fast", _pass(fast, batch), len(fast))]
            time_interleaved(cases, args.repeats, torch.device("cpu"))
            rows = {}
            for c in cases:
                name, variant = c.key.split("|")
                rows.setdefault(name, {})[variant] = {k: v for k, v in c.result.items() if k != "peak_mem_mb"}
            for name, (fast, slow) in sets.items():
                entry = rows[name]
                ref, new = (entry.get(v, {}).get("items_per_s") for v in ("reference", "fast"))
                entry["speedup"] = new / ref if ref and new else None
                entry["pixels"] = _pixel_change(fast, slow, len(fast))
                entry["device_ms_per_image"] = _device_cost(fast, batch, args.device, args.repeats)
    finally:
        torch.set_num_threads(threads)
    cost = joint_step_cost(config)
    workers = config["data"]["init_args"]["num_workers"]
    rate = rows["multi-crop"].get("fast", {}).get("items_per_s")
    report["jpeg_pipelines"] = {
        "config": args.jpeg_config, "cache_config": args.jpeg_cache_config, "images": args.jpeg_images,
        "sizes": sizes, "quality": JPEG_QUALITY, "batch": batch, "pipelines": rows, "step_cost": cost,
        "feed": feed_verdict(cost, rate, workers, args.mfu) if rate else None}


def _device_cost(ds: ImageFolderDataset, batch: int, device: torch.device, repeats: int) -> float | None:
    """ms per image of what the fast path leaves to the device (colour ops, uint8 -> float), on `device`."""
    host = collate_skipping([ds[(0, i)] for i in range(min(batch, len(ds)))])
    n = len(host["image"])

    def run():
        views_to_unit({k: (v.to(device) if torch.is_tensor(v) and v.dtype == torch.uint8 else v)
                       for k, v in host.items()})
        sync(device)

    case = Case("device", run, n)
    time_interleaved([case], repeats, device)
    return 1e3 / case.result["items_per_s"] if "items_per_s" in case.result else None
