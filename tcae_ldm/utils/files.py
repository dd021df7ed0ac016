"""Files the project reads but never downloads: pretrained weights in the standard caches, and YAML configs."""
from __future__ import annotations

import os

import yaml


class MissingWeightsError(FileNotFoundError):
    """A pretrained weight file that the run needs is not on disk."""


def torch_hub_file(file_name: str) -> str:
    """Where torch.hub (torchvision, torch-fidelity) caches a file: $TORCH_HOME/hub/checkpoints/<file>."""
    import torch  # here: the commands that read YAML through this module print --help without torch

    return os.path.join(torch.hub.get_dir(), "checkpoints", file_name)


def require_weights(path: str, what: str, how: str) -> str:
    """`path` if it is a file, else MissingWeightsError: '<what> needs the weight file <path> ... <how>'."""
    if not os.path.isfile(path):
        raise MissingWeightsError(f"{what} needs the weight file {path}, which does not exist. {how}")
    return path


def load_yaml(path: str):
    """The content of a YAML file; a missing file or a syntax error is one error naming the file and the line
    (YAML parsers given the text name it '<unicode string>')."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path} does not exist")
    with open(path) as f:
        try:
            return yaml.safe_load(f)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f", line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
            what = getattr(e, "problem", None) or str(e).splitlines()[0]
            raise ValueError(f"{path}{where}: not valid YAML: {what}") from None


def lookup(tree, dotted: str):
    """tree["a"]["b"]... for "a.b..."; None where a key is missing."""
    for key in dotted.split("."):
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


class _LenientLoader(yaml.SafeLoader):
    """Safe YAML that reads unknown tags (hparams.yaml may hold !!python/object entries) as plain data."""


def _untagged(loader, suffix, node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


_LenientLoader.add_multi_constructor("", _untagged)


def read_lenient_yaml(path: str) -> dict:
    """A saved config / hparams mapping ({} when the file is absent or holds no mapping); unknown tags as data."""
    if not os.path.isfile(path):
        return {}
    try:
        with open(path) as f:
            data = yaml.load(f, Loader=_LenientLoader)
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not readable YAML ({type(e).__name__}): is this a run folder?") from None
    return data if isinstance(data, dict) else {}


def load_config_file(path: str) -> dict:
    """load_yaml of a config file that must be a mapping of keys to values: an empty file or one that holds a
    list or a scalar is one error naming the file (jsonargparse says only "Unexpected config")."""
    content = load_yaml(path)
    if content is None:
        raise ValueError(f"config file {path} is empty: a config is a mapping of keys to values (trainer:, model:, "
                         f"data:, ...)")
    if not isinstance(content, dict):
        raise ValueError(f"config file {path} holds a {type(content).__name__}, not a mapping of keys to values "
                         f"(trainer:, model:, data:, ...)")
    return content
