"""The `tcae-ldm` command: LightningCLI's fit / validate / test / predict, plus the project's own commands."""
from __future__ import annotations

import lightning as L
from lightning.pytorch.cli import LightningCLI


class TCAELightningCLI(LightningCLI):
    """LightningCLI in subclass mode: configs name the module and datamodule by class_path."""


def lightning_main(args: list[str] | None = None) -> TCAELightningCLI:
    return TCAELightningCLI(
        L.LightningModule, L.LightningDataModule, subclass_mode_model=True, subclass_mode_data=True,
        save_config_kwargs={"overwrite": True}, auto_configure_optimizers=False, args=args)


def main(argv: list[str] | None = None) -> None:
    lightning_main(argv)


if __name__ == "__main__":
    main()
