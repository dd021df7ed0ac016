"""What installing and cleaning up does: dependencies and extras, Python 3.10 support, `make clean`."""
import os
import re
import subprocess
import sys

import pytest

from tests.tiny import REPO


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # 3.11+
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]


def _names(requirements) -> set[str]:
    return {r.split(";")[0].split("[")[0].split(">")[0].split("=")[0].split("<")[0].strip().lower() for r in requirements}


def test_demo_only_packages_are_an_extra_that_the_tests_install():
    project = _pyproject()
    extras = project["optional-dependencies"]
    assert not {"scikit-image", "scikit-learn"} & _names(project["dependencies"])
    assert {"scikit-image", "scikit-learn"} <= _names(extras["demo"])
    assert "tcae-ldm[demo]" in extras["test"]  # the tests use the demo photos
    assert _names(extras["wandb"]) == {"wandb"}
    assert "huggingface_hub" in _names(project["dependencies"])  # DC-AE loads through it


def test_python_310_is_supported_where_the_package_says_so():
    """pyproject says >= 3.10: no typing.NotRequired (3.11), and the optional key of a spec is optional."""
    assert _pyproject()["requires-python"] == ">=3.10"
    from tcae_ldm.latents.frozen import AutoencoderSpec

    assert AutoencoderSpec.__required_keys__ == {"kind", "path"} and AutoencoderSpec.__optional_keys__ == {"dtype"}
    names_311 = ("NotRequired", "Required", "Self", "LiteralString", "Never", "assert_never", "TypeVarTuple", "Unpack")
    found = []
    for root, _, files in os.walk(os.path.join(REPO, "tcae_ldm")):
        for name in files:
            if name.endswith(".py"):
                for line in open(os.path.join(root, name)):
                    if line.startswith("from typing import"):
                        found += [f"{name}: {n}" for n in names_311 if re.search(rf"\b{n}\b", line)]
    assert not found, found


def test_the_demo_says_which_extra_it_needs(monkeypatch):
    from tcae_ldm.data.demo import load_demo_photos

    monkeypatch.setitem(sys.modules, "skimage", None)  # as if scikit-image were not installed
    with pytest.raises(ImportError, match=r"scikit-image and scikit-learn .*pip install -e '\.\[demo\]'"):
        load_demo_photos()


def test_make_clean_removes_only_what_the_demo_wrote():
    # Under `make test` this runs inside make: a sub-make would announce its directory, so it is told not to.
    env = {k: v for k, v in os.environ.items() if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    run = subprocess.run(["make", "--no-print-directory", "-n", "clean"], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["rm", "-rf", "runs/demo"]  # not runs/, where paper-scale checkpoints live
    run = subprocess.run(["make", "--no-print-directory", "-n", "distclean"], cwd=REPO, env=env,
                         capture_output=True, text=True, check=True)
    assert run.stdout.split() == ["rm", "-rf", "runs/demo", "rm", "-rf", ".venv", ".pytest_cache"]
