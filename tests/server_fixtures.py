"""Module-scoped fixtures for tests that talk to one default server: `server` (a fresh engine
on the tiny Llama served as "tiny-llama"), `client` (the openai client on it) and `offline`
(an LLM on the same model, for reference outputs). Import them into a test module."""

from __future__ import annotations

import pytest
from server_helpers import openai_client, serving

from pagedserve import LLM

MODEL = "tiny-llama"


@pytest.fixture(scope="module")
def server(llama_dir):
    with serving(llama_dir, MODEL) as srv:
        yield srv


@pytest.fixture(scope="module")
def offline(llama_dir):
    return LLM(llama_dir, max_model_len=512)


@pytest.fixture(scope="module")
def client(server):
    with openai_client(server) as c:
        yield c
