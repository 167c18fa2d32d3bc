"""The head's chunked cross-entropy (lm.head_loss) gives the loss and gradients of logits followed by
plain cross-entropy: over several chunks, with ignored targets, with none counted, and in bf16."""

import pytest
import torch
import torch.nn.functional as F

import lm.head_loss
from lm.config import ModelConfig
from lm.head_loss import LinearCrossEntropy
from lm.model import GPT


def plain(hidden, weight, targets):
    logits = (hidden @ weight.t()).float()
    counted = (targets != -100).sum().clamp(min=1)
    return F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum") / counted


def loss_and_grads(loss_fn, hidden, weight, targets, grad_scale=1.0):
    hidden, weight = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    loss = loss_fn(hidden, weight, targets)
    (loss * grad_scale).backward()
    return loss.detach(), hidden.grad, weight.grad


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setitem(lm.head_loss._CHUNK_ELEMENTS, "cpu", 7 * 50)  # 7 rows a chunk: 30 rows = 4 chunks + 2


def inputs(dtype=torch.float32, ignored=(0, 5, 29)):
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(30, 16, generator=g), torch.randn(50, 16, generator=g) * 0.5
    targets = torch.randint(0, 50, (30,), generator=g)
    targets[list(ignored)] = -100
    return hidden.to(dtype), weight.to(dtype), targets


def test_loss_and_gradients_equal_plain_cross_entropy_over_several_chunks(small_chunks):
    hidden, weight, targets = inputs()
    expected = loss_and_grads(plain, hidden, weight, targets, grad_scale=0.5)  # backward scales by its input
    got = loss_and_grads(LinearCrossEntropy.apply, hidden, weight, targets, grad_scale=0.5)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_batch_with_no_counted_targets_has_zero_loss_and_gradients(small_chunks):
    hidden, weight, targets = inputs(ignored=range(30))
    loss, grad_hidden, grad_weight = loss_and_grads(LinearCrossEntropy.apply, hidden, weight, targets)
    assert loss.item() == 0 and not grad_hidden.any() and not grad_weight.any()


def test_bf16_weights_and_autocast_stay_close_to_fp32(small_chunks):
    hidden, weight, targets = inputs()
    reference = loss_and_grads(plain, hidden, weight, targets)
    bf16 = loss_and_grads(LinearCrossEntropy.apply, hidden.bfloat16(), weight.bfloat16(), targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = loss_and_grads(LinearCrossEntropy.apply, hidden, weight, targets)
    assert bf16[1].dtype == bf16[2].dtype == torch.bfloat16  # gradients in the inputs' dtypes
    assert autocast[1].dtype == autocast[2].dtype == torch.float32
    for got in (bf16, autocast):
        for a, b in zip(got, reference):
            torch.testing.assert_close(a.float(), b, rtol=0.05, atol=0.02)


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_a_training_step_equals_the_one_through_full_logits(variant, small_chunks):
    """GPT in training mode takes the chunked path; in eval mode (no dropout here) the plain one."""
    cfg = ModelConfig(name="t", variant=variant, n_layer=2, n_head=2, n_embd=16, block_size=16, vocab_size=50,
                      bias=variant == "gpt2")
    idx = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(1))
    results = []
    for training in (True, False):
        torch.manual_seed(0)
        model = GPT(cfg).train(training)
        logits, loss = model(idx[:, :-1], idx[:, 1:])
        assert (logits is None) == training
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
