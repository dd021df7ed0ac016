"""The `tcae-ldm` command: its listing, typos, options' help, --config files, one-line errors naming what is wrong,
linked values, and `--ckpt_path last` with nothing to resume."""
import contextlib
import dataclasses
import importlib
import io
import os
import subprocess
import sys
import typing

import pytest
import yaml

from tcae_ldm.cli import (
    COMMANDS,
    LIGHTNING_COMMANDS,
    condense_parser_error,
    lightning_main,
    main,
    project_error,
    run,
)
from tcae_ldm.commands import CommandParser
from tests.tiny import REPO, TINY

DEMO_TCAE = os.path.join(REPO, "configs", "demo", "tcae.yaml")
DEMO_DCAE = os.path.join(REPO, "configs", "demo", "dcae.yaml")


def _fails(argv, capsys, code=None) -> str:
    """Run the command line expecting it to stop; its stderr."""
    with pytest.raises(SystemExit) as exit_:
        run(argv)
    if code is not None:
        assert exit_.value.code == code
    return capsys.readouterr().err


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if "error:" in ln]
    assert len(lines) == 1, err
    return lines[0]


# ------------------------------------------------------------------------------------------------ listing, typos
def test_help_lists_every_command_with_a_summary(capsys):
    main(["--help"])
    out = capsys.readouterr().out
    summaries = {**LIGHTNING_COMMANDS, **{name: summary for name, (_, summary) in COMMANDS.items()}}
    for name, summary in summaries.items():
        assert any(line.split() and line.split()[0] == name and summary in line for line in out.splitlines()), name
    main([])
    assert capsys.readouterr().out == out


def test_version_is_the_installed_distributions(capsys):
    from importlib.metadata import version

    for flag in ("--version", "-V"):
        main([flag])
        assert capsys.readouterr().out == f"tcae-ldm {version('tcae-ldm')}\n"


# bench's options name its presets and cases, which its modules build with torch (its --help takes torch's import)
HELP_IMPORTS_TORCH = {"bench"}


def test_a_commands_help_imports_no_torch():
    """`tcae-ldm <command> --help` answers without torch (seconds of import): what it prints is parsed from the
    module alone. One fresh process, every command in turn."""
    code = ("import sys, contextlib, io\nfrom tcae_ldm import cli\nslow = []\n"
            f"for name in {sorted(set(COMMANDS) - HELP_IMPORTS_TORCH)!r}:\n"
            "    with contextlib.redirect_stdout(io.StringIO()) as out:\n"
            "        try:\n            cli.run([name, '--help'])\n        except SystemExit:\n            pass\n"
            "    assert f'tcae-ldm {name}' in out.getvalue(), name\n"
            "    if 'torch' in sys.modules:\n        slow.append(name)\n        break\n"
            "cli.run(['--version'])\nprint('imported torch:', slow, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    assert out.splitlines()[-1] == "imported torch: [] False", out


def test_names_repeated_for_a_quick_help_match_their_source():
    from tcae_ldm.commands import FEATURE_NETWORKS, diagnose
    from tcae_ldm.metrics.diagnostics import TOKEN_STAGES
    from tcae_ldm.metrics.features import FEATURE_EXTRACTORS

    assert FEATURE_NETWORKS == tuple(FEATURE_EXTRACTORS) and diagnose.TOKEN_STAGES == TOKEN_STAGES


def test_a_mistyped_command_names_the_closest_ones(capsys):
    err = _fails(["fti"], capsys, code=2)
    assert "unknown command 'fti'; did you mean fit or fid?" in err
    assert "did you mean sample?" in _fails(["smaple"], capsys, code=2)
    assert "did you mean" not in _fails(["xyzzy"], capsys, code=2)


def _parser(command: str) -> CommandParser:
    module = importlib.import_module(f"tcae_ldm.commands.{COMMANDS[command][0]}")
    with contextlib.redirect_stdout(io.StringIO()), pytest.raises(SystemExit):
        module.main(["--help"])
    assert CommandParser.last.prog == f"tcae-ldm {command}"
    return CommandParser.last


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_option_of_every_project_command_has_help_and_config_files(command):
    parser = _parser(command)
    assert not [a.option_strings or a.dest for a in parser._actions if not a.help]
    assert "--config" in parser._option_string_actions


def test_every_option_of_the_lightning_commands_has_help():
    """Every init argument of every class that a shipped config names (modules, datamodules, callbacks, loggers,
    their nested configs) shows a help text in `tcae-ldm fit --help` / `--model.help CLASS`."""
    from jsonargparse import ArgumentParser

    from tests.test_configs import CONFIGS

    classes = set()

    def collect(tree):
        if isinstance(tree, dict):
            if isinstance(tree.get("class_path"), str) and tree["class_path"].startswith("tcae_ldm."):
                classes.add(tree["class_path"])
            for value in tree.values():
                collect(value)
        elif isinstance(tree, list):
            for value in tree:
                collect(value)

    for path in CONFIGS:
        collect(yaml.safe_load(open(path)))
    assert {"tcae_ldm.lit.autoencoder.AutoencoderModule", "tcae_ldm.lit.diffusion.DiffusionModule"} <= classes
    types = {getattr(importlib.import_module(path.rsplit(".", 1)[0]), path.rsplit(".", 1)[1]) for path in classes}
    for cls in list(types):  # and the dataclasses they take (model.loss, model.ssl, data.views), base classes too
        hints = [h for c in cls.__mro__ if "__init__" in vars(c) for h in typing.get_type_hints(c.__init__).values()]
        types |= {t for hint in hints for t in (typing.get_args(hint) or (hint,)) if dataclasses.is_dataclass(t)}
    assert {"ReconstructionLossConfig", "SSLConfig", "MultiCropConfig"} <= {t.__name__ for t in types}
    missing = []
    for cls in sorted(types, key=lambda t: t.__qualname__):
        parser = ArgumentParser()
        parser.add_class_arguments(cls, "x", fail_untyped=False)
        missing += [f"{cls.__qualname__}: {a.dest}" for a in parser._actions
                    if a.dest.startswith("x.") and not a.dest.endswith(".help") and not a.help]
    assert not missing, "\n".join(missing)


# ------------------------------------------------------------------------------------------------ --config FILE
def test_a_command_reads_its_options_from_a_config_file_and_the_command_line_wins(tmp_path):
    parser = CommandParser("tcae-ldm demo")
    parser.add_argument("--num", type=int, default=1, help="a number")
    parser.add_argument("--names", default="a", help="comma list")
    parser.add_argument("--pair", type=float, nargs=2, help="two floats")
    parser.add_argument("--flag", action="store_true", help="a switch")
    (tmp_path / "a.yaml").write_text("num: 5\nnames: [x, y]\npair: [0.5, 1]\nflag: true\n")
    args = parser.parse_args(["--config", str(tmp_path / "a.yaml")])
    assert (args.num, args.names, args.pair, args.flag) == (5, "x,y", [0.5, 1.0], True)
    assert parser.parse_args(["--config", str(tmp_path / "a.yaml"), "--num", "7"]).num == 7


@pytest.mark.parametrize("content, message", [
    ("num: 5\nnmu: 6\n", "unknown option 'nmu'; did you mean 'num'?"),
    ("flag: 3\n", "'flag' is a switch: give true or false, not 3"),
    ("num: [1, 2\n", "line 2, column 1: not valid YAML"),
    ("- 1\n", "expected a mapping of option names to values, got list"),
    ("# only a comment\n", "is empty: expected a mapping of option names to values"),
])
def test_a_bad_config_file_is_one_line_naming_the_file(tmp_path, capsys, content, message):
    parser = CommandParser("tcae-ldm demo")
    parser.add_argument("--num", type=int, default=1, help="a number")
    parser.add_argument("--flag", action="store_true", help="a switch")
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(SystemExit):
        parser.parse_args(["--config", str(path)])
    line = _error_line(capsys.readouterr().err)
    assert line.startswith(f"tcae-ldm demo: error: {path}") and message in line


def test_fid_stats_through_a_config_file(tmp_path):
    out = tmp_path / "ref.npz"
    (tmp_path / "fid.yaml").write_text(f"demo: true\nfeatures: random\nmax-images: 12\nbatch_size: 5\nout: {out}\n"
                                       f"device: cpu\nimage-size: 32\n")
    main(["fid-stats", "--config", str(tmp_path / "fid.yaml")])
    import numpy as np

    with np.load(out) as f:
        assert int(f["count"]) == 12 and f["mu"].shape == (32,)


# ------------------------------------------------------------------------------------------------ one-line errors
def test_a_yaml_syntax_error_names_the_file(tmp_path, capsys):
    bad = tmp_path / "overlay.yaml"
    bad.write_text("model:\n  init_args:\n    max_steps: [1\n")
    line = _error_line(_fails(["fit", "--config", DEMO_TCAE, "--config", str(bad)], capsys, code=1))
    assert f"{bad}, line 4, column 1: not valid YAML" in line and "<unicode string>" not in line


def test_a_missing_config_file_is_named(tmp_path, capsys):
    line = _error_line(_fails(["fit", "--config", str(tmp_path / "nope.yaml")], capsys, code=1))
    assert line == f"tcae-ldm fit: error: config file {tmp_path / 'nope.yaml'} does not exist"
    with pytest.raises(FileNotFoundError, match="nope.yaml does not exist"):  # from Python, main() raises
        main(["fit", "--config", str(tmp_path / "nope.yaml")])


def test_a_misspelt_net_args_key_fails_when_the_config_is_parsed(tmp_path, capsys):
    argv = ["fit", "--config", DEMO_TCAE, "--model.init_args.net_args={latent_size: 4, qk_nrom: true}", "--print_config"]
    line = _error_line(_fails(argv, capsys, code=2))
    assert line == "tcae-ldm fit: error: model.net_args: unknown key(s) 'qk_nrom'"
    overlay = tmp_path / "overlay.yaml"  # the same from a config file
    overlay.write_text("model:\n  init_args:\n    net_args:\n      latent_size: 4\n      qk_nrom: true\n")
    assert "qk_nrom" in _error_line(_fails(["fit", "--config", DEMO_TCAE, "--config", str(overlay), "--print_config"],
                                           capsys, code=2))


def test_a_dit_args_typo_and_a_bad_value_are_one_line(capsys):
    dit = os.path.join(REPO, "configs", "demo", "dit_on_tcae.yaml")
    line = _error_line(_fails(["fit", "--config", dit, "--model.init_args.dit_args={depht: 2}", "--print_config"],
                              capsys, code=2))
    assert line == "tcae-ldm fit: error: model.dit_args: unknown key(s) 'depht'"
    line = _error_line(_fails(["fit", "--config", DEMO_TCAE, "--model.init_args.optimizer.init_args.lr=abc",
                               "--print_config"], capsys, code=2))
    assert line == "tcae-ldm fit: error: model.optimizer.lr: expected float, got abc"


def test_net_args_of_the_other_family_are_refused_naming_them(capsys):
    line = _error_line(_fails(["fit", "--config", DEMO_DCAE, "--model.init_args.net_args={latent_size: 4}",
                               "--trainer.max_steps=1"], capsys, code=1))
    assert line.startswith("tcae-ldm fit: error: DC-AE-XS/f16c32 does not take ['latent_size'] (net_args of a DC-AE")


@pytest.mark.parametrize("case", ["vgg16", "inception", "dcae"])
def test_a_missing_weight_file_is_one_line_when_the_run_starts(tmp_path, capsys, monkeypatch, case):
    """Raised before the first step (the preflight lists every missing file at once; configure_model / setup read
    them), not by a constructor, so jsonargparse does not wrap it in its report of every Union member; and nothing
    is trained first."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.chdir(tmp_path)
    if case == "dcae":
        argv = ["fit", "--config", DEMO_DCAE, "--model.init_args.net=DC-AE-T/f16c16",
                f"--model.init_args.net_args={{pretrained: {tmp_path / 'no_dcae'}}}", "--data.init_args.image_size=32",
                "--model.init_args.metrics_fid=random"]
        expected, named = "this run cannot start, 1 problem(s) found before the first step: (1) model.net_args.pretrained", \
            str(tmp_path / "no_dcae")
    else:
        argv = ["fit", "--config", DEMO_TCAE, *TINY, "--model.init_args.metrics_fid_weights=null",
                "--model.init_args.loss.lpips_weight=1" if case == "vgg16" else "--model.init_args.metrics_fid=inception"]
        expected, named = ("this run cannot start, 1 problem(s) found before the first step: (1) LPIPS "
                           "(model.loss.lpips_trunk) needs the weight file", str(tmp_path)) if case == "vgg16" else \
            ("this run cannot start, 1 problem(s) found before the first step: (1) the inception FID network",
             "weights-inception-2015-12-05-6726825d.pth")
    line = _error_line(_fails(argv + ["--trainer.max_steps=1"], capsys, code=1))
    assert line.startswith(f"tcae-ldm fit: error: {expected}") and named in line, line
    assert not (tmp_path / "runs" / "demo").exists() or not any((tmp_path / "runs" / "demo").rglob("*.ckpt"))


def test_only_errors_raised_on_purpose_lose_their_traceback():
    from tcae_ldm.cli import config_files
    from tcae_ldm.models.zoo import autoencoder_family

    with pytest.raises(KeyError) as deliberate:
        autoencoder_family("nope")
    assert project_error(deliberate.value) is deliberate.value
    with pytest.raises(TypeError) as bug:
        config_files(None)  # a bug inside the project: no `raise` statement raised it
    assert project_error(bug.value) is None
    wrapper = ValueError("Does not validate against any of the Union subtypes")
    wrapper.__cause__ = deliberate.value
    assert project_error(wrapper) is deliberate.value


def test_condensing_keeps_messages_of_another_shape():
    assert condense_parser_error("unrecognized arguments: --x") == "unrecognized arguments: --x"
    assert condense_parser_error('Parser key "a":\n\n') == 'Parser key "a":\n\n'


# ------------------------------------------------------------------------------------------------ linked values
def test_the_image_size_is_linked_from_the_data(tmp_path, capsys):
    args = ["--config", DEMO_TCAE, *[a for a in TINY if "net_args" not in a],
            "--model.init_args.net_args={latent_size: 2}", "--trainer.logger=false", "--trainer.callbacks=[]"]
    cli = lightning_main(args, run=False)
    assert cli.model.net.image_size == 32 and cli.model.hparams.net_args["image_size"] == 32
    with pytest.raises(SystemExit):
        lightning_main(["--config", DEMO_TCAE, "--model.init_args.image_size=64", "--print_config"])
    assert "model.init_args.image_size" in capsys.readouterr().err  # a linked value cannot be set by hand
    line = _error_line(_fails(["fit", *args, "--model.init_args.net_args={image_size: 64, latent_size: 2}"], capsys))
    assert "model.net_args.image_size=64 but the images are 32x32 (data.image_size)" in line


def test_print_config_shows_no_placeholders_for_linked_values(capsys):
    with pytest.raises(SystemExit):
        lightning_main(["fit", "--config", os.path.join(REPO, "configs", "demo", "dit_on_tcae.yaml"), "--print_config"])
    model = yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]
    assert not {"latent_shape", "num_classes"} & set(model)


# ------------------------------------------------------------------------------------------------ resume
def test_ckpt_path_last_without_a_checkpoint_says_so(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    main(["fit", "--config", DEMO_TCAE, *TINY, "--model.init_args.max_steps=1", "--ckpt_path=last"])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "--ckpt_path last" in ln or "no last checkpoint" in ln]
    assert lines == [f"tcae-ldm fit: --ckpt_path last found no checkpoint (searched: "
                     f"{os.path.join('runs', 'demo', 'tcae', 'checkpoints')}); training starts from step 0"]
    main(["fit", "--config", DEMO_TCAE, *TINY, "--model.init_args.max_steps=2", "--ckpt_path=last"])
    assert "found no checkpoint" not in capsys.readouterr().err  # the second run resumes


def test_the_executable_flushes_cpu_denormals():
    """Denormals slow CPU training several-fold; `tcae-ldm <command>` flushes them (in its own process)."""
    code = ("import torch\nfrom tcae_ldm import cli\n"
            "tiny = torch.tensor([1e-39])\nbefore = (tiny * 1.0).item()\n"
            "try:\n    cli.run(['fid'])\nexcept SystemExit:\n    pass\n"
            "print(before, (tiny * 1.0).item())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO).stdout
    before, after = map(float, out.split()[-2:])
    assert before > 0 and after == 0.0


def test_a_bad_keyword_value_is_refused_before_anything_is_seeded_or_built(capsys, caplog, monkeypatch):
    built = []
    monkeypatch.setattr("tcae_ldm.lit.autoencoder.create_autoencoder", lambda *a, **k: built.append(a))
    with caplog.at_level("INFO"):
        line = _error_line(_fails(["fit", "--config", DEMO_TCAE, "--model.init_args.net_args={qk_norm: maybe}"],
                                  capsys, code=1))
    assert line == "tcae-ldm fit: error: model.net_args.qk_norm: expected bool, got 'maybe' (str)"
    assert "Seed set to" not in caplog.text and not built  # so this line is all the terminal shows


# ------------------------------------------------------------------------------------------------ the terminal
# What Lightning logs when a run starts, before the preflight can look at the run: the only lines allowed above an
# error found then.
LIGHTNING_START = ("Seed set to ", "GPU available: ", "TPU available: ", "💡 Tip: ")


def _terminal(tmp_path, *args, **env) -> tuple[int, list[str]]:
    """(exit status, stderr lines) of the `tcae-ldm` executable in its own process, without a GPU."""
    from tests.tiny import isolated_env

    proc = subprocess.run([sys.executable, "-m", "tcae_ldm.cli", *args], capture_output=True, text=True, cwd=tmp_path,
                          env=isolated_env(CUDA_VISIBLE_DEVICES="", TORCH_HOME=str(tmp_path / "torch"), **env))
    return proc.returncode, proc.stderr.splitlines()


@pytest.mark.slow
@pytest.mark.parametrize("case", ["bad key", "bad type at depth", "yaml syntax", "empty yaml", "no gpu",
                                  "missing weight file"])
def test_the_terminal_shows_one_line_and_nothing_else(tmp_path, case):
    (tmp_path / "bad.yaml").write_text("model:\n  init_args:\n    max_steps: [1\n")
    (tmp_path / "empty.yaml").write_text("")
    vgg = tmp_path / "torch" / "hub" / "checkpoints" / "vgg16-397923af.pth"
    args, code, line = {
        "bad key": (["--model.init_args.net_args={latnt_size: 4}"], 2,
                    "model.net_args: unknown key(s) 'latnt_size'"),
        "bad type at depth": (["--model.init_args.ssl.heads_on=both"], 2,
                              "model.ssl.heads_on: expected one of 'fine', 'coarse', got both"),
        "yaml syntax": (["--config", str(tmp_path / "bad.yaml")], 1,
                        f"{tmp_path / 'bad.yaml'}, line 4, column 1: not valid YAML: expected ',' or ']', but got "
                        f"'<stream end>'"),
        "empty yaml": (["--config", str(tmp_path / "empty.yaml")], 1,
                       f"config file {tmp_path / 'empty.yaml'} is empty: a config is a mapping of keys to values "
                       f"(trainer:, model:, data:, ...)"),
        "no gpu": (None, 1, "this config runs on a GPU (trainer.accelerator=gpu, trainer.precision=bf16-mixed) and "
                            "this machine has no CUDA device; to run it on the CPU add --trainer.accelerator cpu "
                            "--trainer.precision 32-true --trainer.devices 1 --trainer.strategy auto (slow at full "
                            "scale: configs/demo/ holds CPU-sized runs)"),
        "missing weight file": ([*TINY, "--model.init_args.loss.lpips_weight=1"], 1,
                                f"this run cannot start, 1 problem(s) found before the first step: (1) LPIPS "
                                f"(model.loss.lpips_trunk) needs the weight file {vgg}, which does not exist"),
    }[case]
    config = os.path.join(REPO, "configs", "tcae.yaml") if args is None else DEMO_TCAE
    status, lines = _terminal(tmp_path, "fit", "--config", config, *(args or []))
    assert status == code and lines[-1] == f"tcae-ldm fit: error: {line}", lines
    before = lines[:-1]
    assert before == [] if case != "missing weight file" else all(ln.startswith(LIGHTNING_START) for ln in before)


@pytest.mark.slow
def test_debug_shows_the_parsers_whole_report(tmp_path):
    status, lines = _terminal(tmp_path, "fit", "--config", DEMO_TCAE, "--model.init_args.net_args={latnt_size: 4}",
                              TCAE_LDM_DEBUG="1")
    assert status == 2 and lines[0].startswith("usage: tcae-ldm fit") and len(lines) > 3, lines
    assert 'Parser key "model"' in "\n".join(lines) and "latnt_size" in "\n".join(lines)
