"""The package's layout: each stage of the data flow imports only the stages below it, no two files import each
other, and checkpoints written before a move still load."""
import ast
import os
from collections import defaultdict

import torch

from tcae_ldm.latents.frozen import load_autoencoder
from tcae_ldm.lit.autoencoder import AutoencoderModule
from tests.tiny import REPO

PACKAGE = os.path.join(REPO, "tcae_ldm")
# Floors, bottom up: a module may import its own folder and any folder on a lower floor, nothing else.
FLOORS = {"utils": 0, "data": 1, "models": 1, "diffusion": 1, "losses": 2, "metrics": 3, "latents": 4, "lit": 5,
          "commands": 6, "cli": 7, "__init__": 7}


def _modules() -> dict[str, str]:
    """dotted module name -> file path, for every module of the package."""
    out = {}
    for root, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(root, f), os.path.dirname(PACKAGE))[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(root, f)
    return out


def _imports(path: str, module: str, known: set[str]) -> set[str]:
    """Project modules imported anywhere in a file (functions included), resolved to module names."""
    found = set()
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("tcae_ldm")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.startswith("tcae_ldm"):
                found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names}
    return {m for m in found if m in known}


def _floor(module: str) -> tuple[str, int]:
    part = module.split(".")[1] if "." in module else "__init__"
    return part, FLOORS[part]


def test_imports_run_downward_only():
    modules = _modules()
    upward = []
    for mod, path in modules.items():
        room, floor = _floor(mod)
        for dep in _imports(path, mod, set(modules)):
            dep_room, dep_floor = _floor(dep)
            if dep_room != room and dep_floor >= floor:
                upward.append(f"{mod} (floor {floor}) imports {dep} (floor {dep_floor})")
    assert not upward, "\n".join(upward)


def test_no_two_files_import_each_other():
    modules = _modules()
    graph = defaultdict(set)
    for mod, path in modules.items():
        graph[mod] = _imports(path, mod, set(modules)) - {mod}
    # every strongly connected component must be a single module (Tarjan)
    index, low, stack, on, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                circles.append(sorted(comp))

    for v in list(graph):
        if v not in index:
            visit(v)
    assert not circles, circles


def test_a_checkpoint_written_before_the_layout_change_still_loads():
    """tests/fixtures/pre_layout_autoencoder.ckpt was written by the code before latents/ and commands/ existed
    (a TC-AE-T trained jointly with iBOT; its hyper-parameters pickle SSLConfig and ReconstructionLossConfig by
    class path). It loads as a training module and as a frozen autoencoder, with the outputs it had then."""
    ckpt = os.path.join(REPO, "tests", "fixtures", "pre_layout_autoencoder.ckpt")
    expected = torch.load(os.path.join(REPO, "tests", "fixtures", "pre_layout_autoencoder_io.pt"))
    x = torch.linspace(-1, 1, 3 * 32 * 32).view(1, 3, 32, 32)
    module = AutoencoderModule.load_from_checkpoint(ckpt, map_location="cpu")
    assert module.ssl is not None and module.hparams.ssl.out_dim == 16
    with torch.no_grad():
        assert torch.allclose(module.eval_net(x)[0], expected["x_rec"], atol=1e-6)
        assert torch.allclose(load_autoencoder("tcae", ckpt).encode(x), expected["z"], atol=1e-6)
