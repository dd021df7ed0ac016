"""torch.compile for the training modules' networks, switched by a config value.

Compilation is in place (nn.Module.compile): the module keeps its parameters, its state_dict keys and its
checkpoints, so a run may be resumed or evaluated with compile on or off, and the EMA (a separate eager copy made
before compiling) keeps averaging the same parameter tensors. A wrapper from torch.compile(module) would instead
prefix every key with `_orig_mod.`.
"""
from __future__ import annotations

import torch.nn as nn

CompileSpec = bool | dict


def compile_in_place(modules: list[nn.Module], spec: CompileSpec) -> None:
    """spec: False (eager), True (torch.compile defaults) or torch.compile kwargs ({mode: max-autotune, ...})."""
    if not spec:
        return
    kwargs = spec if isinstance(spec, dict) else {}
    for m in modules:
        m.compile(**kwargs)
