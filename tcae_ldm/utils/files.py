"""Files the project reads but never downloads: pretrained weights in the standard caches."""
from __future__ import annotations

import os

import torch


class MissingWeightsError(FileNotFoundError):
    """A pretrained weight file that the run needs is not on disk."""


def torch_hub_file(file_name: str) -> str:
    """Where torch.hub (torchvision, torch-fidelity) caches a file: $TORCH_HOME/hub/checkpoints/<file>."""
    return os.path.join(torch.hub.get_dir(), "checkpoints", file_name)


def require_weights(path: str, what: str, how: str) -> str:
    """`path` if it is a file, else MissingWeightsError: '<what> needs the weight file <path> ... <how>'."""
    if not os.path.isfile(path):
        raise MissingWeightsError(f"{what} needs the weight file {path}, which does not exist. {how}")
    return path
