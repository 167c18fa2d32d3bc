"""Serving over real Ray Serve HTTP on loopback: the openai client (completions, chat and responses,
streaming and not), 32 concurrent requests, every bad input answered with a 4xx OpenAI error object naming the
field while the server keeps serving, and the API key enforced."""

import asyncio
import json
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch

from conftest import served
from lm.export import export_checkpoint

pytestmark = pytest.mark.slow
KEY = "test-key"


@pytest.fixture(scope="module")
def server(trained):
    from launcher.serve_app import build

    root, checkpoints, prepared = trained
    export_dir = root / "gpt2-trained" / "exports" / "fp32-step000300"
    export_checkpoint(checkpoints["gpt2-trained"], export_dir, "fp32", prepared.tokens("val"))
    # max_model_len below the model's 256 positions: the served context (tokenizer_info reports it).
    app = build({"export_dir": str(export_dir), "api_key": KEY, "max_batch_size": 8, "max_model_len": 200})
    # Metrics reach Ray's Prometheus endpoint every half second (its default: 10 s)
    with served(app, _system_config={"metrics_report_interval_ms": 500}) as url:
        yield url, "gpt2-trained"


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    url, _ = server
    return OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0)


def test_completions_streaming_and_not_agree(server, client):
    _, model = server
    full = client.completions.create(model=model, prompt="def main(", max_tokens=24, temperature=0)
    choice = full.choices[0]
    assert isinstance(choice.text, str) and choice.finish_reason in ("length", "stop")
    assert 0 < full.usage.completion_tokens <= 24 and full.usage.prompt_tokens > 0
    streamed = client.completions.create(model=model, prompt="def main(", max_tokens=24, temperature=0, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason
    with_usage = list(client.completions.create(model=model, prompt="def main(", max_tokens=24, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
    assert with_usage[-1].choices == [] and with_usage[-1].usage.completion_tokens == full.usage.completion_tokens


def test_chat_streaming_and_not_agree(server, client):
    _, model = server
    messages = [{"role": "system", "content": "You write Python."}, {"role": "user", "content": "A loop?"}]
    full = client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0)
    message = full.choices[0].message
    assert message.role == "assistant" and isinstance(message.content, str)
    streamed = list(client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0,
                                                   stream=True))
    assert streamed[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == message.content
    # Later requests find the first's prompt in the replica's prefix cache (serve.enable_prefix_caching),
    # as OpenAI's usage reports it.
    from ray import serve

    info = serve.get_deployment_handle("LanguageModel", app_name="lm").info.remote().result()
    assert info["prefix_cache_hit_rate"] > 0
    again = client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0)
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert again.choices[0].message.content == message.content
    assert 0 < cached < again.usage.prompt_tokens and cached % 16 == 0
    assert full.usage.prompt_tokens_details.cached_tokens <= cached


def test_with_two_replicas_each_turn_of_a_conversation_goes_to_the_replica_holding_the_turns_before(server,
                                                                                                      trained):
    """serve.request_router=prefix_affinity. With Serve's own router (the default), each later turn of a
    conversation would find the turn before it cached with probability 1/2 (all four here: 1/16)."""
    from openai import OpenAI
    from ray import serve

    from launcher.serve_app import build

    url, model = server
    export_dir = trained[0] / "gpt2-trained" / "exports" / "fp32-step000300"
    # A second app beside the first, on the half CPU each of its two replicas needs.
    serve.run(build({"export_dir": str(export_dir), "api_key": KEY, "num_replicas": 2, "cpus_per_replica": 0.5,
                     "max_batch_size": 4, "request_router": "prefix_affinity"}), name="replicas",
              route_prefix="/replicas")
    try:
        replicas = OpenAI(base_url=f"{url}/replicas/v1", api_key=KEY, max_retries=0)
        conversations = [[{"role": "system", "content": f"You write {language}."}] for language in ("Python", "C")]
        previous_prompts = [0, 0]
        for turn in range(3):
            for i, messages in enumerate(conversations):
                messages.append({"role": "user", "content": f"Turn {turn}: read a CSV file, return column {turn}."})
                reply = replicas.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0)
                messages.append({"role": "assistant", "content": reply.choices[0].message.content})
                usage, previous_prompt = reply.usage, previous_prompts[i]
                # Each turn adds more than two blocks: the replica that served only the turn before last
                # holds too little to pass.
                assert usage.prompt_tokens - previous_prompt > 2 * 16
                assert usage.prompt_tokens_details.cached_tokens >= (previous_prompt // 16 - 1) * 16, (i, turn, usage)
                previous_prompts[i] = usage.prompt_tokens
        # A request's n choices are n calls under one request id: each is routed (to the same replica).
        three = replicas.completions.create(model=model, prompt="def main(", n=3, max_tokens=4, temperature=1.0,
                                            seed=5)
        assert [choice.index for choice in three.choices] == [0, 1, 2]
    finally:
        serve.delete("replicas")


def test_a_replica_whose_decode_steps_keep_failing_is_replaced_by_serve(server, trained):
    """End to end: Serve calls the model replica's check_health (here every 0.5 s, not every 10 s) and,
    once it raises after 3 failed decode steps in a row, replaces the replica with a fresh one.
    Meanwhile each request fails at once with a 500 rather than hang, and the next replica serves."""
    from ray import serve

    from launcher.serve_app import OpenAIServer
    from launcher.serve_model import FAILED_STEPS_UNHEALTHY, LanguageModel

    class BreakableModel(LanguageModel.func_or_class):
        """The replica the server runs, with a way to break its engine as a CUDA error would."""

        def break_decoding(self) -> None:
            def step(*args, **kwargs):
                raise RuntimeError("CUDA error: an illegal memory access was encountered")

            self.engine.step = step

        def pid(self) -> int:
            return os.getpid()

    url, model_name = server
    export_dir = trained[0] / "gpt2-trained" / "exports" / "fp32-step000300"
    model = serve.deployment(BreakableModel).options(health_check_period_s=0.5, ray_actor_options={"num_cpus": 0.5})
    serve.run(OpenAIServer.options(ray_actor_options={"num_cpus": 0}).bind(
        model.bind(str(export_dir), 4, 1, model_name=model_name), model_name, None), name="breakable",
        route_prefix="/breakable")
    try:
        replica = serve.get_deployment_handle("BreakableModel", app_name="breakable")
        request = {"model": model_name, "prompt": "def main(", "max_tokens": 4}

        def complete() -> httpx.Response:
            return httpx.post(f"{url}/breakable/v1/completions", json=request, timeout=60)

        def replaced() -> bool:
            """A fresh replica runs and the broken one is gone (from Serve's state, so no longer routed to)."""
            status = serve.status().applications["breakable"].deployments["BreakableModel"]
            return status.replica_states == {"RUNNING": 1} and replica.pid.remote().result() != broken_pid

        assert complete().status_code == 200
        broken_pid = replica.pid.remote().result()
        replica.break_decoding.remote().result()
        for _ in range(FAILED_STEPS_UNHEALTHY):
            assert complete().status_code == 500
        deadline = time.time() + 90
        while time.time() < deadline and not replaced():
            time.sleep(0.5)
        assert replaced(), "Serve did not replace the unhealthy replica"
        answer = complete()
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
    finally:
        serve.delete("breakable")


def test_chat_replies_run_to_the_end_of_the_context_unless_limited(server, client):
    """OpenAI's chat default: no max_tokens means as many as fit; max_completion_tokens (its newer name)
    limits them. Penalties are accepted and change a greedy reply; so are logit_bias and vLLM's sampling
    extras (ignore_eos: the reply runs to max_tokens)."""
    _, model = server
    messages = [{"role": "user", "content": "Write a long loop."}]
    free = client.chat.completions.create(model=model, messages=messages, temperature=0)
    context = (httpx.get(f"{server[0]}/tokenizer_info", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
               .json()["model_max_length"])
    assert context == 200  # serve.max_model_len, below the model's 256
    assert free.choices[0].finish_reason == "stop" or free.usage.total_tokens == context
    assert free.usage.completion_tokens > 16 or free.choices[0].finish_reason == "stop"
    short = client.chat.completions.create(model=model, messages=messages, temperature=0, max_completion_tokens=5)
    assert short.usage.completion_tokens <= 5
    assert free.choices[0].message.content.startswith(short.choices[0].message.content)
    penalized = client.completions.create(model=model, prompt="def main(", max_tokens=24, temperature=0,
                                          frequency_penalty=2.0, presence_penalty=2.0)
    plain = client.completions.create(model=model, prompt="def main(", max_tokens=24, temperature=0)
    assert penalized.choices[0].text != plain.choices[0].text
    (x,) = httpx.post(f"{server[0]}/tokenize", json={"model": model, "prompt": "x"},
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()["tokens"]
    biased = client.completions.create(model=model, prompt="def main(", max_tokens=6, temperature=0,
                                       logit_bias={str(x): 100})  # OpenAI's
    assert biased.choices[0].text == "x" * 6
    extras = client.completions.create(model=model, prompt="def main(", max_tokens=24, temperature=0.8, seed=1,
                                       extra_body={"repetition_penalty": 1.2, "min_p": 0.1, "ignore_eos": True})
    assert extras.choices[0].finish_reason == "length" and extras.usage.completion_tokens == 24  # vLLM's


def test_openai_newer_request_forms_content_parts_developer_role_and_model_retrieval(server, client, trained):
    _, model = server
    plain = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A loop?"}]
    newer = [{"role": "developer", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "brief."}]},
             {"role": "user", "content": [{"type": "text", "text": "A loop?"}]}]
    answers = [client.chat.completions.create(model=model, messages=m, max_tokens=8, temperature=0) for m in (plain, newer)]
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content
    assert answers[0].usage.prompt_tokens == answers[1].usage.prompt_tokens
    retrieved = client.models.retrieve(model)
    export = json.loads((trained[0] / model / "exports" / "fp32-step000300" / "export.json").read_text())
    assert retrieved.id == model and retrieved.created == export["created"] > 1.7e9  # when it was exported
    with pytest.raises(Exception) as error:
        client.models.retrieve("nope")
    assert getattr(error.value, "status_code", None) == 404


def test_same_seed_same_completion(server, client):
    _, model = server
    texts = {client.completions.create(model=model, prompt="import ", max_tokens=16, temperature=1.0, seed=5)
             .choices[0].text for _ in range(3)}
    assert len(texts) == 1


def test_n_choices_streaming_and_not_agree_and_choice_0_is_the_single_answer(server, client):
    _, model = server
    sampled = dict(model=model, max_tokens=12, temperature=1.0, seed=11)
    single = client.completions.create(prompt="import ", **sampled)
    three = client.completions.create(prompt="import ", n=3, **sampled)
    assert [c.index for c in three.choices] == [0, 1, 2]
    assert three.choices[0].text == single.choices[0].text, "choice i samples with seed + i"
    assert len({c.text for c in three.choices}) > 1
    assert three.usage.prompt_tokens == single.usage.prompt_tokens, "the prompt counts once"
    assert single.usage.completion_tokens < three.usage.completion_tokens <= 3 * 12
    streamed = list(client.completions.create(prompt="import ", n=3, stream=True,
                                              stream_options={"include_usage": True}, **sampled))
    for choice in three.choices:
        mine = [c.choices[0] for c in streamed if c.choices and c.choices[0].index == choice.index]
        assert "".join(c.text for c in mine) == choice.text and mine[-1].finish_reason == choice.finish_reason
    assert streamed[-1].usage.completion_tokens == three.usage.completion_tokens

    messages = [{"role": "user", "content": "A loop?"}]
    full = client.chat.completions.create(messages=messages, n=2, **sampled)
    chunks = list(client.chat.completions.create(messages=messages, n=2, stream=True,
                                                 stream_options={"include_usage": True}, **sampled))
    for choice in full.choices:
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == choice.index]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == choice.finish_reason
        assert "".join(c.delta.content or "" for c in mine) == choice.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_a_list_of_prompts_or_token_ids_gets_n_choices_each(server, client, trained):
    _, model = server
    tokenizer = trained[2].tokenizer()
    sampled = dict(model=model, max_tokens=8, temperature=1.0, seed=3)
    prompts = ["import ", "class A"]
    alone = [client.completions.create(prompt=p, **sampled) for p in prompts]
    both = client.completions.create(prompt=prompts, n=2, **sampled)
    assert [c.index for c in both.choices] == [0, 1, 2, 3]  # prompt index x n + choice
    assert [both.choices[0].text, both.choices[2].text] == [a.choices[0].text for a in alone]
    assert both.usage.prompt_tokens == sum(a.usage.prompt_tokens for a in alone)
    as_ids = client.completions.create(prompt=tokenizer.encode("import "), echo=True, **sampled)
    assert as_ids.choices[0].text == "import " + alone[0].choices[0].text
    as_id_lists = client.completions.create(prompt=[tokenizer.encode(p) for p in prompts], **sampled)
    assert [c.text for c in as_id_lists.choices] == [a.choices[0].text for a in alone]


def test_logprobs_score_the_completion_and_with_echo_the_prompt(server, client):
    """What evaluation harnesses ask of a completions server: each token's log-probability and its
    top alternatives, and with echo=True the prompt scored too (its first token has none)."""
    _, model = server
    prompt, greedy = "def main(", dict(model=model, max_tokens=6, temperature=0, logprobs=2)
    plain = client.completions.create(prompt=prompt, **greedy)
    lp = plain.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == plain.usage.completion_tokens
    assert "".join(lp.tokens) == plain.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    for value, top in zip(lp.token_logprobs, lp.top_logprobs):  # greedy: the token is the most likely
        assert len(top) == 2 and value == pytest.approx(max(top.values())) and value <= 0

    echoed = client.completions.create(prompt=prompt, echo=True, **greedy)
    choice, n_prompt = echoed.choices[0], echoed.usage.prompt_tokens
    assert choice.text == prompt + plain.choices[0].text
    assert "".join(choice.logprobs.tokens[:n_prompt]) == prompt
    assert choice.logprobs.token_logprobs[0] is None and choice.logprobs.top_logprobs[0] is None
    assert all(v <= 0 for v in choice.logprobs.token_logprobs[1:n_prompt])
    assert choice.logprobs.token_logprobs[n_prompt:] == pytest.approx(lp.token_logprobs, abs=1e-4)
    streamed = list(client.completions.create(prompt=prompt, echo=True, stream=True, **greedy))
    assert [t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens] == choice.logprobs.tokens
    assert "".join(c.choices[0].text for c in streamed) == choice.text

    messages = [{"role": "user", "content": "A loop?"}]
    chat = dict(model=model, messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3)
    full = client.chat.completions.create(**chat)
    content = full.choices[0].logprobs.content
    assert len(content) == full.usage.completion_tokens
    assert all(len(c.top_logprobs) == 3 and c.top_logprobs[0].logprob == pytest.approx(c.logprob) for c in content)
    assert all(bytes(c.bytes) == c.token.encode() for c in content)
    chunks = list(client.chat.completions.create(stream=True, **chat))
    assert [c.token for k in chunks if k.choices and k.choices[0].logprobs for c in k.choices[0].logprobs.content] \
        == [c.token for c in content]


def test_a_loglikelihood_request_as_lm_evaluation_harness_sends_it_scores_the_continuation(server, trained):
    """lm-evaluation-harness's local-completions model scores a continuation by sending the token ids
    of context + continuation with echo, logprobs=1 and max_tokens=1, then summing token_logprobs
    [len(context):-1] (the last is the generated token). That sum is the model's log-likelihood."""
    from lm.export import load_export

    url, model = server
    export = trained[0] / "gpt2-trained" / "exports" / "fp32-step000300"
    reference, tokenizer, _, _ = load_export(export)
    pairs = [("def main(", "):\n    return"), ("import os\n", "import sys")]
    requests = [(tokenizer.encode(c), tokenizer.encode(c + x)) for c, x in pairs]
    payload = {"model": model, "prompt": [ids for _, ids in requests], "temperature": 0, "max_tokens": 1,
               "logprobs": 1, "seed": 1234, "echo": True}
    response = httpx.post(f"{url}/v1/completions", json=payload, headers={"Authorization": f"Bearer {KEY}"},
                          timeout=60).json()
    for choice, (context, ids) in zip(sorted(response["choices"], key=lambda c: c["index"]), requests):
        logprobs = choice["logprobs"]
        assert len(logprobs["token_logprobs"]) == len(ids) + 1
        with torch.no_grad():
            logits = reference(torch.tensor([ids]))[0][0, :, :tokenizer.vocab_size]  # padded rows never occur
            expected = torch.log_softmax(logits.float(), dim=-1)
        likelihood = sum(float(expected[i - 1, ids[i]]) for i in range(len(context), len(ids)))
        assert sum(logprobs["token_logprobs"][len(context):-1]) == pytest.approx(likelihood, abs=1e-4)
        greedy = [max(top.values()) for top in logprobs["top_logprobs"][len(context):-1]]
        assert all(v <= g for v, g in zip(logprobs["token_logprobs"][len(context):-1], greedy))


def test_tokenizer_endpoints_as_lm_evaluation_harness_probes_and_uses_them(server, trained):
    """vLLM's /tokenizer_info, /tokenize and /detokenize: with them lm-evaluation-harness tokenizes
    on the server; its chat template renders prompts as the server's own template does."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    from lm.chat_template import render_chat

    url, _ = server
    tokenizer = trained[2].tokenizer()
    auth = {"Authorization": f"Bearer {KEY}"}
    info = httpx.get(f"{url}/tokenizer_info", headers=auth, timeout=30).json()
    assert "eos_token" in info and info["model_max_length"] > 0 and info["vocab_size"] == tokenizer.vocab_size
    text = "def main():\n    return 1"
    tokenized = httpx.post(f"{url}/tokenize", json={"prompt": text, "add_special_tokens": False}, headers=auth,
                           timeout=30).json()
    assert tokenized["tokens"] == tokenizer.encode(text) and tokenized["count"] == len(tokenized["tokens"])
    assert httpx.post(f"{url}/detokenize", json={"tokens": tokenized["tokens"]}, headers=auth,
                      timeout=30).json() == {"prompt": text}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "A loop?"}]
    for add in (True, False):
        chat = httpx.post(f"{url}/tokenize", json={"messages": messages, "add_generation_prompt": add}, headers=auth,
                          timeout=30).json()
        assert chat["tokens"] == tokenizer.encode(render_chat(messages, add))
        # Rendered as Hugging Face renders chat templates (trim_blocks, lstrip_blocks).
        jinja = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(info["chat_template"])
        assert jinja.render(messages=messages, add_generation_prompt=add) == render_chat(messages, add)
    assert httpx.get(f"{url}/tokenizer_info", timeout=30).status_code == 401
    for body, param in (({"tokens": "abc"}, "tokens"), ({"tokens": [10 ** 9]}, "tokens")):
        response = httpx.post(f"{url}/detokenize", json=body, headers=auth, timeout=30)
        assert response.status_code == 400 and response.json()["error"]["param"] == param
    response = httpx.post(f"{url}/tokenize", json={"prompt": 5}, headers=auth, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "prompt"


def test_a_client_that_disconnects_frees_its_decode_slots(server):
    """A stream closed after its first chunk (here with n=2, each choice a sequence) is abandoned:
    the replica stops decoding both at its next step instead of running them to max_tokens."""
    from ray import serve

    url, model = server
    replica = serve.get_deployment_handle("LanguageModel", app_name="lm")
    before = replica.info.remote().result()["abandoned"]
    body = {"model": model, "prompt": "def main(", "max_tokens": 190, "temperature": 0, "n": 2, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as response:
        next(response.iter_lines())  # the first chunk: both choices are decoding
    for _ in range(100):
        info = replica.info.remote().result()
        if info["abandoned"] == before + 2 and info["running"] == 0:
            break
        time.sleep(0.1)
    assert info["abandoned"] == before + 2 and info["running"] == info["waiting"] == 0, info


def test_response_format_guides_replies_to_json_that_matches_the_schema(server, client):
    """OpenAI's structured outputs: a model trained on prose and code answers with JSON matching the
    schema, chat and completions, streamed and not (the stream's text is the same document); vLLM's
    guided choice, regex and grammar."""
    _, model = server
    schema = {"type": "object", "properties": {"answer": {"type": "string", "maxLength": 8}, "n": {"type": "integer"},
                                               "unit": {"enum": ["s", "ms"]}}, "required": ["answer", "n"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "reply", "schema": schema, "strict": True}}

    def check(text):
        value = json.loads(text)
        assert set(value) <= {"answer", "n", "unit"} and isinstance(value["n"], int) and len(value["answer"]) <= 8
        assert value.get("unit", "s") in ("s", "ms")

    messages = [{"role": "user", "content": "How long does the loop take? Answer in JSON."}]
    chat = client.chat.completions.create(model=model, messages=messages, response_format=fmt, max_tokens=120,
                                          temperature=0)
    assert chat.choices[0].finish_reason == "stop"
    check(chat.choices[0].message.content)
    streamed = client.chat.completions.create(model=model, messages=messages, response_format=fmt, max_tokens=120,
                                              temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content
    sampled = client.completions.create(model=model, prompt="def main(", max_tokens=150, temperature=0.8, seed=1, n=2,
                                        extra_body={"response_format": fmt})
    for choice in sampled.choices:
        assert choice.finish_reason == "stop"
        check(choice.text)
    chosen = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0.8, seed=3,
                                            extra_body={"structured_outputs": {"choice": ["fast", "slow"]}})
    assert chosen.choices[0].message.content in ("fast", "slow")  # vLLM's guided choice
    timed = client.completions.create(model=model, prompt="took", max_tokens=12, temperature=0.8, seed=4,
                                      extra_body={"structured_outputs": {"regex": r" \d{1,4} ?(ms|s)"}})
    assert re.fullmatch(r" \d{1,4} ?(ms|s)", timed.choices[0].text)  # vLLM's guided regex
    said = client.completions.create(model=model, prompt="took", max_tokens=12, temperature=0.8, seed=5,
                                     extra_body={"structured_outputs": {"grammar": 'root ::= " " ("fast" | "slow") "."'}})
    assert said.choices[0].text in (" fast.", " slow.")  # vLLM's guided grammar (GBNF)


def test_responses_api_answers_as_chat_does_streaming_and_not(server, client):
    """OpenAI's Responses API through the openai client: `instructions` and `input` are the chat's system
    and user messages, so the greedy answer is the chat's; the stream's events build the same text;
    `max_output_tokens` cuts a response to `incomplete`; log-probabilities are chat's; `text.format`
    guides it to JSON."""
    _, model = server
    question = "Write a loop."
    chat = client.chat.completions.create(model=model, max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": "You write Python."}, {"role": "user", "content": question}])
    answer = client.responses.create(model=model, instructions="You write Python.", input=question,
                                     max_output_tokens=12, temperature=0)
    assert answer.object == "response" and answer.output_text == chat.choices[0].message.content
    assert answer.status == ("incomplete" if chat.choices[0].finish_reason == "length" else "completed")
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (chat.usage.prompt_tokens,
                                                                       chat.usage.completion_tokens)
    # the same conversation as a list of messages, content as text parts
    listed = client.responses.create(model=model, max_output_tokens=12, temperature=0, reasoning={"effort": None},
                                     input=[
        {"role": "developer", "content": "You write Python."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": question}]}])
    assert listed.output_text == answer.output_text

    cut = client.responses.create(model=model, input=question, max_output_tokens=3, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert cut.status == "incomplete" and cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage.output_tokens == 3

    events = list(client.responses.create(model=model, instructions="You write Python.", input=question,
                                          max_output_tokens=12, temperature=0, stream=True))
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] == f"response.{answer.status}"
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == answer.output_text
    assert events[-1].response.output_text == answer.output_text
    assert events[-1].response.usage.output_tokens == answer.usage.output_tokens

    # the text's log-probabilities, as chat's: the same tokens and values, streamed with each delta
    scored = client.responses.create(model=model, input=question, max_output_tokens=6, temperature=0,
                                     include=["message.output_text.logprobs"], top_logprobs=2)
    chat_scored = client.chat.completions.create(model=model, messages=[{"role": "user", "content": question}],
                                                 max_tokens=6, temperature=0, logprobs=True, top_logprobs=2)
    tokens = scored.output[0].content[0].logprobs
    expected = chat_scored.choices[0].logprobs.content
    assert [t.token for t in tokens] == [t.token for t in expected] and len(tokens) == scored.usage.output_tokens
    assert [t.logprob for t in tokens] == pytest.approx([t.logprob for t in expected], abs=1e-4)
    assert all(len(t.top_logprobs) == 2 for t in tokens)
    streamed = list(client.responses.create(model=model, input=question, max_output_tokens=6, temperature=0,
                                            top_logprobs=2, stream=True))
    assert [t.token for e in streamed if e.type == "response.output_text.delta" for t in e.logprobs] == \
        [t.token for t in tokens]

    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    shaped = client.responses.create(model=model, input="How many? Answer in JSON.", max_output_tokens=40,
                                     temperature=0, text={"format": {"type": "json_schema", "name": "count",
                                                                     "schema": schema, "strict": True}})
    assert shaped.status == "completed" and isinstance(json.loads(shaped.output_text)["n"], int)


def test_32_concurrent_requests_all_succeed(server, client):
    _, model = server

    def one(i):
        return client.completions.create(model=model, prompt=f"x = {i}\n", max_tokens=12, temperature=0.8, seed=i)

    with ThreadPoolExecutor(32) as pool:
        results = list(pool.map(one, range(32)))
    assert all(r.choices[0].finish_reason in ("length", "stop") for r in results)


def prometheus_series(prefix: str, application: str = "lm"):
    """(name, labels, value) of each series named `prefix`... of the application on Ray's Prometheus
    endpoint (histogram buckets left out)."""
    import ray

    port = ray.nodes()[0]["MetricsExportPort"]
    for line in httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines():
        found = re.match(rf"({prefix}\w*)\{{(.*)\}} (\S+)$", line)
        if found:
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', found[2]))
            if labels.get("application") == application and "le" not in labels:
                yield found[1], labels, float(found[3])


def engine_metrics() -> dict:
    """The model replicas' `ray_lm_*` series, summed over replicas: {(name, finished_reason or None): value}."""
    totals: dict = {}
    for name, labels, value in prometheus_series("ray_lm_"):
        key = (name, labels.get("finished_reason"))
        totals[key] = totals.get(key, 0.0) + value
    return totals


def settled_metrics(until=lambda totals: True, timeout: float = 30) -> dict:
    """The engine metrics once `until` holds of them and two reads 1.2 s apart agree (every replica's
    latest counts reported)."""
    deadline = time.time() + timeout
    last = None
    while time.time() < deadline:
        totals = engine_metrics()
        if totals == last and until(totals):
            return totals
        last = totals
        time.sleep(1.2)
    raise AssertionError(f"metrics never settled: {last}")


def test_engine_metrics_reach_prometheus_through_rays_metrics_agent(server, client):
    """Tokens, finished requests by reason, prefix-cache lookups and the latency histograms, as vLLM's
    /metrics has them, on the Ray node's metrics export port (what a cluster's Prometheus scrapes)."""
    _, model = server
    before = settled_metrics()
    usages, reasons = [], []
    long = "def main(argv):\n    parser = argparse.ArgumentParser(description='a tool')\n    return parser\n"
    for prompt, max_tokens in ((long, 6), (long, 9), ("import os\n", 4)):
        reply = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
        usages.append(reply.usage)
        reasons.append(reply.choices[0].finish_reason)
    streamed = list(client.completions.create(model=model, prompt="class A:", max_tokens=5, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    usages.append(streamed[-1].usage)
    reasons.append(streamed[-2].choices[0].finish_reason)
    generated = sum(u.completion_tokens for u in usages)
    after = settled_metrics(lambda t: t.get(("ray_lm_generation_tokens_total", None), 0) >=
                            before.get(("ray_lm_generation_tokens_total", None), 0) + generated)

    def added(name, reason=None):
        return after.get((name, reason), 0) - before.get((name, reason), 0)

    assert added("ray_lm_generation_tokens_total") == generated
    assert added("ray_lm_prompt_tokens_total") == sum(u.prompt_tokens for u in usages)
    assert added("ray_lm_prefix_cache_queries_total") == sum(u.prompt_tokens for u in usages)
    cached = sum(u.prompt_tokens_details.cached_tokens for u in usages)
    assert cached > 0 and added("ray_lm_prefix_cache_hits_total") == cached  # the long prompt's second time
    for reason in set(reasons):
        assert added("ray_lm_requests_total", reason) == reasons.count(reason)
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert added(f"ray_lm_{histogram}_count") == 4
    assert added("ray_lm_time_per_output_token_seconds_count") == sum(u.completion_tokens > 1 for u in usages)
    assert after[("ray_lm_num_requests_running", None)] == after[("ray_lm_num_requests_waiting", None)] == 0

    # A client that goes away mid-stream: its request counts as aborted, and no longer as running.
    with httpx.stream("POST", f"{server[0]}/v1/completions", headers={"Authorization": f"Bearer {KEY}"},
                      json={"model": model, "prompt": "while True:", "max_tokens": 150, "stream": True}) as response:
        next(response.iter_lines())
    aborted = settled_metrics(lambda t: t.get(("ray_lm_requests_total", "abort"), 0) >
                              after.get(("ray_lm_requests_total", "abort"), 0))
    assert aborted[("ray_lm_requests_total", "abort")] - after.get(("ray_lm_requests_total", "abort"), 0) == 1
    assert aborted[("ray_lm_num_requests_running", None)] == 0


BAD = [
    ("completions", b"{not json", 400, None),
    ("completions", b"", 400, None),
    ("completions", b"[1, 2]", 400, None),
    ("completions", json.dumps({"max_tokens": 5}).encode(), 400, "prompt"),
    ("completions", json.dumps({"prompt": 123}).encode(), 400, "prompt"),
    ("completions", json.dumps({"prompt": "a", "max_tokens": "5"}).encode(), 400, "max_tokens"),
    ("completions", json.dumps({"prompt": "a", "max_tokens": 0}).encode(), 400, "max_tokens"),
    ("completions", json.dumps({"prompt": "a", "max_tokens": 100000}).encode(), 400, "max_tokens"),
    ("completions", json.dumps({"prompt": "a", "temperature": -1}).encode(), 400, "temperature"),
    ("completions", json.dumps({"prompt": "a", "top_p": 0}).encode(), 400, "top_p"),
    ("completions", json.dumps({"prompt": "a", "top_p": 1.5}).encode(), 400, "top_p"),
    ("completions", json.dumps({"prompt": "a", "top_k": -2}).encode(), 400, "top_k"),
    ("completions", json.dumps({"prompt": "a", "model": "nope"}).encode(), 404, "model"),
    ("completions", json.dumps({"prompt": "a", "n": 0}).encode(), 400, "n"),
    ("completions", json.dumps({"prompt": "a", "logprobs": 21}).encode(), 400, "logprobs"),
    ("completions", json.dumps({"prompt": "a", "presence_penalty": 3}).encode(), 400, "presence_penalty"),
    ("completions", json.dumps({"prompt": "a", "frequency_penalty": "high"}).encode(), 400, "frequency_penalty"),
    ("completions", json.dumps({"prompt": "a", "logit_bias": {"x": 1}}).encode(), 400, "logit_bias"),
    ("completions", json.dumps({"prompt": "a", "logit_bias": {"5": 101}}).encode(), 400, "logit_bias"),
    ("completions", json.dumps({"prompt": "a", "logit_bias": {"999999": 1}}).encode(), 400, "logit_bias"),
    ("chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "repetition_penalty": 0})
     .encode(), 400, "repetition_penalty"),
    ("completions", json.dumps({"prompt": "a", "min_p": 2}).encode(), 400, "min_p"),
    ("completions", json.dumps({"prompt": "a", "max_tokens": 4, "min_tokens": 5}).encode(), 400, "min_tokens"),
    ("completions", json.dumps({"prompt": "a", "ignore_eos": "yes"}).encode(), 400, "ignore_eos"),
    ("completions", json.dumps({"prompt": "a", "stop_token_ids": "7"}).encode(), 400, "stop_token_ids"),
    ("chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0})
     .encode(), 400, "max_completion_tokens"),
    ("completions", json.dumps({"prompt": "a", "echo": "yes"}).encode(), 400, "echo"),
    # what the server cannot honour is refused by name, never ignored
    ("completions", json.dumps({"prompt": "def f(", "suffix": "\n    return x"}).encode(), 400, "suffix"),
    ("completions", json.dumps({"prompt": "a", "best_of": 3}).encode(), 400, "best_of"),
    ("chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "functions": [
        {"name": "f", "parameters": {}}]}).encode(), 400, "functions"),
    ("chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "modalities": ["text", "audio"],
                                     "audio": {"voice": "alloy", "format": "wav"}}).encode(), 400, "audio"),
    ("chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}).encode(),
     400, "top_logprobs"),
    ("chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "logprobs": 1}).encode(),
     400, "logprobs"),
    ("completions", json.dumps({"prompt": "a", "n": 17}).encode(), 400, "n"),
    ("completions", json.dumps({"prompt": ["a", "b"], "n": 9}).encode(), 400, "n"),
    ("completions", json.dumps({"prompt": [5, 10 ** 9]}).encode(), 400, "prompt"),
    ("completions", json.dumps({"prompt": ["a", 5]}).encode(), 400, "prompt"),
    ("completions", json.dumps({"prompt": []}).encode(), 400, "prompt"),
    ("chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "n": "2"}).encode(), 400, "n"),
    ("completions", json.dumps({"prompt": "def f():\n    pass\n" * 200, "max_tokens": 4}).encode(), 400, "prompt"),
    ("completions", b'{"prompt": "' + b"a" * 2_000_000 + b'"}', 413, None),
    ("completions", json.dumps({"prompt": "a", "stream": True, "stream_options": 5}).encode(), 400, "stream_options"),
    ("chat/completions", json.dumps({"messages": []}).encode(), 400, "messages"),
    ("chat/completions", json.dumps({"messages": [{"role": "robot", "content": "hi"}]}).encode(), 400, "messages"),
    ("chat/completions", json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {
        "url": "x"}}]}]}).encode(), 400, "messages"),
    # the built-in template takes no tools (a model tuned on them brings its own: test_tool_calls.py)
    ("chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "tools": [{
        "type": "function", "function": {"name": "f"}}]}).encode(), 400, "tools"),
    ("chat/completions", json.dumps({"messages": [{"role": "tool", "content": "21 C"}]}).encode(), 400, "messages"),
    ("chat/completions", json.dumps({"messages": [{"role": "user", "content": "hi"}], "response_format": {
        "type": "xml"}}).encode(), 400, "response_format"),
    ("completions", json.dumps({"prompt": "a", "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "string", "pattern": "(?=a)"}}}}).encode(), 400, "response_format"),
    ("completions", json.dumps({"prompt": "a", "structured_outputs": {"regex": "a{3,1}"}}).encode(), 400,
     "structured_outputs"),
    # the Responses API's errors name its own fields; what needs stored state or tools is refused by name
    ("responses", json.dumps({"input": 5}).encode(), 400, "input"),
    ("responses", json.dumps({"input": [{"type": "function_call_output", "call_id": "c", "output": "1"}]}).encode(),
     400, "input"),
    ("responses", json.dumps({"input": [{"role": "robot", "content": "hi"}]}).encode(), 400, "input"),
    ("responses", json.dumps({"input": "hi", "max_output_tokens": 0}).encode(), 400, "max_output_tokens"),
    ("responses", json.dumps({"input": "hi", "text": {"format": {"type": "xml"}}}).encode(), 400, "text.format"),
    ("responses", json.dumps({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {
        "type": "string", "pattern": "(?=a)"}}}}).encode(), 400, "text.format"),
    ("responses", json.dumps({"input": "hi", "previous_response_id": "resp_1"}).encode(), 400, "previous_response_id"),
    ("responses", json.dumps({"input": "hi", "tools": [{"type": "web_search"}]}).encode(), 400, "tools"),
    ("responses", json.dumps({"input": "hi", "tools": [{"type": "function", "name": "f"}]}).encode(), 400, "tools"),
    ("responses", json.dumps({"input": [{"type": "function_call", "call_id": "c"}]}).encode(), 400, "input"),
    ("responses", json.dumps({"input": "hi", "reasoning": {"effort": "high"}}).encode(), 400, "reasoning"),
    ("responses", json.dumps({"input": "hi", "top_logprobs": 21}).encode(), 400, "top_logprobs"),
    ("responses", json.dumps({"input": "hi", "include": "logprobs"}).encode(), 400, "include"),
    ("responses", json.dumps({"input": "hi", "model": "nope"}).encode(), 404, "model"),
    ("responses", json.dumps({"input": "def f():\n    pass\n" * 200}).encode(), 400, "input"),
]


def test_sampling_fields_read_as_vllm_reads_them():
    """Clients written for vLLM send top_k -1 (its old default) or 0 for "no top-k", whole floats
    (16.0) for integer fields, and completions' logprobs as a boolean."""
    from launcher.openai_protocol import APIError, logprobs_count, sampling_params

    assert [sampling_params({"prompt": "a", "top_k": k}, 64).top_k for k in (-1, 0, 1, 40)] == [None, None, 1, 40]
    params = sampling_params({"prompt": "a", "max_tokens": 16.0, "top_k": 3.0, "seed": 7.0}, 64)
    assert (params.max_tokens, params.top_k, params.seed) == (16, 3, 7)
    assert all(isinstance(v, int) for v in (params.max_tokens, params.top_k, params.seed))
    with pytest.raises(APIError, match=r"^'max_tokens' must be an integer, got float 16\.5$"):
        sampling_params({"prompt": "a", "max_tokens": 16.5}, 64)
    # completions' logprobs: true is 1 (the openai client sends Python's True for logprobs=True), false none
    values = (True, False, None, 0, 3, 2.0)
    assert [logprobs_count({"logprobs": v}, chat=False) for v in values] == [1, None, None, 0, 3, 2]


@pytest.mark.parametrize("path,body,status,param", BAD, ids=[f"{p}-{s}-{i}" for i, (p, _, s, _) in enumerate(BAD)])
def test_bad_input_gets_a_4xx_error_object_and_the_server_keeps_serving(server, path, body, status, param):
    url, _ = server
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    response = httpx.post(f"{url}/v1/{path}", content=body, headers=headers, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"] and error["param"] == param
    assert httpx.get(f"{url}/health", timeout=30).json() == {"status": "ok"}


def test_api_key_is_enforced(server):
    url, model = server
    body = {"model": model, "prompt": "a", "max_tokens": 2}
    assert httpx.post(f"{url}/v1/completions", json=body, timeout=60).status_code == 401
    wrong = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": "Bearer nope"}, timeout=60)
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    models = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    assert [(m["id"], m["max_model_len"]) for m in models["data"]] == [(model, 200)]  # vLLM's field


def http_requests_by_status(route: str) -> dict[str, float]:
    """Serve's own request counter for one route of the application: {status code: requests}."""
    counts: dict[str, float] = {}
    for _, labels, value in prometheus_series("ray_serve_num_http_requests_total"):
        if labels.get("route") == route:
            counts[labels["status_code"]] = counts.get(labels["status_code"], 0) + value
    return counts


def test_a_client_gone_before_its_body_arrived_is_a_499_not_a_server_error(server):
    """nginx's "client closed request", not the server's 500 in Serve's metrics (and the dashboard's
    error rate). Here Serve's proxy notices first and answers 499 itself; when the route notices first
    (once in a stress run of 256 requests that clients abandoned), serve_app's handler answers the same
    where the error had been a 500 with a traceback. That race is not reproducible on demand."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(server[0])
    before = http_requests_by_status("/v1/completions")
    with socket.create_connection((url.hostname, url.port)) as raw:  # promises 1,000 bytes, sends 14, leaves
        raw.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                    "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"prompt\": \"ab".encode())
        time.sleep(0.5)
    deadline = time.time() + 30
    while (after := http_requests_by_status("/v1/completions")).get("499", 0) == before.get("499", 0):
        assert time.time() < deadline, f"no 499 counted: {after}"
        time.sleep(0.5)
    assert after.get("499", 0) == before.get("499", 0) + 1 and after.get("500", 0) == before.get("500", 0), after


@pytest.mark.parametrize("streams,events_per_s,expected_ms", [(1, 100, 40), (4, 100, 40), (16, 100, 160),
                                                               (64, 100, 640), (64, 0, 40)])
def test_each_streams_interval_grows_so_a_replica_keeps_to_its_chunk_budget(streams, events_per_s, expected_ms):
    from types import SimpleNamespace

    from launcher.serve_model import LanguageModel

    replica = SimpleNamespace(stream_interval=0.040, stream_events_per_s=events_per_s,
                              queues={i: None for i in range(streams)})
    assert LanguageModel.func_or_class._interval(replica) == pytest.approx(expected_ms / 1000)


def test_serve_config_errors_name_the_field():
    """make serve's serve.* keys and `serve run`'s args (cluster/serve.yaml) are checked alike, before
    the export is looked for."""
    from launcher.serve import builder_args
    from launcher.serve_app import build
    from lm.config import ConfigError, ServeAppConfig, ServeConfig

    for field, value in (("stream_events_per_s", -1), ("stream_interval_ms", -5), ("port", 70000),
                         ("prefix_cache_tokens", 8), ("max_num_batched_tokens", 0), ("metrics_port", 0),
                         ("num_replicas", 0), ("max_batch_size", 0), ("cpus_per_replica", 0),
                         ("max_model_len", 1), ("graceful_shutdown_timeout_s", -1)):
        with pytest.raises(ConfigError, match=f"^serve.{field}={value} is invalid"):
            build(builder_args(ServeAppConfig(serve=ServeConfig(**{field: value}, export_dir="/nowhere"))))
    for field, value in (("num_replicas", 0), ("max_batch_size", -2), ("gpus_per_replica", -1),  # serve run's args
                         ("num_replicas", "two"), ("cpus_per_replica", 0)):
        with pytest.raises(ConfigError, match=f"^serve.{field}={value!r} is invalid"):
            build({"export_dir": "/nowhere", field: value})
    with pytest.raises(ConfigError, match=r"^serve.dtype='fp16' is invalid: allowed are auto, fp32, bf16$"):
        build(builder_args(ServeAppConfig(serve=ServeConfig(dtype="fp16", export_dir="/nowhere"))))
    with pytest.raises(ConfigError, match=r"^serve.request_router='random' is invalid: allowed are power_of_two, "
                                          r"prefix_affinity$"):
        build(builder_args(ServeAppConfig(serve=ServeConfig(request_router="random", export_dir="/nowhere"))))
    import socket

    from launcher.serve import check_port_free

    with socket.create_server(("127.0.0.1", 0)) as taken:  # a `make serve` still running, say
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=rf"^serve.port={port} is invalid: 127.0.0.1:{port} is in use \(.+\); "
                                              r"stop what listens there \(a `make serve` still running\?\) or "
                                              r"choose another serve.port$"):
            check_port_free("127.0.0.1", port, "serve.port")
    check_port_free("127.0.0.1", port, "serve.port")  # free again
    from launcher.serve_app import newest_export

    with pytest.raises(FileNotFoundError, match=r"^run.name='nope' has no run directory under run.storage='/nowhere'$"):
        newest_export("/nowhere", "nope")  # as export says it


def test_max_model_len_is_checked_against_the_exports_context_before_serving(server, trained):
    from launcher.serve_app import build, check_max_model_len, served_model
    from lm.config import ConfigError

    export = str(trained[0] / "gpt2-trained" / "exports" / "fp32-step000300")  # the server's
    with pytest.raises(ConfigError, match=r"^serve.dtype=bf16 is invalid for an export, which serves in the "):
        build({"export_dir": export, "dtype": "bf16"})  # before any replica starts
    name, context = served_model(export)
    assert (name, context) == (server[1], 256)  # the run's name, the model's context
    check_max_model_len(context, context)
    check_max_model_len(10**6, None)  # an export in an object store: its replica checks it as it loads
    with pytest.raises(ConfigError, match=r"^serve.max_model_len=257 is invalid: must be between 2 and the model's "
                                          r"context \(256\)$"):
        check_max_model_len(257, context)


def bare_replica():
    """A model replica's state around a real engine (1 layer, character vocabulary) without an export or
    Ray, and its engine's steps, which raise the errors put in the returned list first."""
    import string
    import threading

    import torch

    from launcher.serve_metrics import EngineMetrics
    from launcher.serve_model import LanguageModel
    from lm.config import ModelConfig
    from lm.engine import Engine
    from lm.model import GPT
    from lm.tokenizer import CharTokenizer

    tokenizer = CharTokenizer(sorted(set(string.ascii_lowercase + " ")))
    torch.manual_seed(0)
    engine = Engine(GPT(ModelConfig(name="t", n_layer=1, n_head=2, n_embd=32, block_size=32, vocab_size=32)),
                    tokenizer, max_batch_size=2)
    replica = object.__new__(LanguageModel.func_or_class)  # the replica's state without loading an export
    replica.engine, replica.queues, replica.loop, replica.work = engine, {}, None, threading.Event()
    replica.stream_interval, replica.stream_events_per_s = 0.0, 0
    replica.decoder, replica.failed_steps, replica.last_failure, replica.abandoned = None, 0, "", 0
    replica.metrics = EngineMetrics("t", prefix_caching=False)  # outside Ray: records nothing
    step, failures = engine.step, []
    engine.step = lambda **kw: step(**kw) if not failures else (_ for _ in ()).throw(failures.pop())
    return replica, failures


async def replica_events(replica, prompt: str = "abc", timeout: float = 30) -> list[dict]:
    from lm.engine import SamplingParams

    async def run():
        return [event async for event in replica.generate(prompt, SamplingParams(max_tokens=5, temperature=0))]

    return await asyncio.wait_for(run(), timeout)


def test_a_failed_decode_step_fails_the_requests_in_flight_and_the_replica_keeps_serving():
    """The replica's decode thread: a step that raises ends its requests with that error (Serve turns
    it into a failed response); the next request decodes as usual."""
    from lm.engine import Engine, SamplingParams

    replica, failures = bare_replica()
    failures.append(RuntimeError("out of memory"))
    finished = []  # the finish reason each request reported to the replica's metrics
    replica.metrics.request_finished = lambda seq, arrived, first_token, now, reason=None: finished.append(
        reason or seq.finish_reason)

    async def main():
        with pytest.raises(RuntimeError, match="decoding failed: out of memory"):
            await replica_events(replica)
        return await replica_events(replica)

    events = asyncio.run(main())
    engine = replica.engine
    greedy = SamplingParams(max_tokens=5, temperature=0)
    expected = Engine(engine.model, engine.tokenizer, max_batch_size=1).generate(["abc"], greedy)
    assert "".join(e.get("delta", "") for e in events) == expected[0].text
    assert events[-1]["finish_reason"] == "length" and events[-1]["completion_tokens"] == 5
    assert not engine.running and not engine.waiting
    assert finished == ["error", "length"]
    replica.check_health()  # one failed step, then good ones: healthy


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread that ends
def test_a_replica_whose_steps_keep_failing_or_whose_decode_thread_stopped_fails_serves_health_check():
    """Serve calls check_health every 10 s and replaces a replica that raises: after 3 failed decode
    steps in a row (a CUDA error leaves the process unable to compute), or once the decode thread has
    stopped (its requests would wait forever)."""
    from launcher.serve_model import FAILED_STEPS_UNHEALTHY

    replica, failures = bare_replica()
    replica.check_health()  # before any request: no thread yet, nothing failed

    async def failing(count: int):
        failures.extend(RuntimeError(f"CUDA error: an illegal memory access ({i})") for i in range(count))
        for _ in range(count):
            with pytest.raises(RuntimeError, match="decoding failed: CUDA error"):
                await replica_events(replica)

    def broken():
        raise RuntimeError("the engine's state is broken")

    async def main():  # one event loop, as a replica has
        await failing(FAILED_STEPS_UNHEALTHY - 1)
        replica.check_health()
        await failing(1)
        with pytest.raises(RuntimeError, match=rf"^the last {FAILED_STEPS_UNHEALTHY} decode steps failed: "
                                               r"RuntimeError\('CUDA error: an illegal memory access \(0\)'\)$"):
            replica.check_health()
        assert (await replica_events(replica))[-1]["finish_reason"] == "length"
        replica.check_health()  # a good step again: healthy

        replica.engine.cancel_all = broken  # the thread's own recovery fails: the thread ends
        failures.append(RuntimeError("CUDA error"))
        with pytest.raises(asyncio.TimeoutError):
            await replica_events(replica, timeout=3)
        replica.decoder.join(timeout=10)
        with pytest.raises(RuntimeError, match="^the decode thread has stopped$"):
            replica.check_health()

    asyncio.run(main())
