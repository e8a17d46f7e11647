"""The device threaded through: --device on the command line, the model, its KV stores and the engine.

CPU tests run everywhere; `@pytest.mark.cuda` tests run where torch sees a CUDA device (benchmarks/gpu_check.py
runs them on a GPU) and are skipped elsewhere."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infinichat.engine.torch_engine import TorchEngine
from infinichat.errors import DeviceError
from infinichat.kernels import resolve_device
from infinichat.kv.store import KVStore
from infinichat.model.config import ModelConfig
from infinichat.model.transformer import Transformer

REPO = Path(__file__).resolve().parents[1]
CFG = ModelConfig(
    arch="llama", vocab_size=101, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=96, max_position=256
)


def _weights(cfg: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    from infinichat.model.weights import expected_shapes

    g = torch.Generator().manual_seed(seed)
    return {
        n: torch.randn(s, generator=g) * 0.1 + (1.0 if "norm" in n else 0.0) for n, s in expected_shapes(cfg).items()
    }


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "NO_COLOR": "1", "COLUMNS": "250"}
    cmd = [sys.executable, "-m", "infinichat", "generate", "hi", "-n", "1", *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    with pytest.raises(DeviceError, match=r"unknown --device 'tpu'; accepted: auto, cpu, cuda, cuda:N"):
        resolve_device("tpu")
    with pytest.raises(DeviceError, match=r"--device cuda:99"):
        resolve_device("cuda:99")  # no CUDA here, or fewer than 100 devices
    for junk in ("cpu:0", "mps", "meta", "cuda:-1", "cuda:x", "cuda:²"):
        with pytest.raises(DeviceError, match=r"accepted: auto, cpu, cuda, cuda:N"):
            resolve_device(junk)
    with pytest.raises(DeviceError, match=r"--device is empty; accepted: auto"):
        resolve_device(" ")  # was: auto


def test_resolve_device_junk_indexes_on_a_cuda_machine(monkeypatch):
    """Where CUDA is available: an index past the devices is one clear error; "cuda:²" (a digit to isdigit(), no
    int) was a ValueError traceback."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert resolve_device("cuda:1") == torch.device("cuda", 1) and resolve_device("CUDA") == torch.device("cuda", 0)
    with pytest.raises(DeviceError, match=r"--device cuda:99: there are 2 CUDA devices \(cuda:0..cuda:1\)"):
        resolve_device("cuda:99")
    with pytest.raises(DeviceError, match=r"unknown --device 'cuda:²'"):
        resolve_device("cuda:²")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_device_cuda_without_cuda_is_one_clear_line(device):
    run = _cli("--device", device)
    assert "Traceback" not in run.stderr, run.stderr
    assert run.returncode == 2, run.stderr
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("infinichat: error: --device " + device), run.stderr
    assert "no CUDA device" in lines[0] and "--device cpu" in lines[0], lines[0]


def test_device_flag_is_on_every_model_command():
    for cmd in (
        ["generate"],
        ["story"],
        ["chat"],
        ["serve"],
        ["eval", "ppl"],
        ["eval", "passkey"],
        ["eval", "filter-layers"],
        ["bench", "latency"],
    ):
        env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
        out = subprocess.run(
            [sys.executable, "-m", "infinichat", *cmd, "--help"], env=env, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0 and "--device" in out.stdout, (cmd, out.stderr)


def test_kv_store_buffers_live_on_the_models_device():
    model = Transformer(CFG, _weights(CFG), torch.float32, device="cpu", kernels="torch")
    seq = TorchEngine(model).new_cache(32)
    assert seq.store.k_all.device == model.device == seq.store.device
    assert seq.store.fork().device == model.device


# ---------------------------------------------------------------------------------------------- CUDA
def _twins(dtype: torch.dtype = torch.float32):
    w = _weights(CFG)
    return Transformer(CFG, w, dtype, device="cpu", kernels="torch"), Transformer(CFG, w, dtype, device="cuda")


@pytest.mark.cuda
def test_cuda_model_matches_the_cpu_torch_kernels():
    cpu, gpu = _twins()
    assert gpu.kernels.name == "torch" and gpu.embed.device.type == "cuda"
    ids = torch.randint(0, CFG.vocab_size, (20,), generator=torch.Generator().manual_seed(1))
    a, b = TorchEngine(cpu), TorchEngine(gpu)
    sa, sb = a.new_cache(32), b.new_cache(32)
    la, lb = a.prefill(sa, ids.tolist()), b.prefill(sb, ids.tolist())
    assert sb.store.k_all.device.type == "cuda" and lb.device.type == "cuda"
    assert (la - lb.cpu()).abs().max().item() <= 1e-4
    for tok in (3, 5, 7):
        la, lb = a.decode_one(sa, tok), b.decode_one(sb, tok)
        assert (la - lb.cpu()).abs().max().item() <= 1e-4


@pytest.mark.cuda
def test_cuda_kv_operations_match_the_cpu_store():
    """Removal with re-rotation, snapshot / restore and fork on a CUDA store = the same on a CPU store."""
    cpu, gpu = _twins()
    ids = torch.randint(0, CFG.vocab_size, (24,), generator=torch.Generator().manual_seed(2))
    stores = []
    for m in (cpu, gpu):
        st = KVStore(CFG, 32, rope=m.rope, device=m.device)
        m(ids, torch.arange(24), st, 0)
        st.append(ids, torch.arange(24))
        st.remove(4, 9)  # compaction + re-rotation of the 15 keys after the span
        stores.append(st)
    a, b = stores
    assert b.k_all.device.type == "cuda" and a.length == b.length == 19
    assert torch.allclose(a.k_all, b.k_all.cpu(), atol=1e-5) and torch.allclose(a.v_all, b.v_all.cpu(), atol=1e-5)
    c = KVStore(CFG, 32, rope=gpu.rope, device=gpu.device)
    c.load_snapshot(c.decode_snapshot(b.snapshot()))  # bytes through the CPU, back onto the device
    n = b.length  # the live slots: past them the source keeps the rows the removal compacted away
    assert c.k_all.device.type == "cuda" and c.length == n and torch.equal(c.k_all[:, :, :n], b.k_all[:, :, :n])
    assert torch.equal(b.fork().k_all[:, :, :n], b.k_all[:, :, :n])


@pytest.mark.cuda
def test_cuda_batch_gives_each_sequence_its_solo_logits():
    from infinichat.model.transformer import BatchItem

    _, gpu = _twins()
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(0, CFG.vocab_size, (n,), generator=g) for n in (1, 7, 4)]
    solo = [gpu(t, torch.arange(len(t)), KVStore(CFG, 16, device=gpu.device), 0) for t in ids]
    items = [BatchItem(t, torch.arange(len(t)), KVStore(CFG, 16, device=gpu.device), 0) for t in ids]
    for a, b in zip(solo, gpu.forward_batch(items), strict=True):
        assert (a - b).abs().max().item() <= 1e-4


# the commands that run a model outside the engine worker's usual path: the same --device / --compile lines
DEVICE_COMMANDS = [["generate", "hi", "-n", "1"], ["bench", "latency"], ["eval", "filter-layers"]]


def _error_line(capsys, argv: list[str]) -> str:
    from infinichat.cli.main import main

    rc = main(argv)
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and "Traceback" not in lines[0], lines
    return lines[0]


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_and_compile_lines_are_the_same_on_every_command(capsys, tmp_path):
    """--device cuda without CUDA, and --compile on the CPU: each command stops before loading anything with the
    line `generate` gives (the checks are shared: engine/backends.py check_device_options)."""
    never = ["--model", str(tmp_path / "never-loaded.gguf")]
    cuda = {" ".join(c): _error_line(capsys, [*c, *never, "--device", "cuda"]) for c in DEVICE_COMMANDS}
    assert len(set(cuda.values())) == 1, cuda
    line = next(iter(cuda.values()))
    assert line.startswith("infinichat: error: --device cuda: no CUDA device") and "--device cpu" in line
    comp = {" ".join(c): _error_line(capsys, [*c, *never, "--device", "cpu", "--compile"]) for c in DEVICE_COMMANDS}
    assert len(set(comp.values())) == 1, comp
    assert "--compile captures the CUDA decode step" in next(iter(comp.values()))
