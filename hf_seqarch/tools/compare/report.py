"""report.md: the verdicts first, then the tables they come from, the plots and the settings."""

from .tasks import chance_levels
from .verdicts import THRESHOLDS


def _mib(size):
    return f"{size / 2**20:.2f}"


def _kib(size):
    return f"{size / 1024:.1f}"


def _recall(accuracy, chance):
    """An accuracy cell, marked where it is near chance (nothing learned): below twice chance, or, for a chance above
    a third (MQAR with 2 pairs: 50%), below halfway from chance to 100%."""
    near = min(2 * chance, (1 + chance) / 2)
    return _pct(accuracy) + (" *(near chance)*" if accuracy is not None and accuracy < near else "")


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]


def render(results: dict, plots: list[str]) -> str:
    env, preset, archs = results["environment"], results["preset"], results["architectures"]
    out = [f"# hf-seqarch compare: preset `{preset['name']}` on {env['device_name']}", ""]
    status = results["status"]
    if status != "complete":
        out += [f"**Status: {status}.** The tables hold what finished; missing cells are stages that did not run.", ""]
    load = env.get("load_average_start"), env.get("load_average_end")
    out += [
        f"- Device: {env['device_name']} (`{env['device']}`), {env['torch_threads']} torch threads, "
        f"{env['cpu_count']} CPUs; torch {env['torch']}, transformers {env['transformers']}, hf_seqarch {env['hf_seqarch']}.",
        f"- Wall time: {results.get('wall_seconds', 0):.0f} s ({_num(results.get('cpu_seconds'), '{:.0f}')} s of CPU time "
        f"in this process). 1-min load average at start {_load(load[0])}, at end {_load(load[1])} (in a container, "
        f"the host's: compare it with the host's CPUs): on a busy machine timings are slower and noisier.",
        f"- Command: `{results['command']}`",
        "",
        "## Verdicts",
        "",
    ]
    if preset["name"] == "test":
        out += [f"(Preset `test`: {preset['description']}. The verdicts below show the report's format, not findings.)",
                ""]
    for v in results.get("verdicts", []):
        out.append(f"- **{v['claim']}**: **{v['verdict']}**. {v['evidence']}.")
    out += ["", f"Thresholds: {THRESHOLDS}.", ""]
    if results.get("skipped"):
        out += ["Skipped: " + "; ".join(f"{n} ({why})" for n, why in results["skipped"].items()), ""]
    failed = {n: a["error"] for n, a in archs.items() if a.get("error")}
    if failed:
        out += ["Failed: " + "; ".join(f"{n}: {err}" for n, err in failed.items()), ""]

    out += ["## Architectures at matched size", "", results["parameter_matching"]["method"], ""]
    out += _table(
        ["architecture", "mixers", "width", "MLP width", "parameters", "non-embedding", "vs transformer"],
        [[n, " / ".join(dict.fromkeys(a["mixer_types"])), a["hidden_size"], a["intermediate_size"],
          f"{a['parameters']:,}", f"{a['non_embedding_parameters']:,}",
          f"{a['non_embedding_parameters'] / results['parameter_matching']['target_non_embedding_parameters'] - 1:+.1%}"]
         for n, a in archs.items()],
    )

    lengths = list(preset["train_lengths"])
    out += ["", "## Training speed and memory against sequence length", "",
            f"One training step (forward, backward, AdamW) of {preset['tokens_per_step']} tokens "
            f"(batch = {preset['tokens_per_step']} / length), {preset['warmup']} warm-up step(s), median of "
            f"{preset['repeats']}, the lengths' steps interleaved (one model; each round times every length once). "
            f"Peak memory: {results['memory_method']}.", ""]
    out += _table(["architecture"] + [f"tokens/s @{n}" for n in lengths] + [f"peak MiB @{n}" for n in lengths],
                  [[n] + _cells(a.get("training_speed"), "seq_len", lengths, "tokens_per_second", lambda x: f"{x:,.0f}")
                   + _cells(a.get("training_speed"), "seq_len", lengths, "peak_memory_bytes", _mib)
                   for n, a in archs.items()])

    contexts = list(preset["decode_contexts"])
    out += ["", "## Decoding against context length", "",
            f"Batch 1: a prompt of each length prefilled, then one token per forward from the cache; "
            f"2 warm-up tokens, median of {preset['decode_repeats']}. Cache size: `SeqArchCache.get_memory_footprint()` "
            "after the prompt.", ""]
    out += _table(["architecture"] + [f"ms/token @{c}" for c in contexts] + [f"cache KiB @{c}" for c in contexts],
                  [[n] + _cells(a.get("decode"), "context", contexts, "ms_per_token", lambda x: f"{x:.2f}")
                   + _cells(a.get("decode"), "context", contexts, "cache_bytes", _kib)
                   for n, a in archs.items()])

    mqar = [length for length, _ in preset["mqar"]]
    mqar_chance, copy_chance = chance_levels(preset)
    out += ["", "## Recall and language modelling after the same training budget", "",
            "Each task trains a fresh model per architecture through the Trainer: the same steps, batches, seed and "
            f"optimiser for all (AdamW, lr {preset['learning_rate']}, warm-up {preset['warmup_ratio']:.0%}, cosine decay).",
            "",
            f"- MQAR (Zoology): keys from [1, {preset['mqar_vocab'] // 2}), values from [{preset['mqar_vocab'] // 2}, "
            f"{preset['mqar_vocab']}), queries at power-law gaps, (length, pairs) = "
            f"{', '.join(f'({n}, {k})' for n, k in preset['mqar'])}; {preset['mqar_steps']} steps of "
            f"{preset['mqar_batch_size']} sequences, one length per batch, in the same shuffled order for every "
            f"architecture; scored on {preset['mqar_eval_examples']} "
            f"held-out sequences per length. Chance (a guess among the values a sequence showed): "
            f"{', '.join(f'{chance:.1%} at {length}' for length, chance in mqar_chance.items())}.",
            f"- Selective copying: {preset['copy_tokens']} tokens scattered in the first "
            f"{preset['copy_length'] - preset['copy_tokens'] - 1} positions (noise elsewhere), then copied in order "
            f"after markers ({preset['copy_length']} positions in all), "
            f"alphabet {preset['copy_alphabet']}; {preset['copy_steps']} steps of {preset['copy_batch_size']}. "
            f"Chance: {copy_chance:.1%}.",
            "- An accuracy below twice chance (for a chance above a third, below halfway from it to 100%) is marked "
            "*(near chance)*: the model learned (almost) nothing of that "
            "task within the budget.",
            f"- Text: bits per byte on held-out pydoc text (the first {preset['text_eval_windows']} windows of "
            f"{preset['text_length']} bytes, at most, of the last 10% of `pydoc_data.topics`, leaving out those the "
            f"training text also holds verbatim); {preset['text_steps']} "
            f"steps of {preset['text_batch_size']}. "
            "A uniform guess: 8 bits per byte.", ""]
    out += _table(["architecture"] + [f"MQAR @{n}" for n in mqar] + ["selective copying", "text bits/byte", "training s (MQAR / copy / text)"],
                  [[n] + [_recall(a.get("mqar", {}).get("accuracy", {}).get(str(length)), mqar_chance[length])
                          for length in mqar]
                   + [_recall(a.get("selective_copying", {}).get("accuracy"), copy_chance),
                      _num(a.get("text", {}).get("bits_per_byte")),
                      " / ".join(_num(a.get(t, {}).get("train", {}).get("wall_seconds"), "{:.0f}")
                                 for t in ("mqar", "selective_copying", "text"))]
                   for n, a in archs.items()])

    if plots:
        out += ["", "## Plots", ""] + [f"![{p}]({p})" for p in plots]
    elif results.get("plots_note"):
        out += ["", "## Plots", "", results["plots_note"]]
    out += ["", "## Checkpoints", ""] + _checkpoints_section(archs, results.get("output_dir", "."))
    out += ["", "## Settings", "", "```", *(f"{k} = {v}" for k, v in preset.items()), "```", ""]
    return "\n".join(out)


def _checkpoints_section(archs, output_dir):
    """The byte-level text models this run saved (folders from earlier runs into the same directory are not
    listed), and how to load one."""
    saved = {n: a["text"]["checkpoint"] for n, a in archs.items() if a.get("text", {}).get("checkpoint")}
    if not saved:
        return ["This run saved no checkpoints (its text phase did not run or did not finish)."]
    first = next(iter(saved.values()))
    return ["This run saved each byte-level text model (save_pretrained): "
            + ", ".join(f"`{folder}/` ({name})" for name, folder in saved.items()) + ". Load one with:", "",
            "```python", "import hf_seqarch  # registers the seqarch model type", "from transformers import AutoModelForCausalLM",
            f"model = AutoModelForCausalLM.from_pretrained(\"{output_dir}/{first}\")", "```"]


def _cells(rows, key, columns, field, fmt):
    by_key = {r[key]: r for r in rows or []}
    return [fmt(by_key[c][field]) if c in by_key else "-" for c in columns]


def _pct(value):
    return "-" if value is None else f"{value:.1%}"


def _num(value, fmt="{:.3f}"):
    return "-" if value is None else fmt.format(value)


def _load(value):
    return "n/a" if value is None else f"{value:.2f}"
