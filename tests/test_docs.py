"""The README and docs/ say only what the project does: every `tcae-ldm` command they show parses, every file they
link exists, and the README stays a front door."""
import glob
import os
import re
import shlex

import pytest

from tcae_ldm.cli import lightning_main
from tcae_ldm.commands import CommandParser
from tests.tiny import REPO

DOCS = [os.path.join(REPO, "README.md"), *sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))]
LIGHTNING = {"fit", "validate", "test", "predict"}


def _commands(path):
    """The `tcae-ldm ...` lines of a file's shell blocks, continuation lines joined, comments dropped."""
    text = open(path).read()
    found = []
    for block in re.findall(r"```(?:bash|sh)?\n(.*?)```", text, flags=re.S):
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            line = line.split(" # ")[0].split("  #")[0].strip()
            if line.startswith("tcae-ldm ") and not line.split()[1].endswith(":"):  # not an error line it prints
                found.append(line)
    return found


COMMANDS = [(os.path.relpath(p, REPO), c) for p in DOCS for c in _commands(p)]


class Parsed(Exception):
    """Raised once a project command's options have parsed: the test stops there, nothing runs."""


@pytest.mark.parametrize("where,command", COMMANDS, ids=[f"{w}:{c[9:60]}" for w, c in COMMANDS])
def test_every_documented_command_parses(where, command, monkeypatch, capsys, tmp_path):
    argv = shlex.split(command)[1:]
    monkeypatch.chdir(REPO)
    for i, arg in enumerate(argv[:-1]):  # an example's own option file (`--config sample.yaml`): an empty one
        if arg == "--config" and not os.path.exists(argv[i + 1]):
            argv[i + 1] = str(tmp_path / os.path.basename(argv[i + 1]))
            with open(argv[i + 1], "w") as f:
                f.write("{}\n")
    if argv[0] in LIGHTNING:
        # Resolve the whole config without running it; a checkpoint or data folder need not exist here.
        argv = [a for a in argv if a != "--print_config"]
        if "--ckpt_path" in argv:
            i = argv.index("--ckpt_path")
            del argv[i:i + 2]
        with pytest.raises(SystemExit) as exit_:
            lightning_main([*argv, "--print_config"])
        assert exit_.value.code in (0, None), capsys.readouterr().err
        return
    if argv[0] in ("--help", "--version") or "--help" in argv:
        return  # tests/test_cli.py runs every command's --help
    original = CommandParser.parse_known_args

    def parse_then_stop(self, args=None, namespace=None):
        result = original(self, args, namespace)
        if not result[1]:  # a command that takes unknown options on purpose would pass them on
            raise Parsed(result[0])
        return result

    monkeypatch.setattr(CommandParser, "parse_known_args", parse_then_stop)
    from tcae_ldm.cli import run

    with pytest.raises((Parsed, SystemExit)) as raised:
        run(argv)
    err = capsys.readouterr().err
    assert raised.type is Parsed, f"{where}: `{command}` does not parse: {err}"


LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


@pytest.mark.parametrize("path", DOCS, ids=lambda p: os.path.relpath(p, REPO))
def test_every_linked_file_exists(path):
    missing = [target for target in LINK.findall(open(path).read())
               if not target.startswith(("http://", "https://", "mailto:"))
               and not os.path.exists(os.path.join(os.path.dirname(path), target))]
    assert not missing, missing


def test_the_readme_is_a_front_door():
    readme = open(os.path.join(REPO, "README.md")).read()
    assert len(readme.splitlines()) <= 200
    for must in ("make demo", "make test", "tcae-ldm fit --config configs/tcae.yaml",
                 "tcae-ldm fit --config configs/dit_on_tcae.yaml"):
        assert must in readme, must
    linked = {os.path.normpath(t) for t in LINK.findall(readme)}
    unlinked = [p for p in glob.glob(os.path.join(REPO, "docs", "*.md"))
                if os.path.relpath(p, REPO) not in linked]
    assert not unlinked, f"docs not linked from the README: {unlinked}"
