"""Engine: KV-cache decoding equals decoding without a cache; batched equals one at a time; the
same seed gives the same sample; requests join a running batch; bad parameters name their field;
the compiled decode step (serve.compile) decodes as the eager one does."""

import math
import string

import pytest
import torch

from lm.config import ModelConfig, padded_vocab_size
from lm.engine import Engine, RequestError, SamplingParams, Sequence, adjust_logits, sample_next
from lm.model import GPT
from lm.tokenizer import ByteBPETokenizer, CharTokenizer

TOKENIZER = CharTokenizer(sorted(set(string.ascii_lowercase + " .,\n")))
PROMPTS = ["hello world", "a", "the quick brown fox jumps", "xyz. abc,\nq"]


def model(variant: str, block_size: int = 48) -> GPT:
    """gpt2, llama, or llama-gqa: llama with grouped-query attention (2 key/value heads for 4 query heads)."""
    torch.manual_seed(0)
    cfg = ModelConfig(name="t", variant=variant.removesuffix("-gqa"), n_layer=2, n_head=4, n_embd=64,
                      block_size=block_size,
                      n_kv_head=2 if variant.endswith("-gqa") else None,
                      vocab_size=padded_vocab_size(TOKENIZER.vocab_size), bias=variant == "gpt2")
    return GPT(cfg).eval()


def greedy_without_cache(m: GPT, prompt: str, n: int) -> list[int]:
    """Reference: full forward over the whole sequence for every new token, restricted to the real vocabulary."""
    ids = TOKENIZER.encode(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            logits, _ = m(torch.tensor([ids + out]))
            out.append(int(logits[0, -1, :TOKENIZER.vocab_size].argmax()))
    return out


@pytest.mark.parametrize("variant", ["gpt2", "llama", "llama-gqa"])
def test_greedy_with_the_kv_cache_equals_greedy_without(variant):
    m = model(variant)
    seqs = Engine(m, TOKENIZER, max_batch_size=4).generate(PROMPTS, SamplingParams(max_tokens=20, temperature=0))
    for prompt, seq in zip(PROMPTS, seqs):
        assert seq.output_ids == greedy_without_cache(m, prompt, 20), prompt
        assert seq.finish_reason == "length" and seq.text == TOKENIZER.decode(seq.output_ids)


@pytest.mark.parametrize("variant", ["gpt2", "llama", "llama-gqa"])
def test_batched_results_equal_one_at_a_time(variant):
    m = model(variant)
    params = [SamplingParams(max_tokens=15, temperature=0.9, top_k=10, seed=i) for i in range(len(PROMPTS))]
    together = Engine(m, TOKENIZER, max_batch_size=8).generate(PROMPTS, params)
    alone = [Engine(m, TOKENIZER, max_batch_size=1).generate([p], [sp])[0] for p, sp in zip(PROMPTS, params)]
    assert [s.output_ids for s in together] == [s.output_ids for s in alone]


def test_same_seed_same_sample_and_another_seed_another():
    m = model("gpt2")
    engine = Engine(m, TOKENIZER, max_batch_size=4)
    a, b, c = engine.generate(["hello"] * 3, [SamplingParams(max_tokens=30, temperature=1.0, seed=s) for s in (7, 7, 8)])
    assert a.output_ids == b.output_ids and a.output_ids != c.output_ids


def test_requests_join_between_decode_steps_and_slots_are_reused():
    engine = Engine(model("gpt2"), TOKENIZER, max_batch_size=2)
    first = engine.submit("hello", SamplingParams(max_tokens=10, temperature=0))
    engine.step()
    engine.step()
    late = engine.submit("world", SamplingParams(max_tokens=3, temperature=0))
    advanced = engine.step()
    assert first in advanced and late in advanced, "the late request joined the running batch"
    queued = [engine.submit("abc", SamplingParams(max_tokens=2, temperature=0)) for _ in range(3)]
    while engine.has_work:
        engine.step()
    assert all(s.finished for s in [first, late, *queued])
    assert sorted(engine.free_slots) == [0, 1]


def test_a_new_request_is_prefilled_before_the_running_batch_decodes():
    """Its first token exists (and `on_prefilled` sees it) before the step decodes the others."""
    m = model("gpt2")
    engine = Engine(m, TOKENIZER, max_batch_size=4)
    params = SamplingParams(max_tokens=6, temperature=0)
    running = engine.submit("hello", params)
    engine.step()
    new = engine.submit("abc", params)
    seen = []
    advanced = engine.step(on_prefilled=lambda seqs: seen.append(([s.id for s in seqs], len(new.output_ids),
                                                                  len(running.output_ids))))
    assert seen == [([new.id], 1, 1)]  # the running sequence had not decoded yet
    assert {s.id for s in advanced} == {new.id, running.id} and len(running.output_ids) == 2
    while engine.has_work:
        engine.step()
    assert running.output_ids == greedy_without_cache(m, "hello", 6)
    assert new.output_ids == greedy_without_cache(m, "abc", 6)


def test_stop_strings_cut_the_text():
    engine = Engine(model("gpt2"), TOKENIZER, max_batch_size=2)
    full = engine.generate(["hello"], SamplingParams(max_tokens=30, temperature=0))[0].text
    stop = full[5:7]
    cut = engine.generate(["hello"], SamplingParams(max_tokens=30, temperature=0, stop=[stop]))[0]
    assert cut.finish_reason == "stop" and cut.text == full[:full.find(stop)]


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_logprobs_are_the_models_own_for_sampled_tokens_and_for_the_prompt(variant):
    """Each output token's log-probability (and its top alternatives) is the model's distribution at
    that position, before temperature; prompt_logprobs scores the prompt's tokens the same way."""
    m = model(variant)
    engine = Engine(m, TOKENIZER, max_batch_size=4)
    greedy, hot = engine.generate(["hello world", "the quick"], [SamplingParams(max_tokens=8, temperature=0, logprobs=3),
                                                                 SamplingParams(max_tokens=8, temperature=3.0, seed=1,
                                                                                logprobs=0)])
    for seq in (greedy, hot):
        ids = seq.prompt_ids + seq.output_ids
        with torch.no_grad():
            expected = torch.log_softmax(m(torch.tensor([ids]))[0][0, :, :TOKENIZER.vocab_size], dim=-1)
        assert [lp.token for lp in seq.logprobs] == seq.output_ids
        for i, lp in enumerate(seq.logprobs):
            assert lp.logprob == pytest.approx(float(expected[len(seq.prompt_ids) - 1 + i, lp.token]), abs=1e-4)
        scored = engine.prompt_logprobs(ids, 2)
        assert scored[0] is None and [lp.token for lp in scored[1:]] == ids[1:]
        assert [lp.logprob for lp in scored[1:]] == pytest.approx([float(expected[i - 1, ids[i]])
                                                                   for i in range(1, len(ids))], abs=1e-4)
    for lp in greedy.logprobs:  # greedy: the sampled token is the most likely one
        assert len(lp.top) == 3 and lp.top[0] == (lp.token, pytest.approx(lp.logprob))
        assert [v for _, v in lp.top] == sorted((v for _, v in lp.top), reverse=True)
    assert all(lp.top == [] for lp in hot.logprobs)
    assert not engine.generate(["hello"], SamplingParams(max_tokens=4, temperature=0))[0].logprobs


def test_penalties_lower_the_logits_of_generated_tokens_by_count_and_presence():
    m = model("gpt2")
    engine = Engine(m, TOKENIZER, max_batch_size=4)
    plain = SamplingParams(max_tokens=24, temperature=0)
    penalized = SamplingParams(max_tokens=24, temperature=0, frequency_penalty=0.7, presence_penalty=0.4)
    unpenalized, seq = engine.generate(["hello", "hello"], [plain, penalized])  # in one batch
    ids, out = TOKENIZER.encode("hello"), []  # reference: full forward, penalties applied by hand
    with torch.no_grad():
        for _ in range(24):
            logits = m(torch.tensor([ids + out]))[0][0, -1, :TOKENIZER.vocab_size]
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).float()
            out.append(int((logits - 0.7 * counts - 0.4 * (counts > 0).float()).argmax()))
    assert seq.output_ids == out and unpenalized.output_ids == greedy_without_cache(m, "hello", 24)
    assert seq.output_ids != unpenalized.output_ids
    assert len(set(seq.output_ids)) > len(set(unpenalized.output_ids)), "fewer repeats"


def test_logit_bias_and_the_ends_a_request_may_or_may_not_reach():
    """OpenAI's logit_bias shifts a token's logit; vLLM's stop_token_ids end a reply at a token (not in
    its text), min_tokens holds every end off that long, ignore_eos holds end-of-text off for good."""
    tokenizer = ByteBPETokenizer.train(["hello world, the quick brown fox.\n"] * 20, 300)
    torch.manual_seed(0)
    m = GPT(ModelConfig(name="t", n_layer=1, n_head=2, n_embd=32, block_size=48,
                        vocab_size=padded_vocab_size(tokenizer.vocab_size))).eval()
    engine, eot, z = Engine(m, tokenizer, max_batch_size=4), tokenizer.eot_id, tokenizer.encode("z")[0]
    free = engine.generate(["hello"], SamplingParams(max_tokens=8, temperature=0))[0]
    forced, barred = engine.generate(["hello"] * 2, [SamplingParams(max_tokens=8, temperature=0, logit_bias={z: 100}),
                                                     SamplingParams(max_tokens=8, temperature=0,
                                                                    logit_bias={free.output_ids[0]: -100})])
    assert forced.text == "z" * 8 and barred.output_ids[0] != free.output_ids[0]
    ending = {eot: 100}
    ends_now, held, never, at_z = engine.generate(["hello"] * 4, [
        SamplingParams(max_tokens=10, temperature=1.0, seed=1, logit_bias=ending),
        SamplingParams(max_tokens=10, temperature=1.0, seed=1, logit_bias=ending, min_tokens=4),
        SamplingParams(max_tokens=10, temperature=1.0, seed=1, logit_bias=ending, ignore_eos=True),
        SamplingParams(max_tokens=10, temperature=0, logit_bias={z: 100}, stop_token_ids=[z])])
    assert (ends_now.finish_reason, ends_now.output_ids) == ("stop", [])
    assert held.finish_reason == "stop" and len(held.output_ids) == 4 and eot not in held.output_ids
    assert never.finish_reason == "length" and len(never.output_ids) == 10 and eot not in never.output_ids
    assert (at_z.finish_reason, at_z.output_ids, at_z.text) == ("stop", [], "")


def test_repetition_penalty_and_min_p_as_transformers_computes_them():
    from transformers import MinPLogitsWarper, RepetitionPenaltyLogitsProcessor

    torch.manual_seed(0)
    logits = torch.randn(TOKENIZER.vocab_size)
    seq = Sequence(0, [1, 2, 3], SamplingParams(repetition_penalty=1.3), torch.Generator(), output_ids=[3, 5])
    ours = logits.clone()
    adjust_logits(ours, seq, set())  # the prompt's tokens and the output's, each once
    theirs = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[1, 2, 3, 3, 5]]), logits[None].clone())[0]
    assert torch.equal(ours, theirs) and not torch.equal(ours, logits)
    kept = set(torch.nonzero(MinPLogitsWarper(0.3)(None, logits[None].clone())[0] > float("-inf")).flatten().tolist())
    generator = torch.Generator().manual_seed(0)
    drawn = {sample_next(logits, SamplingParams(temperature=1.0, min_p=0.3), generator) for _ in range(400)}
    assert drawn == kept and 1 < len(kept) < TOKENIZER.vocab_size // 2


def test_max_tokens_none_decodes_until_the_context_is_full():
    seq = Engine(model("gpt2"), TOKENIZER, max_batch_size=2).generate(["hello"], SamplingParams(max_tokens=None,
                                                                                               temperature=0))[0]
    assert seq.finish_reason == "length" and len(seq.prompt_ids) + len(seq.output_ids) == 48


def test_max_model_len_shortens_the_caches_and_the_context_and_decodes_the_same():
    """serve.max_model_len: each cache holds that many positions, prompts and answers must fit it, and the
    tokens are the whole context's."""
    m = model("llama-gqa")
    engine = Engine(m, TOKENIZER, max_batch_size=2, max_model_len=20)
    assert engine.k_caches[0].shape == (2, 2, 20, 16) and engine.context == 20
    seq = engine.generate(["hello"], SamplingParams(max_tokens=None, temperature=0))[0]
    assert seq.finish_reason == "length" and len(seq.prompt_ids) + len(seq.output_ids) == 20
    assert seq.output_ids == greedy_without_cache(m, "hello", 15)
    with pytest.raises(RequestError, match="20 tokens do not fit the context of 20"):
        engine.submit("a" * 20, SamplingParams())
    with pytest.raises(RequestError, match=r"max_tokens.*between 1 and 15 for this prompt \(context 20\)") as error:
        engine.submit("hello", SamplingParams(max_tokens=16))
    assert error.value.field == "max_tokens"
    with pytest.raises(ValueError, match="max_model_len=49 must be between 2 and the model's context .48."):
        Engine(m, TOKENIZER, max_model_len=49)


def test_top_k_one_and_a_tiny_top_p_are_greedy():
    logits = torch.tensor([0.1, 2.0, 1.9, -1.0])
    gen = torch.Generator().manual_seed(0)
    assert {sample_next(logits, SamplingParams(temperature=1.0, top_k=1), gen) for _ in range(20)} == {1}
    assert {sample_next(logits, SamplingParams(temperature=1.0, top_p=0.01), gen) for _ in range(20)} == {1}


@pytest.mark.parametrize("prompt,params,field", [
    ("x" * 48, SamplingParams(max_tokens=1), "prompt"),
    ("", SamplingParams(), "prompt"),
    ("hello", SamplingParams(max_tokens=0), "max_tokens"),
    ("hello", SamplingParams(max_tokens=44), "max_tokens"),
    ("hello", SamplingParams(temperature=-0.1), "temperature"),
    ("hello", SamplingParams(top_p=0.0), "top_p"),
    ("hello", SamplingParams(top_p=1.5), "top_p"),
    ("hello", SamplingParams(logprobs=21), "logprobs"),
    ("hello", SamplingParams(frequency_penalty=2.5), "frequency_penalty"),
    ("hello", SamplingParams(presence_penalty=-3), "presence_penalty"),
    ("hello", SamplingParams(logit_bias={30: 1.0}), "logit_bias"),  # past the vocabulary
    ("hello", SamplingParams(logit_bias={3: 101.0}), "logit_bias"),
    ("hello", SamplingParams(stop_token_ids=[-1]), "stop_token_ids"),
    ("hello", SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
    ("hello", SamplingParams(min_p=1.5), "min_p"),
    ("hello", SamplingParams(max_tokens=4, min_tokens=5), "min_tokens"),
])
def test_bad_requests_name_their_field_and_are_not_truncated(prompt, params, field):
    engine = Engine(model("gpt2"), TOKENIZER, max_batch_size=2)
    with pytest.raises(RequestError) as error:
        engine.submit(prompt, params)
    assert error.value.field == field and not engine.has_work


def test_incremental_text_equals_decoding_the_whole_output_for_byte_level_bpe():
    from lm.tokenizer import ByteBPETokenizer

    tokenizer = ByteBPETokenizer.train(["naïve café — 東京 ünïcödé 🙂 text, and plain words."] * 20, 300)
    torch.manual_seed(0)
    m = GPT(ModelConfig(name="t", n_layer=1, n_head=2, n_embd=32, block_size=64,
                        vocab_size=padded_vocab_size(tokenizer.vocab_size))).eval()
    engine = Engine(m, tokenizer, max_batch_size=4)
    seqs = engine.generate(["café"] * 4, [SamplingParams(max_tokens=40, temperature=1.5, seed=s) for s in range(4)])
    assert any(ord(c) > 127 for s in seqs for c in s.text), "the samples exercise multi-byte characters"
    for seq in seqs:
        assert seq.text == tokenizer.decode(seq.output_ids)


@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa"])
def test_a_cached_prefix_is_not_prefilled_again_and_decoding_is_unchanged(variant):
    """Prefix caching: requests that share a system prompt, and a next turn that resends the first turn
    and its reply, prefill only what follows the cached blocks, and decode what a full prefill does."""
    from lm.prefix_cache import BLOCK_TOKENS

    system = "you are helpful, be brief. "  # 27 tokens: one whole block
    prompts = [system + p for p in PROMPTS]
    params = SamplingParams(max_tokens=6, temperature=0)
    reference = Engine(model(variant, 160), TOKENIZER, max_batch_size=4)
    engine = Engine(model(variant, 160), TOKENIZER, max_batch_size=4, prefix_cache_tokens=1000)
    first = engine.generate(prompts[:1], params)[0]
    assert engine.prefix_cache.hits == 0
    together = engine.generate(prompts, params)  # prompt 0 again, and three that share its first block
    assert [s.output_ids for s in together] == [s.output_ids for s in reference.generate(prompts, params)]
    lengths = [len(TOKENIZER.encode(p)) for p in prompts]
    again = (lengths[0] + len(first.output_ids) - 1) // BLOCK_TOKENS  # its prompt and reply were stored
    assert engine.prefix_cache.hits == BLOCK_TOKENS * (min(again, (lengths[0] - 1) // BLOCK_TOKENS) + 3)
    assert first.cached_tokens == 0 and [s.cached_tokens for s in together[1:]] == [BLOCK_TOKENS] * 3
    follow_up = prompts[0] + first.text + " and"
    hits = engine.prefix_cache.hits
    assert engine.generate([follow_up], params)[0].output_ids == reference.generate([follow_up], params)[0].output_ids
    assert engine.prefix_cache.hits - hits == BLOCK_TOKENS * again

    # The prefilled rest attends to the copied keys as a whole prefill would: same logits.
    m, ids = engine.model, torch.tensor([TOKENIZER.encode(follow_up)])
    caches = [torch.zeros_like(c[:1]) for c in engine.k_caches], [torch.zeros_like(c[:1]) for c in engine.v_caches]
    whole = m.prefill(ids, [ids.shape[1]], [0], *caches)
    m.prefill(ids[:, :20], [20], [0], *caches)
    rest = m.prefill(ids[:, 20:], [ids.shape[1] - 20], [0], *caches, start=20)
    torch.testing.assert_close(rest, whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["gpt2", "llama-gqa"])
def test_chunked_prefill_decodes_as_a_whole_prefill_while_the_running_sequences_keep_stepping(variant):
    """max_num_batched_tokens: a step prefills at most that many prompt tokens besides its decode tokens;
    a prompt whose prefill finishes moves into the slot after the running batch's, swapping with a
    prompt still prefilling there."""
    params = [SamplingParams(max_tokens=n, temperature=0) for n in (12, 5, 9, 7)]
    expected = [s.output_ids for s in Engine(model(variant), TOKENIZER, max_batch_size=2).generate(PROMPTS, params)]
    for options in ({"max_num_batched_tokens": 4}, {"max_num_batched_tokens": 5, "prefix_cache_tokens": 500}):
        engine = Engine(model(variant), TOKENIZER, max_batch_size=2, **options)  # 4 requests through 2 slots
        assert [s.output_ids for s in engine.generate(PROMPTS, params)] == expected
        assert engine.free_slots == [0, 1] and not engine.has_work

    engine = Engine(model(variant), TOKENIZER, max_batch_size=2, max_num_batched_tokens=8)
    running = engine.submit("hello", SamplingParams(max_tokens=30, temperature=0))
    engine.step()
    long_prompt = "the quick brown fox jumps over"  # 30 tokens: 7 a step beside the running one's token
    arriving = engine.submit(long_prompt, SamplingParams(max_tokens=3, temperature=0))
    steps = 0
    while not arriving.output_ids:
        before = len(running.output_ids)
        engine.step()
        steps += 1
        assert len(running.output_ids) == before + 1, "the running sequence decodes every step meanwhile"
    assert steps == math.ceil(len(long_prompt) / 7)
    while engine.has_work:
        engine.step()
    assert running.output_ids == greedy_without_cache(engine.model, "hello", 30)
    assert arriving.output_ids == greedy_without_cache(engine.model, long_prompt, 3)
    with pytest.raises(ValueError, match="max_num_batched_tokens=0 must be >= 1"):
        Engine(model(variant), TOKENIZER, max_num_batched_tokens=0)


def test_a_prompt_repeated_in_a_batch_is_prefilled_once_and_each_copy_samples_as_if_alone():
    """A request's n choices: one row of each prefill forward computes the shared prompt (a chunk at a
    time, the copies riding along outside the token budget); the others copy its keys and values."""
    engine = Engine(model("gpt2"), TOKENIZER, max_batch_size=4, max_num_batched_tokens=8)
    rows = []
    prefill = engine.model.prefill
    engine.model.prefill = lambda ids, *args, **kwargs: rows.append(ids.shape[0]) or prefill(ids, *args, **kwargs)
    params = [SamplingParams(max_tokens=10, temperature=1.0, seed=s) for s in range(3)]
    together = engine.generate([PROMPTS[2]] * 3, params)
    assert rows == [1] * math.ceil(len(PROMPTS[2]) / 8), "one row a step: the copies computed nothing"
    alone = Engine(model("gpt2"), TOKENIZER, max_batch_size=1)
    for seq, p in zip(together, params):
        assert seq.output_ids == alone.generate([PROMPTS[2]], p)[0].output_ids
    assert len({tuple(s.output_ids) for s in together}) > 1, "each copy samples with its own seed"


def test_the_prefix_cache_keeps_the_most_recently_used_blocks_within_its_size():
    from lm.prefix_cache import BLOCK_TOKENS, PrefixCache

    engine = Engine(model("gpt2", 160), TOKENIZER, max_batch_size=2, prefix_cache_tokens=3 * BLOCK_TOKENS)
    params = SamplingParams(max_tokens=1, temperature=0)
    old, new = "a" * 40, "b" * 40  # two blocks each cached (the reply's token is never fed in)
    engine.generate([old], params)
    engine.generate([new], params)
    assert len(engine.prefix_cache.blocks) == 3, "at most its size"
    hits = engine.prefix_cache.hits
    engine.generate([new + "c"], params)
    assert engine.prefix_cache.hits - hits == 2 * BLOCK_TOKENS, "the newest prompt's blocks were kept"
    engine.generate([old + "c"], params)
    assert engine.prefix_cache.hits - hits == 3 * BLOCK_TOKENS, "of the oldest prompt, its last block went first"
    engine.cancel_all()
    assert not engine.prefix_cache.blocks, "after a failed step nothing cached is trusted"
    assert PrefixCache(BLOCK_TOKENS - 1).max_blocks == 0


def test_an_aborted_request_frees_its_slot_and_the_others_continue():
    m = model("gpt2")
    engine = Engine(m, TOKENIZER, max_batch_size=2)
    params = SamplingParams(max_tokens=12, temperature=0)
    gone, kept = engine.submit("hello", params), engine.submit("world", params)
    engine.step()
    engine.abort(gone)
    waiting = engine.submit("abc", params)
    while engine.has_work:
        engine.step()
    assert gone.finish_reason == "abort" and len(gone.output_ids) < 12
    assert kept.output_ids == greedy_without_cache(m, "world", 12)
    assert waiting.output_ids == greedy_without_cache(m, "abc", 12)
    assert engine.free_slots == [0, 1]


def test_compiled_decoding_equals_eager_at_every_batch_size_without_falling_back():
    """On Llama with grouped-query attention (RoPE, a smaller cache); the int8 test below compiles GPT-2."""
    params = [SamplingParams(max_tokens=n, temperature=0) for n in (5, 20, 10, 15)]  # batch 4 -> 3 -> 2 -> 1
    engine = Engine(model("llama-gqa"), TOKENIZER, max_batch_size=4, compile=True)
    assert engine.k_caches[0].shape == (4, 2, 48, 16)
    eager_steps = []
    eager = engine.model.decode
    engine.model.decode = lambda *args: eager_steps.append(args) or eager(*args)
    together = engine.generate(PROMPTS, params)  # prompts of different lengths
    alone = engine.generate(PROMPTS[:1], params[1])
    in_step = engine.generate(PROMPTS[2:3] * 2, params[:2])  # two sequences at one position
    assert not eager_steps, "every step ran a compiled program"
    reference = Engine(model("llama-gqa"), TOKENIZER, max_batch_size=4)
    assert [s.output_ids for s in together] == [s.output_ids for s in reference.generate(PROMPTS, params)]
    assert alone[0].output_ids == reference.generate(PROMPTS[:1], params[1])[0].output_ids
    assert [s.output_ids for s in in_step] == [s.output_ids for s in reference.generate(PROMPTS[2:3] * 2, params[:2])]

    # The programs read the model's own weights (handed over at load, not copied into them).
    engine.model.lm_head.weight_t.zero_()
    ids = torch.tensor([1, 2])
    assert not engine.decode(ids, [3, 5], engine.k_caches, engine.v_caches).any()
    assert not engine.decode(ids[:1], [3], engine.k_caches, engine.v_caches).any()


@pytest.mark.parametrize("kernel", ["int_mm", "weight_only_bf16"])
def test_compiled_int8_decoding_computes_what_the_export_gate_measured(kernel):
    """Compiled, int8 layers run the CPU's kernel (lm.inference): activations quantized per row for
    `torch._int_mm` with VNNI, bf16 activations for weight-only int8 without; `use_int8_activations`
    is that arithmetic in eager."""
    from lm.export import export_state, serving_model
    from lm.inference import use_int8_activations

    m = model("gpt2")
    eager, compiled = (serving_model(export_state(m.state_dict(), "int8"), m.cfg, "int8") for _ in range(2))
    use_int8_activations(eager, kernel=kernel)
    use_int8_activations(compiled, on=False, kernel=kernel)  # eager stays FBGEMM; the program takes `kernel`
    params = SamplingParams(max_tokens=20, temperature=0)
    out = Engine(compiled, TOKENIZER, max_batch_size=1, compile=True).generate(PROMPTS[2:3], params)
    assert out[0].output_ids == Engine(eager, TOKENIZER, max_batch_size=1).generate(PROMPTS[2:3], params)[0].output_ids


def test_compiled_programs_are_cached_by_shape_and_read_each_models_own_weights(compile_cache, monkeypatch):
    """A second engine of the same shape loads the cached programs (nothing compiles) and decodes with
    its own weights, which are not in the programs."""
    params = SamplingParams(max_tokens=12, temperature=0)
    # The model and batch of the first compiled test's engine: run after it, nothing compiles here at all.
    first = Engine(model("llama-gqa"), TOKENIZER, max_batch_size=4, compile=True).generate(PROMPTS[:2], params)
    cached = sorted(compile_cache.glob("*.pt2"))
    assert cached and not list(compile_cache.glob("*.partial.pt2"))

    def no_compiling(*args, **kwargs):
        raise AssertionError("compiled again instead of loading the cached program")

    def other_weights() -> GPT:  # same shape
        m = model("llama-gqa")
        with torch.no_grad():
            for p in m.parameters():
                p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.1)
        return m

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compiling)
    out = Engine(other_weights(), TOKENIZER, max_batch_size=4, compile=True).generate(PROMPTS[:2], params)
    expected = Engine(other_weights(), TOKENIZER, max_batch_size=4).generate(PROMPTS[:2], params)
    assert [s.output_ids for s in expected] != [s.output_ids for s in first], "the two models decode differently"
    assert [s.output_ids for s in out] == [s.output_ids for s in expected]
    assert sorted(compile_cache.glob("*.pt2")) == cached
