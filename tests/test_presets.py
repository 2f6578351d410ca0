"""The preset folders in configs/: they load with AutoConfig, match the generator and the README table."""

import importlib.util
import json
import os
import re

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import hf_seqarch  # noqa: F401  (registers "seqarch" with AutoConfig)
from hf_seqarch import SeqArchConfig

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
FOLDERS = sorted(d for d in os.listdir(CONFIGS) if os.path.isfile(os.path.join(CONFIGS, d, "config.json")))


def load_generator():
    # configs/ is not a package: load the script by path.
    spec = importlib.util.spec_from_file_location("make_presets", os.path.join(CONFIGS, "make_presets.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def readme_counts() -> dict[str, int]:
    """Preset name -> parameter count, from the table in configs/README.md."""
    with open(os.path.join(CONFIGS, "README.md")) as f:
        rows = re.findall(r"^\| ([\w-]+) \|.*\| ([\d,]+) \|$", f.read(), flags=re.M)
    return {name: int(count.replace(",", "")) for name, count in rows}


def test_folders_match_the_generator():
    """Every buildable preset of make_presets.py has its folder and table row, and nothing else does."""
    generator = load_generator()
    expected = {name for name, kwargs in generator.preset_kwargs().items()
                if set(kwargs["mixer_types"]) <= set(generator.MIXER_CLASSES)}
    assert set(FOLDERS) == expected, "configs/ is stale: run `python configs/make_presets.py`"
    assert set(readme_counts()) == expected, "configs/README.md is stale: run `python configs/make_presets.py`"
    for name in expected:
        with open(os.path.join(CONFIGS, name, "config.json")) as f:
            saved = json.load(f)
        for key, value in generator.preset_kwargs()[name].items():
            assert saved[key] == value, f"{name}: {key} differs from make_presets.py; rerun it"


@pytest.mark.parametrize("name", FOLDERS)
def test_preset_loads_and_has_the_tabled_size(name):
    config = AutoConfig.from_pretrained(os.path.join(CONFIGS, name))
    assert isinstance(config, SeqArchConfig)
    with torch.device("meta"):  # base presets are ~100M parameters: count them without allocating
        model = AutoModelForCausalLM.from_config(config)
    count = sum(p.numel() for p in model.parameters())
    assert count == readme_counts()[name]


@pytest.mark.parametrize("name", [n for n in FOLDERS if n.endswith("-tiny")])
def test_tiny_preset_runs(name):
    config = AutoConfig.from_pretrained(os.path.join(CONFIGS, name))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    ids = torch.randint(0, config.vocab_size, (2, 24))
    out = model(input_ids=ids, labels=ids)
    assert out.logits.shape == (2, 24, config.vocab_size)
    assert torch.isfinite(out.loss)
    out.loss.backward()
