"""A folder of latents in LightningDiT's or fast-DiT's own layout is named for what it is, with what to do."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tcae_ldm.latents.stream import LatentDataModule


def _lightningdit(folder):
    folder.mkdir()
    z = torch.randn(4, 4, 2, 2)
    for i in range(2):
        save_file({"latents": z, "latents_flip": z.flip(-1), "labels": torch.arange(4)},
                  folder / f"latents_rank00_shard{i:03d}.safetensors")
    torch.save({"mean": torch.zeros(1, 4, 1, 1), "std": torch.ones(1, 4, 1, 1)}, folder / "latents_stats.pt")
    return folder


def _fast_dit(root):
    for sub in ("imagenet256_features", "imagenet256_labels"):
        (root / sub).mkdir(parents=True)
    for i in range(3):
        np.save(root / "imagenet256_features" / f"{i}.npy", np.zeros((1, 4, 32, 32), np.float32))
        np.save(root / "imagenet256_labels" / f"{i}.npy", np.array([i]))
    return root


@pytest.mark.parametrize("layout,where,said", [
    ("lightningdit", "", "is in LightningDiT's own layout (2 latents_rank*_shard*.safetensors + latents_stats.pt, "
                         "no metadata.json)"),
    ("fast-dit", "", "is in fast-DiT's own layout (3 .npy files in imagenet256_features/ with labels in "
                     "imagenet256_labels/"),
    ("fast-dit", "imagenet256_features", "is in fast-DiT's own layout (3 .npy files in imagenet256_features/"),
])
def test_foreign_latent_folders_are_named_with_what_to_do(tmp_path, layout, where, said):
    root = _lightningdit(tmp_path / "lightningdit") if layout == "lightningdit" else _fast_dit(tmp_path / "fast")
    folder = root / where if where else root
    with pytest.raises(FileNotFoundError) as err:
        LatentDataModule(str(folder)).setup("fit")
    message = str(err.value)
    assert message.startswith(f"latent cache {folder} {said}") and "\n" not in message
    assert "does not exist or is empty" not in message
    assert "tcae-ldm predict --config configs/cache_latents_<autoencoder>.yaml" in message


def test_an_empty_folder_is_still_called_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist or is empty"):
        LatentDataModule(str(tmp_path)).setup("fit")
