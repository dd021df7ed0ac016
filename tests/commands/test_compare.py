"""`tcae-ldm compare` on synthetic CSVLogger run folders: steps-to-level, speed-ups, refusal of mismatched runs."""
import csv
import json

import pytest
import yaml

from tcae_ldm.commands.compare import compare_runs, main
from tcae_ldm.metrics.convergence import (
    COMPUTE_COLUMN,
    GFID_COLUMN,
    IMAGES_SEEN_COLUMN,
    STEP_COLUMN,
    WALL_TIME_COLUMN,
)

DCAE = {"class_path": "tcae_ldm.models.autoencoders.DCAEAutoencoder",
        "init_args": {"path": "mit-han-lab/dc-ae-f32c32-in-1.0-diffusers"}}


TCAE = {"class_path": "tcae_ldm.models.autoencoders.TCAEAutoencoder",
        "init_args": {"kind": "tcae", "path": "runs/tcae/last.ckpt", "gmacs": 164.0}}


# (step, gFID): the baseline reaches 50 at 15000 and 30 at 30000, never 20; the other run reaches
# 50 at its first point (10000), 30 at 10000 + 15/17 * 10000 and 20 at 30000.
CURVE_BASE = [(10000, 60.0), (20000, 40.0), (30000, 30.0), (40000, 25.0)]


CURVE_FAST = [(10000, 45.0), (20000, 28.0), (30000, 20.0), (40000, 16.0)]


def write_run(root, name, curve, autoencoder=DCAE, dit="DiT-XL/1", dataset="imagenet256", net="inception",
              split_rows=False, version=None, images_per_step=256, seed=0, lr=1e-4, gmacs_per_step=None):
    run = root / name / version if version else root / name
    run.mkdir(parents=True)
    gfid = GFID_COLUMN.format(net=net)
    cols = ["epoch", STEP_COLUMN, "train/loss", gfid, IMAGES_SEEN_COLUMN, WALL_TIME_COLUMN, COMPUTE_COLUMN]
    with open(run / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        for i, (step, value) in enumerate(curve):
            w.writerow({"epoch": i, STEP_COLUMN: step - 1, "train/loss": 0.5})  # training rows: no gen/ values
            gen = {gfid: value, IMAGES_SEEN_COLUMN: step * images_per_step, WALL_TIME_COLUMN: step * 0.5}
            if gmacs_per_step:
                gen[COMPUTE_COLUMN] = step * gmacs_per_step
            if split_rows:  # the callback's values may land on separate rows of the same step
                w.writerow({"epoch": i, STEP_COLUMN: step, gfid: value})
                w.writerow({"epoch": i, STEP_COLUMN: step, WALL_TIME_COLUMN: gen[WALL_TIME_COLUMN],
                            IMAGES_SEEN_COLUMN: gen[IMAGES_SEEN_COLUMN]})
            else:
                w.writerow({"epoch": i, STEP_COLUMN: step, **gen})
    config = {"seed_everything": seed,
              "trainer": {"logger": {"init_args": {"name": name}}},  # where a run writes is not its identity
              "model": {"class_path": "tcae_ldm.lit.diffusion.DiffusionModule",
                        "init_args": {"autoencoder": autoencoder, "dit": dit,
                                      "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": lr}}}},
              "data": {"class_path": "tcae_ldm.data.latents.LatentDataModule",
                       "init_args": {"dataset": dataset, "cache_dir": str(root / "no_cache")}}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    return run


def read_csv(path):
    with open(path, newline="") as f:
        return {row["run"]: row for row in csv.DictReader(f)}


def test_table_plot_and_hand_computed_speedups(tmp_path):
    base = write_run(tmp_path, "dit_dcae", CURVE_BASE)
    fast = write_run(tmp_path, "dit_tcae", CURVE_FAST, autoencoder=TCAE, split_rows=True)
    out = tmp_path / "cmp"
    main([str(base), str(fast), "--out", str(out), "--baseline", "dit_dcae", "--levels", "50,30,20"])
    rows = read_csv(out / "comparison.csv")
    b, f = rows["dit_dcae"], rows["dit_tcae"]
    assert float(b["steps_to_50"]) == 15000 and float(b["steps_to_30"]) == 30000
    assert b["steps_to_20"] == "not reached" and b["speedup_20"] == "not reached"
    assert float(b["speedup_50"]) == 1.0 and float(b["speedup_30"]) == 1.0
    assert float(f["steps_to_50"]) == 10000
    assert float(f["steps_to_30"]) == pytest.approx(10000 + 15 / 17 * 10000, abs=1e-3)
    assert float(f["steps_to_20"]) == 30000
    assert float(f["speedup_50"]) == pytest.approx(1.5)
    assert float(f["speedup_30"]) == pytest.approx(30000 / (10000 + 15 / 17 * 10000), abs=1e-4)  # 1.59375
    assert f["speedup_20"] == ">1.33"  # the baseline's last step / 30000: a lower bound
    assert (float(f["final_gfid"]), float(f["best_gfid"]), int(f["best_step"])) == (16.0, 16.0, 40000)
    assert f["autoencoder"] == "tcae runs/tcae/last.ckpt" and float(f["autoencoder_gmacs"]) == 164.0
    assert b["autoencoder"] == "DCAEAutoencoder mit-han-lab/dc-ae-f32c32-in-1.0-diffusers"
    assert b["autoencoder_gmacs"] == "" and f["metric"] == "gfid_inception" and f["dit"] == "DiT-XL/1"
    md = (out / "comparison.md").read_text()
    assert "WARNING" not in md and "| 1.59x |" in md and ">1.33x" in md
    assert (out / "convergence.png").read_bytes()[:4] == b"\x89PNG"


def test_mismatched_dit_is_refused_unless_allowed(tmp_path, capsys):
    base = write_run(tmp_path, "a", CURVE_BASE)
    other = write_run(tmp_path, "b", CURVE_FAST, autoencoder=TCAE, dit="DiT-B/1")
    out = tmp_path / "cmp"
    with pytest.raises(SystemExit) as err:
        main([str(base), str(other), "--out", str(out), "--levels", "30"])
    assert err.value.code == 2
    assert "DiT preset" in capsys.readouterr().err
    first = (out / "comparison.md").read_text().splitlines()[0]
    assert first.startswith("> WARNING") and "a=DiT-XL/1" in first and "b=DiT-B/1" in first
    main([str(base), str(other), "--out", str(out), "--levels", "30", "--allow-mismatch"])  # exits normally
    assert (out / "comparison.md").read_text().startswith("> WARNING")


def test_different_metric_network_or_dataset_is_not_comparable(tmp_path, capsys):
    base = write_run(tmp_path, "a", CURVE_BASE)
    proxy = write_run(tmp_path, "b", CURVE_FAST, net="demo-classifier")
    other_data = write_run(tmp_path, "c", CURVE_FAST, dataset="demo64")
    result = compare_runs([str(base), str(proxy), str(other_data)], levels=[30])
    assert any("metric network" in p and "b=demo-classifier" in p for p in result["problems"])
    assert any("dataset" in p and "c=demo64" in p for p in result["problems"])
    with pytest.raises(SystemExit) as err:  # asking for a column a run lacks is an error naming it
        main([str(base), str(proxy), "--out", str(tmp_path / "o"), "--metric", "gfid_inception"])
    assert "gen/gfid_inception" in str(err.value) and str(err.value).startswith("tcae-ldm compare: error: ")


def test_different_global_batch_is_not_comparable(tmp_path):
    base = write_run(tmp_path, "a", CURVE_BASE)
    bigger = write_run(tmp_path, "b", CURVE_FAST, images_per_step=512)
    result = compare_runs([str(base), str(bigger)], levels=[30])
    assert result["problems"] == ["different images per step: a=256, b=512"]


def test_identity_from_the_latent_cache_metadata(tmp_path):
    """The DiT configs leave model.autoencoder null: the cache's metadata.json says what made the latents."""
    def cache(name, ae_name, image_size):
        folder = tmp_path / name
        folder.mkdir()
        meta = {"autoencoder": {"kind": name, "name": ae_name, "path": f"ckpt/{name}", "config_hash": "abc"},
                "image_size": image_size, "dataset": {"datamodule": "tcae_ldm.data.images.ImageFolderDataModule",
                                                      "root": "/data/imagenet", "split": "train", "size": 1000}}
        (folder / "metadata.json").write_text(json.dumps(meta))
        return str(folder)

    runs = [write_run(tmp_path, "a", CURVE_BASE, autoencoder=None, dataset=None),
            write_run(tmp_path, "b", CURVE_FAST, autoencoder=None, dataset=None)]
    for run, cache_dir in zip(runs, [cache("dcae", "dc-ae-f32c32-in-1.0", 256), cache("tcae", "TC-AE-B/p8-c128", 512)]):
        config = yaml.safe_load((run / "config.yaml").read_text())
        config["data"]["init_args"] = {"cache_dir": cache_dir}
        (run / "config.yaml").write_text(yaml.safe_dump(config))
    result = compare_runs([str(r) for r in runs], levels=[30])
    assert [row["autoencoder"] for row in result["rows"]] == ["dcae dc-ae-f32c32-in-1.0", "tcae TC-AE-B/p8-c128"]
    assert result["runs"][0].identity["dataset"] == "ImageFolderDataModule /data/imagenet"
    assert result["problems"] == ["different image size: a=256, b=512"]


def test_default_levels_come_from_the_baseline_and_version_folders_are_found(tmp_path):
    base = write_run(tmp_path, "dcae", CURVE_BASE, version="version_0")
    fast = write_run(tmp_path, "tcae", CURVE_FAST, autoencoder=TCAE)
    result = compare_runs([str(tmp_path / "dcae"), str(fast)], baseline="dcae/version_0")
    assert result["baseline"].path == str(base)
    assert result["levels"] == [60.0, 40.0, 25.0]  # its best by 25%, 50% and 100% of its steps
    row = result["rows"][1]
    assert row["speedup_40"] == pytest.approx(20000 / (10000 + 5 / 17 * 10000))
    assert row["speedup_25"] == pytest.approx(40000 / (20000 + 3 / 8 * 10000))



def test_folders_that_are_not_runs_fail_on_one_line(tmp_path):
    run = write_run(tmp_path, "a", CURVE_BASE)
    (tmp_path / "empty").mkdir()
    (tmp_path / "ae").mkdir()  # an autoencoder run: metrics.csv without any gFID
    (tmp_path / "ae" / "metrics.csv").write_text("epoch,step,val/psnr\n0,10,20.5\n")
    (tmp_path / "binary").mkdir()
    (tmp_path / "binary" / "metrics.csv").write_bytes(bytes(range(256)) * 4)
    (tmp_path / "badstep").mkdir()
    (tmp_path / "badstep" / "metrics.csv").write_text("step,gen/gfid_inception\nten,3.0\n")
    (tmp_path / "badyaml").mkdir()
    (tmp_path / "badyaml" / "metrics.csv").write_text("step,gen/gfid_inception\n10,3.0\n")
    (tmp_path / "badyaml" / "config.yaml").write_text("model: [unclosed\n")
    (tmp_path / "file.ckpt").write_bytes(b"PK")
    cases = [(tmp_path / "missing", "missing does not exist"),
             (tmp_path / "file.ckpt", "file.ckpt is not a folder"),
             (tmp_path / "empty", "empty: no metrics.csv (expected a Lightning CSVLogger run folder)"),
             (tmp_path / "ae", "has no gen/gfid_{net} column"),
             (tmp_path / "binary", "binary/metrics.csv is not a metrics table a CSVLogger writes"),
             (tmp_path / "badstep", "badstep/metrics.csv is not a metrics table a CSVLogger writes"),
             (tmp_path / "badyaml", "badyaml/config.yaml is not readable YAML")]
    for folder, message in cases:
        with pytest.raises(SystemExit) as err:
            main([str(run), str(folder), "--out", str(tmp_path / "out")])
        text = str(err.value)
        assert text.startswith("tcae-ldm compare: error: ") and message in text and "\n" not in text, text
    assert not (tmp_path / "out").exists()


# Three seeds per autoencoder: the baseline's curves are CURVE_BASE scaled in steps by 1, 1.1, 0.9, the other's
# CURVE_FAST by 1, 1.2, 0.8; steps to gFID 30: baseline 30000 x (1, 1.1, 0.9), fast 18823.5 x (1, 1.2, 0.8).
def _seeded(tmp_path, name, curve, scales, **kw):
    return [write_run(tmp_path, f"{name}_s{i}", [(round(s * k), v) for s, v in curve], seed=i, **kw)
            for i, k in enumerate(scales)]


def test_three_seeds_per_autoencoder_are_pooled_with_bootstrap_intervals(tmp_path, capsys):
    base = _seeded(tmp_path, "dcae", CURVE_BASE, (1, 1.1, 0.9), gmacs_per_step=2.0)
    fast = _seeded(tmp_path, "tcae", CURVE_FAST, (1, 1.2, 0.8), autoencoder=TCAE, gmacs_per_step=2.0)
    out = tmp_path / "cmp"
    main([str(r) for r in base + fast] + ["--out", str(out), "--baseline", "dcae_s0", "--levels", "30"])
    result = compare_runs([str(r) for r in base + fast], baseline="dcae_s0", levels=[30])
    assert result["problems"] == [] and [len(g["runs"]) for g in result["groups"]] == [3, 3]
    b, f = result["group_rows"]
    t30 = 10000 + 15 / 17 * 10000
    assert f["steps_to_30_mean"] == pytest.approx(t30) and f["steps_to_30_min"] == pytest.approx(0.8 * t30, abs=1)
    assert f["steps_to_30_std"] == pytest.approx(0.2 * t30, rel=1e-3)  # std of (1, 1.2, 0.8) x t30, n - 1
    assert b["final_gfid_mean"] == 25.0 and f["best_gfid_max"] == 16.0
    assert f["speedup_30"] == pytest.approx(30000 / t30, rel=1e-3)
    assert b["speedup_30_lo"] < 1 < b["speedup_30_hi"]  # the baseline against itself: an interval around 1
    slowest, fastest = 30000 * 0.9 / (t30 * 1.2), 30000 * 1.1 / (t30 * 0.8)  # the extreme resamples
    assert slowest <= f["speedup_30_lo"] < f["speedup_30"] < f["speedup_30_hi"] <= fastest
    assert f["dit_gmacs_to_30"] == pytest.approx(2 * t30, rel=1e-3)  # DiT compute interpolated at the level
    per_run = {row["run"]: row for row in result["rows"]}
    assert per_run["tcae_s1"]["dit_gmacs_to_30"] == pytest.approx(2 * 1.2 * t30, rel=1e-3)
    assert per_run["tcae_s1"]["autoencoder_training_gmacs"] is None  # no autoencoder run to read it from
    md = (out / "comparison.md").read_text()
    assert "95% percentile bootstrap" in md and "10000 resamples" in md
    assert f"{f['speedup_30']:.2f}x [{f['speedup_30_lo']:.2f}, {f['speedup_30_hi']:.2f}]" in md
    assert "25.00 ± 0.00 [25.00, 25.00]" in md  # the baseline's final gFID over its seeds
    with open(out / "comparison_groups.csv", newline="") as fh:
        assert [int(r["seeds"]) for r in csv.DictReader(fh)] == [3, 3]
    main([str(r) for r in base + fast]
         + ["--out", str(out), "--levels", "30", "--ci-level", "0.8", "--resamples", "500"])
    md = (out / "comparison.md").read_text()
    assert "80% percentile bootstrap" in md and "500 resamples" in md
    narrow = compare_runs([str(r) for r in base + fast], levels=[30], ci=(0.8, 500))["group_rows"][1]
    assert f["speedup_30_lo"] < narrow["speedup_30_lo"] < narrow["speedup_30_hi"] < f["speedup_30_hi"]


def test_bootstrap_interval_matches_a_hand_computation():
    """Baseline seeds (2, 4), other seeds (1, 2): with the generator's draws, each resample's ratio is
    mean(base resample) / mean(other resample); the 2.5% / 97.5% quantiles of those, computed here by hand."""
    import numpy as np

    from tcae_ldm.metrics.seeds import bootstrap_ratio

    point, lo, hi = bootstrap_ratio([2.0, 4.0], [1.0, 2.0], level=0.9, resamples=7, seed=3)
    rng = np.random.default_rng(3)
    ib, io = rng.integers(0, 2, (7, 2)), rng.integers(0, 2, (7, 2))
    base, other = np.array([2.0, 4.0]), np.array([1.0, 2.0])
    ratios = sorted(base[i].mean() / other[j].mean() for i, j in zip(ib, io))
    # numpy's default quantile: linear interpolation at position q * (n - 1)
    def lerp(q):
        i, frac = int(q * 6), q * 6 - int(q * 6)
        return ratios[i] + frac * (ratios[min(i + 1, 6)] - ratios[i])
    assert point == 2.0 and (lo, hi) == pytest.approx((lerp(0.05), lerp(0.95)))
    assert set(ratios) <= {1.0, 1.5, 2.0, 3.0, 4.0, 2 / 1.5, 4 / 1.5, 3 / 1.5}


def test_runs_differing_in_lr_are_not_pooled(tmp_path, capsys):
    a = write_run(tmp_path, "a", CURVE_BASE, seed=0)
    b = write_run(tmp_path, "b", CURVE_BASE, seed=1, lr=2e-4)
    result = compare_runs([str(a), str(b)], levels=[30])
    assert [len(g["runs"]) for g in result["groups"]] == [1, 1]
    assert len(result["problems"]) == 1
    assert "differ in more than the seed (model.init_args.optimizer.init_args.lr)" in result["problems"][0]
    with pytest.raises(SystemExit) as err:
        main([str(a), str(b), "--out", str(tmp_path / "o"), "--levels", "30"])
    assert err.value.code == 2 and "not pooled" in capsys.readouterr().err
    rows = compare_runs([str(a), str(write_run(tmp_path, "c", CURVE_FAST, seed=2))], levels=[30])
    assert [len(g["runs"]) for g in rows["groups"]] == [2] and rows["problems"] == []  # the seed alone: pooled
    assert result["group_rows"][1]["speedup_30"] == 1.0 and result["group_rows"][1]["speedup_30_lo"] == "n/a (1 seed)"


def test_the_plot_draws_each_groups_band_over_steps_and_total_compute(tmp_path):
    from tcae_ldm.commands.compare import draw

    base = _seeded(tmp_path, "dcae", CURVE_BASE, (1, 1, 1), gmacs_per_step=2.0)
    for run, shift in zip(base, (0.0, 4.0, -2.0)):  # same steps, gFID shifted per seed
        text = (run / "metrics.csv").read_text().splitlines()
        rows = [text[0]] + [",".join(c if i != 3 or not c else str(float(c) + shift) for i, c in
                                     enumerate(line.split(","))) for line in text[1:]]
        (run / "metrics.csv").write_text("\n".join(rows) + "\n")
    one = write_run(tmp_path, "tcae", CURVE_FAST, autoencoder=TCAE, gmacs_per_step=2.0)
    result = compare_runs([str(r) for r in base] + [str(one)], levels=[30])
    fig, bands = draw(result)
    x, mean, lo, hi = bands["steps"][result["groups"][0]["label"]]
    assert list(x) == [10000, 20000, 30000, 40000]
    assert list(lo) == [58, 38, 28, 23] and list(hi) == [64, 44, 34, 29] and mean[0] == pytest.approx(60 + 2 / 3)
    assert list(bands["compute"][result["groups"][0]["label"]][0]) == [20000, 40000, 60000, 80000]
    # a filled band for the 3-seed group only, on each panel (steps, compute, wall time)
    assert [len(ax.collections) for ax in fig.axes] == [1, 1, 1] and len(fig.axes[1].lines) >= 2
    assert fig.axes[1].get_xlabel().startswith("training compute")


def test_autoencoder_training_compute_follows_the_cache_to_its_runs(tmp_path):
    """The cache names the decoder-finetuned checkpoint; its run started from the joint run's: both phases count."""
    joint, ft = tmp_path / "ae_joint", tmp_path / "ae_ft"
    for folder, gmacs, config in ((joint, 100.0, {}),
                                  (ft, 5.0, {"model": {"init_args": {"init_from": str(joint / "checkpoints" /
                                                                                    "last.ckpt")}}})):
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "metrics.csv").write_text(f"step,train/compute_gmacs\n0,{gmacs / 2}\n1,{gmacs}\n")
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    cache = tmp_path / "cache"
    cache.mkdir()
    made_by = {"kind": "tcae", "path": str(ft / "checkpoints" / "last.ckpt")}
    (cache / "metadata.json").write_text(json.dumps({"autoencoder": made_by, "autoencoder_gmacs": 0.5}))
    run = write_run(tmp_path, "dit", CURVE_FAST, autoencoder=None, gmacs_per_step=2.0)
    config = yaml.safe_load((run / "config.yaml").read_text())
    config["data"]["init_args"]["cache_dir"] = str(cache)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    result = compare_runs([str(run)], levels=[30])
    row = result["group_rows"][0]
    assert row["autoencoder_training_gmacs"] == 105.0 and row["autoencoder_gmacs"] == 0.5
    from tcae_ldm.commands.compare import draw

    _, bands = draw(result)
    assert list(bands["compute"][result["groups"][0]["label"]][0]) == [20105.0, 40105.0, 60105.0, 80105.0]
    (ft / "metrics.csv").write_text("step,train/loss\n0,1.0\n")  # a run from before compute was logged
    assert compare_runs([str(run)], levels=[30])["group_rows"][0]["autoencoder_training_gmacs"] is None
