"""The CUDA paths on the simulated device of tests/simcuda.py (CI has no GPU): the simulation itself refuses what a
GPU refuses; every KV policy, KV format, weight format and decode step gives the CPU run's logits on "cuda" with
no more host syncs per decode step than its design needs; sessions (messages, edits, restore from disk, the
prefix cache) run on it; benchmarks/gpu_check.py's sections run on it end to end.

The sync counts are GPU performance properties checked as counts (a `.item()` per layer would stall a GPU at
every layer); the simulation's timings mean nothing and nothing here measures time."""

from __future__ import annotations

import contextlib
import sys
from pathlib import Path

import pytest
import torch
from simcuda import SimCudaError, SimTensor, simulated_cuda
from test_gpu_paths import CFG, _ids, _weights

from infinichat.engine.sampling import SamplingParams
from infinichat.engine.torch_engine import TorchEngine
from infinichat.kv.registry import POLICIES
from infinichat.model.transformer import Transformer

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="a real GPU is here: the CUDA-marked tests run")


# ---------------------------------------------------------------------------------------------- the simulation
def test_the_simulation_refuses_what_a_gpu_refuses():
    with simulated_cuda() as sim:
        a = torch.ones(3, 4, device="cuda")
        assert isinstance(a, SimTensor) and a.device == torch.device("cuda", 0) and a.is_cuda
        with pytest.raises(SimCudaError, match="same device"):
            a + torch.ones(3, 4)  # a CPU tensor of one or more dimensions
        assert (a * torch.tensor(2.0)).is_cuda  # a CPU 0-dim scalar is allowed, as on CUDA
        assert a[torch.tensor([0, 2])].shape == (2, 4)  # CPU index tensors too
        with pytest.raises(SimCudaError, match="generator"):
            torch.rand(2, generator=torch.Generator().manual_seed(1), device="cuda")
        with pytest.raises(SimCudaError, match="generator"):
            torch.rand(2, generator=torch.Generator(device="cuda"))  # a CUDA generator for a CPU tensor
        with pytest.raises(SimCudaError, match="numpy"):
            a.numpy()
        with pytest.raises(SimCudaError, match="pin"):
            torch.zeros(2, device="cuda", pin_memory=True)
        b = a.cpu()
        b += 1  # `.cpu()` copies: the GPU tensor is unchanged
        assert not b.is_cuda and a.sum().item() == 12.0 and sim.syncs >= 2 and sim.d2h_copies == 1


def test_the_simulation_counts_copies_and_pinned_memory():
    with simulated_cuda() as sim:
        pinned, pageable = torch.zeros(8, pin_memory=True), torch.zeros(8)
        assert pinned.is_pinned() and not pageable.is_pinned() and torch.zeros(2).pin_memory().is_pinned()
        d = torch.empty(8, device="cuda")
        d.copy_(pinned, non_blocking=True)
        assert (sim.h2d_copies, sim.h2d_unpinned_non_blocking) == (1, 0)
        d.copy_(pageable, non_blocking=True)  # from pageable memory: no overlap on a real GPU
        assert (sim.h2d_copies, sim.h2d_unpinned_non_blocking) == (2, 1)
        syncs = sim.syncs
        pinned.copy_(d, non_blocking=True)  # into pinned memory, asynchronous: no sync
        assert sim.syncs == syncs and sim.d2h_copies == 1
        pageable.copy_(d, non_blocking=True)  # into pageable memory: the host waits
        assert sim.syncs == syncs + 1
        before = torch.cuda.memory_allocated()
        big = torch.empty(1000, device="cuda")
        assert torch.cuda.memory_allocated() == before + 4000 and torch.cuda.max_memory_allocated() >= before + 4000
        del big


def test_the_simulation_finds_unordered_stream_and_host_accesses():
    """Two streams touching memory with nothing ordering them, or the host touching pinned memory an asynchronous
    copy may still use: StreamRace; the same with the wait / event / sync in place: fine."""
    from simcuda import StreamRace

    with simulated_cuda():
        side = torch.cuda.Stream()
        buf = torch.zeros(8, device="cuda")  # written on the default stream
        with torch.cuda.stream(side), pytest.raises(StreamRace, match="written on another stream"):
            buf.add_(1)  # with no wait for it
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            buf.add_(1)  # written on the side stream
        with pytest.raises(StreamRace, match="written on another stream"):
            buf.sum()  # read on the default stream with no wait
        ev = torch.cuda.Event()
        with torch.cuda.stream(side):
            buf.add_(1)
            ev.record(side)
        torch.cuda.current_stream().wait_event(ev)
        buf.sum()  # ordered by the event
        with torch.cuda.stream(side):
            with pytest.raises(StreamRace, match="may still read"):
                buf.mul_(2)  # the default stream read it just now: the side stream must wait for it first
            side.wait_stream(torch.cuda.default_stream())
            buf.mul_(2)

        stage = torch.full((8,), 5.0, pin_memory=True)
        side.wait_stream(torch.cuda.default_stream())
        with torch.cuda.stream(side):
            buf.copy_(stage, non_blocking=True)  # host -> device from pinned memory, asynchronous
            done = torch.cuda.Event()
            done.record(side)
        with pytest.raises(StreamRace, match="host writes pinned memory"):
            stage.fill_(3)  # refilled while the copy may still read it
        done.synchronize()
        stage.fill_(3)

        back = torch.empty(8, pin_memory=True)
        torch.cuda.current_stream().wait_stream(side)
        back.copy_(buf, non_blocking=True)  # device -> host, asynchronous
        with pytest.raises(StreamRace, match="host reads pinned memory"):
            back.sum()
        torch.cuda.synchronize()
        assert back.sum().item() == 40.0  # every op a race was raised for did not run


@pytest.mark.parametrize("N,K", [(64, 256), (96, 576)])
def test_the_emulated_cuda_int4_kernel_computes_the_dequantized_product(N, K):
    """Int4Linear on "cuda" packs with the CUDA layout's byte order and calls the CUDA kernel, emulated from its
    contract: equal to the product with Int4Linear's own dequantized weights."""
    from infinichat.model import quant

    g = torch.Generator().manual_seed(N)
    w = torch.randn(N, K, generator=g)
    x = torch.randn(5, K, generator=g).to(torch.bfloat16)
    qw = quant.quantize({"layers.0.wo.weight": w}, "int4", False)
    cpu = quant.QuantLinear.from_tensors(qw, "layers.0.wo")
    assert cpu is not None
    ref = x.float() @ cpu.dense(torch.float32).t()
    with simulated_cuda():
        lin = quant.QuantLinear.from_tensors({n: t.to("cuda") for n, t in qw.items()}, "layers.0.wo")
        assert lin is not None and lin.packed.is_cuda and lin.packed.dtype == torch.int32
        y = lin(x.to("cuda")).float().cpu()
    assert (y - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()


# ---------------------------------------------------------------------------------------------- the engine
# host syncs a decode step may take (the test's own read of the logits aside): the policy's design
SYNCS_PER_STEP = {
    "full": 0,
    "window": 0,
    "streaming": 0,  # an eviction's compaction and re-rotation: indices and rotations uploaded asynchronously
    "turns": 0,
    "recompute": 0,
    "h2o": 1,  # the eviction's choice is made on the host: one read of the scores
    "tova": 1,
    "snapkv": 1,
    "expected_attention": 1,
    "kvzip": 1,
    "omnikv": 0,
    "brutal-offload": 1,  # the flush of the rows written back into pinned host memory
}
FULL_BUDGET = ("full", "omnikv", "brutal-offload", "recompute")


def _run(device: str, policy: str, sim=None, kv: str = "auto", quant: str = "none", step: str = "layers", **kw):
    """Prefill 60 tokens then 10 decode steps; the logits on the CPU and, on the simulation, each step's syncs."""
    model = Transformer(CFG, _weights(), torch.bfloat16, quant, device=device, kernels="torch", step=step)
    eng = TorchEngine(model, kv_dtype=kv)
    budget = 96 if policy in FULL_BUDGET else 40  # the evicting policies evict at every step
    seq = eng.new_sequence(budget=budget, policy=policy, capacity=96, **kw)
    logits = [eng.prefill(seq, _ids(60, 3)).float().cpu()]
    syncs = []
    for tok in _ids(10, 5):
        before = sim.syncs if sim else 0
        out = eng.decode_one(seq, tok)
        syncs.append(sim.syncs - before if sim else 0)
        logits.append(out.float().cpu())
        if sim:
            assert out.is_cuda and (seq.store.device.type == "cuda") != seq.store.pinned  # pinned: host memory
    return logits, syncs, seq


def _check(policy: str, budget_syncs: int, tol: float | None = 1e-6, **kw):
    ref, _, _ = _run("cpu", policy, **kw)
    with simulated_cuda() as sim:
        got, syncs, seq = _run("cuda", policy, sim, **kw)
        assert sim.h2d_unpinned_non_blocking == 0  # every asynchronous upload reads pinned memory
    for a, b in zip(ref, got, strict=True):  # the same arithmetic on the same CPU underneath
        assert tol is None or (a - b).abs().max().item() <= tol * a.abs().max().item()
    assert max(syncs) <= budget_syncs, f"{policy}: host syncs per decode step {syncs}"
    return seq


@pytest.mark.parametrize("policy", sorted(POLICIES))
def test_every_policy_on_cuda_gives_the_cpu_logits_without_extra_syncs(policy):
    seq = _check(policy, SYNCS_PER_STEP[policy])
    if policy not in FULL_BUDGET:
        assert seq.n_evictions > 0  # the decode steps did evict


def test_omnikv_offload_on_cuda_syncs_twice_per_step_and_keeps_its_store_in_pinned_memory():
    """The picked rows' indices come to the host (one sync) and the new rows land in the pinned store at the
    forward call's end (one); the picked rows go up from pinned staging asynchronously."""
    seq = _check("omnikv", 2, offload=True, filter_layers=(1,))
    assert seq.store.pinned


@pytest.mark.parametrize(
    "opts",
    [
        {"kv": "int8"},
        {"kv": "int4"},
        {"kv": "int4h"},
        {"quant": "int8"},
        {"quant": "int4"},
        {"step": "static"},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_kv_formats_weight_formats_and_the_static_step_on_cuda(opts):
    # quantized weights run other arithmetic on the GPU (int8 as a bf16 GEMM, the emulated CUDA int4 kernel, the
    # head dense): test_gpu_paths' test_cuda_quantized_weights[sim-*] checks their logits against float32 models
    # of the dequantized weights; here the device rules and the syncs
    tol = None if "quant" in opts else 1e-6
    _check("streaming" if "kv" in opts else "full", 0, tol, **opts)


def test_batched_prompts_steps_and_sampling_on_cuda_equal_the_cpu():
    """prefill_rows / decode_rows (several sequences in one forward call) and seeded sampling (its generator made
    on the logits' device) give the CPU's logits and tokens."""
    outs = []
    for device in ("cpu", "cuda"):
        with simulated_cuda() if device == "cuda" else contextlib.nullcontext():
            eng = TorchEngine(Transformer(CFG, _weights(), torch.float32, device=device, kernels="torch"))
            seqs = [eng.new_sequence(budget=64) for _ in range(3)]
            first = eng.prefill_rows([(s, torch.tensor(_ids(5 + 7 * i, i))) for i, s in enumerate(seqs)])
            rows = [x for _, x in eng.decode_rows(list(zip(seqs, [1, 2, 3], strict=True)))]
            params = SamplingParams(temperature=0.8, seed=11, max_tokens=6)
            steps = list(eng.generate(eng.new_sequence(budget=64), _ids(9, 4), params))
            outs.append(([x.float().cpu() for x in (*first, *rows)], [(st.token, st.logprob) for st in steps]))
    (rows_a, steps_a), (rows_b, steps_b) = outs
    assert [t for t, _ in steps_a] == [t for t, _ in steps_b] and len(steps_a) > 0
    for a, b in zip(rows_a, rows_b, strict=True):
        assert a.shape == b.shape and (a - b).abs().max().item() <= 1e-5


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.0, max_tokens=8),
        SamplingParams(temperature=0.0, max_tokens=8, top_logprobs=3),
        SamplingParams(temperature=0.9, max_tokens=8, seed=4),
        SamplingParams(max_tokens=8, seed=4, top_k=40, top_p=0.9, min_p=0.05, repetition_penalty=1.1),
    ],
    ids=["greedy", "greedy-logprobs", "seeded", "filtered"],
)
def test_a_generated_token_on_cuda_reads_the_device_once(params):
    """The sampler's numbers for a step (token, its log-probability, the draw's total) come to the host in one
    read, filters and penalties included; the tokens and log-probabilities are the CPU path's (but with filters:
    the GPU draws over the masked vocabulary in vocabulary order, the CPU over its candidates, so the same draw
    may pick another token; test_sampling checks they keep the same tokens). Alternatives cost two more reads."""
    runs = []
    for device in ("cpu", "cuda"):
        with simulated_cuda() if device == "cuda" else contextlib.nullcontext() as sim:
            eng = TorchEngine(Transformer(CFG, _weights(), torch.float32, device=device, kernels="torch"))
            steps = eng.generate(eng.new_sequence(budget=96), _ids(20, 3), params)
            got, syncs = [next(steps)], []
            for _ in range(params.max_tokens - 1):
                before = sim.syncs if sim else 0
                got.append(next(steps))
                syncs.append(sim.syncs - before if sim else 0)
            runs.append((got, syncs))
    (cpu, _), (gpu, syncs) = runs
    if not params.top_k:
        assert [st.token for st in gpu] == [st.token for st in cpu]
        assert [st.logprob for st in gpu] == pytest.approx([st.logprob for st in cpu], abs=1e-5)
    assert all(0 <= st.token < CFG.vocab_size and st.logprob <= 0 for st in gpu)
    assert max(syncs) <= (1 if not params.top_logprobs else 3), syncs


# ---------------------------------------------------------------------------------------------- sessions
def _session_run(model_path: Path, device: str, data: Path) -> tuple[list, list]:
    from infinichat.model.loader import load_model
    from infinichat.session.manager import SessionManager

    m = load_model(model_path, "float32", cache_dir=data / "cache", device=device)
    eng = TorchEngine(m.model, m.tokenizer.eos_ids)
    p = SamplingParams(temperature=0.0, max_tokens=6)
    mgr = SessionManager(eng, m.tokenizer, m.file_hash, data)
    s = mgr.create("a", system_prompt="You are terse.", settings={"budget": 96, "policy": "streaming"})
    for text in ("hello there", "tell me more about the weather in spring", "and then?"):
        list(s.send(text, p))
    list(s.retry(p))
    s.edit(1, "hello again")
    list(s.send("one more", p))
    s.revert_to(3)
    assert s.kv.store.k_all.device.type == (device if device == "cpu" else "cuda")
    logits = s.next_logits().float().cpu()
    transcript = [(x.kind, x.text) for x in s.messages]
    mgr.close()
    # a second manager on the same folder: the session and its KV file come back onto the device
    mgr2 = SessionManager(eng, m.tokenizer, m.file_hash, data)
    s2 = mgr2.get("a")
    assert [(x.kind, x.text) for x in s2.messages] == transcript
    logits2 = s2.next_logits().float().cpu()
    assert (logits - logits2).abs().max().item() <= 1e-5
    b = mgr2.create("b", system_prompt="You are terse.")  # its system part from the prefix cache file
    list(b.send("hello there", p))
    mgr2.close()
    return transcript, [logits, b.next_logits().float().cpu()]


def test_sessions_on_cuda_equal_the_cpu(tmp_path):
    from gguf_util import tiny_llama, write_gguf

    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_llama(seed=3, max_position_embeddings=1024))
    ref = _session_run(path, "cpu", tmp_path / "cpu")
    with simulated_cuda():
        got = _session_run(path, "cuda", tmp_path / "cuda")
    assert got[0] == ref[0]
    for a, b in zip(ref[1], got[1], strict=True):
        assert (a - b).abs().max().item() <= 1e-4 * a.abs().max().item()


# ---------------------------------------------------------------------------------------------- the GPU script
def test_gpu_check_runs_every_section_on_the_simulated_device(tmp_path, monkeypatch):
    """benchmarks/gpu_check.py's dry run with --device cuda: every section but the test run (a subprocess, which
    the CUDA-marked tests' own simulated runs cover) on the CUDA code paths: pinned stores, side stream, peak
    memory, the CUDA int4 kernel. Its figures mean nothing here."""
    import json

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    import gpu_check

    out = tmp_path / "report"
    sections = ["parity", "speed", "quant", "compile", "omnikv"]
    monkeypatch.setattr(sys, "argv", ["gpu_check", "--dry-run", "--device", "cuda", "--out", str(out), "--sections"])
    sys.argv += sections
    with simulated_cuda() as sim:
        rc = gpu_check.main()
    report = json.loads((out / "report.json").read_text())
    assert rc == 0, (out / "report.txt").read_text()
    assert report["meta"]["device"] == "cuda:0" and "simulated" in report["meta"]["device_name"]
    assert [report["sections"][s]["status"] for s in sections] == ["ok"] * 5
    assert sim.h2d_unpinned_non_blocking == 0
    txt = (out / "report.txt").read_text()
    assert "omnikv offload" in txt and "brutal offload" in txt and "| int4 |" in txt


# ---------------------------------------------------------------------------------------------- the server
def _server_scenario(model_path: Path, device: str, data: Path) -> list:
    """The session API, the OpenAI and llama-server APIs and two sessions decoding together (the worker batches
    their steps), greedy: what a client sees, timings and ids left out."""
    import threading

    import httpx
    from server_util import LiveServer, events

    from infinichat.model.loader import load_model

    # the torch kernels on both: the same arithmetic, so the same tokens and log-probabilities
    loaded = load_model(model_path, "float32", cache_dir=data / "cache", device=device, kernels="torch")
    assert loaded.model.device.type == device
    seen: list = []
    greedy = {"temperature": 0.0, "max_tokens": 6, "top_logprobs": 2}
    with LiveServer(loaded, data) as srv, httpx.Client(base_url=srv.url, timeout=120) as c:

        def stream(path: str, body: dict) -> list:
            with c.stream("POST", path, json=body) as r:
                assert r.status_code == 200, r.read()
                return [(k, d.get("text"), _top(d.get("top"))) for k, d in events(r) if k in ("token", "done")]

        for sid, policy in (("a", "h2o"), ("b", "omnikv"), ("c", "streaming"), ("d", "turns")):
            settings = {"temperature": 0, "policy": policy, "budget": 160}
            r = c.post("/api/sessions", json={"id": sid, "system_prompt": "You are terse.", "settings": settings})
            assert r.status_code == 201, r.text
        for text in ("hello there", "tell me about the weather in spring, in detail", "why?"):
            seen.append(stream("/api/sessions/a/messages", {"text": text, "params": greedy}))
        # a seeded draw, without the session's top-k / top-p / min-p (a GPU draws over its masked vocabulary, not the
        # CPU's candidate list: the same seed may pick another token; test_sampling checks the kept sets agree)
        plain = {"seed": 5, "temperature": 1.0, "max_tokens": 5, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
        seen.append(stream("/api/sessions/a/retry", {"params": plain}))
        seen.append(stream("/api/sessions/a/suggest", {"params": {"max_tokens": 4, "temperature": 0}}))
        c.patch("/api/sessions/a/messages/0", json={"text": "hi again"}).raise_for_status()
        kv = c.get("/api/sessions/a/kv").json()
        seen.append((kv["length"], kv["evictions"] > 0, [s["tokens"] for s in kv["segments"]]))
        outs: dict = {}
        threads = [  # two sessions at once: their decode steps may share forward calls (c, d: batchable policies)
            threading.Thread(
                target=lambda s=s: outs.__setitem__(
                    s,
                    stream(
                        f"/api/sessions/{s}/messages",
                        {"text": "count to five", "params": {"temperature": 0, "max_tokens": 12}},
                    ),
                )
            )
            for s in ("c", "d")
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        seen.append([outs.get("c"), outs.get("d")])
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": "x",
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 5,
                "temperature": 0,
                "logprobs": True,
                "top_logprobs": 2,
            },
        )
        assert r.status_code == 200, r.text
        ch = r.json()["choices"][0]
        seen.append((ch["message"]["content"], [(t["token"], t["logprob"]) for t in ch["logprobs"]["content"]]))
        r = c.post("/v1/completions", json={"model": "x", "prompt": "Once upon", "max_tokens": 5, "temperature": 0})
        seen.append(r.json()["choices"][0]["text"])
        r = c.post("/completion", json={"prompt": "Once upon", "n_predict": 4, "temperature": 0, "n_probs": 2})
        seen.append(r.json()["content"])
        metrics = dict(ln.rsplit(" ", 1) for ln in c.get("/metrics").text.splitlines() if ln[:1] not in ("#", ""))
        assert int(metrics["infinichat_kv_peak_bytes"]) > 0 and int(metrics["infinichat_kv_reserved_bytes"]) == 0
    return seen


def _top(top: list | None) -> list | None:
    return None if top is None else [(t["token"], t["logprob"]) for t in top]


def _same(a, b) -> bool:
    """Equal, but floats within 1e-4 (the sampler's CPU and device paths differ in the last float bits)."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-4
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def test_the_server_on_cuda_answers_as_on_the_cpu(tmp_path):
    from gguf_util import tiny_llama, write_gguf

    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_llama(seed=3, max_position_embeddings=1024))
    ref = _server_scenario(path, "cpu", tmp_path / "cpu")
    with simulated_cuda() as sim:
        got = _server_scenario(path, "cuda", tmp_path / "cuda")
    assert sim.ops > 0 and sim.h2d_unpinned_non_blocking == 0
    assert _same(got, ref), (got, ref)


# ---------------------------------------------------------------------------------------------- commands
def test_eval_ppl_on_cuda_gives_the_cpu_perplexities(tiny_gguf_1k, tmp_path, cli_threads):
    """`eval ppl --device cuda` crashed (the targets stayed on the CPU for a gather with the GPU's log-probs)."""
    import json

    from infinichat.cli.main import main

    text = tmp_path / "t.txt"
    text.write_text(" ".join(f"word{i} and some more" for i in range(300)), encoding="utf-8")
    ppl = {}
    for device in ("cpu", "cuda"):
        args = ["eval", "ppl", "--text", str(text), "--policy", "full,streaming,h2o", "--budget", "64"]
        args += ["--chunk", "16", "--tokens", "200", "--out", str(tmp_path / device), "--model", str(tiny_gguf_1k)]
        args += ["--cache-dir", str(tmp_path / "c"), "--device", device, "--dtype", "float32"]
        with simulated_cuda() if device == "cuda" else contextlib.nullcontext():
            assert main(args) == 0
        report = json.loads((tmp_path / device / "ppl.json").read_text())
        assert report["device"] == ("cuda:0" if device == "cuda" else "cpu")
        ppl[device] = [p["ppl_all"] for p in report["policies"]]
    assert ppl["cuda"] == pytest.approx(ppl["cpu"], rel=1e-4)  # the CPU's own kernels against the torch set's


@pytest.mark.parametrize("ev", ["passkey", "multiturn"])
def test_long_evals_on_cuda(ev, tiny_gguf_1k, tmp_path, cli_threads):
    import json

    from infinichat.cli.main import main

    args = ["eval", ev, "--lengths", "500", "--policies", "full,snapkv,omnikv", "--budget-frac", "0.5"]
    args += ["--depths", "0.5"] if ev == "passkey" else ["--turns", "2", "--samples", "1"]
    args += ["--max-new-tokens", "2", "--out", str(tmp_path / ev), "--model", str(tiny_gguf_1k)]
    with simulated_cuda():
        assert main([*args, "--cache-dir", str(tmp_path / "c"), "--device", "cuda"]) == 0
    report = json.loads((tmp_path / ev / f"{ev}.json").read_text())
    assert list(report["summary"]) == ["full", "snapkv 50%", "omnikv 50%"] and report["dtype"].endswith(" on cuda:0")
    assert len(report["results"]) == 3 * (2 if ev == "multiturn" else 1)  # every policy's record(s) scored


# ---------------------------------------------------------------------------------------------- GPU memory
def test_serve_fits_its_kv_memory_defaults_to_the_gpu(tiny_gguf_1k, tmp_path, caplog):
    """On a GPU `serve`'s KV cap and limit default to 45% / 85% of the memory free after the model (1024 MiB /
    twice that on the CPU); given values are kept, with a warning past the free memory; a GPU with no room left
    is one clear error."""
    import logging

    from infinichat.cli.main import build_parser
    from infinichat.errors import InfinichatError
    from infinichat.server.app import kv_memory, make_engine

    def parsed(*extra: str, device: str = "cuda"):
        argv = ["serve", "--model", str(tiny_gguf_1k), "--device", device, "--cache-dir", str(tmp_path / "c")]
        return build_parser().parse_args([*argv, "--dtype", "float32", "--threads", "1", *extra])

    assert kv_memory(parsed(device="cpu"), make_engine(parsed(device="cpu"))[0]) == (1024 << 20, 2048 << 20)
    with simulated_cuda(memory_bytes=600 << 20) as sim:
        engine = make_engine(parsed())[0]
        free = sim.memory_limit - sim.allocated
        assert 0 < sim.allocated < 100 << 20  # the tiny model's weights
        assert kv_memory(parsed(), engine) == (int(free * 0.45), int(free * 0.85))
        assert kv_memory(parsed("--kv-cap-mb", "100"), engine) == (100 << 20, 200 << 20)
        with caplog.at_level(logging.WARNING):
            assert kv_memory(parsed("--kv-limit-mb", "4096"), engine)[1] == 4096 << 20
        assert "more than the" in caplog.text and "MiB free on cuda:0" in caplog.text
        sim.memory_limit = sim.allocated + (1 << 20)  # a card the model fills
        with pytest.raises(InfinichatError, match="no room for KV caches"):
            kv_memory(parsed(), engine)


def test_a_gpu_out_of_memory_is_a_503_and_leaves_the_session_as_it_was(tmp_path):
    """A request that runs the GPU out of memory gets 503 (type out_of_memory) and changes nothing; the server
    and the session go on."""
    import httpx
    from gguf_util import tiny_llama, write_gguf
    from server_util import LiveServer

    from infinichat.model.loader import load_model

    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_llama(seed=3, max_position_embeddings=4096))
    with simulated_cuda() as sim:
        loaded = load_model(path, "float32", cache_dir=tmp_path / "cache", device="cuda")
        with LiveServer(loaded, tmp_path / "data") as srv, httpx.Client(base_url=srv.url, timeout=120) as c:
            params = {"temperature": 0, "max_tokens": 4}

            def send(text: str) -> httpx.Response:  # the reply streams (SSE); an error before it is an HTTP error
                with c.stream("POST", "/api/sessions/s/messages", json={"text": text, "params": params}) as r:
                    r.read()
                    return r

            assert c.post("/api/sessions", json={"id": "s", "settings": {"budget": 4000}}).status_code == 201
            assert send("hello").status_code == 200
            before = c.get("/api/sessions/s").json()
            sim.memory_limit = sim.allocated + (2 << 20)  # 2 MiB left: a 3000-token prompt does not fit
            r = send("word " * 3000)
            assert r.status_code == 503 and r.json()["error"]["type"] == "out_of_memory", r.text
            assert "nothing was changed" in r.json()["error"]["message"] and r.headers["retry-after"]
            assert c.get("/api/sessions/s").json()["messages"] == before["messages"]
            sim.memory_limit = 80 << 30
            assert send("and again").status_code == 200
            assert len(c.get("/api/sessions/s").json()["messages"]) == len(before["messages"]) + 2


@pytest.mark.parametrize("when", ["loading", "prompt"])
def test_a_command_out_of_gpu_memory_says_so_in_one_line(when, tiny_gguf_1k, tmp_path, capsys, cli_threads):
    """Out of GPU memory while loading the weights or while evaluating a prompt: one line, exit 1, no traceback.
    While loading it is not taken for a damaged cache (which was deleted and converted again)."""
    from infinichat.cli.main import main
    from infinichat.model.loader import load_model

    with simulated_cuda() as sim:  # what the model's weights take there
        m = load_model(tiny_gguf_1k, "float32", cache_dir=tmp_path / "c", device="cuda")
        weights = sim.allocated
        del m
    entries = list((tmp_path / "c" / "models").iterdir())
    memory = weights // 2 if when == "loading" else weights + (256 << 10)
    argv = ["generate", "word " * 800, "-n", "2", "--model", str(tiny_gguf_1k), "--cache-dir", str(tmp_path / "c")]
    with simulated_cuda(memory_bytes=memory):
        rc = main([*argv, "--device", "cuda", "--dtype", "float32"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and not ln.startswith("WARNING")]
    assert rc == 1 and len(err) == 1 and "the GPU ran out of memory" in err[0] and "Traceback" not in err[0], err
    assert list((tmp_path / "c" / "models").iterdir()) == entries and all(e.is_dir() for e in entries)


def test_the_terminal_chat_says_out_of_gpu_memory_and_goes_on(tmp_path):
    """`chat` in-process on a GPU: a message that runs it out of memory is one error line, the session is as it
    was, and the next message works."""
    from gguf_util import tiny_llama, write_gguf
    from test_chat_client import Run, texts

    from infinichat.cli.chat_backends import LocalBackend
    from infinichat.model.loader import load_model
    from infinichat.session.manager import SessionManager

    path = tmp_path / "tiny.gguf"
    write_gguf(path, tiny_llama(seed=3, max_position_embeddings=4096))
    with simulated_cuda() as sim:
        m = load_model(path, "float32", cache_dir=tmp_path / "cache", device="cuda")
        eng = TorchEngine(m.model, m.tokenizer.eos_ids)
        b = LocalBackend(SessionManager(eng, m.tokenizer, m.file_hash, tmp_path / "data"), "tiny")
        assert not Run(b, ["Hello", ":exit"], sid="s", given={"budget": 4000}).errors()
        before = texts(b.history())
        sim.memory_limit = sim.allocated + (2 << 20)  # 2 MiB left: a 3000-token message does not fit
        r = Run(b, ["word " * 3000, ":exit"], sid="s")
        assert r.rc == 0 and len(r.errors()) == 1 and "the GPU ran out of memory" in r.errors()[0], r.out
        assert texts(b.history()) == before and "Traceback" not in r.out
        sim.memory_limit = 80 << 30
        assert not Run(b, ["again", ":exit"], sid="s").errors()
        assert [k for k, _ in texts(b.history())] == ["user", "assistant", "user", "assistant"]
        b.close()
