"""Seed inputs of the reader fuzzer (src/fuzz.rs) that only PyTorch writes: a tiny
state_dict {fc.weight [3, 4], fc.bias [3]} as torch.save's zip .pth and as SafeTensors.
Run: python3 tests/data/fuzz/make_seeds.py (PyTorch 2.x, safetensors)."""
import pathlib

import torch
from safetensors.torch import save_file

here = pathlib.Path(__file__).parent
torch.manual_seed(0)


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 3)


state = Tiny().state_dict()
torch.save(state, here / "tiny.pth")
save_file({k: v.contiguous() for k, v in state.items()}, here / "tiny.safetensors")
