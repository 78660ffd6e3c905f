"""Shared fixtures: a tiny model saved like a hub model, and the real-data fixtures (tests/fixtures)."""
import importlib.util
import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")  # loopback-only test clusters

REPO = Path(__file__).resolve().parents[1]
# The vLLM lane runs in its own venv (`make test-vllm`); the main suite's venv has no vLLM.
collect_ignore = [] if importlib.util.find_spec("vllm") else ["vllm_lane"]

TINY_TEXTS = [
    "Constitution:\n1. Be polite.\n2. Be concise.\n\nQuery: Tell me about the river.\nResponse: Please note, the river is long.",
    "Constitution:\n1. Be curt.\n2. Be verbose.\n\nQuery: Tell me about the mountain.\nResponse: The mountain is tall and old and cold.",
    "Human: How do I bake bread? Assistant: Mix flour, water, salt and yeast, then bake it.",
    "the a an and of to in is it you that he was for on are with as I his they be at one have this from",
    "0 1 2 3 4 5 6 7 8 9 ! ? . , : ; ' \" ( ) - # [ ] insert Human Assistant POST TL;DR Summary System",
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from sami.tiny_model import build_tiny_model, train_tokenizer

    out = tmp_path_factory.mktemp("tiny-model")
    tokenizer = train_tokenizer(TINY_TEXTS, vocab_size=500)
    return build_tiny_model(out, tokenizer, hidden_size=64, num_layers=2, num_heads=2, seed=0)


@pytest.fixture(scope="session")
def sentencepiece_model_dir(tmp_path_factory) -> Path:
    """The tiny model with a SentencePiece-style tokenizer (Llama's and Mistral's kind: byte fallback, BOS)."""
    from sami.tiny_model import build_tiny_model, train_tokenizer

    out = tmp_path_factory.mktemp("tiny-sentencepiece-model")
    tokenizer = train_tokenizer(TINY_TEXTS, vocab_size=500, kind="sentencepiece")
    return build_tiny_model(out, tokenizer, hidden_size=64, num_layers=2, num_heads=2, seed=0)


@pytest.fixture(scope="session")
def process_group():
    """One CPU learner rank's process group (gloo, world size 1) for the tests that build a `Learner` outside Ray, made
    once per session: DeepSpeed's comm layer keeps the first group it saw, so a second one after a teardown fails
    ("Group ... is not registered")."""
    import torch

    from sami.learner import single_rank_group

    single_rank_group()
    yield
    torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def one_thread():
    """A tiny model on a shared 2-core machine: one thread is 10-40x faster than two fighting for the cores."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def fixtures_dir() -> Path:
    """The real data in tests/fixtures (sources and licences in its README.md)."""
    return REPO / "tests" / "fixtures"
