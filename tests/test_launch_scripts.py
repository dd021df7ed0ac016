"""The launch files under scripts/launch/: each is valid bash, and the tcae-ldm command inside it parses (the script
runs with stand-ins for srun and torchrun that start the command with --print_config, or --help for the project's
commands, in place of the real run)."""
import glob
import os
import subprocess
import sys

import pytest

from tests.tiny import REPO, isolated_env

SCRIPTS = sorted(glob.glob(os.path.join(REPO, "scripts", "launch", "*")))
LIGHTNING = ("fit", "validate", "test", "predict")

# tcae-ldm: the real command, made to print its resolved config (or its options) instead of running
TCAE_LDM = f"""#!/bin/bash
echo "$@" >> "$LAUNCHED"
case "$1" in {"|".join(LIGHTNING)}) last=--print_config ;; *) last=--help ;; esac
exec {sys.executable} -m tcae_ldm.cli "$@" "$last"
"""
# srun [options] command...: the command, once
SRUN = """#!/bin/bash
while [[ "$1" == -* ]]; do shift; done
exec "$@"
"""
# torchrun [options] -m tcae_ldm.cli args...: tcae-ldm args, once
TORCHRUN = """#!/bin/bash
while [[ $# -gt 0 && "$1" != -m ]]; do shift; done
[[ "$2" == tcae_ldm.cli ]] || { echo "torchrun does not start tcae_ldm.cli: $*" >&2; exit 2; }
shift 2
exec tcae-ldm "$@"
"""


def test_every_kind_of_launch_is_shipped():
    names = {os.path.basename(p) for p in SCRIPTS}
    assert names == {f"{launcher}_{what}.{ext}" for launcher, ext in (("slurm", "sbatch"), ("torchrun", "sh"))
                     for what in ("fit", "cache_latents", "sample")}


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_the_launch_file_and_its_command_parse(script, tmp_path):
    subprocess.run(["bash", "-n", script], check=True)
    text = open(script).read()
    if script.endswith(".sbatch"):  # requeued on preemption; a training run is warned ahead and resumes
        assert "#SBATCH --requeue" in text
        if "_fit" in script:
            assert "#SBATCH --signal=USR1@90" in text and "--ckpt_path=last" in text
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, body in (("tcae-ldm", TCAE_LDM), ("srun", SRUN), ("torchrun", TORCHRUN)):
        (bin_dir / name).write_text(body)
        (bin_dir / name).chmod(0o755)
    launched = tmp_path / "launched"
    env = isolated_env(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", LAUNCHED=str(launched),
                       SLURM_JOB_NUM_NODES="2", SLURM_NTASKS_PER_NODE="8", NNODES="2")
    res = subprocess.run(["bash", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    (command,) = launched.read_text().splitlines()  # exactly one tcae-ldm command
    if command.split()[0] in LIGHTNING:
        assert "class_path" in res.stdout and "num_nodes: 2" in res.stdout
    else:
        assert res.stdout.startswith("usage: tcae-ldm")
