"""The baseline for recipe_parity.py: nanoGPT's character-level Shakespeare recipe as nanoGPT runs it
on a CPU, written out here because nothing may be downloaded. Its README's CPU command is

    python data/shakespeare_char/prepare.py
    python train.py config/train_shakespeare_char.py --device=cpu --compile=False --eval_iters=20
        --log_interval=1 --block_size=64 --batch_size=12 --n_layer=4 --n_head=4 --n_embd=128
        --max_iters=2000 --lr_decay_iters=2000 --dropout=0.0

and this file does what those two do on a CPU: characters as tokens, the first 90% of the text for
training; its GPT (LayerNorm without bias, GELU, torch's fused causal attention, the full logits and
their cross-entropy, tied embedding); fp32 (nanoGPT autocasts only on GPUs); torch's AdamW with
weight decay on matrices only (fused only on GPUs); warm-up then cosine learning rate; clipping at 1.0;
a batch read from the memory-mapped token file each step; 20 train and 20 val batches evaluated
every 250 iterations and at iteration 0, a checkpoint whenever val loss improves, the loss printed
every iteration; iterations 0 to 2000 inclusive, as nanoGPT counts them.

    python benchmarks/nanogpt_recipe.py --data input.txt --workdir DIR [--max-iters 2000]

Prints nanoGPT's "step N: train loss X, val loss Y" lines, then one JSON line with the last losses.
"""

from __future__ import annotations

import argparse
import json
import math
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

N_LAYER, N_HEAD, N_EMBD, BLOCK_SIZE, BATCH_SIZE = 4, 4, 128, 64, 12
LEARNING_RATE, MIN_LR, WARMUP_ITERS, WEIGHT_DECAY, BETAS, GRAD_CLIP = 1e-3, 1e-4, 100, 0.1, (0.9, 0.99), 1.0
EVAL_INTERVAL, EVAL_ITERS = 250, 20


def val_split(text: str) -> str:
    """The last 10% of the characters, as nanoGPT's prepare.py splits them."""
    return text[int(len(text) * 0.9):]


def prepare(text_path: Path, data_dir: Path) -> int:
    """data/shakespeare_char/prepare.py: train.bin, val.bin (uint16 ids) and meta.pkl; the vocab size."""
    text = text_path.read_text()
    chars = sorted(set(text))
    stoi = {ch: i for i, ch in enumerate(chars)}
    val = val_split(text)
    for name, part in (("train", text[:len(text) - len(val)]), ("val", val)):
        np.array([stoi[c] for c in part], dtype=np.uint16).tofile(data_dir / f"{name}.bin")
    with open(data_dir / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": len(chars), "itos": dict(enumerate(chars)), "stoi": stoi}, f)
    return len(chars)


class LayerNorm(nn.Module):
    def __init__(self, ndim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(ndim))

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, None, 1e-5)


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.ln_1, self.ln_2 = LayerNorm(N_EMBD), LayerNorm(N_EMBD)
        self.c_attn = nn.Linear(N_EMBD, 3 * N_EMBD, bias=False)
        self.attn_proj = nn.Linear(N_EMBD, N_EMBD, bias=False)
        self.c_fc = nn.Linear(N_EMBD, 4 * N_EMBD, bias=False)
        self.mlp_proj = nn.Linear(4 * N_EMBD, N_EMBD, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(N_EMBD, dim=2)
        q, k, v = (t.view(B, T, N_HEAD, C // N_HEAD).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).contiguous().view(B, T, C)
        x = x + self.attn_proj(y)
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class GPT(nn.Module):
    def __init__(self, vocab_size: int):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab_size, N_EMBD), nn.Embedding(BLOCK_SIZE, N_EMBD)
        self.h = nn.ModuleList(Block() for _ in range(N_LAYER))
        self.ln_f = LayerNorm(N_EMBD)
        self.lm_head = nn.Linear(N_EMBD, vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = 0.02 / math.sqrt(2 * N_LAYER) if name.endswith("proj.weight") else 0.02
                nn.init.normal_(p, mean=0.0, std=std)

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.size(1)))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)


def get_batch(data_dir: Path, split: str):
    data = np.memmap(data_dir / f"{split}.bin", dtype=np.uint16, mode="r")  # re-mapped per batch, as nanoGPT does
    ix = torch.randint(len(data) - BLOCK_SIZE, (BATCH_SIZE,))
    x = torch.stack([torch.from_numpy(data[i:i + BLOCK_SIZE].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + BLOCK_SIZE].astype(np.int64)) for i in ix])
    return x, y


@torch.no_grad()
def estimate_loss(model: GPT, data_dir: Path) -> dict:
    model.eval()
    out = {split: torch.tensor([model(*get_batch(data_dir, split)).item() for _ in range(EVAL_ITERS)]).mean().item()
           for split in ("train", "val")}
    model.train()
    return out


@torch.no_grad()
def windowed_loss(loss_fn, ids: torch.Tensor) -> float:
    """Mean next-token loss over all of `ids` in non-overlapping windows of BLOCK_SIZE; `loss_fn(x, y)`
    gives a batch's mean loss. Not part of nanoGPT: recipe_parity.py scores both runs' final models
    this way on the same val characters, since each run's own estimate samples different windows."""
    n = (len(ids) - 1) // BLOCK_SIZE
    x, y = ids[:n * BLOCK_SIZE].view(n, BLOCK_SIZE), ids[1:n * BLOCK_SIZE + 1].view(n, BLOCK_SIZE)
    return sum(float(loss_fn(x[i:i + 256], y[i:i + 256])) * len(x[i:i + 256]) for i in range(0, n, 256)) / n


def learning_rate(it: int, max_iters: int) -> float:
    if it < WARMUP_ITERS:
        return LEARNING_RATE * (it + 1) / (WARMUP_ITERS + 1)
    if it > max_iters:
        return MIN_LR
    coeff = 0.5 * (1.0 + math.cos(math.pi * (it - WARMUP_ITERS) / (max_iters - WARMUP_ITERS)))
    return MIN_LR + coeff * (LEARNING_RATE - MIN_LR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--max-iters", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1337)
    args = parser.parse_args()
    data_dir = args.workdir / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    vocab_size = prepare(args.data, data_dir)
    val_ids = torch.from_numpy(np.fromfile(data_dir / "val.bin", dtype=np.uint16).astype(np.int64))

    torch.manual_seed(args.seed)
    model = GPT(vocab_size)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW([{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
                                   {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}],
                                  lr=LEARNING_RATE, betas=BETAS)
    best_val, losses = 1e9, {}
    x, y = get_batch(data_dir, "train")
    for it in range(args.max_iters + 1):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(it, args.max_iters)
        if it % EVAL_INTERVAL == 0:
            losses = estimate_loss(model, data_dir)
            print(f"step {it}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}", flush=True)
            if losses["val"] < best_val:
                best_val = losses["val"]
                if it > 0:
                    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "iter_num": it,
                                "best_val_loss": best_val}, args.workdir / "ckpt.pt")
        loss = model(x, y)
        x, y = get_batch(data_dir, "train")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        print(f"iter {it}: loss {loss.item():.4f}")  # log_interval=1: a host sync every step, as nanoGPT's
    print(json.dumps({"train_loss": losses["train"], "val_loss": losses["val"],
                      "full_val_loss": windowed_loss(model.eval(), val_ids)}), flush=True)


if __name__ == "__main__":
    main()
