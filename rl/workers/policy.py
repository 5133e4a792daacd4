"""Policy and reference workers: one rank of a training layout hosting an algorithms.policy.PolicyModel.

Every rank of the group is called together (WorkerGroup dispatch "dp" for batches, "all" otherwise): a
batch reaches the ranks of its dp shard, PolicyModel runs the collectives, the output ranks' results go
back. The worker adds only what a remote process needs around the model: the LR schedule (stepped after
each optimizer step and checkpointed next to the model), checkpoint paths, and the two ways its weights
reach a generation engine:
- colocated (spec.engine): a NativeEngine on the rank's own model chunk (no copy, tp ranks generate
  SPMD); `use_current_weights(version)` records the version after an optimizer step;
- disaggregated: `send_weights(version)` streams hf_weights() over a weight sender held by rank 0 (a
  rollout.transport one, or rl.cluster.object_store_transport's; the other ranks drive their part of
  the tp/pp gathers) to the engine workers' receivers.

Checkpoint layout (the same as algorithms.inprocess_policy, so a run resumes in either): path/model (a
torch.distributed.checkpoint directory, any layout) and path/schedule.pt (the LR schedule, rank 0).
"""

from __future__ import annotations

from typing import Any

import torch

from algorithms.policy import PolicyModel
from rl.cluster.worker import Worker
from rl.workers.generation import EngineHostMixin, build_native_engine
from rl.workers.specs import PolicySpec
from rl.workers.trainable import TrainedModelMixin


def build_policy_model(spec: PolicySpec, groups: Any, device: torch.device) -> PolicyModel:
    """The rank's PolicyModel from the full initial weights (every rank reads them, keeps its shard)."""
    from algorithms.rl_inputs import load_init_model, resolve_init
    from core.utils.device import param_dtype

    torch.manual_seed(spec.seed)
    full = load_init_model(resolve_init(spec.init_from))
    return PolicyModel.build(
        full.config,
        full.state_dict(),
        groups,
        loss=spec.loss,
        optim=spec.optim,
        micro_batch_size=spec.micro_batch_size,
        parallel=spec.parallel,
        device=device,
        param_dtype=param_dtype(spec.precision, device),
        temperature=spec.temperature,
        compile_layers=spec.compile_layers,
        lora=spec.lora,
    )


class ReferenceWorker(Worker):
    """A frozen copy of the initial policy: logprobs only."""

    role = "reference"

    def __init__(self, spec: PolicySpec) -> None:
        self.spec = spec
        self.model: PolicyModel | None = None

    def setup(self) -> None:
        self.model = None  # a restart rebuilds on the new groups
        self.model = build_policy_model(self.spec, self.groups, self.device)

    def logprobs(self, batch: dict[str, torch.Tensor], with_entropy: bool = False) -> dict[str, torch.Tensor]:
        return self.model.logprobs(batch, with_entropy)

    def base_logprobs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """LoRA: the base model's logprobs (adapters disabled), the reference without a second copy."""
        return self.model.base_logprobs(batch)


class PolicyWorker(EngineHostMixin, TrainedModelMixin, ReferenceWorker):
    """The trained policy: logprobs, train (one optimizer step + LR schedule step), save / load, weights
    out for refit and export, and (spec.engine set) colocated generation on its own parameters."""

    role = "policy"

    def __init__(self, spec: PolicySpec) -> None:
        super().__init__(spec)
        self.scheduler: Any = None
        self.engine = None
        self._sender: Any = None

    def setup(self) -> None:
        from algorithms.schedules import build_scheduler

        self.close_weight_sender()
        self.engine = None
        super().setup()
        if self.spec.quantize is not None:  # QAT: before the engine and any checkpoint load
            from algorithms.qat import quantize_policy

            quantize_policy(self.model, self.spec.quantize.format, self.spec.calibration_prompts)
        self.scheduler = build_scheduler(
            self.model.engine.optimizer, self.spec.total_optimizer_steps, self.spec.optim
        )
        if self.spec.engine is not None:
            self.engine = build_native_engine(self.spec.engine, self.model.engine.chunks[0])

    # ---- training (train / save / load: TrainedModelMixin) ------------------------------------------

    def model_config(self) -> Any:
        return self.model.config

    def save_adapter(self, path: str, lora: Any) -> None:
        """PEFT-format adapters (collective; rank 0 writes)."""
        self.model.save_adapter(path, lora)

    # ---- weights out ----------------------------------------------------------------------------------

    def hf_state(self) -> dict[str, torch.Tensor] | None:
        """The whole model, HF names, on rank 0 (None elsewhere). Collective; one full copy in memory:
        for export and small models; refit streams instead (send_weights)."""
        state = {name: tensor.detach().cpu().clone() for name, tensor in self.model.hf_weights()}
        return state if self.rank == 0 else None

    def quantizer_state(self) -> dict[str, torch.Tensor]:
        """QAT: every quantizer buffer by module name, on the CPU ({} without quantizers)."""
        from algorithms.qat import quantizer_state

        return {k: v.detach().cpu().clone() for k, v in quantizer_state(self.model.engine.chunks).items()}

    def use_current_weights(self, version: int) -> int:
        """Colocated refit: the engine already reads the trained parameters; record the version."""
        self.engine.use_model(self.model.engine.chunks[0], version=version)
        return version

    def open_weight_sender(
        self, num_receivers: int, transport: str, timeout_s: float, bucket_bytes: int = 256 << 20
    ) -> Any:
        """Rank 0: a weight sender for `num_receivers` engine workers; returns the address they connect
        to. transport: "process_group" (gloo on CPU, NCCL on GPU; any hosts), "shared_memory" (same
        host: /dev/shm on CPU, CUDA IPC on GPU, the colocated case where NCCL cannot pair two processes
        on one GPU) or "object_store" (the Ray object store, any hosts, at most 2 buckets alive in it).
        bucket_bytes bounds what is shipped at once."""
        from datetime import timedelta

        from rollout.transport import ProcessGroupSender, SharedMemorySender

        self.close_weight_sender()
        timeout = timedelta(seconds=timeout_s)
        if transport == "shared_memory":
            self._sender = SharedMemorySender(num_receivers, device=self.device, bucket_bytes=bucket_bytes)
        elif transport == "object_store":
            from rl.cluster.object_store_transport import ObjectStoreSender

            self._sender = ObjectStoreSender(num_receivers, bucket_bytes=bucket_bytes, timeout=timeout)
        elif transport == "process_group":
            import ray

            backend = "nccl" if self.device.type == "cuda" else "gloo"
            host = ray.util.get_node_ip_address()
            self._sender = ProcessGroupSender(
                num_receivers, host=host, backend=backend, bucket_bytes=bucket_bytes, timeout=timeout
            )
        else:
            raise ValueError(
                f"weight transport {transport!r}: expected process_group, shared_memory or object_store"
            )
        return self._sender.address

    def send_weights(self, version: int) -> int:
        """Collective over the policy ranks, concurrent with the engine workers' receive_weights."""
        from rollout.transport import send_weights

        send_weights(self._sender, self.model.refit_weights(), version)
        return version

    def close_weight_sender(self) -> None:
        if getattr(self, "_sender", None) is not None:
            self._sender.close()
        self._sender = None
