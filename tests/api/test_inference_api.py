"""Chat completions and completions through the unchanged `openai` SDK against a real server process and the
real inference process it starts, on a configured base model (the tiny random one); no worker, no training.
Fine-tuned models are in tests/integration/test_inference_e2e.py."""

from __future__ import annotations

import json
import shutil

import httpx
import openai
import pytest

from tests.conftest import Server

MESSAGES = [{"role": "system", "content": "You answer in one word."},
            {"role": "user", "content": "What is the capital of Japan?"}]


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_model_dir):
    home = tmp_path_factory.mktemp("infer-home")
    base = home / "local" / "tiny-llama"
    srv = Server(home, {"TUNEYARD_RUN_WORKER": "false", "TUNEYARD_BASE_MODELS": f"{base},org/not-here",
                        "TUNEYARD_RATE_LIMIT_PER_SECOND": "0"})
    shutil.copytree(tiny_model_dir, base)
    srv.model_dir = str(base)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(api):
    return api.openai(api.key("acme"))


def test_chat_completion_has_openai_shape_and_usage(api, client):
    r = client.chat.completions.create(model=api.model_dir, messages=MESSAGES, max_tokens=5, temperature=0)
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-") and r.model == api.model_dir
    (choice,) = r.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("length", "stop")
    assert r.usage.prompt_tokens > 5 and 1 <= r.usage.completion_tokens <= 5
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    health = httpx.get(f"{api.base_url}/healthz").json()["inference"]
    assert health["backend"] == "transformers" and health["vllm"]["used"] is False
    assert health["cache"]["base_loads"] == {api.model_dir: 1}


def test_greedy_is_deterministic_and_length_is_reported(api, client):
    a = client.chat.completions.create(model=api.model_dir, messages=MESSAGES, max_completion_tokens=7,
                                       temperature=0, n=2)
    b = client.chat.completions.create(model=api.model_dir, messages=MESSAGES, max_tokens=7, temperature=0)
    assert [c.index for c in a.choices] == [0, 1]
    assert a.choices[0].message.content == a.choices[1].message.content == b.choices[0].message.content
    if b.usage.completion_tokens == 7:
        assert b.choices[0].finish_reason == "length"


def test_seed_makes_sampling_repeatable(api, client):
    kw = {"model": api.model_dir, "messages": MESSAGES, "max_tokens": 12, "temperature": 1.0, "top_p": 0.9}
    one = client.chat.completions.create(seed=5, **kw).choices[0].message.content
    assert client.chat.completions.create(seed=5, **kw).choices[0].message.content == one
    others = {client.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (6, 7, 8)}
    assert others != {one}


def test_stop_cuts_the_text(api, client):
    full = client.chat.completions.create(model=api.model_dir, messages=MESSAGES, max_tokens=20,
                                          temperature=0).choices[0].message.content
    assert len(full) >= 4
    stop = full[2:4]
    r = client.chat.completions.create(model=api.model_dir, messages=MESSAGES, max_tokens=20, temperature=0,
                                       stop=[stop])
    assert r.choices[0].message.content == full[:full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_stream_gives_the_same_text_with_usage(api, client):
    plain = client.chat.completions.create(model=api.model_dir, messages=MESSAGES, max_tokens=10, temperature=0)
    chunks = list(client.chat.completions.create(model=api.model_dir, messages=MESSAGES, max_tokens=10,
                                                 temperature=0, stream=True, stream_options={"include_usage": True}))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == plain.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


def test_completions_plain_stream_and_echo(api, client):
    r = client.completions.create(model=api.model_dir, prompt=["Paris is", "Rome is"], max_tokens=4, temperature=0)
    assert r.object == "text_completion" and [c.index for c in r.choices] == [0, 1]
    assert r.usage.completion_tokens <= 8
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=api.model_dir, prompt="Paris is", max_tokens=4, temperature=0, stream=True) if c.choices)
    assert streamed == r.choices[0].text
    echoed = client.completions.create(model=api.model_dir, prompt="Paris is", max_tokens=4, temperature=0,
                                       echo=True)
    assert echoed.choices[0].text == "Paris is" + r.choices[0].text


def test_unknown_model_is_openai_404(api, client):
    for name in ("gpt-4o-mini", "ft:tiny-llama:acme::nothing", "ft:tiny-llama:acme::nothing:ckpt-step-3"):
        with pytest.raises(openai.NotFoundError) as e:
            client.chat.completions.create(model=name, messages=MESSAGES)
        assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


def test_context_too_long_is_400_naming_messages(api, client):
    long = [{"role": "user", "content": "Paris Tokyo Rome " * 800}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=api.model_dir, messages=long, max_tokens=5)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"
    assert "maximum context length is 1024 tokens" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=api.model_dir, messages=MESSAGES, max_tokens=5000)
    assert e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=api.model_dir, prompt="Paris " * 2000)
    assert e.value.body["param"] == "prompt"


def test_bad_parameters_are_all_named_in_one_400(api, client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=api.model_dir, temperature=3, n=0,
            messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    msg = e.value.body["message"]
    assert "temperature" in msg and "n" in msg
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=api.model_dir, stream_options={"include_usage": True}, stop=[""],
                                       max_tokens=3, max_completion_tokens=4,
                                       messages=[{"role": "user", "content": [
                                           {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}])
    msg = e.value.body["message"]
    for field in ("stream_options", "stop", "max_completion_tokens", "messages[0].content[0]"):
        assert field in msg, (field, msg)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=api.model_dir, messages=MESSAGES, logit_bias={"1": 5})
    assert "logit_bias" in e.value.body["message"]


def test_a_base_that_does_not_load_is_503_not_500(api, client):
    with pytest.raises(openai.APIStatusError) as e:
        client.chat.completions.create(model="org/not-here", messages=MESSAGES, max_tokens=2)
    assert e.value.status_code == 503 and e.value.body["code"] == "model_unavailable"


def test_base_models_cannot_be_deleted(api, client):
    with pytest.raises(openai.PermissionDeniedError):
        client.models.delete(api.model_dir)
    with pytest.raises(openai.NotFoundError):
        client.models.delete("ft:tiny-llama:acme::nothing")


def test_auth_applies(api):
    r = httpx.post(f"{api.base_url}/v1/chat/completions", json={"model": api.model_dir, "messages": MESSAGES})
    assert r.status_code == 401
    r = httpx.post(f"{api.base_url}/v1/chat/completions", content=b"{not json",
                   headers={"Authorization": f"Bearer {api.key('acme')}", "Content-Type": "application/json"})
    assert r.status_code == 400 and json.loads(r.text)["error"]


def test_llama_stack_chat_completion_answers_as_openai_does(api, client):
    import llama_stack_client
    from llama_stack_client import LlamaStackClient

    ls = LlamaStackClient(base_url=api.base_url, api_key=client.api_key, max_retries=0)
    want = client.chat.completions.create(model=api.model_dir, messages=MESSAGES, max_tokens=6, temperature=0)
    r = ls.inference.chat_completion(model_id=api.model_dir, messages=MESSAGES,
                                     sampling_params={"strategy": {"type": "greedy"}, "max_tokens": 6})
    assert r.completion_message.role == "assistant"
    assert r.completion_message.content == want.choices[0].message.content
    assert r.completion_message.stop_reason == {"length": "out_of_tokens", "stop": "end_of_turn"}[
        want.choices[0].finish_reason]
    assert {m.metric: m.value for m in r.metrics}["completion_tokens"] == want.usage.completion_tokens
    chunks = list(ls.inference.chat_completion(model_id=api.model_dir, messages=MESSAGES, stream=True,
                                               sampling_params={"strategy": {"type": "greedy"}, "max_tokens": 6}))
    assert chunks[0].event.event_type == "start" and chunks[-1].event.event_type == "complete"
    assert "".join(c.event.delta.text for c in chunks) == want.choices[0].message.content
    with pytest.raises(llama_stack_client.NotFoundError) as e:
        ls.inference.chat_completion(model_id="nope", messages=MESSAGES)
    assert "model_id" in e.value.body["detail"] and e.value.body["status"] == 404
    with pytest.raises(llama_stack_client.BadRequestError) as e:
        ls.inference.chat_completion(model_id=api.model_dir, messages=MESSAGES, tools=[{"tool_name": "x"}],
                                     sampling_params={"strategy": {"type": "top_k", "top_k": 3},
                                                      "repetition_penalty": 1.2})
    detail = e.value.body["detail"]
    assert "tools" in detail
    with pytest.raises(llama_stack_client.BadRequestError) as e:
        ls.inference.chat_completion(model_id=api.model_dir, messages=MESSAGES,
                                     sampling_params={"strategy": {"type": "top_k", "top_k": 3},
                                                      "repetition_penalty": 1.2})
    detail = e.value.body["detail"]
    assert "top_k" in detail and "repetition_penalty" in detail
