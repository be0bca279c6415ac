"""The locality analysis' figures (matplotlib, Agg backend), written atomically as PNG."""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np

ADV, MEM, NON, INIT = "#d62728", "#1f77b4", "#2ca02c", "#7f7f7f"


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    from memobench.api import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    _plt().close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def _finish(fig, path: Path, title: str, fontsize: int = 11) -> Path:
    fig.suptitle(title, fontsize=fontsize)
    fig.tight_layout()
    return _save(fig, path)


def short_layer(name: str | None) -> str:
    """``down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v`` → ``down1.a0``; ``mid_block…`` → ``mid.a0``."""
    if not name:
        return "?"
    m = re.match(r"(down|up)_blocks\.(\d+)\.attentions\.(\d+)", name)
    if m:
        return f"{m.group(1)}{m.group(2)}.a{m.group(3)}"
    m = re.match(r"mid_block\.attentions\.(\d+)", name)
    return f"mid.a{m.group(1)}" if m else name.split(".")[0]


def _bar_labels(ax, bars, values, fmt="{:.3g}", fontsize=7):
    for b, v in zip(bars, values):
        if v is None:
            ax.text(b.get_x() + b.get_width() / 2, 0, "n/a", ha="center", va="bottom", fontsize=fontsize, rotation=90)
            continue
        ax.text(b.get_x() + b.get_width() / 2, b.get_height(), fmt.format(v), ha="center", va="bottom",
                fontsize=fontsize, rotation=90 if len(bars) > 6 else 0)


def input_space(section: dict, distances: dict, path: Path, target: str) -> Path:
    """Left: the 2-D projection of inits, results, the memorized prompt and non-memorized prompts; right: the
    pairwise-L2 distributions."""
    plt = _plt()
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(13, 5.4), gridspec_kw={"width_ratios": [1.15, 1]})
    proj = section["projection"]
    c = proj["coords"]
    inits, res = np.asarray(c["inits"]), np.asarray(c["results"])
    scores = np.array([r["score"] for r in section["per_init"]])
    succ = np.array([r["success"] for r in section["per_init"]])
    for a, b in zip(inits, res):
        ax.plot([a[0], b[0]], [a[1], b[1]], color="#bbbbbb", lw=0.6, zorder=1)
    ax.scatter(inits[:, 0], inits[:, 1], marker="x", s=22, color=INIT, label="Gaussian inits y⁽⁰⁾", zorder=5)
    sc = ax.scatter(res[:, 0], res[:, 1], c=scores, cmap="viridis", vmin=0, vmax=1, s=36, zorder=3,
                    edgecolors=np.where(succ, "black", "none").tolist(), linewidths=1.0,
                    label=f"DoRI results (black edge: SSCD > {section['threshold']})")
    if c["nonmem_prompts"]:
        nm = np.asarray(c["nonmem_prompts"])
        ax.scatter(nm[:, 0], nm[:, 1], marker="^", s=20, color=NON, label="non-memorized prompts", zorder=2)
    mp = c["memorized_prompt"]
    ax.scatter([mp[0]], [mp[1]], marker="*", s=260, color=ADV, edgecolors="black", label="memorized prompt e_p",
               zorder=4)
    fig.colorbar(sc, ax=ax, fraction=0.046, pad=0.02).set_label(
        f"SSCD to the training image ({section['success_level']} over seeds)")
    m = proj["method"]
    lab = "t-SNE" if m == "tsne" else "PC"
    ax.set_xlabel(f"{lab} 1")
    ax.set_ylabel(f"{lab} 2")
    if m == "pca" and "explained_variance_ratio" in proj:
        ev = proj["explained_variance_ratio"]
        ax.set_xlabel(f"PC 1 ({100 * ev[0]:.0f}% var.)")
        ax.set_ylabel(f"PC 2 ({100 * ev[1]:.0f}% var.)" if len(ev) > 1 else "PC 2")
    ax.set_title(f"2-D projection ({'t-SNE' if m == 'tsne' else 'PCA'}) of the 77×d embeddings", fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.11), ncol=2, framealpha=0.85)

    order = [("adversarial", "DoRI results\n(all)", ADV), ("adversarial_successful", "DoRI results\n(successful)", ADV),
             ("inits", "Gaussian\ninits", INIT), ("nonmem_prompts", "non-memorized\nprompts", NON),
             ("memorized_prompts", "memorized\nprompts", MEM)]
    data, labels, colors = [], [], []
    for k, lab_, col in order:
        d = distances.get(k)
        if d is not None and len(d):
            data.append(np.asarray(d))
            labels.append(f"{lab_}\n(n={len(d)} pairs)")
            colors.append(col)
    if data:
        bp = bx.boxplot(data, patch_artist=True, showmeans=True, widths=0.55,
                        meanprops={"marker": "D", "markerfacecolor": "white", "markeredgecolor": "black"})
        bx.set_xticks(np.arange(1, len(data) + 1), labels)  # (boxplot's label keyword changed name in 3.9)
        for patch, col in zip(bp["boxes"], colors):
            patch.set_facecolor(col)
            patch.set_alpha(0.45)
        for i, d in enumerate(data, start=1):
            bx.text(i + 0.3, float(np.mean(d)), f"mean {np.mean(d):.3g}", fontsize=7, va="center", ha="left")
    if data:
        bx.set_xlim(0.5, len(data) + 0.95)
    bx.set_ylabel("pairwise L2 distance ‖y_i − y_j‖₂")
    bx.tick_params(axis="x", labelsize=7)
    ratio = section.get("ratio_adversarial_over_nonmem")
    bx.set_title("Spread of the embeddings (diamond: mean)" + (f"; DoRI / non-mem = {ratio:.2f}×" if ratio else ""),
                 fontsize=10)
    return _finish(fig, path, f"Input space — target '{target}': {section['n_success']}/{section['n_inits']} Gaussian "
                   f"inits reach SSCD > {section['threshold']} (own prompt: {section['prompt_sscd']['mean']:.2f})")


def activation_space(section: dict, path: Path, target: str) -> Path:
    """Grouped bars Y_mem vs Y_adv per layer, one panel per layer family."""
    plt = _plt()
    fams = [("nemo", "NeMo layers: attn2.to_v output"), ("wanda", "Wanda layers: ff.net.2 input")]
    fams = [(f, t) for f, t in fams if any(r["family"] == f for r in section["layers"])]
    fig, axes = plt.subplots(1, len(fams), figsize=(6.2 * len(fams), 4.6), squeeze=False)
    nm, na = section["Y_mem"]["n"], section["Y_adv"]["n"]
    for ax, (fam, title) in zip(axes[0], fams):
        rows = [r for r in section["layers"] if r["family"] == fam]
        x = np.arange(len(rows))
        w = 0.38
        vm = [r["Y_mem"] for r in rows]
        va = [r["Y_adv"] for r in rows]
        b1 = ax.bar(x - w / 2, [v or 0 for v in vm], w, color=MEM, label=f"Y_mem: {nm} memorized prompts")
        b2 = ax.bar(x + w / 2, [v or 0 for v in va], w, color=ADV,
                    label=f"Y_adv: {na} DoRI embeddings ({section['Y_adv']['adv_set_used']})")
        _bar_labels(ax, b1, vm)
        _bar_labels(ax, b2, va)
        ax.set_xticks(x, [f"L{r['layer']}\n{short_layer(r['name'])}" for r in rows], fontsize=8)
        ax.set_ylabel("activation discrepancy AD_l (mean pairwise ℓ2)")
        ax.set_title(title, fontsize=10)
        ax.margins(y=0.12)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=1)
    return _finish(fig, path, f"Activation space — target '{target}' ({section['activation']} activations, fixed "
                   f"noise seed {section['noise_seed']}, t = {section['timestep']})")


def weight_space(section: dict, path: Path, target: str) -> Path:
    """Grouped bars per NeMo layer: pairwise IoU of NeMo's and Wanda's selections (Y_adv, Y_mem) and NeMo vs Wanda."""
    plt = _plt()
    rows = [r for r in section["layers"] if r.get("layer") is not None]
    series = [("nemo_Y_adv", "NeMo · Y_adv", ADV, None), ("wanda_Y_adv", "Wanda · Y_adv", "#ff7f0e", None),
              ("nemo_vs_wanda_Y_adv", "NeMo vs Wanda · Y_adv", "#9467bd", None)]
    if section.get("Y_mem"):
        series += [("nemo_Y_mem", "NeMo · Y_mem", MEM, "//"), ("wanda_Y_mem", "Wanda · Y_mem", "#17becf", "//"),
                   ("nemo_vs_wanda_Y_mem", "NeMo vs Wanda · Y_mem", "#8c564b", "//")]
    series = [s for s in series if any(r.get(s[0]) is not None for r in rows)]
    fig, ax = plt.subplots(figsize=(max(7.0, 1.6 * len(rows) + 0.5 * len(series)), 4.8))
    x = np.arange(len(rows))
    w = 0.8 / max(1, len(series))
    bound_drawn = False
    for k, (key, label, col, hatch) in enumerate(series):
        vals = [r.get(key) for r in rows]
        bars = ax.bar(x - 0.4 + w * (k + 0.5), [v or 0 for v in vals], w, color=col, hatch=hatch, label=label,
                      edgecolor="white" if hatch else None)
        _bar_labels(ax, bars, vals, "{:.2f}", fontsize=6)
        for b, r in zip(bars, rows):  # mark values that come from (mostly) empty selections
            ef = r.get(f"{key}_empty_fraction")
            if ef is not None and ef > 0.5:
                ax.text(b.get_x() + b.get_width() / 2, 1.08, "∅", ha="center", fontsize=9, color=col)
            bound = r.get(f"{key}_max")  # NeMo vs Wanda: the largest IoU the two set sizes allow
            if bound is not None:
                ax.hlines(bound, b.get_x(), b.get_x() + b.get_width(), colors="black", lw=1.6,
                          label="size bound min(|A|,|B|)/max(|A|,|B|)" if not bound_drawn else None)
                bound_drawn = True
    def tick(r):
        sizes = r.get("nemo_vs_wanda_Y_adv_mean_sizes")
        extra = (f"\nmean |NeMo| {sizes[0]:.4g}\nmean |Wanda| {sizes[1]:.3g}" if sizes and None not in sizes else "")
        return f"L{r['layer']}\n{short_layer(r['value_name'])}{extra}"

    ax.set_xticks(x, [tick(r) for r in rows], fontsize=8)
    ax.set_ylim(0, 1.18)
    ax.set_ylabel("IoU (mean over pairs / embeddings)")
    if any(r.get("nemo_vs_wanda_Y_adv_mean_sizes") for r in rows):
        ax.set_xlabel(f"|·| = {section['nemo_wanda_space']} of W_V selected per embedding (NeMo vs Wanda bars)",
                      fontsize=8)
    n = section["Y_adv"]["n"]
    ax.set_title(f"Weight space — target '{target}': agreement of selections over {n} DoRI embeddings "
                 f"({section['Y_adv']['adv_set_used']})\nNeMo: value-layer neurons; Wanda: ff.net.2 weights of the "
                 f"same block; NeMo vs Wanda: W_V ({section['nemo_wanda_space']}).\n"
                 f"∅: most selections empty (IoU of two empty sets = {section['empty_iou']:g})", fontsize=9)
    ax.legend(fontsize=7, ncol=2, loc="upper right")  # IoU ≤ 1 < ylim 1.18: the band above 1 stays free
    fig.tight_layout()
    return _save(fig, path)


def generations(runs: list[dict], prompt_images, prompt_sims, target, reference, path: Path, seeds: list[int],
                max_rows: int = 12) -> Path:
    """Training image | generations, one row for the memorized prompt and one per DoRI init (memobench's grid)."""
    from memobench.api import Prompt, Sample, write_grid

    samples, scores = [], {}

    def add(pid: str, text: str, images, sims):
        p = Prompt(pid, text, target.mem_type)
        for s, img, v in zip(seeds, images, sims):
            key = f"{pid}/{s}"
            samples.append(Sample(key, p, s, img, [reference]))
            scores[key] = float(v)

    add("prompt", f"prompt: {target.text}", prompt_images, prompt_sims)
    for r in runs[: max_rows - 1]:
        add(f"init{r['index']}", f"DoRI init {r['index']}: {'copy' if r['success'] else 'no copy'}, "
            f"SSCD {r['score']:.2f}", r["images"], r["sscd"])
    write_grid(samples, path, max_prompts=max_rows, scores=scores, title=target.id)
    return path
