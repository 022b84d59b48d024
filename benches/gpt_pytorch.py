"""The PyTorch twin of kiln's GPT (kiln_models::gpt): nanoGPT's model without dropout, the same
parameter names, and a training run of the `gpt` recipe's defaults for comparison.

Model only: `from gpt_pytorch import GPT, Config` (tests/data/gpt/generate.py does).
Run: python3 benches/gpt_pytorch.py [--steps N] [--threads T] prints one JSON line: training
tokens/s, the validation loss in bits per byte after N steps (default: three epochs of batches of
32 windows, kiln train gpt's default run: AdamW 2e-3, weight decay 0.1, warm-up + cosine to
2e-4, clipping at 1), wall time.
"""
import argparse
import json
import math
import os
import platform
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class Config:
    vocab_size: int = 256
    block_size: int = 64
    layers: int = 4
    heads: int = 4
    embed: int = 128
    tied_head: bool = True


class CausalSelfAttention(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c_attn = nn.Linear(c.embed, 3 * c.embed)
        self.c_proj = nn.Linear(c.embed, c.embed)
        self.heads = c.heads

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.c_attn(x).split(c, dim=2)
        q, k, v = (z.view(b, t, self.heads, c // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(b, t, c))


class MLP(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.c_fc = nn.Linear(c.embed, 4 * c.embed)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * c.embed, c.embed)

    def forward(self, x):
        return self.c_proj(self.gelu(self.c_fc(x)))


class Block(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.embed)
        self.attn = CausalSelfAttention(c)
        self.ln_2 = nn.LayerNorm(c.embed)
        self.mlp = MLP(c)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, c: Config):
        super().__init__()
        self.config = c
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(c.vocab_size, c.embed),
            wpe=nn.Embedding(c.block_size, c.embed),
            h=nn.ModuleList([Block(c) for _ in range(c.layers)]),
            ln_f=nn.LayerNorm(c.embed),
        ))
        self.lm_head = nn.Linear(c.embed, c.vocab_size, bias=False)
        if c.tied_head:
            self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * c.layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def forward(self, idx):
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.transformer.wte(idx) + self.transformer.wpe(pos)
        for block in self.transformer.h:
            x = block(x)
        return self.lm_head(self.transformer.ln_f(x))

    def kiln_state_dict(self):
        """The state_dict as kiln reads it: a tied head is the token embedding, not a key."""
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.config.tied_head:
            del state["lm_head.weight"]
        return state


def windows(data, block, start, count):
    """Windows i of `block + 1` bytes starting at `start + i * block`, as kiln cuts them."""
    rows = [data[start + i * block: start + i * block + block + 1] for i in range(count)]
    return torch.tensor(rows, dtype=torch.long)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--data", default=os.path.join(os.path.dirname(__file__), "..", "data", "shakespeare", "input.txt"))
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps [default: three epochs, as kiln train gpt]")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    data = list(open(args.data, "rb").read())
    c = Config()
    boundary = round(len(data) * 0.9)
    train_count = (boundary - 1) // c.block_size
    val_count = (len(data) - boundary - 1) // c.block_size
    model = GPT(c)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1, betas=(0.9, 0.999), eps=1e-8)
    generator = torch.Generator().manual_seed(args.seed)
    if args.steps is None:
        args.steps = 3 * -(-train_count // args.batch_size)
    # kiln's default schedule: warm-up over min(50, steps / 10), cosine down to lr / 10.
    warmup = max(1, min(50, args.steps // 10))
    started = time.perf_counter()
    for step in range(args.steps):
        lr = args.lr * (step + 1) / warmup if step < warmup else 0.1 * args.lr + 0.45 * args.lr * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        # A new shuffle every epoch, as kiln's sampler (not the same order).
        per_epoch = -(-train_count // args.batch_size)
        if step % per_epoch == 0:
            order = torch.randperm(train_count, generator=generator)
        idx = order[(step % per_epoch) * args.batch_size:][: args.batch_size]
        batch = torch.stack([windows(data, c.block_size, i * c.block_size, 1)[0] for i in idx.tolist()])
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, c.vocab_size), batch[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    train_seconds = time.perf_counter() - started
    with torch.no_grad():
        val = windows(data, c.block_size, boundary, val_count)
        total = 0.0
        for i in range(0, val_count, 256):
            b = val[i: i + 256]
            logits = model(b[:, :-1])
            total += F.cross_entropy(logits.reshape(-1, c.vocab_size), b[:, 1:].reshape(-1), reduction="sum").item()
        val_loss = total / (val_count * c.block_size)
    print(json.dumps({
        "framework": f"pytorch {torch.__version__}",
        "cpu": platform.processor() or platform.machine(),
        "threads": args.threads,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "train_tokens_per_sec": args.steps * args.batch_size * c.block_size / train_seconds,
        "train_seconds": train_seconds,
        "val_loss": val_loss,
        "val_bits_per_byte": val_loss / math.log(2),
    }))


if __name__ == "__main__":
    main()
