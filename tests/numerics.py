"""Comparing results in the tests: a relative-plus-absolute bound that reports by how much it failed."""

from __future__ import annotations

import torch


def close(got: torch.Tensor | float, want: torch.Tensor | float, tol: float) -> None:
    """|got - want| <= tol * (1 + |want|) elementwise, in float64 (torch.testing.assert_close costs ~9 s of
    lazy imports on its first call)."""
    got64, want64 = torch.as_tensor(got, dtype=torch.float64), torch.as_tensor(want, dtype=torch.float64)
    assert got64.shape == want64.shape, (got64.shape, want64.shape)
    err = (got64 - want64).abs() - tol * (1 + want64.abs())
    assert bool((err <= 0).all()), (
        f"off by {float(err.max()):.3g} beyond the tolerance:\ngot  {got64}\nwant {want64}"
    )
