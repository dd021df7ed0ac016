"""Runs that differ only in their seed: which runs pool, their spread, and bootstrap intervals of a speed-up.

A run's config (LightningCLI's config.yaml) is its identity once the seed and the places it writes to are left
out; runs with equal identities are seeds of one experiment. A speed-up of group A over baseline group B at a gFID
level is mean(B's steps to it) / mean(A's steps to it), and its interval is a percentile bootstrap over seeds: each
resample draws the seeds of both groups with replacement, independently, and the interval is the
(1 - level) / 2 and (1 + level) / 2 quantiles of the resampled ratios, from a generator with a fixed seed so the
table reproduces.
"""
from __future__ import annotations

import numpy as np

from tcae_ldm.metrics.convergence import steps_to_reach

# Config keys that never make two runs different experiments: the seeds, and where a run writes (its logger,
# checkpoint folders, the checkpoint it resumed from). A key is dropped wherever it appears in the tree.
SEED_KEYS = frozenset({"seed_everything", "seed"})
OUTPUT_KEYS = frozenset({"logger", "default_root_dir", "dirpath", "ckpt_path", "save_dir", "filename"})
BOOTSTRAP_LEVEL, BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED = 0.95, 10000, 0


def flatten(tree, prefix: str = "") -> dict[str, object]:
    """{'model.init_args.optimizer.init_args.lr': 1e-4, 'trainer.callbacks.0.class_path': ..., ...}"""
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(flatten(v, f"{prefix}{i}."))
        return out
    return {prefix[:-1]: tree}


def experiment_key(config: dict) -> dict[str, object]:
    """The flattened config without seeds and output locations: equal for seeds of one experiment."""
    ignored = SEED_KEYS | OUTPUT_KEYS
    return {k: v for k, v in flatten(config).items() if not ignored & set(k.split("."))}


def differing_keys(a: dict, b: dict) -> list[str]:
    """Keys of two flattened configs whose values differ (or that only one has)."""
    return sorted(k for k in set(a) | set(b) if a.get(k, "<absent>") != b.get(k, "<absent>"))


def spread(values) -> dict[str, float]:
    """mean, std (with n - 1; 0 for one value), min and max."""
    v = np.asarray(values, float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max())}


def bootstrap_ratio(base, other, level: float = BOOTSTRAP_LEVEL, resamples: int = BOOTSTRAP_RESAMPLES,
                    seed: int = BOOTSTRAP_SEED) -> tuple[float, float, float]:
    """(mean(base) / mean(other), lower, upper): the percentile bootstrap interval of the ratio of means, seeds of
    both groups resampled with replacement. Draws: base first, then other, each (resamples, n) from one generator."""
    base, other = np.asarray(base, float), np.asarray(other, float)
    rng = np.random.default_rng(seed)
    b = base[rng.integers(0, len(base), (resamples, len(base)))].mean(1)
    o = other[rng.integers(0, len(other), (resamples, len(other)))].mean(1)
    ratios = b / o
    lo, hi = np.quantile(ratios, [(1 - level) / 2, (1 + level) / 2])
    return float(base.mean() / other.mean()), float(lo), float(hi)


def band(curves: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x, mean, min, max) of several curves (x_i, y_i) on the steps they all cover: the first curve's steps
    inside the common range, the others linearly interpolated there."""
    start = max(float(x[0]) for x, _ in curves)
    stop = min(float(x[-1]) for x, _ in curves)
    x = np.array([s for s in curves[0][0] if start <= s <= stop], float)
    ys = np.stack([np.interp(x, cx, cy) for cx, cy in curves])
    return x, ys.mean(0), ys.min(0), ys.max(0)


def _spread_cells(row: dict, name: str, values) -> None:
    stats = spread(values) if values is not None else dict.fromkeys(("mean", "std", "min", "max"))
    row.update({f"{name}_{k}": v for k, v in stats.items()})


def summarise_group(label: str, curves: list[dict], base: list[dict], levels: list[float], ae_gmacs=None,
                    ae_training_gmacs=None, names: list[str] | None = None, level: float = BOOTSTRAP_LEVEL,
                    resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """One group's row from its seeds' curves ({step, gfid, compute_gmacs} arrays) and the baseline group's: spread
    of final / best gFID and of steps to each level, DiT compute to each level, speed-ups with bootstrap intervals
    (None: a level some seed never reached; 'n/a (1 seed)' when a group has one seed)."""
    row = {"group": label, "seeds": len(curves), "runs": " ".join(names or []), "autoencoder_gmacs": ae_gmacs,
           "autoencoder_training_gmacs": ae_training_gmacs}
    _spread_cells(row, "final_gfid", [c["gfid"][-1] for c in curves])
    _spread_cells(row, "best_gfid", [c["gfid"].min() for c in curves])
    for lv in levels:
        steps = [steps_to_reach(c["step"], c["gfid"], lv) for c in curves]
        base_steps = [steps_to_reach(c["step"], c["gfid"], lv) for c in base]
        reached = None not in steps
        _spread_cells(row, f"steps_to_{lv:g}", steps if reached else None)
        computes = [np.interp(s, c["step"], c["compute_gmacs"]) for s, c in zip(steps, curves)] \
            if reached and all(not np.isnan(c.get("compute_gmacs", np.nan)).any() for c in curves) else None
        row[f"dit_gmacs_to_{lv:g}"] = float(np.mean(computes)) if computes else None
        if reached and None not in base_steps and min(steps) > 0:
            if len(curves) > 1 and len(base) > 1:
                point, lo, hi = bootstrap_ratio(base_steps, steps, level, resamples)
            else:
                point, lo, hi = float(np.mean(base_steps) / np.mean(steps)), "n/a (1 seed)", "n/a (1 seed)"
        else:
            point = lo = hi = None
        row.update({f"speedup_{lv:g}": point, f"speedup_{lv:g}_lo": lo, f"speedup_{lv:g}_hi": hi})
    return row


def _spread_md(g: dict, name: str, fmt: str = ".2f") -> str:
    if g[f"{name}_mean"] is None:
        return "not reached by every seed"
    text = f"{g[f'{name}_mean']:{fmt}}"
    return text if g["seeds"] == 1 else (f"{text} ± {g[f'{name}_std']:{fmt}} "
                                         f"[{g[f'{name}_min']:{fmt}}, {g[f'{name}_max']:{fmt}}]")


def _gmacs_md(v) -> str:
    return "unknown" if v is None else f"{v:.4g}"


def group_table(groups: list[dict], levels: list[float], base: str, level: float = BOOTSTRAP_LEVEL,
                resamples: int = BOOTSTRAP_RESAMPLES) -> list[str]:
    """Markdown lines of the per-autoencoder table (summarise_group's rows): spread, speed-ups and intervals."""
    lines = ["# Per autoencoder (seeds pooled)", "",
             f"Runs differing only in the seed form one group; baseline group: {base}. Cells: mean ± std (n - 1) "
             f"[min, max] over seeds. Speed-up = mean baseline steps / mean steps to the level, with a "
             f"{level:.0%} percentile bootstrap interval over seeds (both groups resampled with "
             f"replacement, {resamples} resamples, fixed RNG seed); n/a with one seed. Compute in "
             f"GMACs: autoencoder encode + decode per image, autoencoder training (its run's train/compute_gmacs), "
             f"DiT training to each level (mean over seeds).", ""]
    header = ["autoencoder", "seeds", "final gFID", "best gFID", "AE GMACs/img", "AE training GMACs"]
    for lv in levels:
        header += [f"steps to {lv:g}", f"speed-up {lv:g}", f"DiT GMACs to {lv:g}"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for g in groups:
        cells = [g["group"], str(g["seeds"]), _spread_md(g, "final_gfid"), _spread_md(g, "best_gfid"),
                 _gmacs_md(g["autoencoder_gmacs"]), _gmacs_md(g["autoencoder_training_gmacs"])]
        for lv in levels:
            sp, lo, hi = (g[f"speedup_{lv:g}{x}"] for x in ("", "_lo", "_hi"))
            speed = "not reached" if sp is None else (f"{sp:.2f}x ({lo})" if isinstance(lo, str)
                                                      else f"{sp:.2f}x [{lo:.2f}, {hi:.2f}]")
            cells += [_spread_md(g, f"steps_to_{lv:g}", ".0f"), speed, _gmacs_md(g[f"dit_gmacs_to_{lv:g}"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines
