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


@torch.no_grad()
def evaluate_conversations(model, conversations, seq_len: int, max_tokens: int | None = None) -> dict:
    """Loss, perplexity and accuracy on the answer tokens of conversations, each given as (ids, answer
    mask) (lm.chat_data.tokenize_conversation) and read on its own: the prompt is context, never a
    target. A conversation longer than seq_len is read in consecutive windows of seq_len, the last one
    reaching back a whole seq_len from the conversation's end (where the last answer sits), every answer
    token scored once. Stops after the conversation that reaches max_tokens answer tokens."""
    loss_sum, correct, counted, scored = 0.0, 0, 0, 0
    for ids, mask in conversations:
        targets = torch.tensor(ids[1:], dtype=torch.int64)
        targets[~torch.tensor(mask[1:], dtype=torch.bool)] = -100
        inputs = torch.tensor(ids[:-1], dtype=torch.int64)
        done = 0  # targets before this one are scored
        while done < len(inputs):
            end = min(done + seq_len, len(inputs))
            start = max(0, end - seq_len)
            x, y = inputs[None, start:end], targets[None, start:end].clone()
            y[0, :done - start] = -100  # scored by the window before
            done = end
            answers = int((y != -100).sum())
            if not answers:
                continue
            logits, loss = model(x, y)
            loss_sum += loss.item() * answers
            correct += int((logits.argmax(-1) == y).sum())
            counted += answers
        scored += 1
        if max_tokens and counted >= max_tokens:
            break
    if not counted:
        raise ValueError("the conversations hold no answer tokens: nothing to predict")
    loss = loss_sum / counted
    return {"tokens": counted, "loss": loss, "perplexity": math.exp(min(loss, 80.0)), "accuracy": correct / counted,
            "conversations": scored}
