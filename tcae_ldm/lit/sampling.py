"""`tcae-ldm sample` as Lightning predict, on every GPU of every node the trainer is given.

The N samples are cut into chunks of consecutive indices. Chunk i is drawn with noise seed (seed + i) on the
rank that Lightning's unrepeated distributed sampler hands it, so every index is drawn and written exactly once
and an image depends on (checkpoint, seed, batch size, index), not on the number of GPUs. The module's
predict_step (DiffusionModule) samples and decodes a chunk; SampleWriter writes it:

    <out>/images/000000.png ...   one PNG per index, written by the rank that drew it
    <out>/samples_NxHxWx3.npz     ADM's layout (arr_0: uint8 (N, H, W, 3), arr_1: labels (N,), also as `labels`),
                                  assembled by rank 0 from the PNGs once every rank is done, as DiT's sample_ddp.py does
    <out>/grid.png                the first samples at a glance (`tcae-ldm fid` skips it when given <out>)
"""
from __future__ import annotations

import math
import os

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision.utils import make_grid, save_image

from tcae_ldm.utils.npz import NpzStreamWriter
from tcae_ldm.utils.progress import progress

GRID_FILE, IMAGES_DIR = "grid.png", "images"


def balanced_labels(num: int, num_classes: int) -> torch.Tensor:
    """0, 1, ..., K-1, 0, 1, ...: every class equally often (up to one), the same for every seed."""
    return torch.arange(num) % num_classes


def sample_labels(spec: str, num: int, num_classes: int, seed: int) -> torch.Tensor:
    """Labels (num,) of the samples: 'balanced' (balanced_labels, what the gFID callback uses), 'uniform' (drawn
    uniformly from the seed, as DiT's sample_ddp.py does) or comma-separated class indices, cycled."""
    if spec == "balanced":
        return balanced_labels(num, num_classes)
    if spec == "uniform":
        return torch.randint(num_classes, (num,), generator=torch.Generator().manual_seed(seed))
    try:
        given = [int(v) for v in spec.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"--labels must be 'balanced', 'uniform' or comma-separated class indices, got {spec!r}") from None
    bad = [v for v in given if not 0 <= v < num_classes]
    if not given or bad:
        raise ValueError(f"--labels {spec!r}: class indices must lie in [0, {num_classes}), got {bad or 'none'}")
    return torch.tensor(given, dtype=torch.long).repeat(math.ceil(num / len(given)))[:num]


class SampleChunks(Dataset):
    """Item i: the indices, labels and noise seed of chunk i (batch_size consecutive samples)."""

    def __init__(self, labels: torch.Tensor, batch_size: int, seed: int):
        self.labels, self.batch_size, self.seed = labels, batch_size, seed

    def __len__(self) -> int:
        return math.ceil(len(self.labels) / self.batch_size)

    def __getitem__(self, i: int) -> dict:
        index = torch.arange(i * self.batch_size, min((i + 1) * self.batch_size, len(self.labels)))
        return {"index": index, "label": self.labels[index], "seed": self.seed + i}


def _one_chunk(items: list[dict]) -> dict:
    return items[0]  # the loader's batch size is 1 chunk: unwrap it


class SampleDataModule(L.LightningDataModule):
    """The chunks to draw; under DDP Lightning gives each chunk to one rank."""

    def __init__(self, labels: torch.Tensor, batch_size: int = 64, seed: int = 0):
        super().__init__()
        self.chunks = SampleChunks(labels, batch_size, seed)

    def predict_dataloader(self):
        return DataLoader(self.chunks, batch_size=1, shuffle=False, collate_fn=_one_chunk)


class SampleWriter(BasePredictionWriter):
    """PNGs per index as chunks arrive; the ADM .npz and the grid on rank 0 at the end."""

    def __init__(self, out_dir: str, labels: torch.Tensor, grid_size: int = 64):
        super().__init__(write_interval="batch")
        self.out_dir, self.labels, self.grid_size = out_dir, labels, grid_size
        self.digits = max(6, len(str(len(labels) - 1)))
        self.npz_path: str | None = None

    def image_path(self, index: int) -> str:
        return os.path.join(self.out_dir, IMAGES_DIR, f"{index:0{self.digits}d}.png")

    def setup(self, trainer, pl_module, stage):
        os.makedirs(os.path.join(self.out_dir, IMAGES_DIR), exist_ok=True)

    def write_on_batch_end(self, trainer, pl_module, prediction, batch_indices, batch, batch_idx, dataloader_idx=0):
        for index, image in zip(prediction["index"].tolist(), prediction["images"].numpy()):
            Image.fromarray(image).save(self.image_path(index))

    def on_predict_end(self, trainer, pl_module):
        trainer.strategy.barrier()  # every rank's PNGs are on disk
        if trainer.is_global_zero:
            self.npz_path = self.assemble()
        trainer.strategy.barrier()

    def assemble(self) -> str:
        """The ADM .npz from the PNGs in index order (PNG is lossless: the same bytes), streamed into the archive
        one image at a time (50000 images of 512x512 would need 39 GB at once), and the grid."""
        n = len(self.labels)
        first = np.asarray(Image.open(self.image_path(0)))
        h, w, _ = first.shape
        path = os.path.join(self.out_dir, f"samples_{n}x{h}x{w}x3.npz")
        shown = []
        with NpzStreamWriter(path) as npz:
            npz.begin("arr_0", (n, h, w, 3))
            for i in progress(range(n), "writing the .npz", unit="images"):
                image = first if i == 0 else np.asarray(Image.open(self.image_path(i)))
                if image.shape != first.shape:
                    raise ValueError(f"{self.image_path(i)} is {image.shape}, sample 0 is {first.shape}")
                npz.write(image[None])
                if i < self.grid_size:
                    shown.append(torch.from_numpy(image.copy()))
            labels = self.labels.numpy()
            npz.add("arr_1", labels)  # where ADM's class-conditional batches keep the labels
            npz.add("labels", labels)  # the name earlier versions wrote
        grid = torch.stack(shown).permute(0, 3, 1, 2).float() / 255
        save_image(make_grid(grid, nrow=int(math.ceil(math.sqrt(len(grid))))), os.path.join(self.out_dir, GRID_FILE))
        return path
