"""FP8 linears: per-tensor current scaling through torch._scaled_mm (TransformerConfig.fp8).

Recipe (torchao's Float8Linear with tensorwise scaling; Transformer Engine's Float8CurrentScaling with
Format.HYBRID computes the same thing):
- forward:  y = x @ w^T with x, w quantised to float8_e4m3fn, each with its own scale
  448 / amax(|t|) taken from the tensor itself (current scaling: no amax history, nothing to carry over
  steps). Output in the input's dtype, fp32 accumulation with the fast (fprop) accumulator.
- backward: grad_y is quantised to float8_e5m2 (more range, less precision: gradients span more binades)
  with scale 57344 / amax(|grad_y|), and both GEMMs run in fp8 with full-precision accumulation:
  grad_x = grad_y @ w (e5m2 x e4m3), grad_w = grad_y^T @ x (e5m2 x e4m3). x and w are saved already
  quantised (1 byte per element instead of 2).
Scales are per tensor and per rank: under tensor parallelism each rank's GEMM is local, so its operands'
scales need no communication.

torch._scaled_mm wants its first operand row-major, its second column-major and every GEMM dim a
multiple of 16. The three GEMMs above use all of M (tokens), K (in) and N (out) as a contraction or
output dim, so fp8_linear falls back to the plain F.linear in the input's dtype whenever one of M, K, N
is not a multiple of 16 (e.g. decoding a batch of 3 tokens) or the dtypes are not floating point.

Modes: "off" (F.linear, untouched), "torch" (the recipe above; CUDA compute capability >= 8.9),
"te" (the Transformer Engine switch: refused at build time, naming the package when it is absent and
saying the backend is not implemented when it is present; TE's kernels, fp8 attention and delayed
scaling are not wired in).
"""

from __future__ import annotations

import importlib.util
from typing import Literal

import torch
import torch.nn.functional as F

from core.errors import InputError

Fp8Mode = Literal["off", "torch", "te"]
FP8_MODES: tuple[str, ...] = ("off", "torch", "te")
E4M3 = torch.float8_e4m3fn  # activations and weights: max 448, 3 mantissa bits
E5M2 = torch.float8_e5m2  # gradients: max 57344, 2 mantissa bits
_AMAX_EPS = 1e-12  # amax floor so that an all-zero tensor gets a finite scale
_MIN_CAPABILITY = (8, 9)  # Ada / Hopper and later have fp8 tensor cores
_HP_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_fp8_mode(mode: str) -> None:
    """Raises InputError unless `mode` can run here. Called when a layer is built, so that a model asking
    for fp8 on a machine without it fails at build time, not at the first step."""
    if mode not in FP8_MODES:
        raise InputError(f"fp8 must be one of {FP8_MODES}, got {mode!r}")
    if mode == "off":
        return
    if mode == "te" and importlib.util.find_spec("transformer_engine") is None:
        raise InputError(
            "fp8=te needs the transformer_engine package (pip install transformer-engine[pytorch]), "
            "which is not installed; use fp8=torch for torch._scaled_mm FP8 linears"
        )
    if mode == "te":  # TE cannot be installed on this project's machines, so its kernels are not wired yet
        raise InputError(
            "fp8=te: the Transformer Engine backend is not implemented yet (only the switch exists); "
            "use fp8=torch for torch._scaled_mm FP8 linears"
        )
    capability = torch.cuda.get_device_capability() if torch.cuda.is_available() else None
    if capability is None or capability < _MIN_CAPABILITY:
        found = f"compute capability {capability[0]}.{capability[1]}" if capability else "no CUDA device"
        raise InputError(
            f"fp8={mode} needs an NVIDIA GPU with compute capability >= 8.9 (H100/H200/L40/RTX 4090), "
            f"found {found}; use fp8=off"
        )


def quantize_tensorwise(t: torch.Tensor, fp8_dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """t -> (t_fp8, scale_inv) with t ~= t_fp8.float() * scale_inv. One fp32 scale for the whole tensor,
    chosen so that amax(|t|) maps to the format's largest finite value; values saturate, never overflow."""
    fp8_max = torch.finfo(fp8_dtype).max
    amax = t.detach().abs().amax().float().clamp(min=_AMAX_EPS)
    scale = fp8_max / amax  # fp32 scalar
    t_fp8 = (t.float() * scale).clamp(-fp8_max, fp8_max).to(fp8_dtype)
    return t_fp8, scale.reciprocal()


def dequantize(
    t_fp8: torch.Tensor, scale_inv: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    return (t_fp8.float() * scale_inv).to(dtype)


def scaled_mm_eligible(x2d: torch.Tensor, weight: torch.Tensor) -> bool:
    """True where all three GEMMs of the fp8 linear meet torch._scaled_mm's constraints (dims % 16)."""
    (m, k), n = x2d.shape, weight.shape[0]
    return (
        m % 16 == 0
        and k % 16 == 0
        and n % 16 == 0
        and m > 0
        and x2d.dtype in _HP_DTYPES
        and weight.dtype in _HP_DTYPES
    )


def _col_major(t: torch.Tensor) -> torch.Tensor:
    """Same values, column-major strides (what _scaled_mm wants for its second operand)."""
    return t.t().contiguous().t()


class _Fp8Matmul(torch.autograd.Function):
    """forward: x (M, K) @ w (N, K)^T in e4m3 | backward: grad_x, grad_w with grad_y in e5m2."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        x_fp8, x_scale_inv = quantize_tensorwise(x, E4M3)  # (M, K) row-major
        w_fp8, w_scale_inv = quantize_tensorwise(weight.contiguous(), E4M3)  # (N, K) row-major
        # w_fp8.t() is (K, N) column-major: no copy needed for the forward GEMM.
        y = torch._scaled_mm(
            x_fp8, w_fp8.t(), x_scale_inv, w_scale_inv, out_dtype=x.dtype, use_fast_accum=True
        )  # (M, N)
        ctx.save_for_backward(x_fp8, x_scale_inv, w_fp8, w_scale_inv)
        ctx.dtypes = (x.dtype, weight.dtype)
        return y

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        x_fp8, x_scale_inv, w_fp8, w_scale_inv = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        g_fp8, g_scale_inv = quantize_tensorwise(grad_y.contiguous(), E5M2)  # (M, N) row-major
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch._scaled_mm(
                g_fp8, _col_major(w_fp8), g_scale_inv, w_scale_inv, out_dtype=x_dtype
            )  # (M, N) @ (N, K) -> (M, K)
        if ctx.needs_input_grad[1]:  # skipped for frozen weights (e.g. a reference policy)
            grad_w = torch._scaled_mm(
                g_fp8.t().contiguous(), _col_major(x_fp8), g_scale_inv, x_scale_inv, out_dtype=w_dtype
            )  # (N, M) @ (M, K) -> (N, K)
        return grad_x, grad_w


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias) with the GEMMs in fp8 (module docstring). x (..., K), weight (N, K)
    -> (..., N). Shapes that _scaled_mm cannot take run the plain F.linear instead."""
    x2d = x.reshape(-1, x.shape[-1])  # (M, K)
    if not scaled_mm_eligible(x2d, weight):
        return F.linear(x, weight, bias)
    y = _Fp8Matmul.apply(x2d.contiguous(), weight).view(*x.shape[:-1], weight.shape[0])  # (..., N)
    return y if bias is None else y + bias
