"""The `tcae-ldm` command: LightningCLI's fit / validate / test / predict, plus the project's own commands.

    tcae-ldm fit --config configs/tcae.yaml          # any LightningCLI subcommand and flag
    tcae-ldm <command> --help                        # one of EXTRA_COMMANDS below
"""
from __future__ import annotations

import importlib
import sys

import lightning as L
from lightning.pytorch.cli import LightningCLI

# Commands beyond Lightning's: name -> module whose main(argv) runs it (imported only when called).
EXTRA_COMMANDS = {
    "sample": "tcae_ldm.sample",                  # DiT checkpoint -> PNGs, grid, ADM-style .npz
    "fid-stats": "tcae_ldm.metrics.fid_stats",    # reference FID statistics of an image folder / datamodule
    "fid": "tcae_ldm.metrics.fid_score",          # FID of a sample .npz / folder against reference statistics
    "diagnose": "tcae_ldm.metrics.diagnostics",   # linear probes and latent spectrum of an autoencoder
    "ae-report": "tcae_ldm.metrics.ae_report",    # autoencoder vs bicubic baseline on validation images
    "compare": "tcae_ldm.compare",                # convergence plot + table from several DiT runs
    "bench": "tcae_ldm.bench",                    # cost and throughput, TC-AE vs DC-AE, side by side
}


class TCAELightningCLI(LightningCLI):
    """LightningCLI in subclass mode: configs name the module and datamodule by class_path."""


def lightning_main(args: list[str] | None = None, run: bool = True) -> TCAELightningCLI:
    return TCAELightningCLI(
        L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False, args=args, run=run)


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] in EXTRA_COMMANDS:
        importlib.import_module(EXTRA_COMMANDS[args[0]]).main(args[1:])
        return
    lightning_main(argv)  # None: LightningCLI reads sys.argv itself


if __name__ == "__main__":
    main()
