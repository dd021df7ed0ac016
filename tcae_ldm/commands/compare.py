"""`tcae-ldm compare`: gFID convergence of several DiT runs, one plot and one table.

    tcae-ldm compare runs/dit_dcae runs/dit_tcae --out runs/compare --baseline dit_dcae --levels 50,30,20

Writes convergence.png (gFID vs training steps and vs wall time, one line per run, labelled by
autoencoder), comparison.md and comparison.csv: per run the final and best gFID, the steps to reach each
gFID level (linear interpolation between logged points) and the speed-up = baseline's steps / this
run's steps to reach it (the paper's "x fewer steps"; ">k" when the baseline never reached the level,
so k is a lower bound from its last logged step). Runs that differ in DiT preset, dataset, metric
network, FID sample count or images per step (global batch) are not comparable: the md starts with a
warning and the exit status is 2 unless --allow-mismatch.

Several runs per autoencoder: runs whose config differs only in the seed (seed_everything, model.seed) and in
where they write are seeds of one experiment and form a group (tcae_ldm.metrics.seeds); runs of one autoencoder
that differ in anything else are not pooled (a warning, exit 2). Per group comparison.md and comparison_groups.csv
give mean, std and min-max of final and best gFID and of the steps to each level, each speed-up with a 95%
percentile bootstrap interval over seeds, the autoencoder's GMACs per image and its training compute (the last
train/compute_gmacs of the run folder holding the checkpoint the cache's metadata names; unknown otherwise) and
the DiT's training compute to each level (gen/compute_gmacs). convergence.png draws each group's mean and min-max
band against DiT steps, total training compute (autoencoder + DiT) and wall time.

Run folder format (a Lightning CSVLogger folder as LightningCLI writes it; the generation-eval callback
logs these with the trainer's global step, which CSVLogger writes as the `step` column):
    RUN_DIR/metrics.csv    the columns of tcae_ldm.metrics.convergence; other columns are ignored
    RUN_DIR/config.yaml    LightningCLI's saved config: the run's identity (IDENTITY_KEYS)
    RUN_DIR/hparams.yaml   optional, the module's saved hyperparameters
    <cache_dir>/metadata.json  the latent cache named by data.init_args.cache_dir, when it is reachable:
                           which autoencoder made the latents, from which dataset, at which image size
"""
from __future__ import annotations

import csv
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import yaml

from tcae_ldm.commands import CommandParser, fail
from tcae_ldm.metrics.convergence import (
    COMPUTE_COLUMN,
    GEN_PREFIX,
    GFID_COLUMN,
    IMAGES_SEEN_COLUMN,
    METRICS_FILE,
    NUM_SAMPLES_COLUMN,
    WALL_TIME_COLUMN,
    auto_levels,
    checkpoint_training_gmacs,
    find_metrics,
    read_metrics,
    steps_to_reach,
)
from tcae_ldm.metrics.seeds import (
    BOOTSTRAP_LEVEL,
    BOOTSTRAP_RESAMPLES,
    band,
    differing_keys,
    experiment_key,
    group_table,
    summarise_group,
)
from tcae_ldm.utils.files import lookup, read_lenient_yaml

CONFIG_FILE, HPARAMS_FILE = "config.yaml", "hparams.yaml"

# Where each part of a run's identity is read, first hit wins: "<source>:<dotted key>" with source
# config (config.yaml), hparams (hparams.yaml) or cache (the latent cache's metadata.json). A value may be
# a string or a mapping ({class_path, init_args}, {kind, name, path}, ...), summarised by describe().
IDENTITY_KEYS = {
    "autoencoder": ("config:model.init_args.autoencoder", "hparams:autoencoder", "cache:autoencoder",
                    "config:data.init_args.expect_autoencoder"),
    "dit": ("config:model.init_args.dit", "hparams:dit"),
    "dataset": ("config:data.init_args.dataset", "hparams:dataset", "cache:dataset"),
    "image_size": ("cache:image_size", "config:data.init_args.expect_image_size", "config:data.init_args.image_size"),
    "autoencoder_gmacs": ("config:model.init_args.autoencoder_gmacs", "hparams:autoencoder_gmacs",
                          "cache:autoencoder_gmacs", "config:model.init_args.autoencoder.init_args.gmacs",
                          "config:model.init_args.autoencoder.gmacs"),
}
CACHE_DIR_KEY = "data.init_args.cache_dir"
_NAME_FIELDS = ("name", "preset", "net")
_PATH_FIELDS = ("path", "root", "ckpt_path", "checkpoint", "pretrained", "pretrained_model_name_or_path", "repo_id")


def describe(value) -> str | None:
    """A short identity string: 'DiT-XL/1', 'tcae TC-AE-B/p8-c128', 'dcae mit-han-lab/dc-ae-...',
    'ImageFolderDataModule /data/imagenet'."""
    if value is None or value == "":
        return None
    if not isinstance(value, dict):
        return str(value)
    fields = {**(value.get("init_args") or {}), **{k: v for k, v in value.items() if k != "init_args"}}
    cls = fields.get("class_path") or fields.get("datamodule")
    kind = str(fields["kind"]) if fields.get("kind") else str(cls).rsplit(".", 1)[-1] if cls else None
    name = next((str(fields[k]) for k in _NAME_FIELDS if fields.get(k)), None)
    path = None if name else next((str(fields[k]) for k in _PATH_FIELDS if fields.get(k)), None)
    return " ".join(w for w in (kind, name, path) if w) or yaml.safe_dump(value, default_flow_style=True).strip()


@dataclass
class Run:
    """One DiT run: identity from its config, and its gFID curve with the chosen metric network."""

    path: str
    name: str
    identity: dict
    metrics: dict[int, dict[str, float]]
    config: dict = field(default_factory=dict)
    cache: dict = field(default_factory=dict)
    net: str | None = None
    curve: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def nets(self) -> list[str]:
        pre = GFID_COLUMN.format(net="")
        return sorted({k[len(pre):] for vals in self.metrics.values() for k in vals if k.startswith(pre)})

    def select(self, net: str) -> None:
        """Keep the logged points that have gen/gfid_{net}: steps, gfid and (NaN where absent) time / images."""
        col = GFID_COLUMN.format(net=net)
        rows = [(s, v) for s, v in self.metrics.items() if col in v]
        self.net = net
        self.curve = {"step": np.array([s for s, _ in rows], float), "gfid": np.array([v[col] for _, v in rows])}
        for key, column in (("wall_time_s", WALL_TIME_COLUMN), ("images_seen", IMAGES_SEEN_COLUMN),
                            ("num_samples", NUM_SAMPLES_COLUMN), ("compute_gmacs", COMPUTE_COLUMN)):
            self.curve[key] = np.array([v.get(column, np.nan) for _, v in rows])


def load_run(run_dir: str) -> Run:
    metrics_path = find_metrics(run_dir)
    folder = os.path.dirname(metrics_path)
    sources = {"config": read_lenient_yaml(os.path.join(folder, CONFIG_FILE)),
               "hparams": read_lenient_yaml(os.path.join(folder, HPARAMS_FILE)), "cache": {}}
    cache_dir = lookup(sources["config"], CACHE_DIR_KEY)
    if isinstance(cache_dir, str) and os.path.isfile(os.path.join(cache_dir, "metadata.json")):
        with open(os.path.join(cache_dir, "metadata.json")) as f:
            sources["cache"] = json.load(f)
    identity = {}
    for what, keys in IDENTITY_KEYS.items():
        found = (lookup(sources[k.split(":", 1)[0]], k.split(":", 1)[1]) for k in keys)
        value = next((v for v in found if v not in (None, "")), None)
        identity[what] = value if what == "autoencoder_gmacs" else describe(value)
    parent, base = os.path.split(os.path.abspath(folder))
    name = f"{os.path.basename(parent)}/{base}" if base.startswith("version_") else base  # version_0 says nothing
    try:
        metrics = read_metrics(metrics_path)
    except (ValueError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{metrics_path} is not a metrics table a CSVLogger writes ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''})") from None
    return Run(folder, name, identity, metrics, sources["config"], sources["cache"])


def autoencoder_training_gmacs(run: Run) -> float | None:
    """The training compute of the autoencoder that made the run's latents (None: unknown)."""
    path = (run.cache.get("autoencoder") or {}).get("path")
    return checkpoint_training_gmacs(path) if isinstance(path, str) and path else None


def mismatches(runs: list[Run]) -> tuple[list[str], list[str]]:
    """(reasons the runs are not comparable, notes on what could not be checked)."""
    problems, notes = [], []
    checks = [(what, [r.identity[key] for r in runs]) for what, key in
              (("DiT preset", "dit"), ("dataset", "dataset"), ("image size", "image_size"))]
    checks.append(("metric network", [r.net for r in runs]))
    samples = [np.unique(r.curve["num_samples"][~np.isnan(r.curve["num_samples"])]) for r in runs]
    checks.append(("FID sample count", [",".join(f"{v:g}" for v in s) or None for s in samples]))
    # steps only compare when a step means the same number of images (the same global batch)
    batch = [np.nanmedian(r.curve["images_seen"] / np.maximum(r.curve["step"], 1))
             if not np.isnan(r.curve["images_seen"]).all() else None for r in runs]
    checks.append(("images per step", [None if b is None else f"{b:.4g}" for b in batch]))
    for what, values in checks:
        known = {v for v in values if v is not None}
        if len(known) > 1:
            problems.append(f"different {what}: " + ", ".join(f"{r.name}={v}" for r, v in zip(runs, values)))
        missing = [r.name for r, v in zip(runs, values) if v is None]
        if missing and what in ("DiT preset", "dataset"):
            notes.append(f"{what} not recorded for {', '.join(missing)}; not checked")
    return problems, notes


def _md_cell(key: str, value) -> str:
    if key.startswith(("steps_to", "speedup", "dit_gmacs_to")) and value is None:
        return "not reached"
    if key.endswith("gmacs") or key.startswith("dit_gmacs_to"):
        return "unknown" if value is None else f"{value:.4g}"
    if key.startswith("speedup"):
        return f"{value}x" if isinstance(value, str) else f"{value:.2f}x"
    if key.startswith("steps_to"):
        return f"{value:.0f}"
    if isinstance(value, float):
        return f"{value:.2f}"
    return "" if value is None else str(value)


def compare_runs(run_dirs: list[str], baseline: str | None = None, metric: str | None = None,
                 levels: list[float] | None = None,
                 ci: tuple[float, int] = (BOOTSTRAP_LEVEL, BOOTSTRAP_RESAMPLES)) -> dict:
    """Load runs and build the tables: {'runs', 'baseline', 'levels', 'rows', 'problems', 'notes', 'groups',
    'group_rows', 'ci'}; ci = (level, resamples) of the bootstrap intervals."""
    runs = [load_run(d) for d in run_dirs]
    want = metric.removeprefix(GEN_PREFIX).removeprefix("gfid_") if metric else None
    for r in runs:
        nets = r.nets
        if not nets:
            raise ValueError(f"{r.path}: {METRICS_FILE} has no {GFID_COLUMN} column")
        if want and want not in nets:
            raise ValueError(f"{r.path}: no {GFID_COLUMN.format(net=want)} column (it has "
                             f"{', '.join(GFID_COLUMN.format(net=n) for n in nets)})")
    if want is None:  # the network all runs share, Inception first; otherwise each run's own (flagged below)
        common = set.intersection(*(set(r.nets) for r in runs))
        want = "inception" if "inception" in common else (min(common) if common else None)
    for r in runs:
        r.select(want if want in r.nets else ("inception" if "inception" in r.nets else r.nets[0]))
        if not len(r.curve["step"]):
            raise ValueError(f"{r.path}: no logged gFID values")
    matches = [r for r in runs if baseline in (None, r.name, r.path, os.path.basename(r.path))]
    if not matches:
        raise ValueError(f"baseline {baseline!r} is none of the runs: {', '.join(r.name for r in runs)}")
    base = matches[0]
    levels = sorted(levels, reverse=True) if levels else auto_levels(base.curve["step"], base.curve["gfid"])
    labels = [r.identity["autoencoder"] or r.name for r in runs]
    rows = []
    base_steps = {lv: steps_to_reach(base.curve["step"], base.curve["gfid"], lv) for lv in levels}
    logged_compute = all(not np.isnan(r.curve["compute_gmacs"]).any() for r in runs)
    for r, label in zip(runs, labels):
        c = r.curve
        row = {"run": r.name, "autoencoder": label if labels.count(label) == 1 else f"{label} ({r.name})"}
        if any(x.identity["autoencoder_gmacs"] is not None for x in runs):
            row["autoencoder_gmacs"] = r.identity["autoencoder_gmacs"]
        best = int(np.argmin(c["gfid"]))
        row.update({"dit": r.identity["dit"], "metric": f"gfid_{r.net}", "final_step": int(c["step"][-1]),
                    "final_gfid": float(c["gfid"][-1]), "best_step": int(c["step"][best]),
                    "best_gfid": float(c["gfid"][best])})
        for lv in levels:
            s = steps_to_reach(c["step"], c["gfid"], lv)
            b = base_steps[lv]
            row[f"steps_to_{lv:g}"] = s
            row[f"speedup_{lv:g}"] = (None if s is None or s <= 0 else b / s if b is not None
                                      else f">{base.curve['step'][-1] / s:.2f}")
            if logged_compute:  # the DiT's training GMACs at that step
                row[f"dit_gmacs_to_{lv:g}"] = None if s is None else float(np.interp(s, c["step"], c["compute_gmacs"]))
        if logged_compute:
            row["autoencoder_training_gmacs"] = autoencoder_training_gmacs(r)
        rows.append(row)
    problems, notes = mismatches(runs)
    groups = group_runs(runs)
    problems += unpooled(groups)
    base_group = next(g for g in groups if base in g["runs"])
    return {"runs": runs, "labels": [row["autoencoder"] for row in rows], "baseline": base, "levels": levels,
            "rows": rows, "problems": problems, "notes": notes, "groups": groups,
            "group_rows": [summarise_group(g["label"], [r.curve for r in g["runs"]],
                                           [r.curve for r in base_group["runs"]], levels, g["runs"][0].identity["autoencoder_gmacs"],
                                           autoencoder_training_gmacs(g["runs"][0]), [r.name for r in g["runs"]], *ci)
                           for g in groups], "ci": ci}


def group_runs(runs: list[Run]) -> list[dict]:
    """Runs whose identity and config (seeds and output folders aside) are equal: {label, key, runs}."""
    groups: list[dict] = []
    for r in runs:
        key = {**experiment_key(r.config), **{f"identity:{k}": v for k, v in r.identity.items()}}
        match = next((g for g in groups if g["key"] == key), None)
        if match:
            match["runs"].append(r)
            continue
        label = r.identity["autoencoder"] or r.name
        taken = sum(g["label"].split(" #")[0] == label for g in groups)
        groups.append({"label": f"{label} #{taken + 1}" if taken else label, "key": key, "runs": [r]})
    return groups


def unpooled(groups: list[dict]) -> list[str]:
    """Groups of one autoencoder that differ in more than the seed: they are not seeds of one experiment."""
    problems = []
    for i, a in enumerate(groups):
        for b in groups[i + 1:]:
            ae = a["key"].get("identity:autoencoder")
            if ae is not None and ae == b["key"].get("identity:autoencoder"):
                keys = differing_keys(a["key"], b["key"])
                problems.append(f"runs of {ae} differ in more than the seed ({', '.join(keys[:4])}"
                                f"{', ...' if len(keys) > 4 else ''}): {a['runs'][0].name} and {b['runs'][0].name} "
                                f"are not pooled")
    return problems


def write_table(result: dict, out_dir: str) -> None:
    rows = result["rows"]
    with open(os.path.join(out_dir, "comparison.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows([{k: ("not reached" if v is None and k.startswith(("steps_to", "speedup")) else
                          round(v, 4) if isinstance(v, float) else v) for k, v in row.items()} for row in rows])
    lines = [f"> WARNING: these runs are not comparable: {p}" for p in result["problems"]]
    lines += ([""] if lines else []) + ["# gFID convergence", ""]
    lines.append(f"Metric: {', '.join(sorted({row['metric'] for row in rows}))}; baseline: {result['baseline'].name}; "
                 f"levels: {', '.join(f'{lv:g}' for lv in result['levels'])}. Speed-up = baseline's steps / this "
                 f"run's steps to reach a level; '>k' when the baseline never reached it (a lower bound).")
    lines += [""] + [f"Note: {n}" for n in result["notes"]] + ([""] if result["notes"] else [])
    header = list(rows[0])
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_md_cell(k, row[k]) for k in header) + " |" for row in rows]
    base = next(g["label"] for g in result["groups"] if result["baseline"] in g["runs"])
    lines += [""] + group_table(result["group_rows"], result["levels"], base, *result["ci"])
    with open(os.path.join(out_dir, "comparison.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    groups = result["group_rows"]
    with open(os.path.join(out_dir, "comparison_groups.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(groups[0]))
        w.writeheader()
        w.writerows([{k: ("" if v is None else round(v, 4) if isinstance(v, float) else v) for k, v in g.items()}
                     for g in groups])


def draw(result: dict):
    """The figure: gFID vs DiT steps, vs total training compute (autoencoder + DiT) when the runs logged it, and
    vs wall time; per group the mean over seeds and a min-max band. Returns (figure, {panel: {group: band}})."""
    import matplotlib

    matplotlib.use("Agg")  # files only, also on machines without a display
    import matplotlib.pyplot as plt

    panels = {"steps": ("training steps", lambda r, ae: r.curve["step"])}
    if all(not np.isnan(r.curve["compute_gmacs"]).any() for r in result["runs"]):
        panels["compute"] = ("training compute, autoencoder + DiT (GMACs)",
                             lambda r, ae: r.curve["compute_gmacs"] + (ae or 0.0))
    if all(not np.isnan(r.curve["wall_time_s"]).any() for r in result["runs"]):
        panels["time"] = ("DiT training wall time (min)", lambda r, ae: r.curve["wall_time_s"] / 60)
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    bands: dict = {name: {} for name in panels}
    for ax, (name, (xlabel, xs)) in zip(axes[0], panels.items()):
        for group, row in zip(result["groups"], result["group_rows"]):
            ae = row["autoencoder_training_gmacs"]
            x, mean, lo, hi = band([(xs(r, ae), r.curve["gfid"]) for r in group["runs"]])
            bands[name][group["label"]] = (x, mean, lo, hi)
            label = f"{group['label']} (n={len(group['runs'])})"
            if name == "compute" and ae is None:
                label += ", AE training unknown"
            line, = ax.plot(x, mean, marker="o", ms=3, label=label)
            if len(group["runs"]) > 1:
                ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.2, lw=0)
        for lv in result["levels"]:
            ax.axhline(lv, color="gray", lw=0.6, ls=":")
        ax.set_xlabel(xlabel)
        ax.set_xscale("log" if name == "compute" else "linear")
        ax.set_ylabel(", ".join(sorted({f"gfid_{r.net}" for r in result["runs"]})) + " (mean, min-max band)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if result["problems"]:
        fig.suptitle("WARNING: runs not comparable (see comparison.md)", color="red")
    fig.tight_layout()
    return fig, bands


def plot(result: dict, out_dir: str) -> None:
    import matplotlib.pyplot as plt

    fig, _ = draw(result)
    fig.savefig(os.path.join(out_dir, "convergence.png"), dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    p = CommandParser(prog="tcae-ldm compare", description=__doc__)
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="Lightning CSVLogger folders of DiT runs")
    p.add_argument("--out", required=True, help="folder for convergence.png, comparison.md, comparison.csv")
    p.add_argument("--baseline", default=None, help="run name (folder name) to compare against (default: first)")
    p.add_argument("--metric", default=None, help="e.g. gfid_inception (default: the network all runs logged)")
    p.add_argument("--levels", default=None,
                   help="gFID levels, e.g. 50,30,20 (default: the baseline's best at 25/50/100%% of its run)")
    p.add_argument("--allow-mismatch", action="store_true", help="exit 0 even when the runs are not comparable")
    p.add_argument("--ci-level", type=float, default=BOOTSTRAP_LEVEL, help="level of the speed-ups' intervals")
    p.add_argument("--resamples", type=int, default=BOOTSTRAP_RESAMPLES, help="bootstrap resamples per interval")
    args = p.parse_args(argv)
    try:
        levels = [float(v) for v in args.levels.split(",") if v.strip()] if args.levels else None
        if not 0 < args.ci_level < 1 or args.resamples < 1:
            raise ValueError(f"--ci-level must lie in (0, 1) and --resamples be >= 1 (got {args.ci_level}, "
                             f"{args.resamples})")
        result = compare_runs(args.runs, args.baseline, args.metric, levels, (args.ci_level, args.resamples))
    except (ValueError, FileNotFoundError) as e:
        fail("tcae-ldm compare", str(e))
    os.makedirs(args.out, exist_ok=True)
    write_table(result, args.out)
    plot(result, args.out)
    print(open(os.path.join(args.out, "comparison.md")).read(), end="")
    if result["problems"] and not args.allow_mismatch:
        print("runs are not comparable (" + "; ".join(result["problems"]) + "); pass --allow-mismatch to "
              "accept", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
