"""The report's plots: DIR/plots/losses.png, rl.png and frontier.png, drawn from the run's files.

matplotlib (Agg) is imported only when a plot is drawn, so that `lmschool --help` and `lmschool run`
stay quick to start; a plot with nothing to show is not drawn (its draw function returns False).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from lmschool.pipeline import TITLES, names
from lmschool.report.collect import read_jsonl_rows


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path: Path) -> None:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    os.replace(tmp, path)


def _series(rows: list[dict], keys: list[str]) -> tuple[list[float], list[float], str | None]:
    """(x, y, key) for the first of `keys` that rows carry; x is the iteration or step."""
    for key in keys:
        points = [(r.get("step", i), r[key]) for i, r in enumerate(rows)
                  if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
        if points:
            return [p[0] for p in points], [p[1] for p in points], key
    return [], [], None


# The keys the stages log in metrics.jsonl: "loss" (pretrain, SFT, reward, DPO), "pg_loss" (PPO, GRPO);
# PPO and GRPO log the reward, the teacher's score of the rollouts and their KL to the reference.
LOSS_KEYS = ["loss", "pg_loss"]
RL_STAGES = ("ppo", "grpo")     # the stages that log per iteration (lmschool ppo), one step each
RL_PANELS = [("RM reward", ["reward"]),
             ("teacher score", ["teacher_score"]),
             ("KL to the reference (nats)", ["kl"])]


def plot_losses(run_dir: Path, path: Path) -> bool:
    """One panel per training stage with a metrics.jsonl: training loss and held-out loss by step."""
    curves = {}
    for stage in names("training", "policy"):
        rows = read_jsonl_rows(run_dir / stage / "metrics.jsonl")
        x, y, key = _series([r for r in rows if "val_loss" not in r or any(k in r for k in LOSS_KEYS)], LOSS_KEYS)
        if key:
            curves[stage] = (x, y, key, *_series(rows, ["val_loss"])[:2])
    if not curves:
        return False
    plt = _pyplot()
    cols = min(3, len(curves))
    rows_n = math.ceil(len(curves) / cols)
    fig, axes = plt.subplots(rows_n, cols, figsize=(4.2 * cols, 3.0 * rows_n), squeeze=False)
    for ax, (stage, (x, y, key, vx, vy)) in zip(axes.flat, curves.items()):
        ax.plot(x, y, lw=1.2, label=f"train {key}")
        if vx:
            ax.plot(vx, vy, "o-", ms=3, lw=1, label="held-out loss")
        if min(y) > 0 and max(y) / min(y) > 10:
            from matplotlib.ticker import NullFormatter, ScalarFormatter
            ax.set_yscale("log")
            ax.yaxis.set_major_formatter(ScalarFormatter())
            ax.yaxis.set_minor_formatter(NullFormatter())
        ax.set_title(TITLES[stage])
        ax.set_xlabel("iteration" if stage in RL_STAGES else "step")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(curves):]:
        ax.axis("off")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def plot_rl(run_dir: Path, path: Path) -> bool:
    """PPO and GRPO per iteration: RM reward, teacher score, KL to the reference."""
    runs = {s: read_jsonl_rows(run_dir / s / "metrics.jsonl") for s in RL_STAGES}
    panels = [(title, {s: _series(rows, keys) for s, rows in runs.items()}) for title, keys in RL_PANELS]
    if not any(xy[2] for _, lines in panels for xy in lines.values()):
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(12.6, 3.2))
    for ax, (title, lines) in zip(axes, panels):
        for stage, (x, y, key) in lines.items():
            if key:
                ax.plot(x, y, lw=1.2, label=f"{TITLES[stage]} ({key})")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


PARAM_LABELS = {"beta": "β", "kl": "KL coef"}


def plot_frontier(points: list[dict], path: Path) -> bool:
    if not any(p["method"] != "sft" for p in points):
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    colours = {m: f"C{i}" for i, m in enumerate(names("policy"))}
    for method in dict.fromkeys(p["method"] for p in points if p.get("sweep")):
        sweep = sorted((p for p in points if p.get("sweep") and p["method"] == method), key=lambda p: p["kl_from_sft"])
        ax.plot([p["kl_from_sft"] for p in sweep], [p["teacher_score"] for p in sweep], "o--", ms=4, lw=1,
                color=colours.get(method, "gray"), alpha=0.7, label=f"{TITLES.get(method, method)} sweep")
        for p in sweep:
            ax.annotate(f"{PARAM_LABELS.get(p['param'], p['param'])}={p['value']:g}", (p["kl_from_sft"],
                        p["teacher_score"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
    for p in points:
        if p["method"] == "sft":
            ax.plot(0.0, p["teacher_score"], "k*", ms=11, label="SFT (KL 0)")
        elif not p.get("sweep"):
            ax.plot(p["kl_from_sft"], p["teacher_score"], "s", ms=7, color=colours.get(p["method"], "gray"),
                    markeredgecolor="black", label=p["label"])
    ax.set_xlabel("KL from SFT (nats per answer)")
    sampled = any(p.get("score") == "teacher_score_sampled" for p in points)
    ax.set_ylabel("teacher score (gold judge)" + (", answers sampled at T = 1" if sampled else ""))
    ax.set_title("Reward vs KL frontier")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)
    return True


def draw_plots(run_dir: Path, frontier: list[dict]) -> dict[str, str]:
    """Draw every plot that has data into DIR/plots/; {name: path relative to DIR}."""
    plots_dir = run_dir / "plots"
    plots_dir.mkdir(exist_ok=True)
    drawn = {}
    for name, draw in (("losses", lambda p: plot_losses(run_dir, p)), ("rl", lambda p: plot_rl(run_dir, p)),
                       ("frontier", lambda p: plot_frontier(frontier, p))):
        if draw(plots_dir / f"{name}.png"):
            drawn[name] = f"plots/{name}.png"
    return drawn
