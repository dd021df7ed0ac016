"""`tcae-ldm fid`: an ADM-style .npz and an image folder of the same images score alike."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from tcae_ldm.metrics.features import (
    build_feature_extractor,
)
from tcae_ldm.metrics.fid import (
    FrechetStats,
    frechet_distance,
)


def images(seed, n=48, shift=0.0):
    """Flat random colours plus noise: images whose pooled features differ from image to image."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.rand(n, 3, 1, 1, generator=g) - 0.5
    return (colour + 0.3 * torch.randn(n, 3, 16, 16, generator=g) + shift).clamp(-1, 1)


def test_fid_command_scores_an_adm_npz_and_a_folder_alike(tmp_path, capsys):
    from tcae_ldm.commands.fid import main as fid_main

    arr = ((images(3, n=40) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    np.savez(tmp_path / "samples.npz", arr_0=arr)
    os.makedirs(tmp_path / "pngs")
    for i, a in enumerate(arr):
        Image.fromarray(a).save(tmp_path / "pngs" / f"{i:03d}.png")
    ext = build_feature_extractor("random")            # what --features random builds
    ref = FrechetStats(ext.dim)
    ref.update(ext(images(4, n=40)))
    ref.save(str(tmp_path / "ref.npz"), features="random")
    f = ext(torch.from_numpy(arr).permute(0, 3, 1, 2)).double().numpy()
    expected = frechet_distance(f.mean(0), np.cov(f, rowvar=False), *ref.mean_cov())
    out = fid_main([str(tmp_path / "samples.npz"), "--ref", str(tmp_path / "ref.npz"), "--features", "random",
                    "--batch-size", "16", "--out", str(tmp_path / "fid.json")])
    assert out["gfid_random"] == pytest.approx(expected, rel=1e-6) and out["num_samples"] == 40
    assert "gfid_random = " in capsys.readouterr().out
    folder = fid_main([str(tmp_path / "pngs"), "--ref", str(tmp_path / "ref.npz"), "--features", "random"])
    assert folder["gfid_random"] == pytest.approx(expected, rel=1e-6)
    np.savez(tmp_path / "bad.npz", images=arr)
    with pytest.raises(SystemExit):
        fid_main([str(tmp_path / "bad.npz"), "--ref", str(tmp_path / "ref.npz"), "--features", "random"])
    assert "has no 'arr_0' array" in capsys.readouterr().err

