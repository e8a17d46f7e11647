"""Test-wide settings. Set before torch starts its OpenMP pool: on a small, shared machine (2 cores, other
processes busy) spinning OpenMP workers starve each other and the suite slows by 10x or more; sleeping
workers cost a little latency per parallel region and nothing else."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    """A tiny random Llama (4096 positions) loaded in float32, shared by the server tests."""
    from gguf_util import tiny_llama, write_gguf
    from infinichat.model.loader import load_model

    d = tmp_path_factory.mktemp("tiny-chat")
    write_gguf(d / "tiny.gguf", tiny_llama(seed=3, max_position_embeddings=4096))
    return load_model(d / "tiny.gguf", "float32", cache_dir=d / "cache")
