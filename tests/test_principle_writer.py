"""Principle writer: strict parsing, bounded retries with a rejection count, a real local OpenAI-style server."""
import json
import logging
import socket

import pytest

from sami.principle_writer import PrincipleWriterCore, WriterError, chat_client_for, parse_principles, write_principles
from chat_server import ChatServer
from sami.chat_clients import ChatClientError, OpenAIChatClient
from sami.config import PrinciplesConfig, WriterConfig
from sami.principles import Principle, PrincipleError, load_principles

GOOD = """Sure! Here are the principles you asked for.

Principle: Depth and clarity
Definition: Address human requests with depth and clarity.
Antithesis: Address human requests with vague and ambiguous responses.

**Principle:** Harmlessness
**Definition:** Avoid content that could cause harm.
**Antithesis:** Freely produce content that could cause harm.
"""
EXPECTED = [
    Principle("depth_and_clarity", "Address human requests with depth and clarity.",
              "Address human requests with vague and ambiguous responses."),
    Principle("harmlessness", "Avoid content that could cause harm.", "Freely produce content that could cause harm."),
]
MISSING_ANTITHESIS = "Principle: a\nDefinition: d1\nAntithesis: x1\nPrinciple: b\nDefinition: d2\n"


def test_parse_good_answer_ignores_preamble_and_markdown():
    assert parse_principles(GOOD, expected=2) == EXPECTED


@pytest.mark.parametrize("text, problem", [
    (MISSING_ANTITHESIS, "last block ('b') is incomplete"),
    ("Principle: a\nAntithesis: x\nDefinition: d\n", "expected 'Definition:', got 'Antithesis:'"),
    ("Principle: a\nDefinition: d\nAntithesis: x\n", "expected 2 principle blocks, found 1"),
    ("Principle: Be kind\nDefinition: d\nAntithesis: x\nPrinciple: be-kind\nDefinition: d2\nAntithesis: x2\n",
     "duplicate name 'be_kind'"),
    ("Principle: a\nDefinition:\nAntithesis: x\nPrinciple: b\nDefinition: d\nAntithesis: y\n", "'definition' must be non-empty"),
    ("I cannot help with that.", "found 0"),
])
def test_parse_rejects_malformed_answers(text, problem):
    with pytest.raises(PrincipleError, match=problem.replace("(", r"\(").replace(")", r"\)")):
        parse_principles(text, expected=2)


class ScriptedClient:
    """Stands in for the LM: returns the scripted answers in order and records the prompts."""

    def __init__(self, answers):
        self.answers, self.prompts = list(answers), []

    def complete(self, messages, temperature=0.0, max_tokens=1024):
        self.prompts.append(messages[-1]["content"])
        return self.answers.pop(0)


def writer_cfg(**kw) -> WriterConfig:
    base = dict(model="writer-model", base_url="http://127.0.0.1:1/v1", num_principles=2, max_retries=2,
                task_description="summarise a post", seed_principles=["Be concise."])
    return WriterConfig(**{**base, **kw})


def test_malformed_answers_are_retried_then_counted():
    client = ScriptedClient(["nonsense", MISSING_ANTITHESIS, GOOD])
    principles, rejected = write_principles(writer_cfg(), client)
    assert (principles, rejected) == (EXPECTED, 2)
    assert "how to summarise a post" in client.prompts[0] and "- Be concise." in client.prompts[0]
    assert "antitheses to use as a contrastive prompt" in client.prompts[0]


def test_too_many_malformed_answers_stop_the_run():
    client = ScriptedClient(["nonsense", MISSING_ANTITHESIS, "nope", GOOD])
    with pytest.raises(WriterError, match=r"3 malformed answer\(s\) \(principles.writer.max_retries=2\), none used"):
        write_principles(writer_cfg(), client)
    assert client.answers == [GOOD]  # bounded: the fourth answer was never asked for


def test_written_principles_are_saved_and_reused_on_resume(tmp_path):
    cfg = PrinciplesConfig(source="writer", writer=writer_cfg())
    core = PrincipleWriterCore(cfg, tmp_path, client=ScriptedClient(["bad", GOOD]))
    assert core.prepare() == {"principles": 2, "rejected": 1, "source": "writer"}
    assert load_principles(tmp_path / "principles.yaml") == EXPECTED
    resumed = PrincipleWriterCore(cfg, tmp_path, client=ScriptedClient([]))  # would fail if asked
    assert resumed.prepare()["source"] == "saved" and resumed.principles() == EXPECTED


def test_constitutions_are_deterministic_per_query_and_seed(tmp_path):
    library = tmp_path / "lib.yaml"
    library.write_text(json.dumps([{"name": f"p{i}", "definition": f"do {i}", "antithesis": f"undo {i}"} for i in range(4)]))
    cfg = PrinciplesConfig(source="file", path=str(library), mode="sample_k", principles_per_constitution=2,
                           num_constitutions=3)
    core = PrincipleWriterCore(cfg, tmp_path / "run")
    first = core.constitutions(["q1", "q2", "q3"], seed=5)
    assert first == PrincipleWriterCore(cfg, tmp_path / "run").constitutions(["q1", "q2", "q3"], seed=5)
    assert first[1] == core.constitutions(["q2"], seed=5)[0]  # a query's draw does not depend on its batch
    assert first != core.constitutions(["q1", "q2", "q3"], seed=6)
    for group in first:
        assert len(group) == 3 and group[0].is_fully_positive and not any(c.is_fully_positive for c in group[1:])


def test_chat_client_for_names_missing_fields():
    with pytest.raises(ChatClientError, match="principles.writer.model is not set"):
        chat_client_for(WriterConfig())
    with pytest.raises(ChatClientError, match="principles.writer.base_url is not set"):
        chat_client_for(WriterConfig(model="m", backend="vllm"))
    assert isinstance(chat_client_for(writer_cfg(backend="vllm")), OpenAIChatClient)


SECRET = "sk-test-4f1c9e-never-log-me"


@pytest.mark.timeout(30)
def test_openai_endpoint_request_and_parsed_principles(tmp_path, monkeypatch, caplog, capsys):
    monkeypatch.setenv("SAMI_WRITER_KEY", SECRET)
    server = ChatServer(GOOD, statuses=(503, 200))  # one transient failure, retried
    try:
        cfg = PrinciplesConfig(source="writer", writer=writer_cfg(base_url=server.url + "/", api_key_env="SAMI_WRITER_KEY",
                                                                 temperature=0.3, max_new_tokens=300))
        client = chat_client_for(cfg.writer)
        client.backoff = 0.01
        with caplog.at_level(logging.DEBUG):
            core = PrincipleWriterCore(cfg, tmp_path, client=client)
            assert core.prepare() == {"principles": 2, "rejected": 0, "source": "writer"}
    finally:
        server.close()
    assert core.principles() == EXPECTED
    assert len(server.requests) == 2
    request = server.requests[-1]
    assert request["path"] == "/v1/chat/completions"
    assert request["headers"]["Authorization"] == f"Bearer {SECRET}"
    body = request["body"]
    assert (body["model"], body["temperature"], body["max_tokens"]) == ("writer-model", 0.3, 300)
    assert [m["role"] for m in body["messages"]] == ["user"] and "summarise a post" in body["messages"][0]["content"]
    out = capsys.readouterr()
    for text in (caplog.text, out.out, out.err, repr(client), (tmp_path / "principles.yaml").read_text()):
        assert SECRET not in text


@pytest.mark.timeout(30)
def test_rejected_key_fails_at_once_without_leaking_it(monkeypatch):
    monkeypatch.setenv("SAMI_WRITER_KEY", SECRET)
    server = ChatServer(GOOD, statuses=(401,))
    try:
        client = OpenAIChatClient(server.url, "m", "SAMI_WRITER_KEY", retries=3, backoff=0.01)
        with pytest.raises(ChatClientError, match=r"after 1 attempt\(s\): HTTP 401 .*SAMI_WRITER_KEY") as err:
            client.complete([{"role": "user", "content": "hi"}])
    finally:
        server.close()
    assert SECRET not in str(err.value) and len(server.requests) == 1


@pytest.mark.timeout(30)
def test_unreachable_endpoint_gives_a_clear_error_after_retries():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = OpenAIChatClient(f"http://127.0.0.1:{port}/v1", "m", "UNSET_KEY_VAR", timeout=2, retries=2, backoff=0.01)
    with pytest.raises(ChatClientError, match=rf"127.0.0.1:{port}/v1/chat/completions failed after 3 attempt\(s\): cannot reach"):
        client.complete([{"role": "user", "content": "hi"}])
