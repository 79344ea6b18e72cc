"""The OpenAI-compatible HTTP API against the live services, through the official `openai` client (and raw SSE
through httpx): the same requests as over gRPC give the same tokens, errors keep OpenAI's shape, a client that
disconnects aborts its request, and /metrics moves as requests run."""
from __future__ import annotations

import json
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.test_integration import collect, generate, wait_idle
from tinyvllm.v1 import scheduler_pb2 as pb

PROMPT = "Once upon a time"
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the river."}]


@pytest.fixture(scope="module")
def http_url(services) -> str:
    return services["scheduler"].http_url


@pytest.fixture(scope="module")
def client(http_url) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{http_url}/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def model(demo_checkpoint) -> str:
    return demo_checkpoint.name


def chat_request(messages: list[dict], **kw) -> pb.GenerateRequest:
    req = pb.GenerateRequest(params=pb.SamplingParams(**kw))
    req.messages.SetInParent()  # the chat input, even when it has no message
    for m in messages:
        req.messages.messages.add(role=m["role"], content=m["content"])
    return req


def scrape(http_url: str) -> dict[tuple[str, tuple], float]:
    """Every sample of /metrics, keyed by (name, sorted labels without model_name)."""
    text = httpx.get(f"{http_url}/metrics").text
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            out[(s.name, labels)] = s.value
    return out


ABORTED = ("tinyvllm:request_success_total", (("finished_reason", "abort"),))


def wait_aborted_and_idle(stub, http_url: str, before: dict, services, what: str) -> dict:
    """Waits (10 s at most) for one more aborted request than `before` counted, then for the server to be idle
    with every KV block free and no traceback in its log (a client that leaves is no error of the server's).
    Returns the last scrape."""
    deadline = time.monotonic() + 10
    while (after := scrape(http_url))[ABORTED] == before[ABORTED]:
        assert time.monotonic() < deadline, f"{what} was not aborted"
        time.sleep(0.05)
    info = wait_idle(stub)
    assert info.running_requests == 0 and info.free_kv_blocks == info.total_kv_blocks
    assert "Traceback" not in (services["log_dir"] / "scheduler.log").read_text()
    return after


def test_health_and_models(client, http_url, model):
    assert httpx.get(f"{http_url}/health").status_code == 200
    models = client.models.list().data
    assert [m.id for m in models] == [model]
    assert models[0].model_extra["max_model_len"] == 256


def test_completion_is_the_grpc_completion(client, stub, model):
    """Greedy and seeded sampling: every field reaches the same SamplingParams as over gRPC."""
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    want = generate(stub, PROMPT, max_tokens=12, temperature=0)
    assert r.choices[0].text == want.text and r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (want.prompt_tokens, 12)
    assert r.usage.total_tokens == want.prompt_tokens + 12
    sampled = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0.9, top_p=0.9,
                                        seed=7, extra_body={"top_k": 20})
    want = generate(stub, PROMPT, max_tokens=10, temperature=0.9, top_p=0.9, seed=7, top_k=20)
    assert sampled.choices[0].text == want.text
    stop = want.text[3:6]
    if stop.strip():
        cut = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, temperature=0.9, top_p=0.9,
                                        seed=7, extra_body={"top_k": 20}, stop=[stop])
        assert cut.choices[0].finish_reason == "stop" and stop not in cut.choices[0].text


def test_penalties_bias_and_min_p_are_the_grpc_ones(client, stub, model):
    """OpenAI's penalties and logit_bias, and vLLM's repetition_penalty, min_p and allowed_token_ids, map onto the
    gRPC fields (the device applies them); a logit_bias key that is not a token id is a 400."""
    kw = dict(temperature=0.8, seed=3, presence_penalty=0.5, frequency_penalty=0.3)
    extra = dict(repetition_penalty=1.2, min_p=0.05)
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=10, logit_bias={"5": 4.0}, extra_body=extra,
                                  **kw)
    want = generate(stub, PROMPT, max_tokens=10, logit_bias={5: 4.0}, **extra, **kw)
    assert r.choices[0].text == want.text
    allowed = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0,
                                        extra_body={"allowed_token_ids": [5, 6, 7]})
    want = generate(stub, PROMPT, max_tokens=6, temperature=0, allowed_token_ids=[5, 6, 7])
    assert set(want.token_ids) <= {5, 6, 7} and allowed.choices[0].text == want.text
    with pytest.raises(openai.BadRequestError, match="logit_bias"):
        client.completions.create(model=model, prompt=PROMPT, max_tokens=4, logit_bias={"the": 1.0})


def test_streamed_chat_completion(client, stub, model):
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=10, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    want = collect(stub.Generate(chat_request(CHAT, max_tokens=10, temperature=0)))
    assert text == want.text and finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert chunks[-1].usage.prompt_tokens == want.prompt_tokens
    whole = client.chat.completions.create(model=model, messages=CHAT, max_tokens=10, temperature=0)
    assert whole.choices[0].message.content == want.text and whole.choices[0].message.role == "assistant"


def test_errors_have_openai_shape_and_status(client, http_url, model):
    with pytest.raises(openai.BadRequestError, match="top_p"):
        client.completions.create(model=model, prompt=PROMPT, max_tokens=4, top_p=2.0)
    with pytest.raises(openai.BadRequestError, match="roles are supported"):  # the template's raise_exception
        client.chat.completions.create(model=model, messages=[{"role": "tool", "content": "x"}], max_tokens=4)
    with pytest.raises(openai.BadRequestError, match="n must"):
        client.completions.create(model=model, prompt=PROMPT, max_tokens=4, n=0)
    with pytest.raises(openai.BadRequestError, match="logprobs must"):
        client.completions.create(model=model, prompt=PROMPT, max_tokens=4, logprobs=21)
    with pytest.raises(openai.BadRequestError, match="top_logprobs needs logprobs"):
        client.chat.completions.create(model=model, messages=CHAT, max_tokens=4, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="best_of"):
        client.completions.create(model=model, prompt=PROMPT, max_tokens=4, best_of=2)
    with pytest.raises(openai.NotFoundError, match="does not exist"):
        client.completions.create(model="gpt-4", prompt=PROMPT, max_tokens=4)
    raw = httpx.post(f"{http_url}/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert raw.status_code == 400 and raw.json()["error"]["type"] == "invalid_request_error"
    raw = httpx.post(f"{http_url}/v1/completions", json={"model": model})  # no prompt
    assert raw.status_code == 400 and "prompt" in raw.json()["error"]["message"]


def grpc_samples(stub, request: pb.GenerateRequest) -> dict[int, dict]:
    """Each sample's token ids, text, logprob entries and last message, by index."""
    out: dict[int, dict] = {}
    for msg in stub.Generate(request):
        sample = out.setdefault(msg.index, {"ids": [], "text": "", "logprobs": [], "last": None})
        sample["ids"] += msg.token_ids
        sample["text"] += msg.text
        sample["logprobs"] += msg.logprobs
        if msg.finish_reason:
            sample["last"] = msg
    return out


def test_n_choices_and_logprobs_are_the_grpc_ones(client, stub, model):
    """n choices (sample i seeded seed + i) with logprobs: the completions API's tokens, token_logprobs,
    top_logprobs and text_offset, and the chat API's content entries, carry what the gRPC API streams."""
    want = grpc_samples(stub, pb.GenerateRequest(prompt=PROMPT, params=pb.SamplingParams(
        max_tokens=6, temperature=0.8, seed=11, n=3, logprobs=2)))
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, temperature=0.8, seed=11, n=3,
                                  logprobs=2)
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert r.usage.completion_tokens == sum(len(w["ids"]) for w in want.values()) == 18
    for choice in r.choices:
        w = want[choice.index]
        assert choice.text == w["text"] and choice.finish_reason == "length"
        lp = choice.logprobs
        assert lp.tokens == [e.text for e in w["logprobs"]] and len(lp.tokens) == 6
        assert lp.token_logprobs == pytest.approx([e.logprob for e in w["logprobs"]])
        assert lp.top_logprobs == [{t.text: pytest.approx(t.logprob) for t in e.top} for e in w["logprobs"]]
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(6)]
    assert len({c.text for c in r.choices}) == 3

    request = chat_request(CHAT, max_tokens=5, temperature=0.8, seed=4, n=2, logprobs=3)
    want = grpc_samples(stub, request)
    chat = client.chat.completions.create(model=model, messages=CHAT, max_tokens=5, temperature=0.8, seed=4, n=2,
                                          logprobs=True, top_logprobs=3)
    for choice in chat.choices:
        w = want[choice.index]
        assert choice.message.content == w["text"]
        content = choice.logprobs.content
        assert [c.token for c in content] == [e.text for e in w["logprobs"]] and len(content) == 5
        assert [c.logprob for c in content] == pytest.approx([e.logprob for e in w["logprobs"]])
        assert all(c.bytes == list(c.token.encode()) and len(c.top_logprobs) == 3 for c in content)
        assert [[t.token for t in c.top_logprobs] for c in content] == [[t.text for t in e.top]
                                                                          for e in w["logprobs"]]
    plain = client.chat.completions.create(model=model, messages=CHAT, max_tokens=2, temperature=0)
    assert plain.choices[0].logprobs is None

    # streamed: the chunks of each index add up to that choice, and the usage counts every choice
    chunks = list(client.chat.completions.create(model=model, messages=CHAT, max_tokens=5, temperature=0.8, seed=4,
                                                 n=2, logprobs=True, top_logprobs=3, stream=True,
                                                 stream_options={"include_usage": True}))
    for index in (0, 1):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert mine[0].delta.role == "assistant" and mine[-1].finish_reason == "length"
        assert "".join(c.delta.content or "" for c in mine) == want[index]["text"]
        assert [e.token for c in mine if c.logprobs for e in c.logprobs.content] == \
            [e.text for e in want[index]["logprobs"]]
    assert chunks[-1].usage.completion_tokens == 10


def test_prompt_logprobs_are_the_grpc_ones(client, stub, model):
    """vLLM's prompt_logprobs extension: completions (per choice) and chat (once per response) carry what the gRPC
    API streams, as vLLM's maps (None for the first prompt token); refused when streamed or above 20."""
    ids = [1] + [(13 * i) % 370 + 15 for i in range(29)]  # 30 tokens: the 1x64 bucket's prompt-logprobs graph
    req = pb.GenerateRequest(params=pb.SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))
    req.prompt_token_ids.ids.extend(ids)
    want = list(stub.Generate(req))[0].prompt_logprobs
    r = client.completions.create(model=model, prompt=ids, max_tokens=2, temperature=0,
                                  extra_body={"prompt_logprobs": 3})
    plp = r.choices[0].model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == len(ids) == len(want) + 1
    for entry, e in zip(plp[1:], want):
        assert entry[str(e.token_id)] == {"logprob": pytest.approx(e.logprob), "rank": e.rank, "decoded_token": e.text}
        assert {int(k) for k in entry} == {e.token_id, *(t.token_id for t in e.top)}
        assert [entry[str(t.token_id)]["rank"] for t in e.top if t.token_id != e.token_id] == \
            [t.rank for t in e.top if t.token_id != e.token_id]
    chat = client.chat.completions.create(model=model, messages=CHAT, max_tokens=2, temperature=0,
                                          extra_body={"prompt_logprobs": 0})
    plp = chat.model_extra["prompt_logprobs"]
    assert plp[0] is None and len(plp) == chat.usage.prompt_tokens and all(len(d) == 1 for d in plp[1:])
    assert client.completions.create(model=model, prompt=ids, max_tokens=1).choices[0].model_extra.get(
        "prompt_logprobs") is None
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
        client.completions.create(model=model, prompt=ids, max_tokens=2, stream=True, extra_body={"prompt_logprobs": 2})
    with pytest.raises(openai.BadRequestError, match="prompt_logprobs"):
        client.completions.create(model=model, prompt=ids, max_tokens=2, extra_body={"prompt_logprobs": 21})


def test_raw_server_sent_events(http_url, model):
    body = {"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{http_url}/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[len("data: "):]) for line in lines[:-1]]
    assert {c["object"] for c in chunks} == {"text_completion"} and len({c["id"] for c in chunks}) == 1
    assert [c["choices"][0]["finish_reason"] for c in chunks][-1] == "length"


def test_disconnect_aborts_and_metrics_move(stub, http_url, model, services):
    before = scrape(http_url)
    body = {"model": model, "messages": CHAT, "max_tokens": 200, "temperature": 0, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", f"{http_url}/v1/chat/completions", json=body, timeout=60) as r:
        lines = (line for line in r.iter_lines() if line)
        assert json.loads(next(lines)[len("data: "):])["choices"][0]["delta"]["role"] == "assistant"
        assert json.loads(next(lines)[len("data: "):])["choices"][0]["delta"]["content"]  # a token: admitted
        during = scrape(http_url)  # the request is running, holding KV blocks
        assert during[("tinyvllm:num_requests_running", ())] == 1
        assert 0 < during[("tinyvllm:kv_cache_usage_perc", ())] <= 1
    after = wait_aborted_and_idle(stub, http_url, before, services, "the disconnected request")
    generated = after[("tinyvllm:generation_tokens_total", ())] - before[("tinyvllm:generation_tokens_total", ())]
    assert 0 < generated < 200


def test_disconnect_aborts_a_request_that_is_not_streamed(stub, http_url, model, services):
    before = scrape(http_url)
    body = {"model": model, "prompt": PROMPT, "max_tokens": 240, "temperature": 0, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before 240 tokens
        httpx.post(f"{http_url}/v1/completions", json=body, timeout=httpx.Timeout(5, read=0.3))
    wait_aborted_and_idle(stub, http_url, before, services, "the abandoned request")


def test_metrics_count_a_request(client, http_url, model):
    prompt = " ".join(["The river ran from the hills to the sea."] * 3)  # more than a block: a prefix-cache hit
    client.completions.create(model=model, prompt=prompt, max_tokens=2, temperature=0)
    before = scrape(http_url)
    r = client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0)
    after = scrape(http_url)

    def moved(name: str, labels: tuple = ()) -> float:
        return after[(name, labels)] - before[(name, labels)]

    assert moved("tinyvllm:prompt_tokens_total") == r.usage.prompt_tokens
    assert moved("tinyvllm:generation_tokens_total") == 5
    assert moved("tinyvllm:request_success_total", (("finished_reason", "length"),)) == 1
    assert moved("tinyvllm:prefix_cache_queries_total") == r.usage.prompt_tokens
    assert moved("tinyvllm:prefix_cache_hits_total") >= 16
    for histogram in ("time_to_first_token_seconds", "time_per_output_token_seconds", "e2e_request_latency_seconds"):
        assert moved(f"tinyvllm:{histogram}_count") == 1
        assert moved(f"tinyvllm:{histogram}_sum") > 0
    for name in ("num_preemptions_total", "worker_restarts_total", "num_requests_waiting"):
        assert (f"tinyvllm:{name}", ()) in after
