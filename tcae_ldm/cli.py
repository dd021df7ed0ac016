"""The `tcae-ldm` command: LightningCLI's fit / validate / test / predict, plus the project's own commands.

    tcae-ldm --help                                  # every command, one line each
    tcae-ldm fit --config configs/tcae.yaml          # any LightningCLI subcommand and flag
    tcae-ldm <command> --help                        # a command's options (answers without importing torch)
    tcae-ldm --version                               # the installed version

An error the project raises on purpose (a missing file, a value that cannot work) ends the command with one
line that names it, and so does a config the parser rejects; TCAE_LDM_DEBUG=1 shows the traceback and the
parser's whole message instead.
"""
from __future__ import annotations

import ast
import difflib
import functools
import importlib
import linecache
import os
import re
import sys
import warnings

# Lightning's subcommands (LightningCLI), with what they do in this project.
LIGHTNING_COMMANDS = {
    "fit": "train an autoencoder or a DiT from a config (--ckpt_path last resumes)",
    "validate": "score a model on the validation split (autoencoders: PSNR, SSIM, LPIPS, rFID)",
    "test": "the same on the test split",
    "predict": "run a predict config: encode images into a latent cache",
}
# The project's commands: name -> (module of tcae_ldm.commands whose main(argv) runs it, one-line summary).
# Modules are imported only when their command runs, so `tcae-ldm --help` starts without torch.
COMMANDS = {
    "sample": ("sample", "DiT checkpoint -> PNGs, a grid and an ADM-style .npz"),
    "fid-stats": ("fid_stats", "reference FID statistics of an image folder or the demo data"),
    "fid": ("fid", "FID of a sample .npz or folder against reference statistics"),
    "diagnose": ("diagnose", "linear probes and latent spectrum of an autoencoder"),
    "ae-report": ("ae_report", "autoencoder vs a bicubic baseline on validation images"),
    "export": ("export", "a trained autoencoder or DiT as a diffusers / safetensors folder with a model card"),
    "compare": ("compare", "convergence plot and table from several DiT runs"),
    "ablation": ("ablation", "the ablation table (rFID, probes, cost, gFID) of autoencoder runs"),
    "bench": ("bench.main", "cost and throughput, TC-AE vs DC-AE, side by side"),
    "train-demo-classifier": ("train_demo_classifier", "the demo's offline FID network"),
}
DEBUG_ENV = "TCAE_LDM_DEBUG"
PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def overview() -> str:
    """What `tcae-ldm --help` prints: every command with its summary."""
    width = max(map(len, [*LIGHTNING_COMMANDS, *COMMANDS])) + 2
    lines = ["usage: tcae-ldm <command> [options]        (tcae-ldm <command> --help lists its options)", "",
             "TC-AE autoencoders and latent DiTs in PyTorch Lightning.", "",
             "Training and evaluation (LightningCLI: --config FILE, --print_config, every --trainer.* / --model.* / "
             "--data.* key):"]
    lines += [f"  {name:<{width}}{summary}" for name, summary in LIGHTNING_COMMANDS.items()]
    lines += ["", "Project commands (--config FILE sets any option from a YAML file):"]
    lines += [f"  {name:<{width}}{summary}" for name, (_, summary) in COMMANDS.items()]
    lines += ["", f"Errors are one line; {DEBUG_ENV}=1 shows the traceback. tcae-ldm --version: the version."]
    return "\n".join(lines)


def version() -> str:
    """The installed distribution's version (pyproject.toml's, as pip recorded it)."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("tcae-ldm")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown (not installed: pip install -e .)"


def closest_commands(name: str) -> list[str]:
    return difflib.get_close_matches(name, [*LIGHTNING_COMMANDS, *COMMANDS], n=3, cutoff=0.5)


# ----------------------------------------------------------------------------------------------- config files
def config_files(args: list[str]) -> list[str]:
    """The files given to --config / -c in a LightningCLI command line."""
    files = []
    for i, arg in enumerate(args):
        if arg in ("--config", "-c") and i + 1 < len(args):
            files.append(args[i + 1])
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
    return files


# ----------------------------------------------------------------------------------------------- one-line errors
_NOISE = re.compile(r"(Does not validate against any of the Union subtypes|Subtypes: |Errors:|Given value|"
                    r"Expected a <class 'NoneType'>|Expected a path but |Expected a dot import path|"
                    r"Problem with given class_path|Parser key \")")


def condense_parser_error(message: str) -> str:
    """jsonargparse's nested Union report -> 'key.path: the innermost reasons' on one line (the whole message
    when its shape is not recognised)."""
    message = re.sub(r"^Call to compute_fn of link '[^']*' with args \(.*?\) failed: ", "", message)
    lines = [ln for ln in message.splitlines() if ln.strip()]
    if len(lines) <= 1:
        return message
    keys = re.findall(r'Parser key "([^"]+)"', message)
    leaves = []
    for ln in lines:
        text = ln.strip().removeprefix("- ").strip()
        text = re.sub(r'\s*Parser key "[^"]+":$', "", text)
        if text and not _NOISE.match(text) and not text.endswith(":"):
            leaves.append((len(ln) - len(ln.lstrip()), text))
    if not leaves:
        return message
    deepest = max(depth for depth, _ in leaves)
    reasons = list(dict.fromkeys(text for depth, text in leaves if depth == deepest))
    return f"{'.'.join(keys) + ': ' if keys else ''}{'; '.join(reasons)}"


_READABLE = [
    (re.compile(r"Expected a <class '(\w+)'>\. Got value: (.*)"), r"expected \1, got \2"),
    (re.compile(r"Expected a typing\.Literal\[(.*)\]\. Got value: (.*)"), r"expected one of \1, got \2"),
    (re.compile(r"Expected a <class '(\w+)'>"), r"expected \1"),  # a Union member's reason: the value comes apart
    (re.compile(r"Option '([^']+)' is not accepted"), r"unknown key '\1'"),
    (re.compile(r"Unexpected keys?: \{(.*)\}"), r"unknown key(s) \1"),
    (re.compile(r"Missing required keys?: \{(.*?)\}(\. Got value: .*)?$"), r"missing required key(s) \1"),
    (re.compile(r"; expected "), r" or "),  # every member of a Union refused the value
]


def _inner_key(message: str, report: str) -> str:
    """'model.autoencoder: expected ..., got fp16' -> 'model.autoencoder.dtype: ...' when the report shows the
    mapping that was given and one key of it holds that value (jsonargparse names only the mapping)."""
    found = re.match(r"([\w.]+): (expected .*, got (.*))$", message)
    if not found:
        return message
    keys = set()
    for text in re.findall(r"Given value: (\{.*\})$", report, re.MULTILINE):
        try:
            given = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            continue
        keys |= {k for k, v in given.items() if str(v) == found[3]} if isinstance(given, dict) else set()
    return f"{found[1]}.{keys.pop()}: {found[2]}" if len(keys) == 1 else message


def readable_parser_error(message: str) -> str:
    """condense_parser_error, in the words of a config's reader: 'model.loss.lpips_weight: expected float, got
    abc', 'data.views: unknown key 'global_sise''."""
    # a Union's report keeps the value apart from the reason
    given = re.search(r"(?:Got value|Given value): (.*?)(?:\. Got value: .*)?$", message, re.MULTILINE)
    report, message = message, condense_parser_error(message)
    for pattern, replacement in _READABLE:
        message = pattern.sub(replacement, message)
    if given and "expected " in message and ", got " not in message:
        message += f", got {given[1].strip()}"
    return _inner_key(" ".join(message.split()), report)  # never more than one line


def raised_on_purpose(exc: BaseException) -> bool:
    """Whether a `raise` statement of the project's own code raised exc. A bug (a failed lookup, a shape error
    inside torch) is raised by other lines or other packages and keeps its traceback."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is None or not tb.tb_frame.f_code.co_filename.startswith(PACKAGE_DIR):
        return False
    return linecache.getline(tb.tb_frame.f_code.co_filename, tb.tb_lineno).lstrip().startswith("raise")


def project_error(exc: BaseException) -> BaseException | None:
    """The error the project raised on purpose behind exc (jsonargparse wraps what a constructor raises while it
    instantiates the config's classes in its own error), or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, Exception) and raised_on_purpose(exc):
            return exc
        exc = exc.__cause__
    return None


def _fail(command: str, exc: BaseException | str) -> None:
    message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)  # KeyError's str() adds quotes
    message = " ".join(str(message).splitlines())  # a message is one line on the terminal, whoever wrote it
    print(f"tcae-ldm {command}: error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(1)


# ----------------------------------------------------------------------------------------------- LightningCLI
def cache_latent_shape(cache_dir: str) -> list[int]:
    """(c, h, w) of the latents in a cache folder (its metadata.json)."""
    from tcae_ldm.latents.cache import read_metadata

    return list(read_metadata(cache_dir)["latent_shape"])


def cache_num_classes(cache_dir: str) -> int:
    """The number of classes of a cache's labels."""
    from tcae_ldm.latents.cache import read_metadata

    return int(read_metadata(cache_dir)["num_classes"])


@functools.cache
def cli_class():
    """The project's LightningCLI subclass. Built on first use, so that the project's commands and
    `tcae-ldm --help` do not import Lightning."""
    import lightning as L
    from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

    class Parser(LightningArgumentParser):
        """Short usage and one-line reasons on a parse error; the full list is behind --help."""

        def print_usage(self, file=None):
            prog = self.prog.replace(" [options]", "")
            print(f"usage: {prog} [--config FILE] [--print_config] [--<key> VALUE ...]", file=file or sys.stderr)

        def error(self, message, ex=None):
            # One line on the user's terminal (no usage, no tip); TCAE_LDM_DEBUG=1: jsonargparse's whole report.
            if self.exit_on_error and not os.environ.get(DEBUG_ENV):
                prog = self.prog.replace(" [options]", "")
                print(f"{prog}: error: {readable_parser_error(message)}", file=sys.stderr, flush=True)
                raise SystemExit(2)
            super().error(message, ex)

    class ResumeNotice(L.Callback):
        """`--ckpt_path last` with no checkpoint starts from scratch (Lightning allows it, so that a requeued job
        can always pass it); this says so in one line, naming the folders that were searched."""

        def on_fit_start(self, trainer, pl_module):
            if trainer.ckpt_path is None and trainer.is_global_zero:
                dirs = sorted({str(cb.dirpath) for cb in trainer.checkpoint_callbacks if getattr(cb, "dirpath", None)})
                print(f"tcae-ldm fit: --ckpt_path last found no checkpoint (searched: {', '.join(dirs) or 'none'}); "
                      f"training starts from step 0", file=sys.stderr, flush=True)

    class CLI(LightningCLI):
        """LightningCLI in subclass mode (configs name the module and datamodule by class_path) whose derived
        values are linked from the datamodule instead of repeated in configs."""

        def add_arguments_to_parser(self, parser):
            # A link whose source or target the chosen classes lack is skipped, so one set serves every config.
            # (Links applied on instantiation are not: they pass the value to any class.)
            parser.link_arguments("data.init_args.image_size", "model.init_args.image_size")  # the autoencoder's
            parser.link_arguments("data.init_args.cache_dir", "model.init_args.latent_shape", cache_latent_shape)
            parser.link_arguments("data.init_args.cache_dir", "model.init_args.num_classes", cache_num_classes)
            parser.add_argument("--overwrite_run", type=bool, default=False,
                                help="fit without --ckpt_path: start over in a run folder that holds checkpoints")

        def _parse_ckpt_path(self) -> None:
            # `--ckpt_path FILE` is checked first: a damaged file is named with what to resume from, and a checkpoint
            # of the other module kind is refused before anything is built or written
            from tcae_ldm.lit.checkpoint_config import check_checkpoint_for_config
            from tcae_ldm.utils.checkpoints import check_checkpoint_file

            command = self.config.get("subcommand") or ""
            config = self.config.get(command, {})
            path = config.get("ckpt_path")
            if path and os.path.isfile(path):
                check_checkpoint_file(path)
                model = config.get("model") or {}
                check_checkpoint_for_config(path, model.get("class_path"), model.get("init_args"), command)
            # Lightning's version would replace the model's config by the checkpoint's hyper-parameters, dropping
            # --model.* values: the config decides with a file as with `last` (tcae_ldm.lit.checkpoint_config)

        def _run_subcommand(self, subcommand: str) -> None:
            from tcae_ldm.lit.runlock import claim_run_folder

            config = self.config_init[subcommand]
            lock = claim_run_folder(self.trainer, subcommand, config.get("ckpt_path"), config.get("overwrite_run"))
            try:
                super()._run_subcommand(subcommand)
            finally:
                if lock is not None:
                    lock.release()

        def _set_seed(self) -> None:
            # A value of the wrong type in net_args / dit_args / objective_args, a GPU config without a GPU, or a
            # trainer option the module cannot honour: refused here, the first step after parsing, so that its one
            # line is all the run prints (seeding logs a line) and nothing is built.
            from tcae_ldm.lit.config_checks import check_keyword_args, check_trainer_config, named_class

            config = self.config.get(self.subcommand) if self.subcommand else self.config
            check_keyword_args(config.get("model"), "model")
            check_trainer_config(config.get("trainer") or {}, named_class(config.get("model")))
            super()._set_seed()

        def before_fit(self):
            if self.config_init[self.subcommand].get("ckpt_path") == "last":
                self.trainer.callbacks.append(ResumeNotice())

    return CLI, Parser


def lightning_main(args: list[str] | None = None, run: bool = True):
    """LightningCLI in subclass mode: configs name the module and datamodule by class_path."""
    cli, parser = cli_class()
    import lightning as L

    from tcae_ldm.utils.files import load_config_file

    for path in config_files(sys.argv[1:] if args is None else list(args)):
        load_config_file(path)  # a syntax error or an empty file names the file; jsonargparse would not
    with warnings.catch_warnings():
        # ResumeNotice says it in one line; Lightning's warning would repeat it among its other warnings
        warnings.filterwarnings("ignore", message=r'.*ckpt_path="last"\) is set, but there is no last checkpoint')
        return cli(L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
                   save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False, args=args, run=run,
                   parser_class=parser, parser_kwargs={"prog": "tcae-ldm"})


def main(argv: list[str] | None = None) -> None:
    """Run a command; errors propagate (see run() for the command line's one-line errors)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(overview())
        return
    if args[0] in ("-V", "--version"):
        print(f"tcae-ldm {version()}")
        return
    command = args[0]
    if command not in COMMANDS and command not in LIGHTNING_COMMANDS and not command.startswith("-"):
        close = closest_commands(command)
        hint = f"; did you mean {' or '.join(close)}?" if close else ""
        print(f"tcae-ldm: unknown command {command!r}{hint} (tcae-ldm --help lists the commands)", file=sys.stderr)
        raise SystemExit(2)
    if command in COMMANDS:
        importlib.import_module(f"tcae_ldm.commands.{COMMANDS[command][0]}").main(args[1:])
    else:
        lightning_main(None if argv is None else args)  # None: LightningCLI reads sys.argv itself


def run(argv: list[str] | None = None) -> None:
    """The `tcae-ldm` executable: main(), with an error the project raised on purpose ending the command in one
    line that names it (exit status 1); any other error keeps its traceback. CPU denormals are flushed to zero
    (utils.precision.flush_denormals: several times faster CPU training)."""
    args = sys.argv[1:] if argv is None else list(argv)
    if args and not {"-h", "--help", "--version"} & set(args):  # help stays free of torch's import time
        from tcae_ldm.utils.precision import flush_denormals

        flush_denormals()
    try:
        main(argv)
    except Exception as e:
        debug = os.environ.get(DEBUG_ENV)
        cause = None if debug else project_error(e)
        if cause is None and not debug:
            from tcae_ldm.lit.guards import write_failure_message  # a full disk or a read-only folder mid-run

            cause = write_failure_message(e)
        if cause is None:
            raise
        args = sys.argv[1:] if argv is None else list(argv)
        _fail(args[0] if args else "", cause)


if __name__ == "__main__":
    run()
