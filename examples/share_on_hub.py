"""Train a small hybrid model briefly, save it as a Hub repository, and load it back as a user who has
never installed hf_seqarch would (only torch and transformers, trust_remote_code=True).

    python examples/share_on_hub.py --output_dir outputs/share_on_hub
    python examples/share_on_hub.py --push_to_hub your-name/tiny-hybrid   # after `hf auth login`

The saved folder is what push_to_hub uploads: config.json (its auto_map names the Auto classes),
the model's Python files, model.safetensors, generation_config.json, the tokenizer files and a
README.md model card (the mixer of each layer, the parameter count, how decoding memory grows).
"""

import argparse
import json
import os
import subprocess
import sys
import textwrap

import torch
from transformers import ByT5Tokenizer, pipeline

from hf_seqarch import SeqArchConfig, SeqArchForCausalLM
from hf_seqarch.tools.text_data import lm_blocks

PROMPT = "The assert statement"

# What a user without hf_seqarch runs. `sys.modules["hf_seqarch"] = None` makes sure that nothing of
# the package is used here, even though it is installed on this machine.
USER_SCRIPT = textwrap.dedent(
    """
    import json, sys
    sys.modules["hf_seqarch"] = None
    from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

    model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)  # it reads config.json too
    generator = pipeline("text-generation", model=model, tokenizer=tokenizer)
    text = generator(sys.argv[2], max_new_tokens=40, do_sample=False)[0]["generated_text"]
    print(json.dumps({"class": type(model).__module__ + "." + type(model).__name__, "text": text}))
    """
)


def train(model, tokenizer, steps, block_size=64, batch_size=8):
    train_blocks, _ = lm_blocks(tokenizer, block_size, max_chars=50_000)
    ids = torch.tensor([b["input_ids"] for b in train_blocks])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for step in range(steps):
        batch = ids[torch.randint(len(ids), (batch_size,), generator=generator)]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 20 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}")
    return model.eval()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/share_on_hub")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--push_to_hub", metavar="ORG/NAME", help="also upload the model and tokenizer there")
    args = parser.parse_args()

    torch.manual_seed(0)
    tokenizer = ByT5Tokenizer()  # byte-level: needs no vocabulary file
    config = SeqArchConfig(
        vocab_size=len(tokenizer), hidden_size=64, mixer_types=["mamba2", "attention", "lstm"],
        num_attention_heads=4, intermediate_size=128, mamba_head_dim=16, mamba_state_size=16, mamba_chunk_size=32,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    model = train(SeqArchForCausalLM(config), tokenizer, args.steps)

    model.save_pretrained(args.output_dir)  # weights, config, code, generation config, README.md card
    tokenizer.save_pretrained(args.output_dir)
    print(f"\nSaved to {args.output_dir}: {', '.join(sorted(os.listdir(args.output_dir)))}")

    # The exact calls that publish it (each uploads one commit; the model's includes the card):
    #     model.push_to_hub("your-name/tiny-hybrid")
    #     tokenizer.push_to_hub("your-name/tiny-hybrid")
    # or, the whole folder at once: huggingface_hub.upload_folder(repo_id="your-name/tiny-hybrid", folder_path=args.output_dir)
    if args.push_to_hub:
        model.push_to_hub(args.push_to_hub)
        tokenizer.push_to_hub(args.push_to_hub)
        print(f"Pushed: https://huggingface.co/{args.push_to_hub}")

    ours = pipeline("text-generation", model=model, tokenizer=tokenizer)
    ours = ours(PROMPT, max_new_tokens=40, do_sample=False)[0]["generated_text"]
    # -I: the user's process sees neither this repository nor PYTHONPATH.
    user = subprocess.run(
        [sys.executable, "-I", "-c", USER_SCRIPT, os.path.abspath(args.output_dir), PROMPT],
        capture_output=True, text=True, check=True, stdin=subprocess.DEVNULL,
    ).stdout.splitlines()
    user = json.loads(user[-1])  # the last line: transformers may print its remote-code notice before
    print(f"\nA user without hf_seqarch gets {user['class']}")
    print(f"hf_seqarch generates: {ours!r}")
    print(f"the user generates:   {user['text']!r}")
    print("same output" if ours == user["text"] else "DIFFERENT OUTPUT")
    sys.exit(0 if ours == user["text"] else 1)


if __name__ == "__main__":
    main()
