"""`tcae-ldm ablation` on synthetic autoencoder and DiT run folders: values read from each source, n/a footnoted."""
import csv
import json

import pytest
import torch
import yaml

from tcae_ldm.commands.ablation import main
from tcae_ldm.metrics.flops import count_gmacs, count_params
from tcae_ldm.models.zoo import create_autoencoder
from tests.commands.test_compare import CURVE_FAST, write_run

NET, NET_ARGS = "TC-AE-T/p4-c16", {"image_size": 32, "latent_size": 2}


def ae_run(root, name, ssl, test=True, diagnose=True):
    run = root / name
    run.mkdir()
    config = {"model": {"init_args": {"net": NET, "net_args": NET_ARGS, "ssl": {"out_dim": 64} if ssl else None}},
              "data": {"init_args": {"image_size": 32}}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "metrics.csv").write_text("step,train/loss,train/compute_gmacs\n0,1.0,10.5\n1,0.9,21.0\n")
    if test:
        (run / "test").mkdir()
        (run / "test" / "metrics.csv").write_text(
            "step,test/psnr,test/ssim,test/lpips_vgg,test/rfid_inception,test/rfid_images\n"
            "2,25.5,0.75,0.125,1.5,50000\n")
    if diagnose:
        (run / "diagnostics").mkdir()
        (run / "diagnostics" / "diagnostics.json").write_text(json.dumps(
            {"probe_tokens": 0.5, "probe_latent": 0.25, "spectrum": {"effective_rank": 7.5}}))
    (run / "checkpoints").mkdir()
    return run


def test_the_table_reads_every_source_and_footnotes_what_is_missing(tmp_path, capsys):
    both = ae_run(tmp_path, "ae_both", ssl=True)
    bare = ae_run(tmp_path, "ae_none", ssl=False, test=False, diagnose=False)
    dit = write_run(tmp_path, "dit_both", CURVE_FAST, autoencoder=None)
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "metadata.json").write_text(json.dumps(
        {"autoencoder": {"kind": "tcae", "name": NET, "path": str(both / "checkpoints" / "last.ckpt")}}))
    config = yaml.safe_load((dit / "config.yaml").read_text())
    config["data"]["init_args"]["cache_dir"] = str(cache)
    (dit / "config.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "abl"
    main([str(both), str(bare), "--dit", str(dit), "--out", str(out)])
    with open(out / "ablation.csv", newline="") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    with torch.device("meta"):
        net = create_autoencoder(NET, **NET_ARGS)
    gmacs = count_gmacs(net.encoder, torch.empty(1, 3, 32, 32, device="meta")) + \
        count_gmacs(net.decoder, torch.empty(1, 16, 2, 2, device="meta"))
    b, n = rows["ae_both"], rows["ae_none"]
    assert (b["ssl"], n["ssl"]) == ("yes", "no")
    assert [float(b[k]) for k in ("rfid", "psnr", "ssim", "lpips", "A1", "A2", "effective_rank")] == \
        [1.5, 25.5, 0.75, 0.125, 0.5, 0.25, 7.5]
    assert float(b["gmacs"]) == round(gmacs, 6) and float(b["params_M"]) == round(count_params(net) / 1e6, 6)
    assert float(b["training_gmacs"]) == 21.0 and float(b["gfid"]) == 16.0  # CURVE_FAST's last gFID
    assert [n[k] for k in ("rfid", "A1", "gfid")] == ["n/a", "n/a", "n/a"] and float(n["training_gmacs"]) == 21.0
    md = (out / "ablation.md").read_text()
    assert "| ae_both | TC-AE-T/p4-c16 | yes | 1.5 | 25.5 |" in md and "| 50.0% | 25.0% | 7.5 |" in md
    assert "n/a* " in md.replace("|", " ") and "* n/a: run `tcae-ldm test" in md
    assert "** n/a: run `tcae-ldm diagnose" in md
    assert "*** n/a: run `--dit" in md


def test_a_folder_that_is_not_a_run_fails_on_one_line(tmp_path):
    with pytest.raises(SystemExit) as err:
        main([str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert str(err.value).startswith("tcae-ldm ablation: error: ") and "missing does not exist" in str(err.value)
