"""How close two next-token logit vectors must be, per backend (shared by the engine tests).

torch (float32): 1e-3 on every logit; the same sums chunked differently differ by <= 4e-5.

llama.cpp: its CPU kernels differ by batch shape and even by where a sequence's cells sit in the cache
(measured on the default model: the same 151 tokens give logits up to 0.77 apart when decoded one by one
instead of in a batch, or when the sequence's first cell is not a multiple of 8), so the check is on
the distribution: KL(reference || result) < LLAMA_KL, and the result's top token must be within
LLAMA_TOP of the reference's best logit (in practice the same token). Measured on correct operations:
KL <= 0.005; with one wrong token in the cache: KL 0.4.
"""

from __future__ import annotations

import torch

TORCH_TOL = 1e-3
LLAMA_KL = 0.015
LLAMA_TOP = 1.0


def assert_close(engine, got: torch.Tensor, want: torch.Tensor) -> None:
    from infinichat.engine.torch_engine import TorchEngine

    if isinstance(engine, TorchEngine):
        diff = (got - want).abs().max().item()
        assert diff < TORCH_TOL, diff
        return
    logp, logq = torch.log_softmax(want.double(), -1), torch.log_softmax(got.double(), -1)
    kl = (logp.exp() * (logp - logq)).sum().item()
    assert kl < LLAMA_KL, kl
    assert want[got.argmax()] >= want.max() - LLAMA_TOP, (got.argmax(), want.argmax())
