"""The gFID callback logs at the right steps, under the names `tcae-ldm compare` reads."""
import csv
from types import SimpleNamespace

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger

from tcae_ldm.lit import generation
from tcae_ldm.lit.generation import GenerationEvalCallback
from tcae_ldm.lit.progress import ProgressLine
from tcae_ldm.metrics.features import RandomFeatures
from tcae_ldm.metrics.fid import FrechetStats, save_stats


class TinyGenerator(L.LightningModule):
    """Stands in for DiffusionModule: trains a scalar, samples images whose brightness it sets."""

    num_classes = 4

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(()))
        self.images_seen, self.compute_gmacs = 0, 0.0
        self.sampled_seeds = []

    def training_step(self, batch, batch_idx):
        self.images_seen += batch[0].shape[0]
        self.compute_gmacs += 1.5 * batch[0].shape[0]  # as DiffusionModule counts its training compute
        return (self.w - 1).square()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)

    def train_dataloader(self):
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(8, 1)), batch_size=2)

    def sample(self, labels, seed, steps=None, sampler=None, cfg_scale=1.0):
        self.sampled_seeds.append(seed)
        g = torch.Generator().manual_seed(seed)
        return (torch.rand(len(labels), 3, 16, 16, generator=g) * 2 - 1) * self.w.detach().clamp(0, 1)


def test_gfid_is_logged_every_k_steps_with_named_columns(tmp_path):
    # reference statistics of "real" images: uniform noise in [-1, 1]
    extractor = RandomFeatures()  # what the callback builds for features="random"
    stats = FrechetStats(extractor.dim)
    stats.update(extractor(torch.rand(64, 3, 16, 16) * 2 - 1))
    mu, sigma = stats.mean_cov()
    save_stats(str(tmp_path / "ref.npz"), mu, sigma, features="random", count=64)

    module = TinyGenerator()
    cb = GenerationEvalCallback(str(tmp_path / "ref.npz"), every_n_steps=3, num_samples=10, features="random",
                                batch_size=4, seed=100)
    logger = CSVLogger(str(tmp_path), name="run", version="")
    L.Trainer(max_steps=7, logger=logger, callbacks=[cb], enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False).fit(module)

    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("gen/gfid_random")]
    assert [int(r["step"]) for r in rows] == [3, 6, 7]  # every 3 steps, then at the end of training
    assert [float(r["gen/images_seen"]) for r in rows] == [6.0, 12.0, 14.0]
    assert all(float(r["gen/num_samples"]) == 10 for r in rows)
    assert [float(r["gen/compute_gmacs"]) for r in rows] == [9.0, 18.0, 21.0]  # the module's total at each point
    walls = [float(r["gen/wall_time_s"]) for r in rows]
    assert walls == sorted(walls) and walls[0] > 0
    fids = [float(r["gen/gfid_random"]) for r in rows]
    assert fids[-1] < fids[0]  # samples approach the reference as w -> 1
    # the same 3 chunk seeds at every evaluation: only the weights change between evaluations
    assert module.sampled_seeds == [100, 101, 102] * 3


def test_wall_time_counts_training_steps_and_excludes_evaluation(tmp_path, monkeypatch):
    """On a clock that a training step moves by 1 s and every sampled chunk by 100 s, gen/wall_time_s is exactly the
    training time: 3, 6 and 7 s at the evaluations of steps 3, 6 and the end."""
    clock = [0.0]
    monkeypatch.setattr(generation, "time", SimpleNamespace(perf_counter=lambda: clock[0]))
    extractor = RandomFeatures()
    stats = FrechetStats(extractor.dim)
    stats.update(extractor(torch.rand(16, 3, 16, 16) * 2 - 1))
    save_stats(str(tmp_path / "ref.npz"), *stats.mean_cov(), features="random", count=16)

    class SlowToEvaluate(TinyGenerator):
        def training_step(self, batch, batch_idx):
            clock[0] += 1.0
            return super().training_step(batch, batch_idx)

        def sample(self, labels, seed, steps=None, sampler=None, cfg_scale=1.0):
            clock[0] += 100.0
            return super().sample(labels, seed, steps, sampler, cfg_scale)

    cb = GenerationEvalCallback(str(tmp_path / "ref.npz"), every_n_steps=3, num_samples=4, features="random",
                                batch_size=2)
    L.Trainer(max_steps=7, logger=CSVLogger(str(tmp_path), name="run", version=""), callbacks=[cb],
              enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False).fit(SlowToEvaluate())
    with open(tmp_path / "run" / "metrics.csv") as f:
        rows = [r for r in csv.DictReader(f) if r.get("gen/gfid_random")]
    assert [float(r["gen/wall_time_s"]) for r in rows] == [3.0, 6.0, 7.0]
    assert clock[0] == 7 + 3 * 2 * 100  # the evaluations did take (fake) time: 2 chunks each


def test_labels_are_balanced_and_fixed():
    cb = GenerationEvalCallback("unused.npz", num_samples=10)
    assert cb._labels(4).tolist() == [0, 1, 2, 3, 0, 1, 2, 3, 0, 1]
    assert np.array_equal(cb._labels(4), cb._labels(4))



def test_sampling_shows_a_progress_bar_when_the_trainer_does(tmp_path, capsys):
    extractor = RandomFeatures()
    stats = FrechetStats(extractor.dim)
    stats.update(extractor(torch.rand(16, 3, 16, 16) * 2 - 1))
    save_stats(str(tmp_path / "ref.npz"), *stats.mean_cov(), features="random", count=16)
    for bar, line in ((False, False), (True, False), (True, True)):  # a ProgressLine (log-file lines): no tqdm bar
        cb = GenerationEvalCallback(str(tmp_path / "ref.npz"), every_n_steps=2, num_samples=8, features="random",
                                    batch_size=4, eval_at_end=False)
        L.Trainer(max_steps=2, logger=False, callbacks=[cb, *([ProgressLine()] if line else [])],
                  enable_checkpointing=False, enable_progress_bar=bar,
                  enable_model_summary=False).fit(TinyGenerator())
        assert ("gFID-8 samples" in capsys.readouterr().err) == (bar and not line)
