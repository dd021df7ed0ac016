"""`tcae-ldm bench`: what it reports (tiny presets), how it times, and the cost counts it relies on."""
import inspect
import json

import pytest
import torch

import tcae_ldm.commands.bench.main as bench
from tcae_ldm.commands.bench import cases, timing

TINY_AES = ["TC-AE-T/p4-c16", "TC-AE-T/p4-c16:vanilla", "DC-AE-T/f16c16"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny networks gain nothing from a thread pool, and a busy CPU makes it stall
    try:
        report = bench.main(["--tiny", "--repeats", "2", "--device", "cpu", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    return report, json.loads(out.read_text()), bench.tables(report)


def test_tiny_bench_json(tiny_run):
    _, saved, _ = tiny_run
    assert {"env", "settings", "reference", "autoencoders", "dits", "dit_latents", "data", "notes"} <= set(saved)
    assert saved["reference"] == "DC-AE-T/f16c16" and list(saved["autoencoders"]) == TINY_AES
    for name, ae in saved["autoencoders"].items():
        assert ae["latent_shape"] == [16, 2, 2]  # the same token count for every autoencoder
        assert ae["gmacs"]["total"] == pytest.approx(ae["gmacs"]["encode"] + ae["gmacs"]["decode"])
        assert ae["params_m"] > 0 and ae["gmacs_256"]["total"] > ae["gmacs"]["total"]
        for mode in ("encode", "decode", "train"):
            r = ae["throughput"]["fp32"][mode]
            assert len(r["times_s"]) == 2 and r["items_per_s"] == pytest.approx(2 / r["median_s"])
            assert r["peak_mem_mb"] is None or r["peak_mem_mb"] > 0
            ref = saved["autoencoders"]["DC-AE-T/f16c16"]["throughput"]["fp32"][mode]["items_per_s"]
            assert r["ratio_vs_reference"] == pytest.approx(r["items_per_s"] / ref)
    assert saved["autoencoders"]["DC-AE-T/f16c16"]["gmacs_ratio_vs_reference"] == 1.0
    dit = saved["dits"]["DiT-T/1@16x2x2"]
    assert dit["latents_of"] == TINY_AES and dit["throughput"]["fp32"]["train"]["items_per_s"] > 0
    img, lat = saved["data"]["images"], saved["data"]["latents 16x2x2"]
    assert img["feeds"].startswith("TC-AE-T/p4-c16") and lat["feeds"] == "DiT-T/1@16x2x2 train fp32"
    assert lat["source"].startswith("LatentDataModule")  # the real reader, not the fallback
    for d in (img, lat):
        assert d["loader_over_step"] == pytest.approx(d["items_per_s"] / d["step_items_per_s"])
        assert d["verdict"] == ("ok" if d["loader_over_step"] >= bench.INPUT_TARGET else "INPUT-BOUND")


def test_tiny_bench_table(tiny_run):
    _, _, text = tiny_run
    for title in ("Cost (GMACs", "Autoencoder throughput", "DiT training step", "Input pipelines"):
        assert title in text
    for header in ("params M", "GMACs enc", "GMACs dec", "e+d@256", "encode", "decode", "train step",
                   "peak MB e/d/t", "loader/step"):
        assert header in text
    lines = [line.split() for line in text.splitlines()]
    for name in TINY_AES:
        assert [cells[0] for cells in lines if cells].count(name) == 2  # its cost row and its fp32 speed row
        assert [name, "fp32"] in [cells[:2] for cells in lines]
    assert ["DiT-T/1", "16x2x2"] in [cells[:2] for cells in lines]
    assert "(1.00x)" in next(line for line in text.splitlines() if line.startswith("DC-AE-T/f16c16") and "fp32" in line)


def test_rounds_interleave_models_and_errors_do_not_stop_the_run():
    calls = []

    def make(key, fail=False):
        def fn():
            calls.append(key)
            if fail and calls.count(key) > 1:
                raise RuntimeError("boom\nsecond line")
        return timing.Case(key, fn, items=4)

    cases = [make("A"), make("B", fail=True), make("C")]
    timing.time_interleaved(cases, repeats=3, device=torch.device("cpu"))
    # warm-up A B C, then rounds A B C, A C, A C: B failed in its first timed call and left the rotation
    assert calls == ["A", "B", "C", "A", "B", "C", "A", "C", "A", "C"]
    assert cases[1].result == {"error": "RuntimeError: boom"}
    assert len(cases[0].result["times_s"]) == 3 and cases[0].result["items_per_s"] > 0


def test_dcae_f32c32_config_and_cost():
    from diffusers import AutoencoderDC

    assert set(cases.DCAE_PRESETS["DC-AE/f32c32"]) <= set(inspect.signature(AutoencoderDC.__init__).parameters)
    dc = cases.autoencoder_cost("DC-AE/f32c32", 256, 32)
    assert dc["latent_shape"] == [32, 8, 8]
    assert dc["gmacs"]["total"] == pytest.approx(606.9, rel=0.005)  # the published 607 GMACs
    assert dc["params_m"] == pytest.approx(323.4, abs=0.1)
    tc = cases.autoencoder_cost("TC-AE-B/p8-c128", 256, 32)
    assert tc["latent_shape"] == [128, 8, 8]
    assert tc["gmacs"]["total"] <= 164 and tc["gmacs"]["total"] <= 0.30 * dc["gmacs"]["total"]


def test_peak_table_by_device_name():
    assert timing.peak_bf16_tflops("NVIDIA H200") == 989.0
    assert timing.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert timing.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.0
    assert timing.peak_bf16_tflops("Some Future GPU") is None


def test_checkpointing_variant_and_mode_selection():
    net = cases.build_autoencoder("TC-AE-T/p4-c16:ckpt", 32, 16)
    assert net.module.encoder.fine.gradient_checkpointing and net.latent_shape == (16, 2, 2)
    with pytest.raises(ValueError, match="unknown variant 'fast'"):
        cases.build_autoencoder("TC-AE-T/p4-c16:fast", 32, 16)
    with pytest.raises(ValueError, match="unknown variant 'vanilla'"):
        cases.build_autoencoder("DC-AE-T/f16c16:vanilla", 32, 16)
    cl = cases.build_autoencoder("DC-AE-T/f16c16:cl", 32, 16)
    conv = next(p for p in cl.module.parameters() if p.dim() == 4)
    assert cl.channels_last and conv.is_contiguous(memory_format=torch.channels_last) and cases.is_dcae(cl.name)
    args = bench.parse_args(["--tiny", "--modes", "encode,decode", "--device", "cpu"])
    assert args.modes == ["encode", "decode"]
    with pytest.raises(SystemExit):
        bench.parse_args(["--tiny", "--modes", "infer", "--device", "cpu"])


def test_encode_plus_decode_is_derived_from_the_timed_modes(tiny_run):
    _, saved, text = tiny_run
    ref = saved["autoencoders"]["DC-AE-T/f16c16"]["throughput"]["fp32"]["encode+decode"]["items_per_s"]
    for name, entry in saved["autoencoders"].items():
        m = entry["throughput"]["fp32"]
        both = 1 / (1 / m["encode"]["items_per_s"] + 1 / m["decode"]["items_per_s"])
        assert m["encode+decode"]["items_per_s"] == pytest.approx(both)
        assert m["encode+decode"]["ratio_vs_reference"] == pytest.approx(both / ref)
    assert "enc+dec" in text


def test_bf16_on_a_cpu_without_bf16_instructions_is_flagged(tiny_run):
    _, saved, text = tiny_run
    assert saved["env"]["cpu_capability"] and "cpu_native_bf16" in saved["env"]
    assert "no bf16 instructions" not in text                         # fp32 only: nothing to warn about
    report = {**saved, "settings": {**saved["settings"], "precisions": ["fp32", "bf16"]},
              "env": {**saved["env"], "cpu_native_bf16": False}}
    assert "has no bf16 instructions (AVX512-BF16 / AMX)" in bench.tables(report)



def test_joint_step_breakdown_on_tiny_presets(tmp_path):
    """--joint-step: every pass of one joint step counted and timed; the passes add up to the step."""
    from tcae_ldm.commands.bench.joint import PASSES

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        report = bench.main(["--joint-step", "--tiny", "--repeats", "1", "--device", "cpu",
                             "--out", str(tmp_path / "joint.json")])
    finally:
        torch.set_num_threads(threads)
    saved = json.loads((tmp_path / "joint.json").read_text())["joint_step"]
    assert saved["net"] == "TC-AE-T/p4-c16" and saved["config"].endswith("configs/demo/tcae.yaml")
    g = saved["gmacs"]
    names = [n for n, _, _ in PASSES if n != "update"]
    assert sorted(g["passes"]) == sorted(names)
    for name in names:
        assert g["passes"][name]["train"] >= g["passes"][name]["forward"] > 0 or name == "lpips"  # demo: no LPIPS
    sg, t = g["passes"]["student_global"], g["passes"]["teacher"]
    assert t["forward"] == t["train"] == sg["forward"]          # the same encoder on the same crops, no backward
    assert sg["train"] == pytest.approx(3 * sg["forward"], rel=0.05)  # backward = 2 forwards
    ssl = sum(g["passes"][n]["train"] for n, part, _ in PASSES if part == "ssl")
    assert g["step"]["joint"] == pytest.approx(g["step"]["reconstruction_only"] + ssl)
    timing = saved["timing"]["fp32"]
    assert set(timing["median_s"]) == {"step_joint", "step_reconstruction_only", *names, "update",
                                       "update_reconstruction_only"}
    # every second of the joint step is either a pass or one of the two measured residuals
    total = sum(timing["share"].values()) + (timing["rest_of_reconstruction"] + timing["rest_of_ssl"]) / \
        timing["median_s"]["step_joint"]
    assert total == pytest.approx(1.0)
    assert timing["ratio"] == pytest.approx(timing["median_s"]["step_joint"] / timing["median_s"]["step_reconstruction_only"])
    text = bench.joint_tables(report)
    for name in (*names, "update", "STEP joint", "STEP reconstruction_only", "joint / reconstruction-only step"):
        assert name in text


def test_joint_step_refuses_a_config_without_ibot(tmp_path):
    from tcae_ldm.commands.bench.joint import read_spec

    with pytest.raises(ValueError, match="needs a config with model.init_args.ssl"):
        read_spec("configs/demo/dcae.yaml")
    with pytest.raises(FileNotFoundError, match="--joint-config: no such file"):
        read_spec(str(tmp_path / "missing.yaml"))


def test_jpeg_pipelines_section(tiny_run):
    _, saved, text = tiny_run
    section = saved["jpeg_pipelines"]
    assert section["config"] == "configs/tcae.yaml" and sum(section["sizes"].values()) == section["images"] == 8
    assert set(section["pipelines"]) == {"multi-crop", "recon only", "latent cache"}
    for name, e in section["pipelines"].items():
        ref, fast = e["reference"]["items_per_s"], e["fast"]["items_per_s"]
        assert ref > 0 and fast > 0 and e["speedup"] == pytest.approx(fast / ref)
        assert e["device_ms_per_image"] > 0
        assert e["pixels"]["mean_abs_levels"] < 1.5 and e["pixels"]["psnr_db"] > 40  # draft decode only
    cost = section["step_cost"]
    ae = cases.autoencoder_cost("TC-AE-B/p8-c128", 256, 32)["gmacs"]["total"]
    assert cost["passes"][0]["fwd_gmacs"] == pytest.approx(ae, rel=0.01)  # the cls token adds one token
    assert cost["gmacs_per_image"] == pytest.approx(sum(p["fwd_gmacs"] * p["times"] for p in cost["passes"]))
    from tcae_ldm.commands.bench.pipelines import CORES_PER_GPU, TARGET_MARGIN

    feed = section["feed"]
    assert feed["verdict"] == ("ok" if feed["margin"] >= TARGET_MARGIN and feed["num_workers"] <= CORES_PER_GPU
                               else "INPUT-BOUND")
    for title in ("JPEG input pipelines, images/s of one loader worker", "joint training step, GMACs per image",
                  "GPU feed: NVIDIA H100"):
        assert title in text


def test_gpu_feed_arithmetic():
    from tcae_ldm.commands.bench.pipelines import feed_verdict

    cost = {"gmacs_per_image": 1000.0}  # 2 TFLOP per image: 0.4 x 989 TFLOP/s -> 197.8 images/s
    fed = feed_verdict(cost, worker_images_per_s=50.0, num_workers=10, mfu=0.4)
    assert fed["gpu_images_per_s"] == pytest.approx(197.8) and fed["workers_needed"] == pytest.approx(3.956)
    assert fed["margin"] == pytest.approx(500 / 197.8) and fed["verdict"] == "ok"
    assert feed_verdict(cost, 50.0, 7, 0.4)["verdict"] == "INPUT-BOUND"  # 350 images/s < 2 x 197.8


@pytest.mark.parametrize("loader_over_step, verdict", [(3.0, "ok"), (2.99, "INPUT-BOUND"), (12.0, "ok"),
                                                       (0.5, "INPUT-BOUND")])
def test_loader_verdict_threshold(monkeypatch, loader_over_step, verdict):
    """A loader is INPUT-BOUND below 3x the fastest training step it feeds (over precisions and networks), ok from
    3x on; the image loader is measured against the TC-AEs only, each latent loader against its DiTs."""
    from types import SimpleNamespace

    assert bench.INPUT_TARGET == 3.0
    train = lambda *v: {p: {"train": {"items_per_s": x}} for p, x in zip(("fp32", "bf16"), v)}  # noqa: E731
    report = {"autoencoders": {"TC-AE-T/p4-c16": {"throughput": train(40.0, 100.0)},  # fastest: bf16, 100/s
                               "DC-AE-T/f16c16": {"throughput": train(1000.0)}},       # not fed by this loader
              "dits": {"DiT-T/1@16x2x2": {"throughput": train(200.0)}, "DiT-T/1@4x4x4": {"throughput": train(9.0)}},
              "dit_latents": {"16x2x2": {"latent_shape": [16, 2, 2]}}, "data": {}}
    monkeypatch.setattr(cases, "image_loader_throughput",
                        lambda *a: {"items_per_s": 100.0 * loader_over_step, "source": "stub"})
    monkeypatch.setattr(cases, "latent_loader_throughput",
                        lambda *a: {"items_per_s": 200.0 * loader_over_step, "source": "stub"})
    args = SimpleNamespace(image_size=32, batch_size=4, repeats=1, num_workers=0, dit_batch_size=8)
    bench.bench_data(args, report)
    img, lat = report["data"]["images"], report["data"]["latents 16x2x2"]
    assert img["feeds"] == "TC-AE-T/p4-c16 train bf16" and lat["feeds"] == "DiT-T/1@16x2x2 train fp32"
    for row in (img, lat):
        assert row["loader_over_step"] == pytest.approx(loader_over_step) and row["verdict"] == verdict


def test_timing_reports_progress_after_the_warm_up_and_each_round():
    lines = []
    cases = [timing.Case("A", lambda: None, items=1), timing.Case("B", lambda: None, items=1)]
    timing.time_interleaved(cases, repeats=3, device=torch.device("cpu"), progress=lines.append)
    assert lines[0].startswith("warmed up 2 of 2 cases in 0:0")
    assert [ln.split(" |")[0] for ln in lines[1:]] == ["timed 1/3 rounds (33%)", "timed 2/3 rounds (67%)"]


def test_profile_ratio_spread_and_threads(tmp_path):
    """--profile: each network's encode + decode by op category and its slowest ops; the enc+dec ratio also round by
    round (median and range); --threads sets torch's intra-op pool for the run."""
    from tcae_ldm.commands.bench import profiling

    threads = torch.get_num_threads()
    try:
        report = bench.main(["--tiny", "--repeats", "3", "--device", "cpu", "--modes", "encode,decode",
                             "--dits", "DiT-T/1", "--skip-jpeg", "--profile", "--profile-top", "4", "--threads", "1",
                             "--out", str(tmp_path / "b.json")])
    finally:
        torch.set_num_threads(threads)
    assert report["env"]["torch_threads"] == 1
    for name, e in report["autoencoders"].items():
        p = e["profile"]["eager"]
        assert len(p["top"]) == 4 and p["top"][0]["self_ms"] >= p["top"][-1]["self_ms"] > 0
        assert sum(p["categories"].values()) == pytest.approx(p["total_ms"])
        assert ("matmul" if name.startswith("TC-AE") else "convolution") in p["categories"]
        rt = e["throughput"]["fp32"]["encode+decode"]
        ref = report["autoencoders"]["DC-AE-T/f16c16"]["throughput"]["fp32"]["encode+decode"]["times_s"]
        assert rt["ratio_rounds"] == pytest.approx([b / a for a, b in zip(rt["times_s"], ref)])
        assert rt["ratio_rounds_min"] <= rt["ratio_rounds_median"] <= rt["ratio_rounds_max"]
    assert "attention" in report["autoencoders"]["TC-AE-T/p4-c16"]["profile"]["eager"]["categories"]
    text = bench.tables(report)
    assert "Profile of one encode + decode, ms of self time by op category" in text
    assert "TC-AE-T/p4-c16: slowest ops" in text and "DC-AE-T/f16c16: slowest ops" in text
    row = next(line for line in text.splitlines() if line.startswith("DC-AE-T/f16c16") and "fp32" in line)
    assert "(1.00x, 1.00-1.00)" in row  # the reference against itself, every round
    assert profiling.category("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert profiling.category("aten::addmm") == "matmul" and profiling.category("aten::add") == "elementwise"
    assert profiling.category("aten::native_layer_norm") == "normalisation"


_STUB = """#!{python}
# Stands in for the interpreter: records each command line, plays the run files the script checks for.
import json, os, sys
out = os.environ["STUB_OUT"]
with open(os.environ["STUB_LOG"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
if sys.argv[1:4] == ["-m", "tcae_ldm.cli", "fit"]:
    for run in ("tcae", "dit_tcae"):
        os.makedirs(os.path.join(out, "fit", run, "checkpoints"), exist_ok=True)
        open(os.path.join(out, "fit", run, "checkpoints", "last.ckpt"), "w").close()
"""


@pytest.mark.slow
def test_the_gpu_check_script_issues_every_step_and_its_commands_parse(tmp_path, capsys, monkeypatch):
    """scripts/gpu_check.sh --tiny with a recording interpreter: every step runs in order with rc 0 (the bench with
    profiles, the joint step, both modules' DDP training, the cache, sample, both exports, the compiled bench), and
    each command line it issues parses with the real command's parser (LightningCLI's --print_config for fit and
    predict). The commands' own behaviour is tested in their own test files."""
    import os
    import subprocess
    import sys

    from tcae_ldm.cli import lightning_main
    from tcae_ldm.commands import export, sample
    from tests.tiny import REPO

    stub, log, out = tmp_path / "python", tmp_path / "argv.jsonl", tmp_path / "out"
    stub.write_text(_STUB.format(python=sys.executable))
    stub.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stub), "STUB_LOG": str(log), "STUB_OUT": str(out)}
    done = subprocess.run(["bash", os.path.join(REPO, "scripts", "gpu_check.sh"), "--tiny", str(out)], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "done: bench=0 joint=0 fit=0 cache=0 dit=0 sample=0 export=0 compile=0" in done.stdout, done.stdout
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    assert calls[-1][0] == "-" and all(c[:2] == ["-m", "tcae_ldm.cli"] for c in calls[:-1])  # then the figures
    commands = [c[2:] for c in calls[:-1]]
    assert [c[0] for c in commands] == ["bench", "bench", "fit", "predict", "fit", "sample", "export", "export",
                                        "bench"]
    monkeypatch.chdir(REPO)  # the script runs from the repository root: its config paths are relative to it
    first, joint, compiled = (bench.parse_args(c[1:]) for i, c in enumerate(commands) if c[0] == "bench")
    assert first.tiny and first.profile and joint.joint_step and compiled.skip_jpeg
    for c in commands:
        if c[0] in ("fit", "predict"):
            with pytest.raises(SystemExit) as exit_:
                lightning_main([*c, "--print_config"])
            assert exit_.value.code in (0, None), c
    capsys.readouterr()
    sample.build_parser().parse_args(commands[5][1:])
    for c in commands[6:8]:
        export.build_parser().parse_args(c[1:])
