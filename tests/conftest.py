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


@pytest.fixture(scope="session")
def tiny_gguf_1k(tmp_path_factory):
    """A tiny random Llama GGUF (byte-level vocabulary, 1024 trained positions) for end-to-end CLI tests."""
    import gguf_util

    path = tmp_path_factory.mktemp("tiny-gguf-1k") / "tiny.gguf"
    gguf_util.write_gguf(path, gguf_util.RandomLlama(max_position_embeddings=1024))
    return path


@pytest.fixture
def cli_threads(monkeypatch):
    """An in-process CLI run sets torch's thread count (--threads): restore it; a wide console for tables."""
    import torch

    monkeypatch.setenv("COLUMNS", "200")
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)
