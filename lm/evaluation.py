"""Loss, perplexity and next-token accuracy of a model on a whole token stream.

Training evaluates a fixed sample of val windows at every evaluation (`lm.trainer.evaluate`). This
reads a stream from start to end instead, in consecutive windows of the model's context, so a
checkpoint or an export can be scored on any held-out text (`python -m launcher.evaluate`).
"""

from __future__ import annotations

import math

import numpy as np
import torch


@torch.no_grad()
def evaluate_stream(model, tokens: np.ndarray, seq_len: int, batch_size: int = 8,
                    max_tokens: int | None = None) -> dict:
    """Every target of consecutive windows of seq_len tokens (the last, shorter one included), up to
    max_tokens targets; `model(x, y)` gives (logits, mean loss) as GPT's forward does. `tokens` may be
    a memory-mapped file: a batch of windows at a time is read."""
    tokens = tokens[: (max_tokens + 1) if max_tokens else None]
    targets = len(tokens) - 1
    if targets < 1:
        raise ValueError("the text has fewer than 2 tokens: nothing to predict")
    full = targets // seq_len
    batches = [range(first, min(first + batch_size, full)) for first in range(0, full, batch_size)]
    windows = [([i * seq_len for i in batch], seq_len) for batch in batches]
    if targets % seq_len:
        windows.append(([full * seq_len], targets % seq_len))  # the last, shorter window
    loss_sum, correct = 0.0, 0
    for starts, length in windows:
        x = torch.from_numpy(np.stack([tokens[s:s + length] for s in starts]).astype(np.int64))
        y = torch.from_numpy(np.stack([tokens[s + 1:s + 1 + length] for s in starts]).astype(np.int64))
        logits, loss = model(x, y)
        loss_sum += loss.item() * y.numel()
        correct += (logits.argmax(-1) == y).sum().item()
    loss = loss_sum / targets
    return {"tokens": targets, "loss": loss, "perplexity": math.exp(min(loss, 80.0)), "accuracy": correct / targets}
