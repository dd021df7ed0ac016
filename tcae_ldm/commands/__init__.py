"""The project's commands beyond LightningCLI's fit / validate / test / predict: one module per command, named
as the command (`tcae-ldm fid-stats` -> fid_stats.py), each with main(argv)."""
