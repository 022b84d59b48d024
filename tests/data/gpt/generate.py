"""Fixtures of kiln's GPT parity tests (tests/integration/gpt.rs), from PyTorch 2.15 and the
twin in benches/gpt_pytorch.py. Not run by CI; rerun: python3 tests/data/gpt/generate.py

- gpt_tied.safetensors / gpt_untied.safetensors: a 2-layer, 2-head, 32-wide model over bytes
  with 16 tokens of context (torch.manual_seed(0) / (1)), in kiln's names.
- input.npy: 4 windows of 17 bytes of data/shakespeare/input.txt (as float32 byte values);
  the first 16 of each are the inputs, the last 16 the targets.
- logits_tied.npy / logits_untied.npy: [4, 16, 256] logits of the inputs.
- tied_after_steps.safetensors, losses.json: the tied model after 3 AdamW steps on that batch
  (lr 3e-3, betas 0.9/0.999, eps 1e-8, weight decay 0.1 on every parameter, gradients
  clipped to norm 1.0) and the loss before each step.
"""
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.join(HERE, "..", "..", "..")
sys.path.insert(0, os.path.join(ROOT, "benches"))
from gpt_pytorch import GPT, Config, windows  # noqa: E402

BLOCK = 16


def model(seed, tied):
    torch.manual_seed(seed)
    return GPT(Config(vocab_size=256, block_size=BLOCK, layers=2, heads=2, embed=32, tied_head=tied))


def main():
    data = list(open(os.path.join(ROOT, "data", "shakespeare", "input.txt"), "rb").read())
    batch = windows(data, BLOCK, 0, 4)
    np.save(os.path.join(HERE, "input.npy"), batch.numpy().astype(np.float32))
    inputs, targets = batch[:, :-1], batch[:, 1:]
    for seed, tied in [(0, True), (1, False)]:
        name = "tied" if tied else "untied"
        m = model(seed, tied)
        save_file(m.kiln_state_dict(), os.path.join(HERE, f"gpt_{name}.safetensors"))
        with torch.no_grad():
            np.save(os.path.join(HERE, f"logits_{name}.npy"), m(inputs).numpy())
    m = model(0, True)
    optimizer = torch.optim.AdamW(m.parameters(), lr=3e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    losses = []
    for _ in range(3):
        loss = F.cross_entropy(m(inputs).reshape(-1, 256), targets.reshape(-1))
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        optimizer.step()
    save_file(m.kiln_state_dict(), os.path.join(HERE, "tied_after_steps.safetensors"))
    json.dump({"losses": losses, "torch": torch.__version__}, open(os.path.join(HERE, "losses.json"), "w"), indent=1)
    print("losses", losses)


if __name__ == "__main__":
    main()
