"""Image grids reach every kind of logger (W&B-like, TensorBoard, CSV folders); gradient norms of every optimizer
are logged before clipping."""
import csv
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from PIL import Image

from tcae_ldm.lit.outputs import grad_norm, save_grid
from tests.tiny import tiny_data, tiny_module, tiny_trainer


class ImageLogger(Logger):
    """Stands in for WandbLogger (wandb is an optional extra): records log_image calls."""

    def __init__(self):
        super().__init__()
        self.images = []

    name, version = "fake", 0

    def log_image(self, key, images, step=None, **kwargs):
        self.images.append((key, images, step))

    def log_metrics(self, metrics, step=None):
        pass

    def log_hyperparams(self, params, *args, **kwargs):
        pass


def test_a_grid_goes_to_every_logger(tmp_path):
    csv_logger = CSVLogger(str(tmp_path), name="run", version="")
    other_csv = CSVLogger(str(tmp_path), name="other", version="")
    tb = TensorBoardLogger(str(tmp_path), name="run", version="")
    fake = ImageLogger()
    trainer = SimpleNamespace(logger=csv_logger, loggers=[csv_logger, tb, fake, other_csv], default_root_dir=None)
    images = torch.linspace(-1, 1, 4 * 3 * 8 * 8).view(4, 3, 8, 8)
    path = save_grid(trainer, images, "samples", 12, "samples", nrow=2)
    assert path == os.path.join(str(tmp_path), "run", "samples", "step0000012.png")
    png = np.asarray(Image.open(path))
    key, sent, step = fake.images[0]
    assert (key, step, len(sent)) == ("samples", 12, 1) and np.array_equal(sent[0], png)  # what the PNG holds
    assert os.path.exists(os.path.join(str(tmp_path), "other", "samples", "step0000012.png"))  # a second folder
    tb.experiment.flush()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(os.path.join(str(tmp_path), "run"), size_guidance={"images": 0})
    events.Reload()
    assert [e.step for e in events.Images("samples")] == [12]


@pytest.mark.parametrize("grad_clip", [1e-6, None])
def test_gradient_norms_of_every_group_are_logged_before_clipping(tmp_path, grad_clip):
    """Encoder, decoder (generator's optimizer) and critic: logged whether or not they are clipped, and before
    clipping (clipping to almost nothing leaves the logged norms far above it)."""
    torch.manual_seed(0)
    module = tiny_module(max_steps=2, grad_clip=grad_clip)
    logger = CSVLogger(str(tmp_path), name="run", version="")
    tiny_trainer(str(tmp_path), logger=logger, log_every_n_steps=1).fit(module, tiny_data())
    with open(os.path.join(str(tmp_path), "run", "metrics.csv")) as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/grad_norm/encoder")]
    assert len(rows) == 2
    for r in rows:
        for group in ("encoder", "decoder", "critic"):
            assert float(r[f"train/grad_norm/{group}"]) > 1e-3, group


def test_grad_norm_is_what_clip_grad_norm_measures():
    params = [torch.nn.Parameter(torch.randn(3, 4)), torch.nn.Parameter(torch.randn(5)), torch.nn.Parameter(torch.ones(2))]
    for p in params[:2]:
        p.grad = torch.randn_like(p)
    expected = torch.nn.utils.clip_grad_norm_(params, max_norm=float("inf"))
    assert torch.allclose(grad_norm(params), expected)
    assert grad_norm([params[2]]).item() == 0.0
