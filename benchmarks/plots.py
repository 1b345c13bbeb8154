"""Plots of a decode benchmark's entries (benchmarks/decode.py), written next to its JSON.

Each plot fixes the other sweep axes at their first value: tokens/s per method (bars per
category), and, where the sweep has two or more values, speedup over plain decoding against
batch size and against context length, and tokens/s over the meshes (devices).
"""

from __future__ import annotations

from pathlib import Path

AXES = ("mesh", "category", "context", "batch_size")


def _first(entries, key):
    return entries[0][key] if entries else None


def _where(entries, **fixed):
    return [e for e in entries if all(e[k] == v for k, v in fixed.items())]


def _values(entries, key):
    seen = []
    for e in entries:
        if e[key] not in seen:
            seen.append(e[key])
    return seen


def _methods(entries):
    return _values(entries, "method")


def write_plots(entries, json_path) -> list[Path]:
    """The plots for `entries` as PNGs beside json_path; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not entries:
        return []
    stem = Path(json_path).with_suffix("")
    fixed = {k: _first(entries, k) for k in AXES}
    written = []

    def save(fig, name):
        path = Path(f"{stem}_{name}.png")
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    def subtitle(*free):
        return ", ".join(f"{k} {fixed[k]}" for k in AXES if k not in free)

    # Tokens/s per method, one bar per category.
    rows = _where(entries, **{k: fixed[k] for k in ("mesh", "context", "batch_size")})
    methods, categories = _methods(rows), _values(rows, "category")
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(methods) * max(1, len(categories)) / 2 + 2), 4))
    width = 0.8 / len(categories)
    for i, category in enumerate(categories):
        tps = {e["method"]: e["tokens_per_second"] for e in _where(rows, category=category)}
        ax.bar([j + i * width for j in range(len(methods))], [tps.get(m, 0) for m in methods], width, label=category)
    ax.set_xticks([j + width * (len(categories) - 1) / 2 for j in range(len(methods))], methods, rotation=30, ha="right")
    ax.set_ylabel("tokens / s")
    ax.set_title(f"decoding speed ({subtitle('category')})", fontsize=9)
    ax.legend(fontsize=8)
    save(fig, "tokens_per_second")

    def against(key, name, xlabel, value="speedup_vs_ar", ylabel="speedup over plain decoding"):
        rows = _where(entries, **{k: fixed[k] for k in AXES if k != key})
        xs = _values(rows, key)
        if len(xs) < 2:
            return
        fig, ax = plt.subplots(figsize=(6, 4))
        for m in _methods(rows):
            points = {e[key]: e[value] for e in _where(rows, method=m)}
            if value == "speedup_vs_ar" and m == "ar" or any(points.get(x) is None for x in xs):
                continue
            ax.plot(range(len(xs)), [points[x] for x in xs], marker="o", label=m)
        ax.set_xticks(range(len(xs)), [str(x) for x in xs])
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        if value == "speedup_vs_ar":
            ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(f"{ylabel} ({subtitle(key)})", fontsize=9)
        ax.legend(fontsize=8)
        save(fig, name)

    against("batch_size", "speedup_vs_batch", "batch size")
    against("context", "speedup_vs_context", "context (tokens)")
    against("mesh", "scaling_vs_devices", "mesh", value="tokens_per_second", ylabel="tokens / s")
    return written
