"""The project's commands beyond LightningCLI's fit / validate / test / predict: one module per command, named
as the command (`tcae-ldm fid-stats` -> fid_stats.py), each with main(argv) parsing its options with CommandParser.
A command module imports torch and the project's heavy modules inside main(), after parsing, so that
`tcae-ldm <command> --help` answers at once (tests/test_cli.py checks that --help imports no torch).
"""
from __future__ import annotations

import argparse
import difflib
import sys
from typing import NoReturn

# The feature networks of tcae_ldm.metrics.features (FEATURE_EXTRACTORS), named here for --help without torch.
FEATURE_NETWORKS = ("inception", "demo-classifier", "random")
# Help of the options that several commands share, where a command leaves it out.
COMMON_HELP = {
    "batch_size": "images per batch",
    "num_workers": "DataLoader worker processes (0: load in the main process)",
    "device": "torch device to run on (cuda when available, else cpu)",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The command's docstring as written (its examples keep their lines); each option's default after its help,
    unless the help already says what the default is."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, False, [], argparse.SUPPRESS) or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)"


class CommandParser(argparse.ArgumentParser):
    """argparse as every project command uses it: `tcae-ldm <command>` as prog, the module docstring as the
    description, defaults shown, `--config FILE` (a YAML mapping of option names to values; the command line
    wins over it), and errors on one line."""

    last: CommandParser | None = None  # the most recent parser, for tests that check every command's options

    def __init__(self, prog: str, description: str | None = None, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(prog=prog, description=description, **kwargs)
        self.add_argument("--config", metavar="FILE", action="append", default=[],
                          help="YAML file of option values, keyed by option name (`batch-size: 64` or "
                               "`batch_size: 64`); options on the command line and in later files win")
        CommandParser.last = self

    def _complete_help(self) -> None:
        for action in self._actions:
            if not action.help and action.dest in COMMON_HELP:
                action.help = COMMON_HELP[action.dest]

    def format_help(self) -> str:
        self._complete_help()
        return super().format_help()

    def parse_known_args(self, args=None, namespace=None):
        args = sys.argv[1:] if args is None else list(args)
        self._complete_help()
        from_files = [token for path in self._config_paths(args) for token in self._config_tokens(path)]
        return super().parse_known_args(from_files + args, namespace)

    @staticmethod
    def _config_paths(args: list[str]) -> list[str]:
        paths = []
        for i, arg in enumerate(args):
            if arg == "--config" and i + 1 < len(args):
                paths.append(args[i + 1])
            elif arg.startswith("--config="):
                paths.append(arg.split("=", 1)[1])
        return paths

    def _config_tokens(self, path: str) -> list[str]:
        """A config file's values as command-line tokens, placed before the real command line so that it wins."""
        from tcae_ldm.utils.files import load_yaml  # imports torch: not for --help

        try:
            values = load_yaml(path)
        except (OSError, ValueError) as e:
            self.error(str(e))
        if values is None:  # given on purpose and empty: most likely the wrong file
            self.error(f"{path} is empty: expected a mapping of option names to values")
        if not isinstance(values, dict):
            self.error(f"{path}: expected a mapping of option names to values, got {type(values).__name__}")
        options = {a.dest: a for a in self._actions if a.option_strings and a.dest not in ("help", "config")}
        tokens = []
        for key, value in values.items():
            dest = str(key).replace("-", "_")
            if dest not in options:
                positional = any(a.dest == dest for a in self._actions if not a.option_strings)
                close = difflib.get_close_matches(dest, options, n=1)
                self.error(f"{path}: {key!r} is a positional argument: give it on the command line" if positional
                           else f"{path}: unknown option {key!r}"
                           + (f"; did you mean {max(options[close[0]].option_strings, key=len)[2:]!r}?" if close else ""))
            action, flag = options[dest], max(options[dest].option_strings, key=len)
            if action.nargs == 0:  # store_true / store_false
                if not isinstance(value, bool):
                    self.error(f"{path}: {key!r} is a switch: give true or false, not {value!r}")
                if value == action.const:
                    tokens.append(flag)
            elif value is not None:  # null keeps the default
                items = value if isinstance(value, list) else [value]
                text = [str(v).lower() if isinstance(v, bool) else str(v) for v in items]
                if action.nargs in (None, "?"):  # one value; a YAML list becomes the comma list such options take
                    tokens.append(f"{flag}={','.join(text)}")
                else:
                    tokens += [flag, *text]
        return tokens

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} ({self.prog} --help lists the options)\n")


def fail(prog: str, message: str) -> NoReturn:
    """End a command on one line, '<prog>: error: <message>' on stderr, exit status 1, no traceback."""
    raise SystemExit(f"{prog}: error: {message}")
