"""The `tcae-ldm` command: LightningCLI's fit / validate / test / predict, plus the project's own commands.

    tcae-ldm fit --config configs/tcae.yaml          # any LightningCLI subcommand and flag
    tcae-ldm <command> --help                        # one of COMMANDS below
"""
from __future__ import annotations

import importlib
import os
import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI

from tcae_ldm.utils.checkpoints import check_checkpoint_file

# The project's commands: name -> module of tcae_ldm.commands whose main(argv) runs it (imported only when called).
COMMANDS = {
    "sample": "sample",                              # DiT checkpoint -> PNGs, grid, ADM-style .npz
    "fid-stats": "fid_stats",                        # reference FID statistics of an image folder / the demo data
    "fid": "fid",                                    # FID of a sample .npz / folder against reference statistics
    "diagnose": "diagnose",                          # linear probes and latent spectrum of an autoencoder
    "ae-report": "ae_report",                        # autoencoder vs bicubic baseline on validation images
    "compare": "compare",                            # convergence plot + table from several DiT runs
    "bench": "bench.main",                           # cost and throughput, TC-AE vs DC-AE, side by side
    "train-demo-classifier": "train_demo_classifier",  # the demo's offline FID network
}


class CheckedCkptCLI(LightningCLI):
    """LightningCLI whose `--ckpt_path FILE` is checked before Lightning reads its hyper-parameters (with a bare
    torch.load, whose error on a truncated file names neither the file nor what to resume from)."""

    def _parse_ckpt_path(self) -> None:
        path = self.config.get(self.config.get("subcommand") or "", {}).get("ckpt_path")
        if path and os.path.isfile(path):
            check_checkpoint_file(path)
        super()._parse_ckpt_path()


def lightning_main(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    """LightningCLI in subclass mode: configs name the module and datamodule by class_path."""
    return CheckedCkptCLI(
        L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False, args=args, run=run)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in COMMANDS:
        importlib.import_module(f"tcae_ldm.commands.{COMMANDS[args[0]]}").main(args[1:])
        return
    lightning_main(argv)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
