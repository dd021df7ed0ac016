"""`tcae-ldm bench --joint-step`: one joint TC-AE training step (alpha * L_rec + L_iBOT) taken apart pass by pass.

The step is AutoencoderModule's own (training_losses, one backward, apply_update), built from a training config
(default configs/tcae.yaml: TC-AE-B/p8-c128 at 256, 2 global 224 crops, 10 local 96 crops, 8192 prototypes) with
random weights and a random LPIPS trunk (same cost). Each pass is its forward and the backward of its own output,
cut at its inputs, so the passes add up to the step: their GMACs are counted on the meta device and their times
measured in interleaved rounds next to the whole step with and without iBOT (same module, iBOT switched off).
"""
from __future__ import annotations

import contextlib
import functools
import os
from dataclasses import dataclass, fields

import torch
import yaml
from einops import rearrange

from tcae_ldm.commands.bench import timing
from tcae_ldm.commands.bench.cases import adamw, autocast
from tcae_ldm.lit.autoencoder import AutoencoderModule
from tcae_ldm.losses.reconstruction import ReconstructionLossConfig
from tcae_ldm.losses.ssl import SSLConfig, draw_masks
from tcae_ldm.metrics.flops import count_call_gmacs

PAPER_CONFIG = "configs/tcae.yaml"
TINY_CONFIG = "configs/demo/tcae.yaml"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

# name, part of the step, what it runs (forward, and backward unless said otherwise)
PASSES = [
    ("autoencoder", "rec", "encode + decode of the reconstruction view"),
    ("lpips", "rec", "LPIPS-VGG of (image, reconstruction), backward to the reconstruction"),
    ("critic", "rec", "critic: generator term (frozen critic) + hinge loss on real and fake"),
    ("student_global", "ssl", "encoder on the 2 masked global crops, up to the heads' stage"),
    ("student_local", "ssl", "encoder on the local crops, one batch ([CLS] only)"),
    ("teacher", "ssl", "EMA encoder on the 2 global crops, inference mode, forward only"),
    ("heads", "ssl", "student heads on [CLS] + masked tokens, teacher heads (forward), iBOT loss"),
    ("update", "both", "clip, AdamW steps (autoencoder + heads, critic), teacher and EMA updates"),
]


@dataclass
class JointSpec:
    """What one joint step is made of, read off a training config."""
    config: str
    net: str
    net_args: dict
    loss: dict
    ssl: dict
    image_size: int
    global_size: int
    local_size: int
    num_local: int
    ema_decay: float | None


def resolve_config(path: str) -> str:
    if not os.path.exists(path) and os.path.exists(os.path.join(REPO, path)):
        path = os.path.join(REPO, path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"--joint-config: no such file {path}")
    return path


def read_spec(path: str) -> JointSpec:
    """The network, losses, iBOT settings and views of an AutoencoderModule config with model.ssl set."""
    path = resolve_config(path)
    with open(path) as f:
        cfg = yaml.safe_load(f)
    model = (cfg.get("model") or {}).get("init_args") or {}
    data = (cfg.get("data") or {}).get("init_args") or {}
    views = data.get("views")
    if not model.get("ssl") or not views:
        raise ValueError(f"{path}: --joint-step needs a config with model.init_args.ssl and data.init_args.views "
                         f"(a joint reconstruction + iBOT run)")
    net_args = dict(model.get("net_args") or {})
    return JointSpec(config=path, net=model.get("net", "TC-AE-B/p8-c128"), net_args=net_args,
                     loss=dict(model.get("loss") or {}), ssl=dict(model["ssl"]),
                     image_size=int(data.get("image_size", net_args.get("image_size", 256))),
                     global_size=int(views.get("global_size", 224)), local_size=int(views.get("local_size", 96)),
                     num_local=int(views.get("num_local", 10)), ema_decay=model.get("ema_decay"))


def build_module(spec: JointSpec, device: torch.device) -> AutoencoderModule:
    """The config's AutoencoderModule built on `device` (meta: no memory): random weights, a random LPIPS trunk,
    no evaluation networks."""
    names = {f.name for f in fields(ReconstructionLossConfig)}
    loss = ReconstructionLossConfig(**{**{k: v for k, v in spec.loss.items() if k in names}, "lpips_trunk": "random"})
    opt = functools.partial(adamw, weight_decay=0.05)
    with torch.device(device):
        module = AutoencoderModule(net=spec.net, net_args=spec.net_args, loss=loss, ssl=SSLConfig(**spec.ssl),
                                   optimizer=opt, disc_optimizer=opt, ema_decay=spec.ema_decay, metrics_lpips=None,
                                   metrics_fid=None)
    if module.loss.lpips is not None:  # outside the module tree; lpips makes its scaling buffers on the CPU
        module.loss.lpips.net.to(device)
    return module.train()


def tiny_spec(spec: JointSpec) -> JointSpec:
    """The config's step on a TC-AE-T at 32x32 with small heads and critic (tests, smoke runs)."""
    return JointSpec(config=spec.config, net="TC-AE-T/p4-c16", net_args={"image_size": 32, "latent_size": 2},
                     loss={**spec.loss, "disc_channels": 8, "disc_layers": 2},
                     ssl={**spec.ssl, "out_dim": 64, "patch_out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16},
                     image_size=32, global_size=16, local_size=8, num_local=spec.num_local, ema_decay=spec.ema_decay)


def bench_step(spec: JointSpec) -> int:
    """A step in the steady state: the GAN term on and the prototypes no longer frozen."""
    return max(int(spec.loss.get("disc_start", 0)), int(spec.ssl.get("freeze_last_layer_steps", 0)))


def synthetic_batch(spec: JointSpec, batch: int, device: torch.device) -> dict:
    g = torch.Generator().manual_seed(0)

    def images(*shape):
        return (torch.rand(*shape, generator=g) * 2 - 1).to(device)
    return {"image": images(batch, 3, spec.image_size, spec.image_size),
            "global": images(batch, 2, 3, spec.global_size, spec.global_size),
            "local": images(batch, spec.num_local, 3, spec.local_size, spec.local_size)}


@contextlib.contextmanager
def ssl_off(module: AutoencoderModule):
    """The same module with iBOT switched off: the reconstruction-only step on the same weights."""
    ssl = module.ssl
    module.ssl = None
    try:
        yield
    finally:
        module.ssl = ssl


#################################################################################
#                                    The passes                                 #
#################################################################################

def _leaf(t: torch.Tensor) -> torch.Tensor:
    return t.detach().requires_grad_()


def pass_calls(module: AutoencoderModule, batch: dict, step: int, opts: list, precision: str,
               n_masked: int | None = None) -> dict:
    """name -> fn() returning the scalar its backward starts from (None: nothing to backpropagate). Inputs at
    the cuts are computed once here. On the meta device, masked tokens cannot be gathered: n_masked gives
    their number, and the heads pass ends in a sum instead of the loss (whose FLOPs are negligible)."""
    dev = batch["image"].device
    meta = dev.type == "meta"
    amp = functools.partial(autocast, dev, precision)
    net, loss, ssl = module.net, module.loss, module.ssl
    x = batch["image"]
    with torch.no_grad(), amp():
        x_rec = module.reconstruct(x)[0].float()
    enc, cfg = net.encoder, ssl.cfg
    B = batch["global"].shape[0]
    g = rearrange(batch["global"], "b v c h w -> (v b) c h w")
    loc = rearrange(batch["local"], "b v c h w -> (v b) c h w")
    grid = g.shape[-1] // enc.stage_stride(cfg.heads_on)
    masks = draw_masks(cfg, 2 * B, grid, step).to(dev)
    token_mask = masks.flatten(1)
    with torch.inference_mode(), amp():
        s_cls, s_tok = ssl.features(enc, g, masks)
        l_cls = ssl.features(enc, loc)[0] if loc.shape[0] else s_cls[:0]
        t_cls, t_tok = ssl.features(ssl.teacher["encoder"], g)
    cls_in = torch.cat([s_cls, l_cls]).clone()
    tok_in = torch.empty(n_masked or 0, s_tok.shape[-1], device=dev) if meta else s_tok[token_mask].clone()
    t_cls, t_tok = t_cls.clone(), t_tok.clone()

    def autoencoder():
        with amp():
            return (x - module.reconstruct(x)[0].float()).abs().mean()

    def lpips():
        return loss.perceptual(x, _leaf(x_rec))

    def critic():
        r = _leaf(x_rec)
        return -loss.critic(r, frozen=True).mean() + loss.discriminator_loss(x, r, step)[0]

    def student_global():
        with amp():
            c, t = ssl.features(enc, g, masks)
        return c.float().sum() + t.float().sum()

    def student_local():
        with amp():
            return ssl.features(enc, loc)[0].float().sum()

    def teacher():
        with torch.inference_mode(), amp():
            ssl.features(ssl.teacher["encoder"], g)

    def heads():
        with amp():
            s_c, s_p = ssl.heads(_leaf(cls_in), _leaf(tok_in))
            with torch.inference_mode():
                t_c, t_p = ssl.teacher["heads"](t_cls, t_tok)
        if meta:
            return s_c.float().sum() + s_p.float().sum()
        return ssl.loss(s_c, s_p, t_c, t_p, token_mask, step, update_center=False)["loss"]

    def update():
        module.apply_update(opts, step, loss.gan_active(step))

    def update_reconstruction_only():
        for p in ssl.heads.parameters():  # as after a reconstruction-only backward: the heads have no gradient
            p.grad = None
        with ssl_off(module):
            module.apply_update(opts, step, loss.gan_active(step))

    return {"autoencoder": autoencoder, "lpips": lpips, "critic": critic, "student_global": student_global,
            "student_local": student_local, "teacher": teacher, "heads": heads, "update": update,
            "update_reconstruction_only": update_reconstruction_only}


def step_call(module: AutoencoderModule, batch: dict, step: int, opts: list, precision: str, with_ssl: bool):
    """The whole training step as AutoencoderModule.training_step runs it, minus logging and LR schedule."""
    def run():
        with contextlib.nullcontext() if with_ssl else ssl_off(module):
            for o in opts:
                o.zero_grad(set_to_none=True)
            with autocast(batch["image"].device, precision):
                total, _, gan = module.training_losses(batch, step)
            total.backward()
            module.apply_update(opts, step, gan)
    return run


def _backward(out) -> None:
    if out is not None and out.requires_grad:
        out.backward()


#################################################################################
#                                     Costs                                     #
#################################################################################

def count_costs(spec: JointSpec) -> dict:
    """GMACs per image of each pass (forward, and forward + backward) and of the two whole steps, counted on the
    meta device. The expected number of masked tokens stands for the drawn masks."""
    module = build_module(spec, torch.device("meta"))
    batch = synthetic_batch(spec, 1, torch.device("meta"))
    step = bench_step(spec)
    ssl = SSLConfig(**spec.ssl)
    grid = spec.global_size // module.net.encoder.stage_stride(ssl.heads_on)
    n_masked = round(2 * grid * grid * ssl.mask_probability * ssl.mask_ratio)
    calls = pass_calls(module, batch, step, [], "fp32", n_masked=n_masked)
    out = {"n_masked": n_masked, "passes": {}}
    for name, part, _ in PASSES:
        if name == "update":
            continue  # elementwise: no multiply-accumulates worth counting
        with torch.no_grad():
            fwd = count_call_gmacs(calls[name])
        out["passes"][name] = {"forward": fwd, "train": count_call_gmacs(lambda c=calls[name]: _backward(c()))}

    def rec_step():
        with ssl_off(module):
            total, _, _ = module.training_losses(batch, step)
            total.backward()
    rec = count_call_gmacs(rec_step)
    ssl_train = sum(out["passes"][n]["train"] for n, part, _ in PASSES if part == "ssl")
    out["step"] = {"reconstruction_only": rec, "joint": rec + ssl_train, "ratio": (rec + ssl_train) / rec,
                   "rest_of_reconstruction": rec - sum(out["passes"][n]["train"] for n, part, _ in PASSES
                                                       if part == "rec")}
    return out


#################################################################################
#                                    Timing                                     #
#################################################################################

def bench_joint_step(args, log=lambda msg: None) -> dict:
    """Counts and times one joint step of args.joint_config at batch args.batch_size, per precision."""
    spec = read_spec(args.joint_config)
    spec = tiny_spec(spec) if args.tiny else spec
    dev = args.device
    log(f"joint step: counting GMACs of {spec.net} ({spec.config}) on the meta device")
    report = {"config": spec.config, "net": spec.net, "image_size": spec.image_size, "global_size": spec.global_size,
              "local_size": spec.local_size, "num_local": spec.num_local, "out_dim": spec.ssl.get("out_dim"),
              "batch": args.batch_size, "step": bench_step(spec), "gmacs": count_costs(spec), "timing": {}}
    torch.manual_seed(0)
    module = build_module(spec, dev)
    opts = module.configure_optimizers()
    batch = synthetic_batch(spec, args.batch_size, dev)
    step = report["step"]
    for prec in args.precisions:
        log(f"joint step: timing {prec}, batch {args.batch_size}")
        calls = pass_calls(module, batch, step, opts, prec)
        cases = [timing.Case("step_joint", step_call(module, batch, step, opts, prec, True), args.batch_size),
                 timing.Case("step_reconstruction_only", step_call(module, batch, step, opts, prec, False),
                             args.batch_size)]
        cases += [timing.Case(name, (lambda c=fn: _backward(c())), args.batch_size) for name, fn in calls.items()]
        timing.time_interleaved(cases, args.repeats, dev, 0.25 if dev.type == "cuda" else 0.0)
        report["timing"][prec] = summarise({c.key: c.result for c in cases})
    return report


def summarise(results: dict) -> dict:
    """Seconds per step of each case, each pass's share of the joint step, the residuals and the ratio.

    rest_of_reconstruction = reconstruction-only step - its passes (the adaptive GAN weight's extra backward
    through LPIPS and the critic, L1, bookkeeping); rest_of_ssl = what iBOT adds to the step - its passes
    (masks, centering, the extra update work)."""
    t = {k: r.get("median_s") for k, r in results.items()}
    out = {"results": results, "median_s": t}
    if any(v is None for v in t.values()):
        return out
    joint, rec = t["step_joint"], t["step_reconstruction_only"]
    rec_parts = sum(t[n] for n, part, _ in PASSES if part == "rec") + t["update_reconstruction_only"]
    ssl_parts = sum(t[n] for n, part, _ in PASSES if part == "ssl") + t["update"] - t["update_reconstruction_only"]
    out.update(ratio=joint / rec, rest_of_reconstruction=rec - rec_parts, rest_of_ssl=joint - rec - ssl_parts,
               share={n: t[n] / joint for n, _, _ in PASSES})
    return out
