"""Config values that cannot work, refused in one line right after parsing, before anything is seeded or built.

- Values of the wrong type inside the keyword dicts (net_args, dit_args, objective_args), which the parser passes
  through untyped so that the error can name the key inside them.
- A GPU config on a machine without one (Lightning's own error is a long traceback ending in "No supported gpu
  backend found!"), with the overrides that run the same config on the CPU.
- Lightning options that a module cannot honour, with what to set instead: AutoencoderModule optimises manually
  (two optimizers, one backward), so Lightning's automatic clipping and accumulation do not apply to it;
  DiffusionModule clips by norm only (its own configure_gradient_clipping).
"""
from __future__ import annotations

import typing

import torch

from tcae_ldm.lit.autoencoder import AutoencoderModule
from tcae_ldm.lit.diffusion import DiffusionModule

# module class -> {trainer option: (values it honours, what to use instead)}
UNSUPPORTED_OPTIONS = {
    AutoencoderModule: {
        "gradient_clip_val": ((None, 0, 0.0), "model.init_args.grad_clip (norm clipping per group: encoder, decoder, "
                                              "iBOT heads, critic)"),
        "gradient_clip_algorithm": ((None, "norm"), "model.init_args.grad_clip, which clips by norm"),
        "accumulate_grad_batches": ((None, 1), "a larger data.init_args.global_batch_size (the two-optimizer step "
                                               "has no accumulation)"),
    },
    DiffusionModule: {
        "gradient_clip_algorithm": ((None, "norm"), "model.init_args.grad_clip or trainer.gradient_clip_val, which "
                                                    "clip by norm"),
    },
}
HALF_PRECISIONS = ("bf16", "16", "bf16-mixed", "16-mixed", "bf16-true", "16-true")


def _get(config, key, default=None):
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value is None else value


def unsupported_options(trainer_config, module_class) -> list[str]:
    """'trainer.X=V: <module> cannot honour it; use ... instead' for each such option in the trainer config."""
    found = []
    for cls, options in UNSUPPORTED_OPTIONS.items():
        if isinstance(module_class, type) and issubclass(module_class, cls):
            for option, (honoured, instead) in options.items():
                value = _get(trainer_config, option)
                if value not in honoured:
                    found.append(f"trainer.{option}={value}: {cls.__name__} cannot honour it; use {instead}")
    return found


def _cuda() -> bool:
    return torch.cuda.is_available()


def _gpu() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return _cuda() or bool(mps is not None and mps.is_available())


def cpu_overrides(trainer_config) -> str | None:
    """The command-line overrides that run a GPU config on this machine's CPU, or None when the config does not
    need a GPU or this machine has one."""
    accelerator = str(_get(trainer_config, "accelerator", "auto")).lower()
    precision = str(_get(trainer_config, "precision", "32-true"))
    needs_gpu = (accelerator == "cuda" and not _cuda()) or (accelerator == "gpu" and not _gpu())
    half_on_cpu = accelerator == "auto" and precision in HALF_PRECISIONS and not _cuda()
    if not (needs_gpu or half_on_cpu):
        return None
    overrides = ["--trainer.accelerator cpu"]
    if precision not in ("32", "32-true", "64", "64-true"):
        overrides.append("--trainer.precision 32-true")
    if _get(trainer_config, "devices", "auto") not in (1, "1", "auto"):  # -1 / a list: every GPU, none on a CPU
        overrides.append("--trainer.devices 1")
    strategy = _get(trainer_config, "strategy", "auto")
    if not (isinstance(strategy, str) and strategy == "auto"):
        overrides.append("--trainer.strategy auto")
    return " ".join(overrides)


def named_class(config):
    """The class a subclass-mode config section ({class_path, init_args}) names, or None."""
    import importlib

    path = _get(config, "class_path") if config is not None else None
    if not isinstance(path, str) or "." not in path:
        return None
    module, name = path.rsplit(".", 1)
    try:
        return getattr(importlib.import_module(module), name, None)
    except ImportError:  # jsonargparse has reported it already
        return None


def check_keyword_args(section, where: str) -> None:
    """check_keywords for every init argument of a {class_path, init_args} config section that is a keyword_dict
    (net_args, dit_args, objective_args): the constructors check them too, but this runs before anything is
    built or logged."""
    from tcae_ldm.utils.kwargs import check_keywords

    cls = named_class(section)
    init_args = _get(section, "init_args") if cls is not None else None
    if init_args is None:
        return
    init_args = init_args.as_dict() if hasattr(init_args, "as_dict") else dict(init_args)
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # an annotation that does not resolve: the constructor checks
        return
    for name, value in init_args.items():
        kinds = [t for t in (typing.get_args(hints.get(name)) or (hints.get(name),)) if hasattr(t, "__value_types__")]
        if kinds and isinstance(value, dict):
            check_keywords(value, kinds[0], f"{where}.{name}")


def check_trainer_config(trainer_config, module_class=None) -> None:
    """ValueError, one line, for a GPU config without a GPU or options the module cannot honour."""
    overrides = cpu_overrides(trainer_config)
    if overrides is not None:
        accelerator, precision = _get(trainer_config, "accelerator", "auto"), _get(trainer_config, "precision", "")
        raise ValueError(f"this config runs on a GPU (trainer.accelerator={accelerator}, trainer.precision="
                         f"{precision}) and this machine has no CUDA device; to run it on the CPU add {overrides} "
                         f"(slow at full scale: configs/demo/ holds CPU-sized runs)")
    problems = unsupported_options(trainer_config, module_class)
    if problems:
        raise ValueError("; ".join(problems))
