"""LatentDiagnosticsCallback: diagnostics logged on its step schedule."""
import math

import torch

from tcae_ldm.lit.callbacks import LatentDiagnosticsCallback
from tests.tiny import tiny_data, tiny_module, tiny_trainer


def test_callback_logs_diagnostics_under_the_step_schedule(tmp_path):
    torch.manual_seed(0)
    cb = LatentDiagnosticsCallback(every_n_steps=2, max_images=8, batch_size=8)
    runs = []
    real = cb.on_validation_epoch_end

    def spy(trainer, pl_module):
        before = cb.last_step
        real(trainer, pl_module)
        runs.append((pl_module.step_count, cb.last_step != before))

    cb.on_validation_epoch_end = spy
    trainer = tiny_trainer(str(tmp_path), check_val_every_n_epoch=1, callbacks=[cb])
    trainer.fit(tiny_module(max_steps=3), tiny_data())
    assert runs == [(1, True), (2, False), (3, True)]
    metrics = trainer.callback_metrics
    assert {"diag/probe_tokens", "diag/probe_latent", "diag/effective_rank"} <= set(metrics)
    assert 1.0 <= float(metrics["diag/effective_rank"]) <= 16.0
    assert cb.state_dict() == {"last_step": 3}
    assert not math.isnan(float(metrics["diag/probe_latent"]))

