"""The OpenAI-compatible Serve app: its core on a tiny checkpoint (fast), then over HTTP under Ray Serve (slow)."""
import json
import re
import socket
import urllib.error
import urllib.request

import pytest

from cluster.serve_app import CompletionCore, RequestError, ServeArgs, build_app
from sami.prompts import generation_prompt

CONSTITUTION = "1. Be polite.\n2. Be concise."


@pytest.fixture(scope="module")
def core(tiny_model_dir):
    return CompletionCore(ServeArgs(model_path=str(tiny_model_dir), engine="hf", model_name="tiny",
                                    constitution=CONSTITUTION, max_tokens_limit=16))


def test_chat_uses_the_constitution_as_the_generation_prompt(core):
    greedy = {"temperature": 0.0, "max_tokens": 12}
    chat = core.chat({"messages": [{"role": "user", "content": "Tell me about the river."}], **greedy})
    query = generation_prompt("dialogue", CONSTITUTION, "Tell me about the river.")
    raw = core.complete({"prompt": query, "system": "", **greedy})  # an empty system: the prompt as given
    assert chat["choices"][0]["message"]["content"] == raw["choices"][0]["text"]
    assert chat["object"] == "chat.completion" and chat["model"] == "tiny"
    assert chat["usage"]["prompt_tokens"] == len(core.tokenizer(query, add_special_tokens=False).input_ids)
    assert 0 < chat["usage"]["completion_tokens"] <= 12


def test_completions_system_field_and_limits(core):
    other = core.complete({"prompt": ["Tell me about the river.", "Tell me about the mountain."], "system": "1. Be curt.",
                           "temperature": 0.0, "max_tokens": 500})
    assert [c["index"] for c in other["choices"]] == [0, 1]
    assert other["usage"]["completion_tokens"] <= 2 * 16  # max_tokens is capped by max_tokens_limit
    first = other["choices"][0]["text"]
    stop = first.split()[1] if len(first.split()) > 1 else None
    if stop:
        cut = core.complete({"prompt": "Tell me about the river.", "system": "1. Be curt.", "temperature": 0.0,
                             "max_tokens": 500, "stop": [stop]})["choices"][0]
        assert cut["text"] == first[:first.find(stop)] and cut["finish_reason"] == "stop"


def test_bad_requests_name_the_problem(core):
    with pytest.raises(RequestError, match="last message must have role 'user'"):
        core.chat({"messages": [{"role": "assistant", "content": "hi"}]})
    with pytest.raises(RequestError, match="prompt must be"):
        core.complete({"prompt": 3})
    with pytest.raises(RequestError, match="temperature"):
        core.chat({"messages": [{"role": "user", "content": "hi"}], "temperature": -1})


@pytest.mark.parametrize("field, value, message", [
    ("n", 200000, "n must be between 1 and 8, got 200000"),
    ("n", "2", "n must be an integer, got '2'"),
    ("n", 2.5, "n must be an integer, got 2.5"),
    ("seed", "abc", "seed must be an integer, got 'abc'"),
    ("seed", True, "seed must be an integer, got True"),
    ("max_tokens", "many", "max_tokens must be an integer, got 'many'"),
    ("max_tokens", 0, "max_tokens must be between 1 and"),
])
def test_bad_counts_and_types_are_request_errors(core, field, value, message):
    """RequestError is what the HTTP layer answers with 400 (a ValueError from int() was a 500)."""
    with pytest.raises(RequestError, match=message):
        core.chat({"messages": [{"role": "user", "content": "hi"}], field: value})


HI = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("method, body, message", [
    ("chat", [], "the body must be a JSON object, got list []"),
    ("chat", None, "the body must be a JSON object, got NoneType None"),
    ("complete", "hi", "the body must be a JSON object, got str 'hi'"),
    ("chat", {"messages": HI, "stop": 5}, "stop must be a string or a list of strings, got 5"),
    ("complete", {"prompt": "hi", "stop": ["ok", None]}, "stop[1] must be a string, got None"),
    ("complete", {"prompt": ""}, "prompt is empty"),
    ("complete", {"prompt": ["a", "  "]}, "prompt[1] is empty"),
    ("chat", {"messages": [{"role": "user", "content": ""}]}, "messages[0].content is empty"),
    ("chat", {"messages": [{"role": "system", "content": "x"}, {"role": "user"}]},
     "messages[1].content must be a string, got None"),
    ("chat", {"messages": [{"role": "user", "content": "hi \ud800"}]},
     "messages[0].content holds a lone surrogate ('\\ud800' at character 3)"),
    ("complete", {"prompt": "\udc80"}, "prompt holds a lone surrogate"),
    ("complete", {"prompt": "hi", "system": "be \ud83d"}, "system holds a lone surrogate"),
    ("chat", {"messages": HI, "stop": "\ud800"}, "stop[0] holds a lone surrogate"),
])
def test_malformed_bodies_and_text_are_request_errors_naming_the_field(core, method, body, message):
    """Each was a 500 (AttributeError, TypeError or UnicodeEncodeError inside the handler)."""
    with pytest.raises(RequestError, match=re.escape(message)):
        getattr(core, method)(body)


def test_prompts_per_request_are_capped(tiny_model_dir):
    capped = CompletionCore(ServeArgs(model_path=str(tiny_model_dir), engine="hf", max_prompts=2, max_n=3,
                                      max_tokens_limit=4))
    with pytest.raises(RequestError, match="prompt has 3 entries; this server takes at most 2"):
        capped.complete({"prompt": ["a", "b", "c"]})
    answer = capped.chat({"messages": [{"role": "user", "content": "hi"}], "n": 3, "max_tokens": 100, "seed": 1})
    assert len(answer["choices"]) == 3 and answer["usage"]["completion_tokens"] <= 3 * 4


def test_build_app_rejects_unknown_arguments():
    with pytest.raises(ValueError, match="modle_path: unknown field"):
        build_app({"model_path": "x", "modle_path": "y"})


@pytest.mark.timeout(120)
def test_engine_auto_reserves_gpus_by_the_cluster_not_by_the_host_that_builds_the_app():
    """`serve run` builds the app on its own host, here a CPU one, as on a CPU head node. On a cluster with GPUs
    (Ray's logical GPUs) each replica holds a vLLM engine's placement group and picks its engine where it runs;
    on a cluster without GPUs it takes one CPU."""
    import ray
    import torch

    from actors.rollout import VLLM_PLACEMENT_STRATEGY, vllm_bundles, vllm_holder_options

    assert not torch.cuda.is_available()
    deployments = {}
    for gpus in (2, 0):
        ray.init(num_cpus=2, num_gpus=gpus, include_dashboard=False, log_to_driver=False)
        try:
            deployments[gpus] = build_app({"model_path": "x", "tensor_parallel_size": 2})._bound_deployment
        finally:
            ray.shutdown()
    replica = deployments[2]._replica_config
    assert deployments[2].ray_actor_options == vllm_holder_options(2)
    assert replica.placement_group_bundles == vllm_bundles(2)
    assert replica.placement_group_strategy == VLLM_PLACEMENT_STRATEGY
    assert deployments[0].ray_actor_options == {"num_cpus": 1} and deployments[0]._replica_config.placement_group_bundles is None


def post(url: str, body: dict, timeout: float = 60.0) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_serve_answers_over_http_on_loopback(tiny_model_dir):
    import ray
    from ray import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ray.init(num_cpus=2, include_dashboard=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"model_path": str(tiny_model_dir), "engine": "hf", "model_name": "tiny"}), name="sami",
                  route_prefix="/")
        base = f"http://127.0.0.1:{port}/v1"
        status, chat = post(f"{base}/chat/completions", {
            "model": "tiny", "max_tokens": 8, "temperature": 0.0,
            "messages": [{"role": "system", "content": CONSTITUTION}, {"role": "user", "content": "Tell me about the river."}]})
        assert status == 200 and chat["choices"][0]["message"]["role"] == "assistant"
        assert 0 < chat["usage"]["completion_tokens"] <= 8
        status, text = post(f"{base}/completions", {"prompt": "Human: How do I bake bread?", "max_tokens": 4})
        assert status == 200 and text["object"] == "text_completion"
        status, error = post(f"{base}/chat/completions", {"messages": []})
        assert status == 400 and "messages must be" in error["error"]["message"]
        status, error = post(f"{base}/chat/completions", [])
        assert status == 400 and error["error"]["message"] == "the body must be a JSON object, got list []"
        status, error = post(f"{base}/completions", {"prompt": "hi \ud800"})
        assert status == 400 and "prompt holds a lone surrogate" in error["error"]["message"]
        with urllib.request.urlopen(f"{base}/models", timeout=30) as response:
            assert json.loads(response.read())["data"][0]["id"] == "tiny"
        # The principle writer's own client can use it as its endpoint.
        from sami.chat_clients import OpenAIChatClient

        answer = OpenAIChatClient(base, "tiny", "SAMI_TEST_NO_KEY").complete([{"role": "user", "content": "Hi"}], 0.0, 4)
        assert isinstance(answer, str)
    finally:
        serve.shutdown()
        ray.shutdown()
