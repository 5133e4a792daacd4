"""Dynamic loss scaling for fp16 training (bf16 and fp32 need none).

fp16 gradients underflow without scaling: the loss is multiplied by `scale` before backward, the fp32
main_grads are divided by it before clipping and the step. If any rank finds an inf/nan, every rank
skips the step (the decision is all-reduced, so model replicas never diverge) and the scale backs off;
after `growth_interval` consecutive clean steps it grows again.

    loss = scaler.scale_loss(loss); loss.backward() ...; ddp.finish_grad_sync()
    found_inf = scaler.unscale_(optimizer.main_grads(), [groups.mp_group, groups.dp_cp_group])
    scaler.update(found_inf)
    if not found_inf: clip, optimizer.step()
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.distributed as dist

from core.distributed.buffers import group_size


class DynamicGradScaler:
    def __init__(
        self,
        initial_scale: float = 2.0**16,
        *,
        min_scale: float = 1.0,
        growth_factor: float = 2.0,
        backoff_factor: float = 0.5,
        growth_interval: int = 1000,
    ):
        if not (growth_factor > 1.0 and 0.0 < backoff_factor < 1.0 and growth_interval >= 1):
            raise ValueError("need growth_factor > 1, 0 < backoff_factor < 1 and growth_interval >= 1")
        self.scale = float(initial_scale)
        self.min_scale = min_scale
        self.growth_factor = growth_factor
        self.backoff_factor = backoff_factor
        self.growth_interval = growth_interval
        self.clean_steps = 0  # consecutive steps without inf/nan since the last scale change

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale

    @torch.no_grad()
    def unscale_(
        self, grads: Iterable[torch.Tensor], groups: Sequence[dist.ProcessGroup | None] = ()
    ) -> bool:
        """Divide grads by the scale in place; True if any grad on any rank of `groups` is inf/nan.

        `groups` must together span every rank whose grads differ from this rank's, e.g.
        [mp_group, dp_cp_group] (tp x pp, then dp x cp: the whole world); they are reduced in order.
        """
        grads = list(grads)
        device = grads[0].device if grads else torch.device("cpu")
        found_inf = torch.zeros(1, dtype=torch.float32, device=device)
        inv_scale = torch.full((1,), 1.0 / self.scale, dtype=torch.float32, device=device)
        for dtype in {g.dtype for g in grads}:
            same_dtype = [g for g in grads if g.dtype == dtype]
            torch._amp_foreach_non_finite_check_and_unscale_(same_dtype, found_inf, inv_scale)
        for group in groups:
            if group_size(group) > 1:
                dist.all_reduce(found_inf, op=dist.ReduceOp.MAX, group=group)
        return bool(found_inf.item())

    def update(self, found_inf: bool) -> None:
        """Back off on overflow (the step is skipped); grow after growth_interval clean steps."""
        if found_inf:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.clean_steps = 0
            return
        self.clean_steps += 1
        if self.clean_steps == self.growth_interval:
            self.scale *= self.growth_factor
            self.clean_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "clean_steps": self.clean_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale = float(state["scale"])
        self.clean_steps = int(state["clean_steps"])
