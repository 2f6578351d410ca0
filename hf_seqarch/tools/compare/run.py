"""`hf-seqarch compare`: every architecture through the same measurements, written as they finish.

Phases run one after another over all architectures (speed, decoding, MQAR, selective copying, text),
so each phase's timings are taken close together in time. results.json is rewritten after every
stage and report.md after every phase: an interrupted run leaves what it finished readable.
"""

import contextlib
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import sys
import threading
import time

import torch
import transformers
from tqdm.auto import tqdm

from ... import __version__
from ...kernels_mamba2 import conv1d_backend, mamba2_backend
from ..distributed import launched_processes
from ..output_dir import prepare_output_dir
from .architectures import matched_configs, resolve_architectures
from .measure import decode_costs, memory_method, training_step_costs
from .plots import PLOT_FILES, plots_note, write_plots
from .presets import get_preset
from .report import render
from .tasks import ByteText, check_copying, check_mqar, copying_batch, generator, mqar_batch
from .train import bits_per_byte, token_accuracy, train
from .verdicts import all_verdicts

PHASES = ("training_speed", "decode", "mqar", "selective_copying", "text")


# -- input checks: each fails fast, before any model is built ---------------------------------------------
def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"Unknown device {name!r} ({err}); use 'cpu' or 'cuda' (or 'cuda:N').") from None
    if device.type == "cpu":
        return torch.device("cpu")  # (torch has one CPU device: "cpu:1" is the same one)
    if device.type != "cuda":
        raise ValueError(f"Device {name!r} is not supported by compare; use 'cpu' or 'cuda'.")
    if not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU here (torch.cuda.is_available() is False, "
                         f"torch {torch.__version__}). Use --device cpu.")
    index = 0 if device.index is None else device.index
    if index >= torch.cuda.device_count():
        raise ValueError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA device(s).")
    if index != 0:  # transformers' Trainer, in a single process, always trains on cuda:0
        raise ValueError(f"--device {name}: compare trains on the first visible GPU; to use GPU {index}, run it with "
                         f"CUDA_VISIBLE_DEVICES={index} and --device cuda.")
    torch.cuda.set_device(index)
    return torch.device("cuda", index)


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_model() or platform.processor() or platform.machine()
    return dict(device=str(device), device_name=name, cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
                torch=torch.__version__, transformers=transformers.__version__, hf_seqarch=__version__,
                python=platform.python_version(), platform=platform.platform(),
                cuda=torch.version.cuda if device.type == "cuda" else None, load_average_start=_load_average(),
                # torch's TF32 the run turns off (_strict_float32); mamba_ssm's Triton matmuls, where its kernel runs
                # mamba2's scan, use TF32 whatever torch's setting
                tf32=False, mamba2_scan_backend=mamba2_backend(device), mamba2_conv_backend=conv1d_backend(device))


def _strict_float32():
    """Turn TF32 off for every architecture (by default cuDNN's LSTM/GRU may take it while matmuls do not, which
    would time the recurrences at a lower precision than the rest); returns the function that restores the settings.
    torch >= 2.9 has per-backend fp32_precision settings, and refuses to read the legacy flags once they were used."""
    if hasattr(torch.backends.cudnn, "rnn") and hasattr(torch.backends.cudnn.rnn, "fp32_precision"):
        backends = [torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends.cudnn.rnn]
        previous = [backend.fp32_precision for backend in backends]
        for backend in backends:
            backend.fp32_precision = "ieee"
        return lambda: [setattr(backend, "fp32_precision", value) for backend, value in zip(backends, previous)]
    previous_flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False

    def restore():
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = previous_flags

    return restore


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            return next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        return None


def _load_average():
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


# -- the phases: (architecture config, preset, device, context) -> results entry ---------------------------
def phase_training_speed(config, preset, device, ctx):
    return training_step_costs(config, device, list(preset.train_lengths), preset.tokens_per_step, preset.warmup,
                               preset.repeats, preset.seed)


def phase_decode(config, preset, device, ctx):
    return decode_costs(config, device, preset.decode_contexts, preset.decode_repeats, seed=preset.seed)


def phase_mqar(config, preset, device, ctx):
    def batch(i):  # batch i has length mqar[i % n] (the Trainer shuffles them, seeded); one length per batch: no padding
        length, pairs = preset.mqar[i % len(preset.mqar)]
        return mqar_batch(preset.mqar_batch_size, length, pairs, preset.mqar_vocab, generator(preset.seed, 1, i))

    model, summary = train(config, batch, preset.mqar_steps, preset, device, ctx.get("progress"))
    accuracy = {}
    for length, pairs in preset.mqar:
        held_out = mqar_batch(preset.mqar_eval_examples, length, pairs, preset.mqar_vocab, generator(preset.seed, 101, length))
        accuracy[str(length)] = token_accuracy(model, *held_out, device)
    return dict(train=summary, accuracy=accuracy)


def phase_selective_copying(config, preset, device, ctx):
    def batch(i):
        return copying_batch(preset.copy_batch_size, preset.copy_length, preset.copy_tokens, preset.copy_alphabet,
                             generator(preset.seed, 2, i))

    model, summary = train(config, batch, preset.copy_steps, preset, device, ctx.get("progress"))
    held_out = copying_batch(preset.copy_eval_examples, preset.copy_length, preset.copy_tokens, preset.copy_alphabet,
                             generator(preset.seed, 102))
    return dict(train=summary, accuracy=token_accuracy(model, *held_out, device))


def phase_text(config, preset, device, ctx):
    text = ctx["text"]

    def batch(i):
        return text.train_batch(preset.text_batch_size, preset.text_length, generator(preset.seed, 3, i))

    model, summary = train(config, batch, preset.text_steps, preset, device, ctx.get("progress"))
    held_out, _ = text.eval_windows(preset.text_length, preset.text_eval_windows)
    folder = os.path.join(ctx["output_dir"], "checkpoints", ctx["name"])
    model.save_pretrained(folder)
    return dict(train=summary, bits_per_byte=bits_per_byte(model, held_out, device), held_out_bytes=held_out.numel(),
                checkpoint=os.path.relpath(folder, ctx["output_dir"]))


PHASE_FUNCTIONS = {name: globals()[f"phase_{name}"] for name in PHASES}


def _refuse_foreign_checkpoints(output_dir: str, names: list[str]) -> bool:
    """Whether output_dir holds an earlier compare run's results.json (read before this run writes its own). A folder
    without one whose checkpoints/ holds a checkpoint this run would replace is refused (ValueError): compare deletes
    only its own."""
    earlier_run = _written_by_compare(output_dir)
    checkpoints = os.path.join(output_dir, "checkpoints")
    if os.path.lexists(checkpoints) and (os.path.islink(checkpoints) or not os.path.isdir(checkpoints)):
        raise ValueError(f"{checkpoints} is {_what(checkpoints)}, where compare saves its checkpoints (a folder): move "
                         "it, or choose another --output-dir.")
    replaced = [name for name in names if os.path.lexists(os.path.join(checkpoints, name))]
    for name in replaced:  # (rmtree refuses a link, and saving would write through it into the folder it names)
        folder = os.path.join(checkpoints, name)
        if os.path.islink(folder) or not os.path.isdir(folder):
            raise ValueError(f"{folder} is {_what(folder)}, not a checkpoint folder compare wrote; this run would "
                             "replace it. Move it, or choose another --output-dir.")
    if replaced and not earlier_run:
        raise ValueError(
            f"{checkpoints} holds {replaced}, which this run would replace, but {output_dir} has no results.json of an "
            "earlier `hf-seqarch compare` run: compare deletes only its own checkpoints. Move them, or choose another "
            "--output-dir."
        )
    return earlier_run


def _what(path: str) -> str:
    return "a symbolic link" if os.path.islink(path) else "a file"


def _clear_earlier_outputs(output_dir: str, names: list[str], earlier_run: bool):
    """An earlier run's plots, and its checkpoints/<name> of the architectures this run trains, are removed, so that
    none outlives a failed or interrupted stage beside this run's results (nor keeps stray files: another preset's
    shards); other checkpoints stay, and are named. Called once this run's results.json is written: an interrupt
    before would leave the earlier report naming checkpoints already gone."""
    if earlier_run:
        for plot in PLOT_FILES:
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(output_dir, plot))
    checkpoints = os.path.join(output_dir, "checkpoints")
    if not os.path.isdir(checkpoints):
        return
    for name in names:
        shutil.rmtree(os.path.join(checkpoints, name), ignore_errors=True)
    kept = sorted(entry.name for entry in os.scandir(checkpoints) if entry.is_dir())
    if kept:
        print(f"hf-seqarch compare: {checkpoints} holds checkpoints of an earlier run that this one does not replace "
              f"and its report will not mention: {kept}.", file=sys.stderr)


def _written_by_compare(output_dir: str) -> bool:
    """Whether output_dir holds the results.json of a compare run (written when a run starts)."""
    try:
        with open(os.path.join(output_dir, "results.json")) as f:
            results = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(results, dict) and str(results.get("command", "")).startswith("hf-seqarch compare")


# -- the run ---------------------------------------------------------------------------------------------------
def run_compare(preset: str = "quick", output_dir: str = "outputs/compare", device: str = "cpu",
                architectures: str | None = None, threads: int | None = None, command: str | None = None) -> dict:
    """Run the comparison and write report.md, results.json, plots and checkpoints into `output_dir`."""
    preset = get_preset(preset)
    processes = launched_processes()
    if processes > 1:
        # Each process would train on its own batches and average them (other numbers than a run's), and all would
        # write the same report, results and checkpoints at once.
        raise ValueError(f"compare measures each architecture in one process on one device; it was started as one of "
                         f"{processes} (WORLD_SIZE={processes}, e.g. by accelerate launch or torchrun). Run it "
                         "directly: hf-seqarch compare ...")
    if threads is not None and threads < 1:
        raise ValueError(f"--threads must be >= 1, got {threads}.")
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if threads is not None and threads > usable:
        # More threads than CPUs make every thread wait on the others: timings of contention, not of architectures.
        print(f"hf-seqarch compare: --threads {threads} is more than the {usable} CPU(s) this process may use; "
              f"using {usable}.", file=sys.stderr)
        threads = usable
    if preset.mqar_vocab > preset.vocab_size:
        raise ValueError(f"Preset {preset.name!r}: mqar_vocab {preset.mqar_vocab} exceeds vocab_size {preset.vocab_size}.")
    for length, pairs in preset.mqar:
        check_mqar(length, pairs, preset.mqar_vocab)
    check_copying(preset.copy_length, preset.copy_tokens, preset.copy_alphabet, preset.vocab_size)
    device = resolve_device(device)
    names, skipped = resolve_architectures(architectures, preset.num_layers)
    if not names:
        raise ValueError(f"None of the architectures can run in this build: {skipped}.")
    output_dir = prepare_output_dir(output_dir)
    earlier_run = _refuse_foreign_checkpoints(output_dir, names)
    target, sizes = matched_configs(names, preset)
    previous_threads = torch.get_num_threads()
    threads = threads or (preset.cpu_threads if device.type == "cpu" else None)
    if threads is not None:
        torch.set_num_threads(threads)  # before environment() records it; restored at the end
    restore_tf32 = _strict_float32()  # restored at the end

    results = dict(
        format_version=1, status="running", command=command or f"hf-seqarch compare --preset {preset.name}",
        output_dir=output_dir, started_at=datetime.datetime.now().isoformat(timespec="seconds"),
        preset=preset.as_dict(), environment=environment(device), memory_method=memory_method(device),
        parameter_matching=dict(
            method=("Same width, depth, heads and vocabulary for every architecture; each one's MLP width is set so its "
                    "non-embedding parameters match the transformer's (MLP ratio "
                    f"{preset.mlp_ratio}) within 2%. Mixers are never altered: a mixer with more parameters than "
                    "attention gets a narrower MLP."),
            target_non_embedding_parameters=target),
        skipped=skipped,
        architectures={n: {k: v for k, v in s.items() if k != "config"} for n, s in sizes.items()},
    )
    stages = [(phase, name) for phase in PHASES for name in names]
    _write_json(results, output_dir)  # status "running", before any checkpoint: it marks the folder as compare's
    _clear_earlier_outputs(output_dir, names, earlier_run)
    ctx = dict(output_dir=output_dir, text=ByteText())
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(total=len(stages), desc="compare", unit="stage", file=sys.stderr, dynamic_ncols=True)
    # The Trainer's notices and save_pretrained's own bar would break the progress bar; restored at the end.
    verbosity, inner_bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    try:
        for index, (phase, name) in enumerate(stages):
            arch = results["architectures"][name]
            bar.set_postfix_str(f"{phase}: {name}")
            ctx["progress"] = lambda step, total, label=f"{phase}: {name}": bar.set_postfix_str(f"{label} step {step}/{total}")
            began = time.perf_counter()
            try:
                arch[phase] = PHASE_FUNCTIONS[phase](sizes[name]["config"], preset, device, dict(ctx, name=name))
            except Exception as err:  # a broken stage costs neither the other architectures nor this one's other stages
                failure = f"{phase}: {type(err).__name__}: {err}"  # (each stage builds its own model: they are independent)
                arch["error"] = f"{arch['error']}; {failure}" if arch.get("error") else failure
            arch.setdefault("stage_seconds", {})[phase] = time.perf_counter() - began
            results["wall_seconds"] = time.perf_counter() - start
            _write_json(results, output_dir)
            bar.update()
            if index + 1 == len(stages) or stages[index + 1][0] != phase:
                _write_report(results, output_dir, plots=[])
        results["status"] = "complete"
    except KeyboardInterrupt:
        results["status"] = "interrupted"
        raise
    except BaseException:
        results["status"] = "failed"
        raise
    finally:
        bar.close()
        transformers.logging.set_verbosity(verbosity)
        torch.set_num_threads(previous_threads)
        restore_tf32()
        if inner_bars:
            transformers.logging.enable_progress_bar()
        results["wall_seconds"] = time.perf_counter() - start
        results["cpu_seconds"] = time.process_time() - cpu_start  # this process's CPU time, all threads
        results["environment"]["load_average_end"] = _load_average()
        results["finished_at"] = datetime.datetime.now().isoformat(timespec="seconds")
        plots = write_plots(results, output_dir)
        results["plots"] = plots
        if not plots:
            results["plots_note"] = plots_note()
        _write_report(results, output_dir, plots)
    return results


def _write_report(results, output_dir, plots):
    """Verdicts from what is measured so far, then report.md and results.json."""
    results["verdicts"] = all_verdicts(results["architectures"], results["environment"])
    _write_json(results, output_dir)
    _atomic_write(os.path.join(output_dir, "report.md"), render(results, plots))


def _write_json(results, output_dir):
    _atomic_write(os.path.join(output_dir, "results.json"), json.dumps(results, indent=2, default=str))


def _atomic_write(path, text):
    # A reader (or an interrupt) never sees a half-written file: write aside, then rename over.
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def main_compare(args) -> int:
    """Entry point for the CLI: returns the process exit code."""
    words = ["hf-seqarch", "compare", "--preset", args.preset, "--output-dir", args.output_dir, "--device", args.device]
    if args.architectures:
        words += ["--architectures", args.architectures]
    if args.threads:
        words += ["--threads", str(args.threads)]
    command = shlex.join(map(str, words))  # quoted: pasted into a shell it runs the same ("lstm, gru" one argument)
    # A run stopped by SIGTERM (`timeout`, a job's time limit) is recorded as interrupted, as Ctrl-C is; otherwise
    # results.json would say "running" for good.
    in_main_thread = threading.current_thread() is threading.main_thread()  # (signal handlers can only be set there)
    previous_handler = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        results = run_compare(args.preset, args.output_dir, args.device, args.architectures, args.threads, command=command)
    except ValueError as err:
        print(f"hf-seqarch compare: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\nInterrupted: what finished is in {os.path.abspath(args.output_dir)} (results.json, report.md).",
              file=sys.stderr)
        return 130
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
    failed = [n for n, a in results["architectures"].items() if a.get("error")]
    print(f"Wrote {results['output_dir']}/report.md, results.json, {len(results['plots'])} plot(s) and checkpoints/ "
          f"({results['wall_seconds']:.0f} s).")
    for verdict in results["verdicts"]:
        print(f"- {verdict['claim']}: {verdict['verdict']}")
    if failed:
        print(f"Failed architectures: {failed} (see report.md)", file=sys.stderr)
        return 1
    return 0
