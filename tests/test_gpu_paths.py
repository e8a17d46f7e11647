"""The CUDA paths of issue 16, run on the CPU where they can be (the same code minus the CUDA-only kernel or
capture), and as `@pytest.mark.cuda` tests (skipped without a GPU; benchmarks/gpu_check.py runs them there):

- int8 / int4 weight-only quantization on the `torch` kernel set (per-row int8 through `torch._weight_int8pack_mm`,
  int4 through PyTorch's int4 kernel: `_for_cpu` here, the CUDA one there), against float32 models of the
  dequantized weights; the CUDA int4 packing's shapes and op signatures traced on fake CUDA tensors;
- the static-shape decode step (kernels/static_step.py) against the layer-by-layer step;
- OmniKV offload (pinned host store, picked rows fetched a layer ahead) against OmniKV without offload.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from infinichat.engine.sampling import SamplingParams
from infinichat.engine.torch_engine import TorchEngine
from infinichat.errors import InfinichatError
from infinichat.kv.offload import RowFetcher
from infinichat.kv.store import KVStore
from infinichat.model import quant
from infinichat.model.config import ModelConfig
from infinichat.model.transformer import Transformer

CFG = ModelConfig(
    arch="llama",
    vocab_size=211,
    dim=128,
    n_layers=4,
    n_heads=4,
    n_kv_heads=2,
    head_dim=32,
    ffn_dim=256,
    max_position=512,
)


def _weights(cfg: ModelConfig = CFG, seed: int = 7) -> dict[str, torch.Tensor]:
    from infinichat.model.weights import expected_shapes

    g = torch.Generator().manual_seed(seed)
    return {
        n: (1 + 0.1 * torch.randn(s, generator=g)) if len(s) == 1 else torch.randn(s, generator=g) * 0.15
        for n, s in expected_shapes(cfg).items()
    }


def _ids(n: int, seed: int) -> list[int]:
    return torch.randint(0, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _dequantized(model: Transformer) -> dict[str, torch.Tensor]:
    """A quantized model's weights as dense float32 (on the CPU): the reference model's weights."""
    out = {"norm.weight": model.norm[0].float().cpu()}
    head = model.lm_head
    # (on a GPU the head is the dense bf16 table: transformer.py)
    dense_head = head.dense(torch.float32) if isinstance(head, quant.QuantLinear) else head.float()
    out["embed.weight" if model.cfg.tie_embeddings else "lm_head.weight"] = dense_head.cpu()
    out["embed.weight"] = model.embed.float().cpu()
    for i, L in enumerate(model.layers):
        for n, t in L.items():
            w = t.dense(torch.float32) if isinstance(t, quant.QuantLinear) else t.float()
            out[f"layers.{i}.{n}"] = w.cpu()
    return out


def _check_quantized(qm: Transformer, kind: type) -> None:
    """Prefill + decode of `qm` against a float32 model of its dequantized weights: the products differ by the
    bf16 activations and the bf16 KV cache only (measured: <= 1.5% of the logits' range)."""
    assert all(isinstance(L["wqkv.weight"], kind) for L in qm.layers)
    ref = TorchEngine(Transformer(CFG, _dequantized(qm), torch.float32, kernels="torch"))
    eq = TorchEngine(qm)
    sq, sr = eq.new_cache(64), ref.new_cache(64)
    ids = _ids(24, seed=1)
    got, want = eq.prefill(sq, ids).cpu(), ref.prefill(sr, ids)
    assert (got - want).abs().max().item() <= 0.05 * want.abs().max().item()
    for tok in _ids(6, seed=2):
        got, want = eq.decode_one(sq, tok).cpu(), ref.decode_one(sr, tok)
        assert (got - want).abs().max().item() <= 0.05 * want.abs().max().item(), tok


# ---------------------------------------------------------------------------------------------- quantization
@pytest.mark.parametrize("mode,kind", [("int8", quant.Int8Linear), ("int4", quant.Int4Linear)])
def test_quantized_weights_on_the_torch_kernels(mode, kind):
    """The torch kernel set (what CUDA runs) takes per-row int8 (PyTorch's kernel; never the CPU-native grouped
    layout) and int4; on the CPU, int4 is the `_for_cpu` variant of the same object."""
    qm = Transformer(CFG, _weights(), torch.bfloat16, quant=mode, kernels="torch")
    assert qm.kernels.name == "torch"
    if mode == "int4":
        assert qm.layers[0]["wqkv.weight"]._kernel is torch.ops.aten._weight_int4pack_mm_for_cpu  # type: ignore[union-attr]
    _check_quantized(qm, kind)


def test_cuda_int4_bytes_put_the_even_input_in_the_high_nibble():
    q = torch.tensor([[1, 2, 15, 0, 7, 8]], dtype=torch.uint8)  # (1, K=6) values in [0, 15]
    ours = quant.pack_nibbles(q)  # even input low
    cuda = quant.cuda_int4_bytes(ours)
    assert cuda.tolist() == [[1 << 4 | 2, 15 << 4 | 0, 7 << 4 | 8]]
    assert torch.equal(quant.cuda_int4_bytes(cuda), ours)  # the swap is its own inverse
    assert [quant.inner_k_tiles(k) for k in (96, 576, 1536, 4096)] == [2, 4, 8, 8]  # K / 16 tiles: 6, 36, 96, 256


@pytest.mark.parametrize("N,K", [(64, 256), (96, 576), (4096, 14336)])
def test_cuda_int4_and_int8_op_signatures_without_a_gpu(N, K):
    """PyTorch's CUDA int4/int8 ops, checked by their meta functions (no GPU needed): the packing call Int4Linear
    makes on CUDA (our nibbles byte-swapped, `inner_k_tiles(K)`) gives the layout `_weight_int4pack_mm` takes with
    the (K/g, N, 2) scales, and the products come out (T, N) bf16. (Fake CUDA tensors cannot run the whole
    constructor on a CPU-only torch: its layout copies need a CUDA device guard.)"""
    from torch._subclasses.fake_tensor import FakeTensorMode

    t = quant.inner_k_tiles(K)
    nib = torch.empty(N, K // 2, dtype=torch.uint8, device="meta")
    packed = torch.ops.aten._convert_weight_to_int4pack(quant.cuda_int4_bytes(nib), t)
    assert tuple(packed.shape) == (N // 8, K // (16 * t), 32, t // 2) and packed.dtype == torch.int32
    with FakeTensorMode():  # tensors made here are fake: shapes, dtypes and devices only
        packed = torch.empty(tuple(packed.shape), dtype=torch.int32, device="cuda")
        sz = torch.empty(K // quant.GROUP, N, 2, dtype=torch.bfloat16, device="cuda")  # Int4Linear.kernel_sz
        x = torch.empty(5, K, dtype=torch.bfloat16, device="cuda")
        y = torch.ops.aten._weight_int4pack_mm(x, packed, quant.GROUP, sz)
        assert y.shape == (5, N) and y.dtype == torch.bfloat16 and y.device.type == "cuda"
        q8 = torch.empty(N, K, dtype=torch.int8, device="cuda")
        y8 = torch._weight_int8pack_mm(x, q8, torch.empty(N, dtype=torch.bfloat16, device="cuda"))
        assert y8.shape == (5, N) and y8.dtype == torch.bfloat16 and y8.device.type == "cuda"


# ---------------------------------------------------------------------------------------------- static step
def test_static_decode_step_equals_the_layer_by_layer_step():
    """float32: the static-shape step (whole-capacity buffers, slot written by index_copy_, masked attention)
    gives the layer-by-layer step's logits (1e-5 of their scale), across a growth of the cache, a revert and a
    second sequence."""
    w = _weights()
    ref = TorchEngine(Transformer(CFG, w, torch.float32, kernels="torch"))
    model = Transformer(CFG, w, torch.float32, kernels="torch", step="static")
    st = TorchEngine(model)
    assert "static decode step" in model.kernels.describe()
    for seed in (3, 4):  # a second sequence binds the step to its own store
        sa, sb = ref.new_cache(300), st.new_cache(300)
        ids = _ids(20, seed)
        ref.prefill(sa, ids), st.prefill(sb, ids)
        for i, tok in enumerate(_ids(12, seed + 10)):
            if i == 6:  # revert three tokens: the mask follows the length
                sa.truncate(sa.length - 3)
                sb.truncate(sb.length - 3)
            a, b = ref.decode_one(sa, tok), st.decode_one(sb, tok)
            assert (a - b).abs().max().item() <= 1e-5 * a.abs().max().item(), (seed, i)
        assert sb.store.allocated == 300  # the static step preallocated the whole capacity
        assert model.kernels.static_step is not None and model.kernels.static_step.static is not None


def test_static_decode_step_in_bfloat16_is_as_close_to_float32_as_the_layer_by_layer_step():
    """bf16 rounds differently over the whole-capacity buffers, so the two bf16 paths differ by bf16 noise
    (measured up to 3% of the logits' scale, where each is up to 8% from float32): the static step's distance
    from float32 stays within 1.25x the layer-by-layer step's, step by step (+1% of the scale)."""
    w = _weights()
    engines = [
        TorchEngine(Transformer(CFG, w, dt, kernels="torch", step=st))
        for dt, st in ((torch.float32, "layers"), (torch.bfloat16, "layers"), (torch.bfloat16, "static"))
    ]
    seqs = [e.new_cache(300) for e in engines]
    for e, s in zip(engines, seqs, strict=True):
        e.prefill(s, _ids(20, 3))
    worst = []
    for tok in _ids(12, 13):
        f32, layers, static = (e.decode_one(s, tok) for e, s in zip(engines, seqs, strict=True))
        scale = f32.abs().max().item()
        worst.append(((static - f32).abs().max().item() / scale, (layers - f32).abs().max().item() / scale))
    assert max(w for w, _ in worst) <= 1.25 * max(r for _, r in worst) + 0.01, worst


def test_static_step_options_are_checked():
    with pytest.raises(InfinichatError, match="unknown decode step 'jit'; accepted: layers, static, compiled"):
        Transformer(CFG, _weights(), torch.float32, kernels="torch", step="jit")
    with pytest.raises(InfinichatError, match="--compile captures the torch kernel set's decode step"):
        Transformer(CFG, _weights(), torch.float32, kernels="cpu-native", step="compiled")


# ---------------------------------------------------------------------------------------------- OmniKV offload
def _omni(engine: TorchEngine, offload: bool):
    return engine.new_sequence(budget=400, policy="omnikv", filter_layers=(0, 2), k=12, offload=offload)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_omnikv_offload_equals_omnikv_resident(dtype):
    """Offloaded OmniKV (picked rows fetched from the host store a layer ahead) against OmniKV with the cache
    resident: the same logits at every step and the same greedy tokens."""
    engine = TorchEngine(Transformer(CFG, _weights(), dtype, kernels="torch"), eos_ids=())
    prompt = _ids(120, seed=5)
    runs = {}
    for offload in (False, True):
        seq = _omni(engine, offload)
        steps = engine.generate(seq, prompt, SamplingParams(temperature=0, max_tokens=16))
        runs[offload] = ([s.token for s in steps], seq)
    assert runs[False][0] == runs[True][0]
    seqs = [runs[False][1], runs[True][1]]
    follow = _ids(5, seed=6)
    a = torch.stack([engine.decode_one(seqs[0], t) for t in follow])
    b = torch.stack([engine.decode_one(seqs[1], t) for t in follow])
    assert (a - b).abs().max().item() <= 1e-6 * a.abs().max().item()
    req = seqs[1].policy.last_request
    assert req.fetch is not None and req.moved_bytes > 0 and set(req.resident) == {0, 2}


def test_row_fetcher_hands_over_the_picked_rows_one_layer_ahead():
    store = KVStore(CFG, 64)
    store.k_all.copy_(torch.randn(store.k_all.shape))
    store.v_all.copy_(torch.randn(store.v_all.shape))
    f = RowFetcher(torch.device("cpu"))
    slots = torch.tensor([0, 3, 9, 40])
    f.plan(store, [1, 3], slots)
    assert set(f.ready) == {1} and set(f.pending) == {3}  # the first served layer starts at once
    k, v = f.take(1)
    assert set(f.ready) == {3} and not f.pending  # taking layer 1 started layer 3
    assert torch.equal(k, store.k[1][:, slots]) and torch.equal(v, store.v[1][:, slots])
    k3, _ = f.take(3)
    assert torch.equal(k3, store.k[3][:, slots])
    assert f.moved == 2 * 2 * 4 * CFG.n_kv_heads * CFG.head_dim * 4


class FakePinning:
    """Stands in for page-locked memory on a CPU-only torch (where pinning raises): `kv.store`'s pinned_zeros / pin
    / is_pinned, the store's only ways to it. A "pinned" tensor is one whose storage came from here (kept alive, so
    no other tensor reuses its address)."""

    def __init__(self) -> None:
        self.held: list[torch.UntypedStorage] = []

    def _hold(self, t: torch.Tensor) -> torch.Tensor:
        self.held.append(t.untyped_storage())
        return t

    def zeros(self, shape, dtype):
        return self._hold(torch.zeros(shape, dtype=dtype))

    def pin(self, t):
        return self._hold(t.clone())

    def is_pinned(self, t) -> bool:
        ptr = t.untyped_storage().data_ptr()
        return any(s.data_ptr() == ptr for s in self.held)


@pytest.fixture
def fake_pinning(monkeypatch):
    from infinichat.kv import store as store_mod

    fake = FakePinning()
    monkeypatch.setattr(store_mod, "pinned_zeros", fake.zeros)
    monkeypatch.setattr(store_mod, "pin", fake.pin)
    monkeypatch.setattr(store_mod, "is_pinned", fake.is_pinned)
    return fake


def test_a_fork_of_a_pinned_store_is_pinned_and_independent(fake_pinning):
    src = KVStore(CFG, 300, initial=8)
    src.pin_host_memory()
    assert fake_pinning.is_pinned(src.k_all) and src.allocated == 300  # the whole capacity, pinned
    src.next_positions(40)  # slots [0, 40)
    src._load_slots(torch.arange(40), torch.arange(40))
    src.k_all[:, :, :40].copy_(torch.randn(src.k_all[:, :, :40].shape))
    src.v_all[:, :, :40].copy_(torch.randn(src.v_all[:, :, :40].shape))
    fork = src.fork()
    assert fork.pinned and fake_pinning.is_pinned(fork.k_all) and fake_pinning.is_pinned(fork.v_all)
    assert all(fake_pinning.is_pinned(t) for t in (*fork.k, *fork.v))  # the forward's per-layer views too
    assert fork.allocated == 300 and fork.length == 40
    assert torch.equal(fork.k_all[:, :, :40], src.k_all[:, :, :40]) and torch.equal(fork.tokens[:40], torch.arange(40))
    assert fork.k_all.untyped_storage().data_ptr() != src.k_all.untyped_storage().data_ptr()
    fork.k_all.zero_()
    assert src.k_all[:, :, :40].abs().sum() > 0  # no shared storage
    plain = KVStore(CFG, 300, initial=8)
    assert not plain.fork().pinned and not fake_pinning.is_pinned(plain.fork().k_all)  # unpinned stays unpinned


def test_pinned_store_copies_stay_pinned(fake_pinning):
    """Growth, snapshot restore and a dense conversion of a pinned store: still page-locked."""
    from infinichat.kv.quantized import convert_store

    src = KVStore(CFG, 300, dtype=torch.bfloat16, initial=8)
    src.pin_host_memory()
    src.next_positions(20)
    src._load_slots(torch.arange(20), torch.arange(20))
    other = KVStore(CFG, 300, dtype=torch.bfloat16, initial=8)
    other.pin_host_memory()
    other.load_snapshot(other.decode_snapshot(src.snapshot()))
    assert fake_pinning.is_pinned(other.k_all) and other.length == 20
    conv = convert_store(src, "f16")
    assert conv.pinned and fake_pinning.is_pinned(conv.k_all) and conv.k_all.dtype == torch.float16


def test_a_fork_of_an_offloaded_omnikv_sequence(fake_pinning):
    """The engine's fork of an OmniKV-offload sequence whose store is pinned (as on CUDA): the fork's store is
    pinned, its policy brings no mirrors or row fetcher along (their CUDA stream could not be copied: a stand-in
    stream here refuses it too), and both sequences go on decoding the same logits."""
    engine = TorchEngine(Transformer(CFG, _weights(), torch.float32, kernels="torch"), eos_ids=())
    seq = _omni(engine, offload=True)
    seq.store.pin_host_memory()  # what the engine does for a model on CUDA
    list(engine.generate(seq, _ids(120, seed=5), SamplingParams(temperature=0, max_tokens=4)))
    assert seq.policy._fetcher is not None and seq.policy._mirrors is not None
    seq.policy._fetcher.stream = torch.Stream("cpu")  # a device stream: copy.deepcopy cannot copy one
    fork = seq.fork()
    assert fork.store.pinned and fake_pinning.is_pinned(fork.store.k_all)
    assert fork.policy._fetcher is None and fork.policy._mirrors is None
    assert fork.policy._decode_start == seq.policy._decode_start and fork.policy.offload
    seq.policy._fetcher.stream = None
    for tok in _ids(4, seed=9):
        a, b = engine.decode_one(seq, tok), engine.decode_one(fork, tok)
        assert torch.equal(a, b), tok
    assert fork.policy._mirrors is not None and fork.policy._mirrors.store_id == id(fork.store)


# ---------------------------------------------------------------------------------------------- CUDA
@pytest.mark.cuda
@pytest.mark.parametrize("mode,kind", [("int8", quant.Int8Linear), ("int4", quant.Int4Linear)])
def test_cuda_quantized_weights(mode, kind):
    qm = Transformer(CFG, _weights(), torch.bfloat16, quant=mode, device="cuda")
    assert qm.kernels.name == "torch" and qm.layers[0]["wqkv.weight"].nbytes > 0  # type: ignore[union-attr]
    assert isinstance(qm.lm_head, torch.Tensor) and qm.lm_head.dtype == torch.bfloat16 and qm.head_exact is None
    if mode == "int4":
        assert qm.layers[0]["wqkv.weight"]._kernel is torch.ops.aten._weight_int4pack_mm  # type: ignore[union-attr]
    _check_quantized(qm, kind)


@pytest.mark.cuda
@pytest.mark.parametrize("N,K,T", [(64, 256, 1), (96, 576, 5), (256, 1536, 17)])
def test_cuda_int4_kernel_equals_the_cpu_kernel(N, K, T):
    nib, sz = quant.quantize_int4(torch.randn(N, K) * 0.1)
    x = torch.randn(T, K).bfloat16()
    cpu = quant.Int4Linear(nib, sz)(x).float()
    gpu = quant.Int4Linear(nib.cuda(), sz.cuda())(x.cuda()).float().cpu()
    ref = x.double() @ quant.Int4Linear(nib, sz).dense(torch.float64).T
    scale = ref.abs().max().item()
    assert (gpu - cpu).abs().max().item() <= 2e-2 * scale  # both round to bf16; the CUDA one dequantizes in bf16
    assert (gpu.double() - ref).abs().max().item() <= 2e-2 * scale


@pytest.mark.cuda
@pytest.mark.parametrize("step", ["static", "compiled"])
def test_cuda_static_and_compiled_steps_equal_the_layer_by_layer_step(step, cuda_run):
    if cuda_run is not None and step == "compiled":
        pytest.skip("torch.compile / CUDA graphs are not simulated (tests/simcuda.py): the real GPU run checks it")
    w = _weights()
    ref = TorchEngine(Transformer(CFG, w, torch.bfloat16, device="cuda"))
    st = TorchEngine(Transformer(CFG, w, torch.bfloat16, device="cuda", step=step))
    sa, sb = ref.new_cache(128), st.new_cache(128)
    ids = _ids(20, seed=3)
    ref.prefill(sa, ids), st.prefill(sb, ids)
    for tok in _ids(10, seed=13):
        a, b = ref.decode_one(sa, tok), st.decode_one(sb, tok)
        assert (a - b).abs().max().item() <= 3e-2 * a.abs().max().item()


@pytest.mark.cuda
def test_cuda_omnikv_offload_pins_the_store_and_equals_resident():
    engine = TorchEngine(Transformer(CFG, _weights(), torch.bfloat16, device="cuda"), eos_ids=())
    prompt = _ids(120, seed=5)
    runs = {}
    for offload in (False, True):
        seq = _omni(engine, offload)
        runs[offload] = (
            [s.token for s in engine.generate(seq, prompt, SamplingParams(temperature=0, max_tokens=16))],
            seq,
        )
    assert runs[False][0] == runs[True][0]
    off = runs[True][1]
    assert off.store.k_all.device.type == "cpu" and off.store.k_all.is_pinned()
    assert off.policy._fetcher.stream is not None
    mirrors = off.policy._mirrors
    assert mirrors.layers == (0, 2) and all(t.device.type == "cuda" for t in mirrors.k.values())  # 2 of 4 layers


def test_compile_without_cuda_is_one_clear_line():
    if torch.cuda.is_available():
        return
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo / "src"), "NO_COLOR": "1", "COLUMNS": "250"}
    cmd = [sys.executable, "-m", "infinichat", "generate", "hi", "-n", "1", "--device", "cpu", "--compile"]
    run = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=120)
    lines = [ln for ln in run.stderr.splitlines() if ln.strip()]
    assert run.returncode == 2 and len(lines) == 1 and "--compile captures the CUDA decode step" in lines[0], run.stderr


@pytest.mark.cuda
def test_cuda_brutal_offload_equals_full():
    """Whole offloaded layers from pinned host memory (rows staged asynchronously, placed after each call) give
    full attention's logits."""
    engine = TorchEngine(Transformer(CFG, _weights(), torch.float32, device="cuda"), eos_ids=())
    prompt, follow = _ids(120, seed=7), _ids(6, seed=8)
    full = engine.new_sequence(budget=400)
    brutal = engine.new_sequence(budget=400, policy="brutal-offload", filter_layers=(1,))
    for s in (full, brutal):
        engine.prefill(s, prompt)
    assert brutal.store.k_all.is_pinned() and not brutal.store._pending
    for tok in follow:
        a, b = engine.decode_one(full, tok), engine.decode_one(brutal, tok)
        assert (a - b).abs().max().item() <= 1e-4 * a.abs().max().item()
    placed, want = brutal.store.k_all[:, :, : brutal.length].cuda(), full.store.k_all[:, :, : full.length]
    assert (placed - want).abs().max().item() <= 1e-4 * want.abs().max().item()  # every staged row landed


@pytest.mark.cuda
def test_cuda_fork_of_an_offloaded_omnikv_sequence_is_pinned_and_decodes_the_same():
    engine = TorchEngine(Transformer(CFG, _weights(), torch.bfloat16, device="cuda"), eos_ids=())
    seq = _omni(engine, offload=True)
    list(engine.generate(seq, _ids(120, seed=5), SamplingParams(temperature=0, max_tokens=4)))
    fork = seq.fork()  # the source's fetcher holds a CUDA stream and events
    assert seq.store.k_all.is_pinned() and fork.store.k_all.is_pinned() and fork.store.k[0].is_pinned()
    assert fork.store.k_all.data_ptr() != seq.store.k_all.data_ptr()
    for tok in _ids(4, seed=9):
        a, b = engine.decode_one(seq, tok), engine.decode_one(fork, tok)
        assert (a - b).abs().max().item() <= 1e-6 * a.abs().max().item(), tok
    assert fork.policy._fetcher.stream is not None and fork.policy._fetcher is not seq.policy._fetcher
