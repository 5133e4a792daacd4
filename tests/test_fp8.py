"""FP8 linears (core.tensor_parallel.fp8): the switch's build-time errors, the quantisation helpers, the
fp8 GEMM and its gradients against the high-precision linear, and a tiny GPTModel training in fp8.

torch 2.13's CPU build implements torch._scaled_mm, so the GEMM math and the training check also run on the
CPU (the build-time check is bypassed there); the same checks run on CUDA >= 8.9 under the gpu mark.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch
import torch.nn.functional as F

from core.errors import InputError
from core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
from core.tensor_parallel import layers as tp_layers
from core.tensor_parallel.fp8 import E4M3, E5M2, check_fp8_mode, dequantize, fp8_linear, quantize_tensorwise
from core.transformer.config import TransformerConfig
from core.transformer.model import GPTModel


def _fp8_gpu() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _cpu_scaled_mm() -> bool:
    a = torch.zeros(16, 16, dtype=E4M3)
    try:
        torch._scaled_mm(a, a.t(), torch.tensor(1.0), torch.tensor(1.0), out_dtype=torch.bfloat16)
    except (RuntimeError, NotImplementedError):
        return False
    return True


HAS_TE = importlib.util.find_spec("transformer_engine") is not None
DEVICES = [
    pytest.param(
        "cpu", marks=pytest.mark.skipif(not _cpu_scaled_mm(), reason="this torch has no CPU torch._scaled_mm")
    ),
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(not _fp8_gpu(), reason="needs CUDA compute capability >= 8.9"),
        ],
    ),
]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.fixture
def allow_fp8_here(request, monkeypatch):
    """On the CPU, let the layers take fp8="torch" (the GEMMs then run on CPU torch._scaled_mm)."""
    if request.node.callspec.params["device"] == "cpu":
        monkeypatch.setattr(tp_layers, "check_fp8_mode", lambda mode: None)


# ---- the switch ------------------------------------------------------------------------------------------


@pytest.mark.skipif(_fp8_gpu(), reason="this machine has an fp8 GPU")
@pytest.mark.parametrize("layer", [ColumnParallelLinear, RowParallelLinear])
def test_fp8_torch_without_fp8_gpu_fails_at_build(layer):
    with pytest.raises(InputError, match=r"fp8=torch needs an NVIDIA GPU with compute capability >= 8\.9"):
        layer(64, 64, fp8="torch")


@pytest.mark.skipif(_fp8_gpu(), reason="this machine has an fp8 GPU")
def test_gpt_model_with_fp8_torch_fails_at_build():
    """The config's switch reaches the attention and MLP linears: building the model is what fails."""
    cfg = TransformerConfig(vocab_size=64, hidden_size=64, num_layers=1, num_attention_heads=4, fp8="torch")
    with pytest.raises(InputError, match="compute capability >= 8.9"):
        GPTModel(cfg)


@pytest.mark.skipif(HAS_TE, reason="transformer_engine is installed")
def test_fp8_te_without_transformer_engine_names_the_package():
    with pytest.raises(InputError, match="fp8=te needs the transformer_engine package"):
        ColumnParallelLinear(64, 64, fp8="te")
    cfg = TransformerConfig(vocab_size=64, hidden_size=64, num_layers=1, num_attention_heads=4, fp8="te")
    with pytest.raises(InputError, match="transformer_engine"):
        GPTModel(cfg)


def test_unknown_fp8_mode_is_refused():
    with pytest.raises(InputError, match="fp8 must be one of"):
        check_fp8_mode("e4m3")


# ---- quantisation -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("fp8_dtype", "mantissa_bits"), [(E4M3, 3), (E5M2, 2)])
def test_quantize_round_trip_within_format_precision(fp8_dtype, mantissa_bits):
    """Values within the format's normal range come back within half an ulp: 2^-(m+1) relative
    (6.25% for e4m3, 12.5% for e5m2); amax maps to the format's max, so nothing saturates."""
    g = torch.Generator().manual_seed(0)
    # Magnitudes over 6 binades below amax: all normal numbers after scaling (e4m3 normals span 2^-6..448).
    mag = 2.0 ** (-6 * torch.rand(4096, generator=g)) * 3.0
    sign = torch.where(torch.rand(4096, generator=g) < 0.5, -1.0, 1.0)
    t = (sign * mag).to(torch.bfloat16)
    t_fp8, scale_inv = quantize_tensorwise(t, fp8_dtype)
    assert t_fp8.dtype == fp8_dtype and scale_inv.dtype == torch.float32 and scale_inv.numel() == 1
    assert t_fp8.float().abs().max().item() == torch.finfo(fp8_dtype).max
    back = dequantize(t_fp8, scale_inv)
    rel = ((back - t.float()).abs() / t.float().abs()).max().item()
    assert 0 < rel <= 2.0 ** -(mantissa_bits + 1) * 1.001


def test_quantize_zeros_and_huge_values_stay_finite():
    zeros_fp8, scale_inv = quantize_tensorwise(torch.zeros(32, 32), E4M3)
    assert torch.equal(dequantize(zeros_fp8, scale_inv), torch.zeros(32, 32))
    huge = torch.tensor([1e30, -1e30, 1.0])
    t_fp8, scale_inv = quantize_tensorwise(huge, E5M2)
    back = dequantize(t_fp8, scale_inv)
    assert torch.isfinite(back).all()
    torch.testing.assert_close(back[:2], huge[:2], rtol=0.13, atol=0)


# ---- the fp8 GEMM -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_linear_matches_high_precision_linear(device):
    """Forward and both gradients against the fp32 linear on random data, and against the same math on
    the dequantised fp8 operands (which shows the GEMMs really ran on the quantised values)."""
    g = torch.Generator().manual_seed(0)
    M, K, N = 256, 512, 384
    x = torch.randn(2, M // 2, K, generator=g).to(device, torch.bfloat16).requires_grad_()
    w = (torch.randn(N, K, generator=g) * K**-0.5).to(device, torch.bfloat16).requires_grad_()
    b = torch.randn(N, generator=g).to(device, torch.bfloat16).requires_grad_()
    grad_y = torch.randn(2, M // 2, N, generator=g).to(device, torch.bfloat16)

    y = fp8_linear(x, w, b)
    assert y.shape == (2, M // 2, N) and y.dtype == torch.bfloat16
    y.backward(grad_y)
    x32, w32, b32 = (t.detach().float().requires_grad_() for t in (x, w, b))
    y32 = F.linear(x32, w32, b32)
    y32.backward(grad_y.float())
    assert _rel(y, y32) < 5e-2
    assert _rel(x.grad, x32.grad) < 1e-1
    assert _rel(w.grad, w32.grad) < 1e-1
    torch.testing.assert_close(b.grad.float(), b32.grad, rtol=1e-2, atol=1e-2)

    xq, wq = (dequantize(*quantize_tensorwise(t.detach(), E4M3)) for t in (x, w))
    gq = dequantize(*quantize_tensorwise(grad_y, E5M2))
    assert _rel(y - b, xq @ wq.t()) < 1e-2
    assert _rel(x.grad, gq @ wq) < 1e-2
    assert _rel(w.grad, gq.reshape(M, N).t() @ xq.reshape(M, K)) < 1e-2
    assert _rel(y, y32) > 1e-3  # not the bf16 GEMM


@pytest.mark.parametrize("device", DEVICES)
def test_fp8_linear_falls_back_for_shapes_scaled_mm_cannot_take(device):
    """M = 3 tokens (a decode step) is not a multiple of 16: the plain linear runs, bit for bit."""
    x = torch.randn(3, 64, device=device, dtype=torch.bfloat16)
    w = torch.randn(32, 64, device=device, dtype=torch.bfloat16)
    assert torch.equal(fp8_linear(x, w), F.linear(x, w))


# ---- a tiny model trains in fp8 like in bf16 ------------------------------------------------------------


def _train_losses(fp8: str, device: str, steps: int = 20) -> list[float]:
    cfg = TransformerConfig(
        vocab_size=128, hidden_size=64, num_layers=2, num_attention_heads=4, ffn_hidden_size=128, fp8=fp8
    )
    torch.manual_seed(0)
    model = GPTModel(cfg).to(device, torch.bfloat16)
    fp8_linears = [
        m for m in model.layers.modules() if isinstance(m, (ColumnParallelLinear, RowParallelLinear))
    ]
    assert len(fp8_linears) == 4 * cfg.num_layers and all(m.fp8 == (fp8 != "off") for m in fp8_linears)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg.vocab_size, (2, 33), generator=g).to(device)  # B * T = 64 rows per GEMM
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    optim = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(steps):
        logits = model(inputs)  # (B, T, V)
        loss = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten())
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        losses.append(loss.item())
    return losses


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_tiny_gpt_trains_in_fp8_like_bf16(device, allow_fp8_here):
    """20 AdamW steps on one fixed batch: the fp8 model's loss falls, by within 10% of the bf16 model's
    fall (same init, same data; fp8 adds per-step quantisation noise, it must not stall or diverge)."""
    ref, fp8 = _train_losses("off", device), _train_losses("torch", device)
    assert ref[-1] < 0.7 * ref[0]
    assert abs(fp8[0] - ref[0]) < 0.02 * ref[0]
    drop_ref, drop_fp8 = ref[0] - ref[-1], fp8[0] - fp8[-1]
    assert abs(drop_fp8 - drop_ref) < 0.1 * drop_ref, (ref, fp8)
