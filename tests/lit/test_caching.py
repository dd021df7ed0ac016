"""Latent caching under DDP: two processes write every index exactly once."""
import glob
import os
import subprocess
import sys

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import DataLoader, DistributedSampler

from tcae_ldm.data.images import ImageFolderDataModule, collate_skipping
from tcae_ldm.latents.cache import (
    CacheSourceDataModule,
    LatentCacheWriter,
    read_metadata,
    read_stats,
)
from tcae_ldm.lit.caching import LatentCacheModule, cache_latents
from tests.tiny import REPO, isolated_env, tiny_tcae_checkpoint


def load_shards(cache_dir):
    shards = [load_file(p) for p in sorted(glob.glob(os.path.join(cache_dir, "shard-*.safetensors")))]
    return {k: torch.cat([s[k] for s in shards]) for k in shards[0]}


class PaddingSource(CacheSourceDataModule):
    """Images through torch's DistributedSampler, which pads 13 images to 14 by repeating index 0."""

    def predict_dataloader(self):
        sampler = DistributedSampler(self.dataset, self.trainer.world_size, self.trainer.global_rank, shuffle=False)
        return DataLoader(self.dataset, batch_size=self.batch_size, sampler=sampler, collate_fn=collate_skipping)


def encode_with_two_processes(root: str, padding: str) -> None:
    """Cache root/images with two gloo ranks into root/latents (run in a fresh process: see the test)."""
    images = ImageFolderDataModule(os.path.join(root, "images"), image_size=32, num_workers=0)
    out, spec = os.path.join(root, "latents"), {"kind": "tcae", "path": os.path.join(root, "ae.ckpt")}
    # ddp_fork: the same DDP code path as `ddp` (gloo on CPU) without re-importing torch in every rank.
    if padding == "1":
        trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp_fork", logger=False,
                            callbacks=[LatentCacheWriter(out, shard_size=4)], enable_progress_bar=False)
        trainer.predict(LatentCacheModule(spec), PaddingSource(images, batch_size=3), return_predictions=False)
    else:
        cache_latents(spec, images, out, batch_size=3, shard_size=4, accelerator="cpu", devices=2,
                      strategy="ddp_fork")


@pytest.mark.slow
@pytest.mark.parametrize("padding", [False, True])
def test_ddp_two_processes_write_every_index_once(tmp_path, padding):
    rng = np.random.default_rng(0)
    for split, count in (("train", 13), ("val", 2)):  # 13: the ranks get 7 and 6 images
        for i in range(count):
            os.makedirs(tmp_path / "images" / split / f"class{i % 2}", exist_ok=True)
            Image.fromarray(rng.integers(0, 255, (40, 36, 3), dtype=np.uint8)).save(
                tmp_path / "images" / split / f"class{i % 2}" / f"{i:02d}.png")
    tiny_tcae_checkpoint(tmp_path / "ae.ckpt")
    out = tmp_path / "latents"
    # In a fresh interpreter with a pinned environment: forked ranks of a process whose OpenMP pool the caller's
    # OMP_NUM_THREADS sized can deadlock, so the test must not depend on it (nor on this process's state).
    code = "import sys; from tests.lit.test_caching import encode_with_two_processes as f; f(*sys.argv[1:])"
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path), "1" if padding else "0"], cwd=REPO,
                         env=isolated_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    data = load_shards(out)
    assert sorted(data["indices"].tolist()) == list(range(13))
    names = {os.path.basename(p) for p in glob.glob(str(out / "shard-*"))}
    assert {n[:8] for n in names} == {"shard-r0", "shard-r1"}
    meta = read_metadata(out)
    assert meta["count"] == 13 and sorted(meta["shards"]) == sorted(names) and meta["num_classes"] == 2
    both = torch.cat([data["latents"], data["latents_flip"]]).double()
    stats = dict(zip(("mean", "std"), read_stats(out)))
    torch.testing.assert_close(stats["mean"], both.mean(dim=(0, 2, 3)).float())
    torch.testing.assert_close(stats["std"], both.std(dim=(0, 2, 3), unbiased=False).float())

