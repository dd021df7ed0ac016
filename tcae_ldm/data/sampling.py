"""Which items a rank sees in which epoch, the generator each item draws its random choices from, and the training
loader's exact mid-epoch resume.

The sampler hands the dataset (epoch, index) keys; a dataset seeds a generator from (seed, epoch, index) and draws
every random choice of the item from it, so a worker, a rank or a resumed run draws the same.
"""
from __future__ import annotations

import torch
from torch.utils.data import DataLoader, DistributedSampler

from tcae_ldm.utils.seeding import seed_of


def key_of(key) -> tuple[int, int]:
    """(epoch, index) from a sampler key: EpochSampler's (epoch, index), or a plain index (epoch 0)."""
    return (int(key[0]), int(key[1])) if isinstance(key, tuple) else (0, int(key))


def item_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator every random choice of one item in one epoch is drawn from."""
    return torch.Generator().manual_seed(seed_of(seed, epoch, index))


class EpochSampler(DistributedSampler):
    """torch's DistributedSampler (the rank's share of a (seed, epoch) permutation) that yields (epoch, index)
    keys, so items draw their randomness from (seed, epoch, index), and that can begin an epoch at a batch."""

    def __init__(self, dataset, batch_size: int, **kwargs):
        super().__init__(dataset, **kwargs)
        self.batch_size, self.start_batch = batch_size, 0

    def __iter__(self):
        epoch, start = self.epoch, self.start_batch * self.batch_size
        self.start_batch = 0  # only the epoch being resumed starts late
        return iter([(epoch, i) for i in list(super().__iter__())[start:]])


class ResumableImageLoader(DataLoader):
    """The training loader; Lightning checkpoints its state_dict (the epoch and the batches the loop has taken
    from it), and load_state_dict makes the next iteration continue that epoch at the next batch."""

    consumed = 0

    def __iter__(self):
        self.consumed = self.sampler.start_batch
        return super().__iter__()

    def state_dict(self) -> dict:
        return {"epoch": self.sampler.epoch, "batches": self.consumed}

    def load_state_dict(self, state: dict) -> None:
        epoch, batches = int(state["epoch"]), int(state["batches"])
        if batches >= len(self):  # saved at the end of an epoch: the next one starts from its beginning
            epoch, batches = epoch + 1, 0
        # set here as well as by Lightning's set_epoch: worker processes may fetch before that call
        self.sampler.set_epoch(epoch)
        self.sampler.start_batch = self.consumed = batches
