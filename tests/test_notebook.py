"""notebooks/walkthrough.ipynb runs top to bottom on a tiny run folder laid out as `make demo` lays it out."""
import os

import nbformat
import pytest
from nbclient import NotebookClient

from tcae_ldm.cli import lightning_main
from tcae_ldm.commands.fid_stats import main as fid_stats_main
from tcae_ldm.data.demo import DemoPhotosDataModule
from tcae_ldm.lit.caching import cache_latents
from tests.tiny import REPO, TINY, callbacks_arg

NOTEBOOK = os.path.join(REPO, "notebooks", "walkthrough.ipynb")


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
    """runs/demo with a 2-step TC-AE-T, its latent cache and a 4-step DiT whose gFID proxy is logged at steps 2, 4."""
    root = tmp_path_factory.mktemp("nb")
    runs = root / "runs" / "demo"
    lightning_main(["fit", "--config", os.path.join(REPO, "configs/demo/tcae.yaml"), *TINY,
                    "--model.init_args.max_steps=2",
                    "--trainer.check_val_every_n_epoch=1", f"--trainer.logger.init_args.save_dir={runs}",
                    f"--trainer.callbacks.init_args.dirpath={runs}/tcae/checkpoints"])
    images = DemoPhotosDataModule(image_size=32, train_per_class=2, val_per_class=1)
    cache = cache_latents({"kind": "tcae", "path": str(runs / "tcae/checkpoints/last.ckpt")}, images,
                          str(runs / "latents_tcae"), accelerator="cpu")
    stats = str(root / "ref.npz")
    fid_stats_main(["--demo", "--image-size", "32", "--features", "random", "--out", stats])
    gen_eval = {"reference_stats": stats, "features": "random", "every_n_steps": 2, "num_samples": 16,
                "batch_size": 8, "sample_steps": 2}
    old = os.getcwd()
    os.chdir(root)  # the demo config writes to runs/demo/dit_tcae
    try:
        lightning_main(["fit", "--config", os.path.join(REPO, "configs/demo/dit_on_tcae.yaml"),
                        f"--data.cache_dir={cache}", "--data.expect_image_size=32",
                        "--data.expect_autoencoder.name=TC-AE-T/p4-c16", "--data.global_batch_size=8",
                        f"--data.expect_autoencoder.path={runs}/tcae/checkpoints/last.ckpt",
                        "--model.dit=DiT-T/1", "--model.sample_steps=2", "--model.sample_every_n_steps=0",
                        callbacks_arg(2, gen_eval), "--trainer.log_every_n_steps=1", "--trainer.max_steps=4"])
    finally:
        os.chdir(old)
    return runs


@pytest.mark.slow
def test_walkthrough_notebook_runs_top_to_bottom(demo_runs, monkeypatch):
    monkeypatch.setenv("TCAE_LDM_RUNS", str(demo_runs))
    monkeypatch.setenv("TCAE_LDM_NOTEBOOK_SMALL", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": REPO}}).execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "mean PSNR: TC-AE" in text
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) >= 4                                # reconstructions, spectrum, samples, convergence
    tables = "".join(o["data"].get("text/markdown", "") for o in outputs if o.output_type == "display_data")
    assert "effective rank" in tables and "gfid_random" in tables
    assert (demo_runs / "compare_notebook" / "comparison.csv").exists()


def test_the_notebook_is_shipped_with_the_outputs_of_a_tiny_run():
    """Opened on GitHub or in Jupyter it shows a run (this test's tiny one), in a small file: every code cell has
    outputs, none is an error, and the images are small."""
    nb = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code and all(cell.outputs for cell in code)
    outputs = [o for cell in code for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= 4
    assert os.path.getsize(NOTEBOOK) < 400_000
