"""The smoke run behind `hf-seqarch demo`: build, train a few steps, save, reload, generate."""

import pydoc_data.topics

import torch

from .. import SeqArchConfig, SeqArchForCausalLM
from .output_dir import prepare_output_dir


def run_demo(output_dir: str, mixer_types: list[str], steps: int = 30):
    """Raises ValueError, before any training, for bad mixers or an output directory that cannot be made."""
    config = SeqArchConfig(vocab_size=256, hidden_size=128, mixer_types=mixer_types, num_attention_heads=4,
                           intermediate_size=256, sliding_window=64)
    output_dir = prepare_output_dir(output_dir)
    torch.manual_seed(0)
    text = " ".join(pydoc_data.topics.topics.values()).encode("utf-8")
    data = torch.tensor(list(text[:200_000]), dtype=torch.long)
    model = SeqArchForCausalLM(config)
    print(f"model: {mixer_types}, {model.num_parameters():,} parameters")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(steps):
        starts = torch.randint(0, len(data) - 129, (8,))
        batch = torch.stack([data[s : s + 128] for s in starts])
        loss = model(batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == steps - 1:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    model.save_pretrained(output_dir)
    reloaded = SeqArchForCausalLM.from_pretrained(output_dir)
    prompt = torch.tensor([list(b"The ")])
    generated = reloaded.generate(prompt, max_new_tokens=40, do_sample=False)
    print("sample:", bytes(generated[0].tolist()).decode("utf-8", errors="replace"))
    print(f"checkpoint saved in {output_dir}")
