"""Sharing on the Hub: save_pretrained writes a self-contained repository that loads, with the same
outputs, in a Python process where hf_seqarch cannot be imported (trust_remote_code=True), from the
folder and by repo id from an offline Hub cache."""

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch
from transformers import ByT5Tokenizer, pipeline

from hf_seqarch import SeqArchForCausalLM, SeqArchForSequenceClassification, SeqArchModel
from hf_seqarch.model_card_seqarch import CARD_MARKER, layer_decoding_state, model_card_text
from hf_seqarch.modeling_seqarch import CACHE_FIELD
from tester import HEADS, STACKS, main_output, random_ids, tiny_config, tiny_model

pytestmark = pytest.mark.hub

AUTO_CLASSES = {
    "base": "AutoModel",
    "causal_lm": "AutoModelForCausalLM",
    "seq_cls": "AutoModelForSequenceClassification",
    "token_cls": "AutoModelForTokenClassification",
}
ALL_MIXERS = list(dict.fromkeys(m for stack in STACKS.values() for m in stack))
# Packages the travelling code may import at module level; transformers' own dependencies may be
# imported inside functions (they are there wherever transformers is).
MODULE_LEVEL_ALLOWED = {"torch", "transformers"} | set(sys.stdlib_module_names)
FUNCTION_LEVEL_ALLOWED = MODULE_LEVEL_ALLOWED | {"huggingface_hub", "safetensors"}
PROMPT = "the cat sat"


def repo_name(stack, head):
    return re.sub(r"[^A-Za-z0-9]+", "-", f"{stack}-{head}")


def put_in_offline_hub_cache(folder, hub_cache, repo_id):
    """The layout huggingface_hub reads offline: models--org--name/refs/main and snapshots/<sha>/."""
    repo_dir = hub_cache / f"models--{repo_id.replace('/', '--')}"
    sha = hashlib.sha1(repo_id.encode()).hexdigest()  # any 40-hex commit id
    shutil.copytree(folder, repo_dir / "snapshots" / sha)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(sha)  # no newline, as huggingface_hub writes it


def byte_tokenizer():
    return ByT5Tokenizer()  # byte-level: needs no vocabulary file, nothing downloaded


def tokenizer_model():
    tokenizer = byte_tokenizer()
    model = tiny_model(
        SeqArchForCausalLM, ALL_MIXERS, vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return model, tokenizer


# The process a user without hf_seqarch runs: it loads every job and writes what it computed.
CHILD = textwrap.dedent(
    """
    import sys
    sys.modules["hf_seqarch"] = None  # as if it were not installed: every import of it raises ImportError
    try:
        import hf_seqarch
    except ImportError:
        pass
    else:
        raise SystemExit("hf_seqarch is importable in the user's process")
    import torch, transformers
    torch.set_num_threads(int(sys.argv[3]))
    jobs, results = torch.load(sys.argv[1]), {}
    for key, job in jobs.items():
        auto = getattr(transformers, job["auto"])
        model = auto.from_pretrained(job["source"], trust_remote_code=True).eval()
        module = type(model).__module__
        assert module.startswith("transformers_modules."), f"{job['source']}: class from {module}"
        with torch.no_grad():
            output = model(input_ids=job["ids"])
        result = {"main": output.last_hidden_state if job["auto"] == "AutoModel" else output.logits}
        if job["auto"] == "AutoModelForCausalLM":
            result["generated"] = model.generate(
                job["prompt"], attention_mask=torch.ones_like(job["prompt"]), max_new_tokens=6, do_sample=False
            )
        if job.get("tokenizer"):
            tokenizer = transformers.AutoTokenizer.from_pretrained(job["source"], trust_remote_code=True)
            generator = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer)
            result["text"] = generator(job["text"], max_new_tokens=8, do_sample=False)[0]["generated_text"]
            result["token_ids"] = tokenizer(job["text"]).input_ids
        results[key] = result
    torch.save(results, sys.argv[2])
    """
)


@pytest.fixture(scope="module")
def remote_results(tmp_path_factory):
    """Save every stack x head, put each in an offline Hub cache too, and load all of them in one
    process without hf_seqarch (one process: its imports cost seconds)."""
    root = tmp_path_factory.mktemp("hub")
    hub_cache = root / "hub_cache"
    hub_cache.mkdir()
    ids, prompt = random_ids(2, 6), random_ids(2, 4, seed=5)
    jobs, expected = {}, {}
    for stack, mixers in STACKS.items():
        for head, model_class in HEADS.items():
            model = tiny_model(model_class, mixers)
            folder = root / "folders" / repo_name(stack, head)
            model.save_pretrained(folder)
            repo_id = f"seqarch-org/{repo_name(stack, head)}"
            put_in_offline_hub_cache(folder, hub_cache, repo_id)
            with torch.no_grad():
                reference = {"main": main_output(model, input_ids=ids)}
            if head == "causal_lm":
                reference["generated"] = model.generate(
                    prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=6, do_sample=False
                )
            for source in ("folder", "hub"):
                jobs[(stack, head, source)] = dict(
                    source=str(folder) if source == "folder" else repo_id, auto=AUTO_CLASSES[head], ids=ids, prompt=prompt
                )
                expected[(stack, head, source)] = reference

    # One repository with a tokenizer saved beside the model: a user loads both by repo id and generates text.
    model, tokenizer = tokenizer_model()
    folder = root / "folders" / "with-tokenizer"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    put_in_offline_hub_cache(folder, hub_cache, "seqarch-org/with-tokenizer")
    text_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    jobs["tokenizer"] = dict(source="seqarch-org/with-tokenizer", auto="AutoModelForCausalLM", ids=text_ids,
                             prompt=text_ids, tokenizer=True, text=PROMPT)
    with torch.no_grad():
        generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
        expected["tokenizer"] = {
            "main": model(input_ids=text_ids).logits,
            "generated": model.generate(text_ids, attention_mask=torch.ones_like(text_ids), max_new_tokens=6, do_sample=False),
            "text": generator(PROMPT, max_new_tokens=8, do_sample=False)[0]["generated_text"],
            "token_ids": tokenizer(PROMPT).input_ids,
        }

    torch.save(jobs, root / "jobs.pt")
    user_dir = root / "user"  # cwd without the repository: nothing of hf_seqarch on the path
    user_dir.mkdir()
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHON", "TRANSFORMERS"))},
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(hub_cache),
        "HF_MODULES_CACHE": str(root / "modules"),
        "HF_HOME": str(root / "hf_home"),
    }
    child = subprocess.run(
        [sys.executable, "-I", "-c", CHILD, str(root / "jobs.pt"), str(root / "results.pt"), str(torch.get_num_threads())],
        cwd=user_dir, env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )
    assert child.returncode == 0, f"the user's process failed:\n{child.stderr[-6000:]}"
    assert "Do you wish to run the custom code" not in child.stdout + child.stderr  # never asked the user
    return expected, torch.load(root / "results.pt"), root


@pytest.mark.parametrize("source", ["folder", "hub"])
@pytest.mark.parametrize("head", list(HEADS))
@pytest.mark.parametrize("stack", list(STACKS))
def test_remote_code_gives_the_same_outputs(remote_results, stack, head, source):
    expected, results, _ = remote_results
    got, want = results[(stack, head, source)], expected[(stack, head, source)]
    # Same code, same weights, same thread count: bit-identical.
    torch.testing.assert_close(got["main"], want["main"], rtol=0, atol=0)
    if head == "causal_lm":
        assert torch.equal(got["generated"], want["generated"])


def test_tokenizer_and_pipeline_from_offline_hub(remote_results):
    expected, results, _ = remote_results
    got, want = results["tokenizer"], expected["tokenizer"]
    assert got["token_ids"] == want["token_ids"]
    torch.testing.assert_close(got["main"], want["main"], rtol=0, atol=0)
    assert torch.equal(got["generated"], want["generated"])
    assert got["text"] == want["text"] and got["text"].startswith(PROMPT)


def test_saved_folder_is_a_self_contained_repository(tmp_path):
    model, tokenizer = tokenizer_model()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"config.json", "model.safetensors", "generation_config.json", "README.md", "tokenizer_config.json"} <= files

    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert set(auto_map) == {"AutoConfig", *AUTO_CLASSES.values()}
    for reference in auto_map.values():
        module, class_name = reference.split(".")
        tree = ast.parse((tmp_path / f"{module}.py").read_text())
        assert class_name in {node.name for node in tree.body if isinstance(node, ast.ClassDef)}, reference
    # Flat: every relative import of every copied file is a copied sibling (a remote load fails otherwise).
    python_files = sorted(f for f in files if f.endswith(".py"))
    for name in python_files:
        for node in ast.walk(ast.parse((tmp_path / name).read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                assert node.level == 1 and node.module and "." not in node.module, f"{name}: nested relative import"
                assert f"{node.module}.py" in files, f"{name} imports .{node.module}, which was not copied"
    # Every mixer's module travels (the registry in modeling_seqarch imports them all).
    assert {"mixer_attention.py", "mixer_rnn.py", "cache_seqarch.py", "mixer_context.py"} <= set(python_files)
    # transformers 4.x copies, for a local folder, only the files modeling_seqarch.py imports directly.
    modeling = ast.parse((tmp_path / "modeling_seqarch.py").read_text())
    direct = {f"{n.module}.py" for n in ast.walk(modeling) if isinstance(n, ast.ImportFrom) and n.level}
    assert set(python_files) - {"modeling_seqarch.py"} <= direct, "import these in modeling_seqarch.py too"



def test_a_subclass_of_a_head_saves_a_self_contained_folder(tmp_path, monkeypatch):
    """A head subclassed in the user's own module: transformers copied that module (which imports hf_seqarch) and
    pointed auto_map at it, so the folder failed to load without hf_seqarch; and the card named AutoModel, with no
    pipeline tag. It ships our code, loads as the head it extends, and its own class keeps its Auto class."""
    package = tmp_path / "users_code"
    package.mkdir()
    (package / "my_heads.py").write_text("from hf_seqarch import SeqArchForCausalLM\n\n\n"
                                         "class MyLM(SeqArchForCausalLM):\n    pass\n")
    monkeypatch.syspath_prepend(str(package))
    from my_heads import MyLM

    model = tiny_model(MyLM, ["attention", "lstm"])
    folder = tmp_path / "saved"
    model.save_pretrained(folder)
    assert MyLM._auto_class == "AutoModelForCausalLM"  # (inherited, as before the save)
    python_files = {f for f in os.listdir(folder) if f.endswith(".py")}
    assert "my_heads.py" not in python_files and {"modeling_seqarch.py", "mixer_rnn.py"} <= python_files
    saved = json.loads((folder / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_seqarch.SeqArchForCausalLM"
    assert saved["architectures"] == ["SeqArchForCausalLM"]  # what the folder loads as
    card = (folder / "README.md").read_text()
    assert "pipeline_tag: text-generation" in card and "AutoModelForCausalLM.from_pretrained" in card

    ids = random_ids(1, 5)
    with torch.no_grad():
        torch.save((ids, model(input_ids=ids).logits), tmp_path / "expected.pt")
    child = textwrap.dedent(
        """
        import sys
        sys.modules["hf_seqarch"] = None  # as if it were not installed
        import torch, transformers
        torch.set_num_threads(int(sys.argv[3]))
        ids, expected = torch.load(sys.argv[2])
        model = transformers.AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).logits, expected, rtol=0, atol=0)
        """
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PYTHON", "TRANSFORMERS"))}
    env.update(HF_HUB_OFFLINE="1", HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HOME=str(tmp_path / "hf_home"))
    result = subprocess.run(
        [sys.executable, "-I", "-c", child, str(folder), str(tmp_path / "expected.pt"), str(torch.get_num_threads())],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    # Untied, its trained head is recognised as such: loading it tied is refused (it once replaced the head silently)
    untied = tmp_path / "untied"
    tiny_model(MyLM, ["lstm"], tie_word_embeddings=False).save_pretrained(untied)
    with pytest.raises(ValueError, match="saved with untied embeddings"):
        SeqArchForCausalLM.from_pretrained(untied, tie_word_embeddings=True)

    # A subclass the user registered with an Auto class of its own keeps transformers' export: its module, its class
    (package / "my_registered.py").write_text(
        "from hf_seqarch import SeqArchForCausalLM\n\n\nclass MyRegisteredLM(SeqArchForCausalLM):\n    pass\n\n\n"
        "MyRegisteredLM.register_for_auto_class('AutoModelForCausalLM')\n")
    from my_registered import MyRegisteredLM

    tiny_model(MyRegisteredLM, ["lstm"]).save_pretrained(tmp_path / "registered")
    assert (tmp_path / "registered" / "my_registered.py").is_file()
    saved = json.loads((tmp_path / "registered" / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForCausalLM"] == "my_registered.MyRegisteredLM"

def _imports(nodes):
    for node in nodes:
        if isinstance(node, ast.Import):
            yield from (alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            yield node.module.split(".")[0]


def test_travelling_code_imports_only_torch_transformers_stdlib(tmp_path):
    tiny_model(SeqArchForCausalLM, ALL_MIXERS).save_pretrained(tmp_path)
    for path in sorted(tmp_path.glob("*.py")):
        tree = ast.parse(path.read_text())
        # Module level, outside try blocks (optional kernels are imported inside try).
        module_level = [n for n in tree.body if not isinstance(n, ast.Try)]
        for stmt in list(module_level):
            if isinstance(stmt, ast.If):  # `if TYPE_CHECKING:`-style blocks still run their else branch
                module_level += stmt.body + stmt.orelse
        bad = set(_imports(module_level)) - MODULE_LEVEL_ALLOWED
        assert not bad, f"{path.name} imports {bad} at module level"
        everywhere = set(_imports(ast.walk(tree)))
        assert "hf_seqarch" not in everywhere, f"{path.name} imports hf_seqarch"
        tried = {name for t in ast.walk(tree) if isinstance(t, ast.Try) for name in _imports(ast.walk(t))}
        assert not (everywhere - tried) - FUNCTION_LEVEL_ALLOWED, f"{path.name}: {(everywhere - tried) - FUNCTION_LEVEL_ALLOWED}"


# -- the model card ----------------------------------------------------------------------------------


def test_model_card_states_mixers_parameters_memory_and_loading(tmp_path):
    from huggingface_hub import ModelCard

    model = tiny_model(SeqArchForCausalLM, ALL_MIXERS)
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert "hf_seqarch" in card.data.tags
    for index, mixer in enumerate(ALL_MIXERS):
        assert f"| {index} | `{mixer}` |" in card.text
    assert f"{model.num_parameters():,} parameters" in card.text
    assert 'AutoModelForCausalLM.from_pretrained("<org>/<name>", trust_remote_code=True)' in card.text
    assert "import hf_seqarch" in card.text
    if "attention" in ALL_MIXERS:
        assert "While decoding, the cache of one sequence grows by" in card.text
    if any(m in ("lstm", "gru", "mamba2", "linear_attention") for m in ALL_MIXERS):
        assert "constant" in card.text


def test_card_of_a_head_that_does_not_generate_and_of_an_unnamed_folder(tmp_path, monkeypatch):
    """A classifier's card spoke of generated tokens; a model saved to "." got the title "# ."."""
    from huggingface_hub import ModelCard

    model = tiny_model(SeqArchForSequenceClassification, ["attention"])
    folder = tmp_path / "my-classifier"
    folder.mkdir()
    monkeypatch.chdir(folder)
    model.save_pretrained(".")
    card = ModelCard.load(folder / "README.md")
    assert "# my-classifier" in card.text and "generated token" not in card.text
    assert "It reads whole sequences and keeps no state between calls" in card.text
    SeqArchModel(model.config).save_pretrained(folder / "body")
    assert "Run with a cache (use_cache=True), the cache of one sequence grows by" in (folder / "body" / "README.md").read_text()


@pytest.mark.parametrize(
    "mixer,overrides",
    [(mixer, {}) for mixer in ALL_MIXERS]
    + [("mamba2", dict(mamba_n_groups=2, mamba_conv_kernel=3)), ("attention", dict(num_key_value_heads=1))],
)
def test_card_decoding_state_matches_the_real_cache(mixer, overrides):
    """The card's numbers are what SeqArchCache holds: per token for attention, capped by the window for
    sliding attention, constant for recurrent layers; with the settings that shape a state varied."""
    model = tiny_model(SeqArchForCausalLM, [mixer], **overrides)
    per_token, cap, constant = layer_decoding_state(model.config, mixer)
    cache, seen = None, 0
    with torch.no_grad():
        for length in (5, 1, 1):  # a prefill, then two decode steps
            output = model(input_ids=random_ids(1, length, seed=seen), cache=cache, use_cache=True)
            cache, seen = getattr(output, CACHE_FIELD), seen + length
            held = sum(t.numel() for t in cache.get_state(0).values())
            assert held == per_token * (seen if cap is None else min(seen, cap)) + constant, (mixer, seen)


def test_the_cards_text_prints_the_real_caches_numbers():
    """The card's table and summary are built from those numbers: checked as printed, against a real cache after 20
    and 21 tokens (past the window of 3: the sliding layers full)."""
    mixers = ["lstm", "gru", "attention", "sliding_attention", "mamba2", "linear_attention"]
    model = tiny_model(SeqArchForCausalLM, mixers)
    text = " ".join(model_card_text(model).split())  # (the text may wrap)

    def held_per_layer(length):
        with torch.no_grad():
            cache = getattr(model(input_ids=random_ids(1, length), use_cache=True), CACHE_FIELD)
        return [sum(t.numel() for t in cache.get_state(i).values()) for i in range(len(mixers))]

    held, held_later = held_per_layer(20), held_per_layer(21)
    growing = bounded = constant = 0
    for i, mixer in enumerate(mixers):
        row = re.search(rf"\| {i} \| `{mixer}` \| ([^|]*)\|", text).group(1)
        if mixer == "attention":
            growing += held_later[i] - held[i]
            assert row.startswith(f"{held_later[i] - held[i]:,} values per token"), row
            continue
        assert held[i] == held_later[i], mixer
        if mixer == "sliding_attention":
            bounded += held[i]
            assert row.rstrip().endswith(f"{held[i]:,} values"), row
        else:
            constant += held[i]
            assert row.startswith(f"{held[i]:,} values, constant"), row
    assert f"grows by {growing:,} values per token" in text
    assert f"holds at most {bounded:,} values in the sliding-window layers" in text
    assert f"keeps {constant:,} values of recurrent state" in text


def test_the_card_says_which_states_stay_float32():
    """mamba2's and linear attention's scan states are kept in float32 in a bf16 model: the card's "2 bytes in bf16"
    understated their bytes (1,504 for 2,528)."""
    model = tiny_model(SeqArchForCausalLM, ["mamba2", "attention"]).to(torch.bfloat16)
    text = " ".join(model_card_text(model).split())
    assert "scan states are kept in float32, 4 bytes, in any dtype" in text
    with torch.no_grad():
        cache = getattr(model(input_ids=random_ids(1, 5), use_cache=True), CACHE_FIELD)
    assert cache.get_state(0)["ssm"].dtype == torch.float32 and cache.get_state(1)["key"].dtype == torch.bfloat16
    assert "scan states" not in model_card_text(tiny_model(SeqArchForCausalLM, ["lstm", "attention"]))


def test_users_readme_is_kept_and_ours_is_refreshed(tmp_path):
    (tmp_path / "README.md").write_text("# My own card\n")
    tiny_model(SeqArchForCausalLM, ["lstm"]).save_pretrained(tmp_path)
    assert (tmp_path / "README.md").read_text() == "# My own card\n"
    (tmp_path / "README.md").unlink()
    tiny_model(SeqArchForCausalLM, ["lstm"]).save_pretrained(tmp_path)
    assert CARD_MARKER in (tmp_path / "README.md").read_text()
    tiny_model(SeqArchForCausalLM, ["gru", "attention"]).save_pretrained(tmp_path)  # ours: rewritten
    assert "`gru`" in (tmp_path / "README.md").read_text()


class FakeHubApi:
    """Stands in for huggingface_hub.HfApi: records what would be uploaded (no network in tests)."""

    remote_readme = None
    uploads = []

    def __init__(self, token=None):
        self.token = token

    def create_repo(self, repo_id, private=None, exist_ok=False):
        from types import SimpleNamespace

        return SimpleNamespace(repo_id=repo_id)

    def create_branch(self, repo_id, branch, exist_ok=False):
        pass

    def file_exists(self, repo_id, filename, revision=None):
        return self.remote_readme is not None

    def hf_hub_download(self, repo_id, filename, revision=None):
        path = os.path.join(FakeHubApi.scratch, "remote_README.md")
        with open(path, "w") as f:
            f.write(self.remote_readme)
        return path

    def upload_folder(self, repo_id, folder_path, commit_message, commit_description, create_pr, revision,
                      ignore_patterns):
        files = {name: open(os.path.join(folder_path, name), "rb").read() for name in os.listdir(folder_path)}
        FakeHubApi.uploads.append(dict(repo_id=repo_id, files=files, ignore=ignore_patterns, message=commit_message,
                                       description=commit_description, revision=revision))


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeHubApi)
    monkeypatch.setattr(FakeHubApi, "uploads", [])
    monkeypatch.setattr(FakeHubApi, "remote_readme", None)
    FakeHubApi.scratch = str(tmp_path)
    return FakeHubApi


def test_push_to_hub_uploads_the_saved_folder_with_our_card(fake_hub, tmp_path):
    model = tiny_model(SeqArchForCausalLM, ALL_MIXERS)
    model.push_to_hub("me/tiny-hybrid")
    model.save_pretrained(tmp_path / "saved")
    [upload] = fake_hub.uploads
    assert upload["repo_id"] == "me/tiny-hybrid" and upload["ignore"] is None
    assert set(upload["files"]) == set(os.listdir(tmp_path / "saved"))
    card = upload["files"]["README.md"].decode()
    assert CARD_MARKER in card and 'from_pretrained("me/tiny-hybrid", trust_remote_code=True)' in card

    fake_hub.remote_readme = "# A card the user wrote on the Hub\n"
    model.save_pretrained(tmp_path / "again", push_to_hub=True, repo_id="me/tiny-hybrid")
    assert fake_hub.uploads[-1]["ignore"] == ["README.md"]  # the user's card on the Hub stays


@pytest.mark.parametrize("how", ["push_to_hub", "save_pretrained", "save_pretrained_without_repo_id"])
def test_the_card_names_the_repository_the_upload_went_to(fake_hub, monkeypatch, tmp_path, how):
    """The Hub puts a bare repository name under the token's user: the card's load snippet named the bare name (a
    repository that does not exist), or "<org>/<name>" where save_pretrained chose the name from the folder."""
    monkeypatch.setattr(FakeHubApi, "create_repo", lambda self, repo_id, private=None, exist_ok=False:
                        SimpleNamespace(repo_id=repo_id if "/" in repo_id else f"me/{repo_id}"))
    model = tiny_model(SeqArchForCausalLM, ["lstm"], intermediate_size=0)
    if how == "push_to_hub":
        model.push_to_hub("tiny")
    elif how == "save_pretrained":
        model.save_pretrained(tmp_path / "saved", push_to_hub=True, repo_id="tiny")
    else:
        model.save_pretrained(tmp_path / "tiny", push_to_hub=True)
    [upload] = fake_hub.uploads
    card = upload["files"]["README.md"].decode()
    assert upload["repo_id"] == "me/tiny" and 'from_pretrained("me/tiny", trust_remote_code=True)' in card
    assert "one pre-norm residual block, a token mixer (no MLP)" in " ".join(card.split())  # (the text wraps)

@pytest.mark.parametrize("how", ["push_to_hub", "save_pretrained"])
def test_push_to_hub_keeps_tags_and_commit_details(fake_hub, tmp_path, how):
    """transformers' push_to_hub arguments (tags, commit_description, revision) and add_model_tags reach the Hub."""
    model = tiny_model(SeqArchForCausalLM, ["lstm"])
    model.add_model_tags(["from-add-model-tags"])
    details = dict(tags=["my-tag"], commit_message="msg", commit_description="what changed", revision="v2")
    if how == "push_to_hub":
        model.push_to_hub("me/tiny", **details)
    else:
        model.save_pretrained(tmp_path / "saved", push_to_hub=True, repo_id="me/tiny", **details)
    [upload] = fake_hub.uploads
    assert (upload["message"], upload["description"], upload["revision"]) == ("msg", "what changed", "v2")
    front_matter = upload["files"]["README.md"].decode().split("---")[1]
    assert "- my-tag" in front_matter and "- from-add-model-tags" in front_matter and "- lstm" in front_matter


def test_only_the_main_process_writes_the_card(tmp_path):
    model = tiny_model(SeqArchForCausalLM, ["lstm"])
    model.save_pretrained(tmp_path / "keyword", is_main_process=False)
    model.save_pretrained(tmp_path / "positional", False)  # transformers' second parameter
    for folder in ("keyword", "positional"):
        assert not (tmp_path / folder / "README.md").exists()
    model.save_pretrained(tmp_path / "main")
    assert (tmp_path / "main" / "README.md").exists()


# -- loading something broken gets a clear error ------------------------------------------------------


@pytest.fixture
def saved_lm(tmp_path):
    folder = tmp_path / "model"
    tiny_model(SeqArchForCausalLM, ["lstm", "attention"]).save_pretrained(folder)
    return folder


@pytest.mark.parametrize(
    "damage",
    [lambda b: b[: len(b) // 2], lambda b: b[:5], lambda b: b[:8] + b"\x00garbage" + b[17:], lambda b: b""],
    ids=["truncated", "truncated_header", "garbled_header", "empty"],
)
def test_broken_safetensors_file(saved_lm, damage):
    path = saved_lm / "model.safetensors"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(OSError, match=f"{re.escape(str(saved_lm))}.*truncated or corrupted"):
        SeqArchForCausalLM.from_pretrained(saved_lm)


def test_folder_without_config(saved_lm):
    (saved_lm / "config.json").unlink()
    with pytest.raises(OSError, match=f"{re.escape(str(saved_lm))}.*has no config.json"):
        SeqArchForCausalLM.from_pretrained(saved_lm)
    SeqArchForCausalLM.from_pretrained(saved_lm, config=tiny_config(["lstm", "attention"]))  # given in code: fine


def test_subfolder(saved_lm, tmp_path):
    model = SeqArchForCausalLM.from_pretrained(saved_lm)
    model.save_pretrained(tmp_path / "repo" / "checkpoint")
    again = SeqArchForCausalLM.from_pretrained(tmp_path / "repo", subfolder="checkpoint")
    ids = random_ids(2, 5)
    torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    with pytest.raises(OSError, match="elsewhere.*has no config.json"):
        SeqArchForCausalLM.from_pretrained(tmp_path / "repo", subfolder="elsewhere")


def test_config_overrides_at_load_are_applied_and_checked(saved_lm):
    """from_pretrained's keyword overrides are set after the config's __init__ (transformers' from_dict)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(saved_lm, mixer_types=["gru", "attention", "lstm"])
    assert config.num_hidden_layers == 3 and len(SeqArchForCausalLM(config).model.layers) == 3
    with pytest.raises(ValueError, match="Unknown mixer type.*bogus"):
        AutoConfig.from_pretrained(saved_lm, mixer_types=["gru", "bogus"])
    with pytest.raises(ValueError, match="num_hidden_layers=3 does not match len"):
        AutoConfig.from_pretrained(saved_lm, num_hidden_layers=3)
    with pytest.raises(ValueError, match="lacks"):  # a layer more than the checkpoint: never left random
        SeqArchForCausalLM.from_pretrained(saved_lm, mixer_types=["lstm", "attention", "attention"])
    with pytest.raises(ValueError, match="num_attention_heads=5 does not divide"):
        SeqArchForCausalLM.from_pretrained(saved_lm, num_attention_heads=5)


def test_mixer_types_set_on_a_live_config():
    config = tiny_config(["lstm"])
    config.mixer_types = ("lstm", "attention")
    assert config.num_hidden_layers == 2 and len(SeqArchModel(config).layers) == 2
    config.mixer_types = ["lstm", "bogus"]
    with pytest.raises(ValueError, match="Unknown mixer type.*bogus"):
        SeqArchModel(config)


def test_ignore_mismatched_sizes_does_not_reinitialise_the_body(saved_lm):
    with pytest.raises(ValueError, match="other shapes.*ignore_mismatched_sizes only suits a task head"):
        SeqArchForCausalLM.from_pretrained(saved_lm, hidden_size=64, ignore_mismatched_sizes=True)
    # A task head of another size is what the option is for.
    classifier = SeqArchForSequenceClassification.from_pretrained(saved_lm, num_labels=3)
    classifier.save_pretrained(saved_lm.parent / "classifier")
    with pytest.raises(ValueError, match="another num_labels.*pass ignore_mismatched_sizes=True"):
        SeqArchForSequenceClassification.from_pretrained(saved_lm.parent / "classifier", num_labels=5)
    resized = SeqArchForSequenceClassification.from_pretrained(
        saved_lm.parent / "classifier", num_labels=5, ignore_mismatched_sizes=True
    )
    assert resized.score.out_features == 5


@pytest.mark.parametrize(
    "mixer_types,message",
    [
        (["lstm"], "has 9 weight.*no place for"),  # a layer fewer than the checkpoint
        (["lstm", "attention", "attention"], "lacks"),  # a layer more
        (["attention", "lstm"], "lacks.*no place for"),  # swapped
        (["gru", "attention"], "other shapes"),  # same names, other shapes
    ],
)
def test_config_whose_mixers_do_not_match_the_weights(saved_lm, mixer_types, message):
    from transformers import AutoModelForCausalLM

    config = json.loads((saved_lm / "config.json").read_text())
    config["mixer_types"], config["num_hidden_layers"] = mixer_types, len(mixer_types)
    (saved_lm / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        AutoModelForCausalLM.from_pretrained(saved_lm)


def test_unknown_mixer_from_a_newer_release(saved_lm):
    from transformers import AutoModelForCausalLM

    config = json.loads((saved_lm / "config.json").read_text())
    config["mixer_types"] = ["lstm", "hyena_from_the_future"]
    (saved_lm / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"hyena_from_the_future.*allowed: \[.*'lstm'.*upgrade"):
        AutoModelForCausalLM.from_pretrained(saved_lm)
