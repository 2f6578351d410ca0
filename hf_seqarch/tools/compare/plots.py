"""PNG plots of the results (matplotlib, the `plots` extra). Returns the file names written."""

import importlib.util
import math
import os

from .tasks import chance_levels

PLOTS_MISSING = "matplotlib is not installed: no plots (pip install 'hf-seqarch[plots]')"
NOTHING_TO_PLOT = "no plots: no stage measured what they draw"
PLOT_FILES = ("throughput.png", "memory.png", "decode.png", "recall.png")  # every plot write_plots can draw


def write_plots(results: dict, output_dir: str) -> list[str]:
    try:  # Figure objects, not pyplot: files only, no display, and the caller's pyplot backend is left as it was
        from matplotlib.figure import Figure
    except ImportError:
        return []
    archs = results["architectures"]  # a failed stage leaves its key out: each plot draws what was measured
    device = results["environment"]["device_name"]
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(os.path.join(output_dir, name), dpi=110)
        written.append(name)

    def lines(ax, key, x, y, scale=1.0):
        for name, arch in archs.items():
            rows = arch.get(key) or []
            if rows:
                ax.plot([r[x] for r in rows], [r[y] * scale for r in rows], marker="o", label=name)
        ax.set_xscale("log", base=2)
        ax.grid(True, which="both", alpha=0.3)

    for key, y, scale, label, name in (
        ("training_speed", "tokens_per_second", 1.0, "training tokens/s", "throughput.png"),
        ("training_speed", "peak_memory_bytes", 2**-20, "peak memory of a step (MiB)", "memory.png"),
    ):
        if any(a.get(key) for a in archs.values()):
            fig = Figure(figsize=(6, 4))
            ax = fig.subplots()
            lines(ax, key, "seq_len", y, scale)
            ax.set(xlabel="sequence length (tokens per step fixed)", ylabel=label)
            ax.set_title(f"{label} vs length\n{device}", fontsize=10)
            ax.set_yscale("log")
            ax.legend(fontsize=8)
            save(fig, name)

    if any(a.get("decode") for a in archs.values()):
        fig = Figure(figsize=(10, 4))
        left, right = fig.subplots(1, 2)
        lines(left, "decode", "context", "ms_per_token")
        left.set(xlabel="context length", ylabel="ms per generated token", title="decode time per token")
        lines(right, "decode", "context", "cache_bytes", 1 / 1024)
        right.set(xlabel="context length", ylabel="cache KiB", title="cache size", yscale="log")
        left.legend(fontsize=8)
        save(fig, "decode.png")

    scored = {n: a for n, a in archs.items() if a.get("mqar", {}).get("accuracy") or a.get("selective_copying")}
    if scored:
        lengths = sorted({int(k) for a in scored.values() for k in a.get("mqar", {}).get("accuracy", {})})
        groups = [f"MQAR {n}" for n in lengths] + ["selective copying"]
        fig = Figure(figsize=(8, 4))
        ax = fig.subplots()
        width = 0.8 / len(scored)
        for i, (name, arch) in enumerate(scored.items()):
            # NaN where unmeasured (e.g. a task that failed): no bar, where 0.0 would draw a 0% one
            values = [arch.get("mqar", {}).get("accuracy", {}).get(str(n), math.nan) for n in lengths]
            values.append(arch.get("selective_copying", {}).get("accuracy", math.nan))
            ax.bar([g + i * width for g in range(len(groups))], values, width, label=name)
        preset = results["preset"]
        mqar_chance, copy_chance = chance_levels(preset)
        for g, level in enumerate([mqar_chance.get(n, math.nan) for n in lengths] + [copy_chance]):
            ax.hlines(level, g - width / 2, g + 0.8 - width / 2, colors="gray", linestyles="dotted",
                      label="chance" if g == 0 else None)
        ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], groups)
        ax.set(ylabel="accuracy", ylim=(0, 1), title="recall after the same training budget")
        ax.legend(fontsize=8)
        save(fig, "recall.png")
    return written


def plots_note() -> str:
    """Why write_plots drew nothing: matplotlib missing (or failing to import), or nothing measured."""
    try:
        from matplotlib.figure import Figure  # noqa: F401
    except ImportError as error:
        installed = importlib.util.find_spec("matplotlib") is not None
        return f"no plots: matplotlib fails to import ({error})" if installed else PLOTS_MISSING
    return NOTHING_TO_PLOT
