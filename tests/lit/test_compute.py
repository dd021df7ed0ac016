"""Training compute: the meta-device count of a step against a real step counted on the CPU, and the cumulative
train/compute_gmacs of a run, phase by phase and across a resume."""
import csv

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

import tcae_ldm.losses.ssl as ssl_module
from tcae_ldm.lit.compute import AutoencoderStepCost
from tcae_ldm.losses.reconstruction import ReconstructionLossConfig
from tcae_ldm.losses.ssl import SSLConfig
from tcae_ldm.metrics.flops import count_call_gmacs
from tests.tiny import tiny_data, tiny_module, tiny_trainer

LOSS = ReconstructionLossConfig(lpips_weight=1.0, lpips_trunk="random", gan_weight=0.1, disc_start=2,
                                disc_channels=8, disc_layers=2)
SSL = SSLConfig(out_dim=64, patch_out_dim=64, hidden_dim=32, bottleneck_dim=16, mask_probability=0.5,
                mask_ratio=0.5, teacher_temp_warmup_steps=2)


def _real_step_gmacs(module, batch, step):
    """GMACs per image of the module's own forward + backward on real CPU tensors."""
    module.loss.load_lpips()

    def run():
        total, _, _ = module.training_losses(batch, step)
        total.backward()
    return count_call_gmacs(run) / batch["image"].shape[0]


@pytest.mark.parametrize("phase", ["joint", "decoder_finetune"])
def test_step_cost_counted_on_the_meta_device_equals_a_real_step(phase, monkeypatch):
    torch.manual_seed(0)
    ssl = SSL if phase == "joint" else None
    module = tiny_module(loss=LOSS, ssl=ssl, phase=phase)
    B = 3
    batch = {"image": torch.rand(B, 3, 32, 32) * 2 - 1, "global": torch.rand(B, 2, 3, 32, 32) * 2 - 1,
             "local": torch.rand(B, 2, 3, 16, 16) * 2 - 1}

    # The real step's masks: the expected number, 2 views x 4x4 coarse tokens x 0.5 x 0.5 = 8 tokens per image,
    # all in each image's first view (the count depends on how many tokens are masked, not on which).
    def masks(cfg, n, grid, step):
        m = torch.zeros(n, grid * grid, dtype=torch.bool)
        m[: n // 2, :8] = True
        return m.view(n, grid, grid)
    monkeypatch.setattr(ssl_module, "draw_masks", masks)
    cost = AutoencoderStepCost(module)
    # Left out of the count: the [CLS] loss's einsum over (2 teacher x 4 student views x 64 prototypes) per image,
    # forward and backward to the student (the MIM term is elementwise): 1e-6 of this tiny step.
    uncounted = 2 * 2 * 4 * 64 / 1e9 if ssl else 0.0
    for step in (0, 2):  # before and after disc_start: the critic's terms join the step
        assert cost(batch, step) + uncounted == pytest.approx(_real_step_gmacs(module, batch, step), rel=1e-12)
    assert cost.per_image[True] > cost.per_image[False]
    if phase == "decoder_finetune":  # the frozen encoder runs forward only: less than the joint reconstruction
        joint = AutoencoderStepCost(tiny_module(loss=LOSS))
        assert cost(batch, 2) < joint(batch, 2)


def _logged(path, column):
    with open(path, newline="") as f:
        return {int(r["step"]): float(r[column]) for r in csv.DictReader(f) if r.get(column)}


def test_runs_log_cumulative_compute_by_phase_and_continue_it_on_resume(tmp_path):
    loss = ReconstructionLossConfig(lpips_weight=0.0, gan_weight=0.1, disc_start=2, disc_channels=8, disc_layers=2)
    L.seed_everything(0)
    straight = tiny_module(loss=loss)
    tiny_trainer(str(tmp_path / "a"), logger=CSVLogger(str(tmp_path / "a"), name="", version=""),
                 log_every_n_steps=1).fit(straight, tiny_data())
    batch = {"image": torch.zeros(16, 3, 32, 32)}
    pre, gan = (_real_step_gmacs(tiny_module(loss=loss), batch, s) * 16 for s in (0, 2))
    logged = _logged(tmp_path / "a" / "metrics.csv", "train/compute_gmacs")
    # the logger's step is the trainer's, which counts both optimizers' steps once the critic trains
    assert list(logged.values()) == pytest.approx([pre, 2 * pre, 2 * pre + gan, 2 * pre + 2 * gan], rel=1e-12)
    assert straight.compute_gmacs == pytest.approx(2 * pre + 2 * gan, rel=1e-12)
    times = list(_logged(tmp_path / "a" / "metrics.csv", "train/wall_time_s").values())
    assert len(times) == 4 and times == sorted(times) and times[0] > 0

    L.seed_everything(0)
    tiny_trainer(str(tmp_path / "b"), max_epochs=2).fit(tiny_module(loss=loss), tiny_data())  # 2 of 4 steps
    assert torch.load(tmp_path / "b" / "ckpt" / "last.ckpt", weights_only=True)["compute"]["gmacs"] == \
        pytest.approx(2 * pre, rel=1e-12)
    resumed = tiny_module(loss=loss)
    tiny_trainer(str(tmp_path / "b")).fit(resumed, tiny_data(), ckpt_path="last")
    assert resumed.compute_gmacs == pytest.approx(straight.compute_gmacs, rel=1e-12)  # continued, not restarted
    assert resumed.train_seconds > 0
