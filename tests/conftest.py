"""Test-wide settings. Set before torch starts its OpenMP pool: on a small, shared machine (2 cores, other
processes busy) spinning OpenMP workers starve each other and the suite slows by 10x or more; sleeping
workers cost a little latency per parallel region and nothing else.

Engine fixtures on the real default model, loaded once per session: `torch_default_engine` (float32),
`llamacpp_default_engine` (skipped where llama-cpp-python is not installed), and `default_engine`, which
is each of them in turn: a test that takes `default_engine` runs on both backends."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


import pytest


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory):
    """A tiny random Llama (4096 positions) loaded in float32, shared by the server tests."""
    from gguf_util import tiny_llama, write_gguf

    from infinichat.model.loader import load_model

    d = tmp_path_factory.mktemp("tiny-chat")
    write_gguf(d / "tiny.gguf", tiny_llama(seed=3, max_position_embeddings=4096))
    return load_model(d / "tiny.gguf", "float32", cache_dir=d / "cache")


@pytest.fixture(scope="module")
def live(tiny_chat_model, tmp_path_factory):
    """A real server on `tiny_chat_model`, one per test module (server_util.LiveServer); a module that needs
    other options defines its own `live`."""
    from server_util import LiveServer

    with LiveServer(tiny_chat_model, tmp_path_factory.mktemp("data")) as srv:
        yield srv


@pytest.fixture(scope="module")
def oc(live):
    """The OpenAI client on the module's `live` server (skipped where the openai package is not installed)."""
    openai = pytest.importorskip("openai")
    return openai.OpenAI(base_url=live.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def one_torch_thread():
    """For a module's tiny models (`pytestmark = pytest.mark.usefixtures("one_torch_thread")`): they gain nothing
    from threads, and two threads on a busy 2-core machine only contend (spinning, up to ~50x slower)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


BACKENDS = ("torch", "llamacpp")
TEST_THREADS = 1  # llama.cpp's threads busy-wait: on a shared 2-core machine, 2 threads can collapse to ~1 token/s


@pytest.fixture(scope="session")
def torch_default_engine(tmp_path_factory):
    """Our PyTorch engine on the default model, float32 (the reference numerics); loaded once per session."""
    from infinichat.engine.torch_engine import TorchEngine
    from infinichat.model.loader import load_model

    loaded = load_model(None, "float32", cache_dir=tmp_path_factory.mktemp("engine-cache"))
    return TorchEngine(loaded.model, loaded.tokenizer.eos_ids)


@pytest.fixture(scope="session")
def llamacpp_default_engine():
    """The llama.cpp backend on the default model's GGUF file; loaded once per session."""
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (bash scripts/setup.sh --test)")
    from infinichat.engine.llamacpp import load_llamacpp

    _, _, engine = load_llamacpp(None, threads=TEST_THREADS)
    yield engine
    engine.close()


@pytest.fixture(scope="session", params=BACKENDS)
def default_engine(request):
    """An engine on the default model for each backend: parametrize a test over both by using this fixture."""
    return request.getfixturevalue(f"{request.param}_default_engine")


@pytest.fixture(scope="session")
def default_tokenizer():
    from infinichat.model.loader import default_model_path
    from infinichat.model.tokenizer import Tokenizer

    return Tokenizer.from_gguf(default_model_path())


def pytest_generate_tests(metafunc):
    """A `@pytest.mark.cuda` test runs twice: on the real GPU ("gpu", skipped where torch sees none) and on the
    simulated CUDA device of tests/simcuda.py ("sim", CPU compute under CUDA's device rules; skipped where a real
    GPU runs it). `@pytest.mark.cuda(sim="why")` keeps a test off the simulation (what it measures needs the GPU)."""
    marker = metafunc.definition.get_closest_marker("cuda")
    if marker is None:
        return
    import torch

    real = torch.cuda.is_available()
    params = [pytest.param("gpu", marks=() if real else pytest.mark.skip(reason="needs a CUDA device (none here)"))]
    why_not = marker.kwargs.get("sim")
    if why_not is None:
        params.append(pytest.param("sim", marks=pytest.mark.skip(reason="a real GPU runs it") if real else ()))
    metafunc.parametrize("cuda_run", params, indirect=True)


@pytest.fixture(autouse=True)
def cuda_run(request):
    """For `@pytest.mark.cuda` tests: None on the real GPU, the simulation's records (simcuda.SimCuda) on the
    simulated one; None for every other test."""
    if getattr(request, "param", None) != "sim":
        yield None
        return
    from simcuda import simulated_cuda

    with simulated_cuda() as sim:
        yield sim
