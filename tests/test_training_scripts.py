"""The example scripts, run as a user runs them: `accelerate launch` with two DDP processes on CPU (gloo)
against one process with the same global batch, then pretraining followed by fine-tuning a classifier.

Tiny runs (a preset of 165K parameters, 32-byte blocks, a few steps) so the file takes well under a minute.
"""

import importlib.util
import json
import os
import socket
import sys
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

import hf_seqarch  # noqa: F401  (registers the seqarch Auto classes)
from safetensors.torch import save_file
from hf_seqarch import SeqArchForCausalLM, SeqArchForSequenceClassification
from tester import ROOT, run_script, tiny_config, tiny_model

PRETRAIN = os.path.join(ROOT, "examples", "pretrain_lm.py")
FINETUNE = os.path.join(ROOT, "examples", "finetune_classifier.py")
STREAMING = os.path.join(ROOT, "examples", "streaming.py")
# 1500 characters: 44 training blocks, so that 6 steps of 8 cross an epoch's end (where a short last batch once made
# two processes train other blocks than one process does).
TINY_RUN = [
    "--preset", "lstm-attention-tiny", "--max_chars", "1500", "--block_size", "32", "--max_steps", "6",
    "--logging_steps", "1", "--eval_strategy", "no", "--save_strategy", "no", "--sample_tokens", "8",
    "--warmup_steps", "2", "--disable_tqdm", "true",
]


def losses(output_dir):
    with open(os.path.join(output_dir, "trainer_state.json")) as f:
        return [entry["loss"] for entry in json.load(f)["log_history"] if "loss" in entry]


def free_port():
    # Two test sessions on one machine must not both rendezvous on accelerate's default port 29500.
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


@pytest.fixture(scope="module")
def single_process_run(tmp_path_factory):
    output_dir = str(tmp_path_factory.mktemp("single"))
    stdout = run_script([sys.executable, PRETRAIN, *TINY_RUN, "--per_device_train_batch_size", "8", "--output_dir", output_dir])
    return output_dir, stdout


def ddp_launch():
    """`accelerate launch` of two processes. The command of the issue, as is: the examples turn the CPU-only launch
    into gloo DDP (not 2 lone runs)."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port()]


def ddp_launch_run(command):
    """Run `command` under ddp_launch(); its stdout. Each process must free its DDP wrapper before leaving the
    process group (finish_distributed_run): one whose reducer held the group to the end hung at exit, now and then."""
    stdout, stderr = run_script([*ddp_launch(), *command], with_stderr=True)
    assert "still referenced when the process group ends" not in stderr
    return stdout


def ddp_run(tiny_run, output_dir):
    stdout = ddp_launch_run([PRETRAIN, *tiny_run, "--per_device_train_batch_size", "4", "--output_dir", output_dir])
    assert "2 process(es) on cpu, global batch 8" in stdout


def assert_same_losses(ddp_dir, single_dir):
    ddp, single = losses(ddp_dir), losses(single_dir)
    assert len(ddp) == len(single) == 6
    assert ddp[0] > ddp[-1]  # it trained
    # Same data, same initial weights: only the order of float sums differs (all-reduce vs one batch).
    assert max(abs(a - b) for a, b in zip(ddp, single)) < 1e-4


def test_two_ddp_processes_match_one_process_with_the_same_global_batch(single_process_run, tmp_path):
    ddp_run(TINY_RUN, str(tmp_path / "ddp"))
    single_dir, single_stdout = single_process_run
    assert "1 process(es) on cpu, global batch 8" in single_stdout
    assert_same_losses(str(tmp_path / "ddp"), single_dir)


@pytest.mark.parametrize("preset", ["mamba2-attention-tiny", "linear-attention-tiny"])
def test_linear_time_mixers_under_ddp_match_one_process(preset, tmp_path):
    """The same with mamba2 and linear_attention layers, whose scans, conv and norms have hand-written backwards."""
    tiny_run = [*TINY_RUN]
    tiny_run[tiny_run.index("--preset") + 1] = preset
    single_dir, ddp_dir = str(tmp_path / "single"), str(tmp_path / "ddp")
    run_script([sys.executable, PRETRAIN, *tiny_run, "--per_device_train_batch_size", "8", "--output_dir", single_dir])
    ddp_run(tiny_run, ddp_dir)
    assert_same_losses(ddp_dir, single_dir)


def test_finetuning_under_ddp_matches_one_process(single_process_run, tmp_path):
    """The classifier example on two DDP processes against one with the same global batch. It once measured its
    accuracy before fine-tuning with trainer.evaluate() before train(), after which accelerate did not wrap the model
    in DDP: each process trained its own copy, gradients never averaged, and the losses drifted apart."""
    pretrained, _ = single_process_run
    run = [FINETUNE, "--model_name_or_path", pretrained, "--max_steps", "4", "--max_length", "48", "--logging_steps",
           "1", "--eval_strategy", "no", "--save_strategy", "no", "--disable_tqdm", "true"]
    single_dir, ddp_dir = str(tmp_path / "single"), str(tmp_path / "ddp")
    run_script([sys.executable, *run, "--per_device_train_batch_size", "8", "--output_dir", single_dir])
    ddp_launch_run([*run, "--per_device_train_batch_size", "4", "--output_dir", ddp_dir])
    ddp, single = losses(ddp_dir), losses(single_dir)
    assert len(ddp) == len(single) == 4
    assert max(abs(a - b) for a, b in zip(ddp, single)) < 1e-4


def test_pretrain_then_finetune_a_classifier(single_process_run, tmp_path):
    pretrained, stdout = single_process_run
    assert "sample: 'The \"while\" statement" in stdout and pretrained in stdout  # the sample and where outputs went
    lm = AutoModelForCausalLM.from_pretrained(pretrained)
    tokenizer = AutoTokenizer.from_pretrained(pretrained)
    assert lm.config.vocab_size == len(tokenizer) and lm.config.mixer_types == ["attention", "lstm"]
    assert lm.config.use_cache and lm.generation_config.use_cache  # (the Trainer set it to False: restored)

    output_dir = str(tmp_path / "classifier")
    stdout = run_script([sys.executable, FINETUNE, "--model_name_or_path", pretrained, "--output_dir", output_dir,
                  "--max_steps", "3", "--max_length", "48", "--per_device_train_batch_size", "8", "--disable_tqdm", "true"])
    assert "accuracy on" in stdout and output_dir in stdout
    with open(os.path.join(output_dir, "eval_results.json")) as f:
        assert 0.0 <= json.load(f)["eval_accuracy"] <= 1.0
    classifier = AutoModelForSequenceClassification.from_pretrained(output_dir)
    assert classifier.config.id2label[1] == "compound"
    # It started from the pretrained body and trained it.
    assert classifier.model.embed_tokens.weight.shape == lm.model.embed_tokens.weight.shape
    assert not torch.equal(classifier.model.embed_tokens.weight, lm.model.embed_tokens.weight)


@pytest.mark.parametrize("name,kind", [("single_gpu", "NO"), ("multi_gpu_ddp", "MULTI_GPU"), ("fsdp", "FSDP")])
def test_accelerate_configs_load_and_show_their_command(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    path = os.path.join(ROOT, "configs", "accelerate", f"{name}.yaml")
    assert load_config_from_file(path).distributed_type == kind
    with open(path) as f:
        assert f"accelerate launch --config_file configs/accelerate/{name}.yaml" in f.read()


def test_bad_arguments_stop_the_examples_before_training(tmp_path):
    """Each was a traceback, an error only after the whole training run (--sample_tokens 0), or silently meant no
    limit (--max_chars 0, --max_length 0)."""
    import subprocess

    # A checkpoint whose files all read (headers only are checked) but whose model is the lstm preset's
    other_model = tmp_path / "checkpoint-3"
    other_model.mkdir()
    config = json.loads(open(os.path.join(ROOT, "configs", "lstm-tiny", "config.json")).read())
    (other_model / "config.json").write_text(json.dumps(config))
    save_file({}, other_model / "model.safetensors")
    for name in ("optimizer.pt", "scheduler.pt"):
        torch.save({}, other_model / name)
    (other_model / "trainer_state.json").write_text("{}")
    cases = [
        (PRETRAIN, ["--resume_from_checkpoint", str(other_model)], "it holds another model (vocab_size: 256 in the checkpoint, 384 in this run; mixer_types: "),
        (PRETRAIN, ["--sample_tokens", "0"], "--sample_tokens must be >= 1"),
        (PRETRAIN, ["--block_size", "1"], "--block_size must be >= 2"),
        (PRETRAIN, ["--max_chars", "0"], "--max_chars must be >= 1"),  # read as "the whole corpus"
        (PRETRAIN, ["--config_overrides", "hidden_size=abc"], "--config_overrides 'hidden_size=abc': invalid literal"),
        (PRETRAIN, ["--config_overrides", "num_attention_heads=3"], "does not divide hidden_size"),
        (PRETRAIN, ["--config_overrides", "bidirectional=true"], "is bidirectional (an encoder)"),  # was a traceback
        (FINETUNE, ["--model_name_or_path", str(tmp_path), "--sections", "types,types"],
         "--sections needs two or more different sections"),
        (FINETUNE, ["--model_name_or_path", str(tmp_path), "--max_length", "0"], "--max_length must be >= 1"),
        # these four were tracebacks (one saying "0 block(s) ..., 1 of them held out")
        (PRETRAIN, ["--max_chars", "100"], "gives only 0 block(s) of 256 tokens, none left to train on"),
        (PRETRAIN, ["--config_overrides", "vocab_size=100"], "vocab_size comes from the byte tokenizer"),
        (STREAMING, ["--mixers", "transformer"], "--mixers 'transformer': Unknown mixer"),
    ]
    for step in (9, 10):  # a new run there once deleted them
        (tmp_path / "earlier_run" / f"checkpoint-{step}").mkdir(parents=True)
    cases.append((PRETRAIN, ["--output_dir", str(tmp_path / "earlier_run")],
                  "holds the checkpoints of another run (checkpoint-9, checkpoint-10)"))
    for script, arguments, message in cases:
        output_flag = "--output-dir" if script == STREAMING else "--output_dir"  # (argparse's spelling, or HF's)
        result = subprocess.run([sys.executable, script, output_flag, str(tmp_path / "out"), *arguments],
                                capture_output=True, text=True, timeout=300)
        assert result.returncode != 0 and message in result.stderr and "Traceback" not in result.stderr, result.stderr[-2000:]
        assert not (tmp_path / "out" / "trainer_state.json").exists()


def load_example(path):
    """An example script as a module (examples/ is not a package)."""
    spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_pretrain_overrides_set_fields_that_default_to_none():
    """transformers' update_from_string types a value by the field's current one: head_dim=8 (None by default) was
    refused as "int, float, bool or string values ..., got 8"."""
    config = tiny_config(["attention", "linear_attention"])
    load_example(PRETRAIN).apply_overrides(config, "head_dim=8, linear_attention_head_dim=4, hidden_size=64")
    assert (config.head_dim, config.linear_attention_head_dim, config.hidden_size) == (8, 4, 64)


def test_finetuning_a_classifier_keeps_its_label_order(tmp_path, capsys):
    """Fine-tuning a classifier checkpoint with its sections in another order renamed its trained rows (the row for
    'a' was read as 'b'): the checkpoint's order is kept. With other sections (even of the same count), the rows would
    stand for sections they were not trained on: the classification layer starts anew."""
    sections_of_checkpoint = load_example(FINETUNE).sections_of_checkpoint
    tiny_model(SeqArchForSequenceClassification, ["lstm"], num_labels=3,
               id2label={0: "a", 1: "b", 2: "c"}).save_pretrained(tmp_path)
    assert sections_of_checkpoint(str(tmp_path), ["b", "c", "a"], announce=True) == (["a", "b", "c"], False)
    assert sections_of_checkpoint(str(tmp_path), ["b", "a", "d"], announce=True) == (["b", "a", "d"], True)
    printed = capsys.readouterr().out
    assert "its order is kept" in printed and "a new classification layer is trained for ['b', 'a', 'd']" in printed
    tiny_model(SeqArchForCausalLM, ["lstm"]).save_pretrained(tmp_path / "lm")  # a new classification layer: any order
    assert sections_of_checkpoint(str(tmp_path / "lm"), ["b", "a"], announce=True) == (["b", "a"], False)


def test_an_fsdp_launch_without_gpus_says_it_trains_as_ddp(monkeypatch, capsys):
    """accelerate's FSDP config on a CPU-only machine trained plain DDP with nothing said."""
    from hf_seqarch.tools.distributed import use_cpu_ddp_if_no_accelerator

    if torch.cuda.is_available():
        pytest.skip("about machines without a GPU")
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("ACCELERATE_USE_FSDP", "true")):
        monkeypatch.setenv(name, value)
    assert use_cpu_ddp_if_no_accelerator()
    assert os.environ["ACCELERATE_USE_CPU"] == "true"
    expected = "FSDP was asked for, but this machine has no GPU: the 2 processes train as plain DDP"
    assert expected in capsys.readouterr().err


def test_a_script_past_its_time_is_killed_with_its_processes(tmp_path):
    """A hung DDP rank once outlived its test by hours: the launcher was killed, its workers were not."""
    pid_file = tmp_path / "child.pid"
    parent = ("import subprocess, sys, time; child = subprocess.Popen([sys.executable, '-c', 'import time; "
              "time.sleep(60)'], start_new_session=True); "  # (as torch's launcher starts its workers)
              f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(60)")
    with pytest.raises(AssertionError, match="still running after 3 s, killed with its processes"):
        run_script([sys.executable, "-c", parent], timeout=3)
    child, deadline = int(pid_file.read_text()), time.monotonic() + 10
    while _running(child) and time.monotonic() < deadline:  # (a killed process takes a moment to go)
        time.sleep(0.1)
    assert not _running(child)


def _running(pid) -> bool:
    """Whether process `pid` runs (Linux): not gone, and not a zombie waiting to be reaped."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] not in ("Z", "X")
    except FileNotFoundError:
        return False
