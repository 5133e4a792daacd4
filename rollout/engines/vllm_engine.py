"""`GenerationEngine` over vLLM's offline engine (`vllm.LLM`), in-process or multi-process.

Logprobs: vLLM runs with logprobs_mode="raw_logprobs", so `Sample.logprobs[i]` is
log_softmax(model logits)[token_ids[i]] at temperature 1, before temperature, top-k/top-p and
penalties -- the quantity the trainer recomputes for importance ratios, whatever temperature the
sample was drawn at. Pass logprobs_mode="processed_logprobs" to get the logprobs of the
distribution actually sampled from instead.

Streaming is real: requests go into vLLM's `LLMEngine` and we step it ourselves, handing each
request out as soon as it finishes (vLLM's continuous batching keeps the others running).

Refit: in-process, the weight iterator goes straight to the driver worker's
`reload_weights(weights_iterator=...)` (vLLM re-runs its per-layer weight processing, e.g. the CPU
backend's repacking; a plain `model.load_weights` would skip that). Multi-process workers cannot
receive tensors through `collective_rpc`, so the weights are written as safetensors shards to a
directory owned by the engine and the workers `reload_weights(weights_path=...)` from it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from core.errors import InputError
from rollout.engines.base import EmitSamples, GenerationEngine, WeightUpdateRejected
from rollout.refit import iter_buckets
from rollout.types import GenerationRequest, Sample, SamplingParams

LogprobsMode = Literal["raw_logprobs", "processed_logprobs"]

# Checkpoint tensors vLLM recomputes instead of loading: a refit need not send them.
_NOT_LOADED_SUFFIXES = ("rotary_emb.inv_freq",)


class VLLMEngine(GenerationEngine):
    """vLLM generation engine on an HF checkpoint directory (config, safetensors, tokenizer).

    in_process=True runs vLLM in this process (`distributed_executor_backend="uni"`): ~5 s to
    start, tensor_parallel_size 1 only, but it seeds nothing of ours (we restore the global RNG)
    and makes `torch.set_num_threads` a no-op for the process. in_process=False runs the engine
    core and workers in child processes (needed for tensor_parallel_size > 1). On CPU, vLLM binds
    each TP worker's threads to a NUMA node of its own and refuses TP > NUMA nodes; unless
    VLLM_CPU_OMP_THREADS_BIND is set, we then split this process's CPUs between the workers instead
    (TP needs at least one CPU per worker).
    kv_cache_gib sizes the KV cache explicitly (required on CPU); None leaves it to
    gpu_memory_utilization (GPU). The environment variable VLLM_CPU_KVCACHE_SPACE, when set,
    overrides kv_cache_gib on CPU.
    """

    def __init__(
        self,
        model_dir: str | os.PathLike[str],
        *,
        tensor_parallel_size: int = 1,
        dtype: str = "float32",
        max_model_len: int | None = None,
        kv_cache_gib: float | None = 0.25,
        in_process: bool = True,
        seed: int = 0,
        enforce_eager: bool = True,
        gpu_memory_utilization: float = 0.9,
        logprobs_mode: LogprobsMode = "raw_logprobs",
        enable_sleep_mode: bool = False,
    ) -> None:
        super().__init__()
        self._model_dir = _checked_model_dir(model_dir)
        if tensor_parallel_size < 1 or (in_process and tensor_parallel_size > 1):
            raise InputError(
                f"tensor_parallel_size={tensor_parallel_size}: must be >= 1, and 1 when in_process=True "
                "(use in_process=False for tensor parallelism)"
            )
        llm_kwargs: dict[str, Any] = dict(
            tensor_parallel_size=tensor_parallel_size,
            dtype=dtype,
            max_model_len=max_model_len,
            seed=seed,
            enforce_eager=enforce_eager,
            gpu_memory_utilization=gpu_memory_utilization,
            logprobs_mode=logprobs_mode,
            enable_sleep_mode=enable_sleep_mode,
        )
        if kv_cache_gib is not None:
            llm_kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * (1 << 30))
        self._in_process = in_process
        self._sleep_mode = enable_sleep_mode
        with _cpu_thread_binding(tensor_parallel_size):
            self._llm = _build_llm(self._model_dir, in_process=in_process, **llm_kwargs)
        self._engine = self._llm.llm_engine
        model_config = self._engine.model_config
        self._max_model_len = int(model_config.max_model_len)
        self._vocab_size = int(model_config.get_vocab_size())
        self._weight_names = _checkpoint_tensor_names(self._model_dir)
        self._vllm_ids = itertools.count()
        self._refit_dir: tempfile.TemporaryDirectory[str] | None = None

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def llm(self) -> Any:
        """The underlying `vllm.LLM`, for what this interface does not cover (tokenizer, metrics)."""
        return self._llm

    # ---- generation --------------------------------------------------------------------------

    def _generate_locked(
        self, requests: list[GenerationRequest], emit: EmitSamples, cancelled: Callable[[], bool]
    ) -> None:
        from vllm.inputs.engine import tokens_input

        index_of: dict[str, int] = {}  # vLLM request id -> index in `requests`, until finished
        try:
            for index, req in enumerate(requests):
                vllm_id = f"tandem-{next(self._vllm_ids)}"
                self._engine.add_request(
                    vllm_id, tokens_input(req.prompt_token_ids), to_vllm_params(req.params)
                )
                index_of[vllm_id] = index
            while index_of and not cancelled():
                if not self._engine.has_unfinished_requests():
                    raise RuntimeError(f"vLLM dropped {len(index_of)} requests without finishing them")
                for output in self._engine.step():
                    if output.finished:
                        index = index_of.pop(output.request_id)
                        emit(index, [to_sample(c, requests[index].params.logprobs) for c in output.outputs])
        finally:
            if index_of:
                self._engine.abort_request(list(index_of))

    # ---- weights -----------------------------------------------------------------------------

    def _load_weights_locked(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        seen: set[str] = set()
        if self._in_process:
            stream = _recording_names(named_tensors, seen)
            self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": stream})
            self._check_complete(seen, after_load=True)
        else:
            shard_dir = self._write_shards(_recording_names(named_tensors, seen))
            self._check_complete(seen, after_load=False)
            self._llm.collective_rpc("reload_weights", kwargs={"weights_path": shard_dir})
        self._llm.reset_prefix_cache()

    def _check_complete(self, seen: set[str], *, after_load: bool) -> None:
        missing = sorted(self._weight_names - seen)
        if not missing:
            return
        what = f"update_weights: {len(missing)} of the checkpoint's {len(self._weight_names)} tensors"
        if after_load:
            raise InputError(f"{what} were not updated (the engine now mixes versions), e.g. {missing[:3]}")
        raise WeightUpdateRejected(f"{what} were not sent, e.g. {missing[:3]}; the old weights stay")

    def _write_shards(
        self, named_tensors: Iterable[tuple[str, torch.Tensor]], shard_bytes: int = 1 << 30
    ) -> str:
        """Write the weights as safetensors shards into the engine's refit directory (replacing
        the previous update's shards) and return the directory."""
        from safetensors.torch import save_file

        if self._refit_dir is None:
            self._refit_dir = tempfile.TemporaryDirectory(prefix="tandem-refit-")
        out = Path(self._refit_dir.name)
        for old in out.glob("*.safetensors"):
            old.unlink()
        for i, bucket in enumerate(iter_buckets(named_tensors, shard_bytes)):
            save_file(_unshared_cpu_tensors(bucket), str(out / f"refit-{i:05d}.safetensors"))
        return str(out)

    # ---- sleep / shutdown --------------------------------------------------------------------

    def _sleep_locked(self, level: int) -> None:
        # vLLM sleep needs enable_sleep_mode at build time (GPU only); on CPU it is a no-op anyway.
        if self._sleep_mode:
            self._llm.sleep(level=level)

    def _wake_up_locked(self) -> None:
        if self._sleep_mode:
            self._llm.wake_up()

    def shutdown(self) -> None:
        with self._lock:
            engine_core = getattr(self._engine, "engine_core", None)
            if engine_core is not None:
                engine_core.shutdown()
            if self._refit_dir is not None:
                self._refit_dir.cleanup()
                self._refit_dir = None


# ---- conversions -----------------------------------------------------------------------------


def to_vllm_params(params: SamplingParams) -> Any:
    """Our SamplingParams -> vllm.SamplingParams. logprobs=0 asks vLLM for the sampled token's
    logprob only (it always adds the sampled token to the top-k it returns)."""
    import vllm
    from vllm.sampling_params import RequestOutputKind

    return vllm.SamplingParams(
        n=params.n,
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k or 0,  # vLLM: 0 disables top-k
        max_tokens=params.max_tokens,
        stop_token_ids=list(params.stop_token_ids),
        stop=list(params.stop),
        seed=params.seed,
        logprobs=0 if params.logprobs else None,
        flat_logprobs=True,
        ignore_eos=params.ignore_eos,
        output_kind=RequestOutputKind.FINAL_ONLY,
    )


def to_sample(completion: Any, want_logprobs: bool) -> Sample:
    """vllm.CompletionOutput -> Sample."""
    if completion.finish_reason not in ("stop", "length"):
        raise RuntimeError(f"vLLM ended a sample with finish_reason={completion.finish_reason!r}")
    token_ids = list(completion.token_ids)
    logprobs = sampled_logprobs(completion.logprobs, token_ids) if want_logprobs else None
    return Sample(token_ids, logprobs, completion.finish_reason, completion.text)


def sampled_logprobs(position_logprobs: Any, token_ids: list[int]) -> list[float]:
    """The logprob of each sampled token, from vLLM's per-position logprobs (flat or dicts)."""
    if position_logprobs is None or len(position_logprobs) != len(token_ids):
        raise RuntimeError(
            f"vLLM returned logprobs for {0 if position_logprobs is None else len(position_logprobs)} "
            f"positions, expected {len(token_ids)}"
        )
    from vllm.logprobs import FlatLogprobs

    if not isinstance(position_logprobs, FlatLogprobs):
        return [position[token].logprob for position, token in zip(position_logprobs, token_ids)]
    flat = position_logprobs
    out = []
    for start, end, token in zip(flat.start_indices, flat.end_indices, token_ids):
        out.append(next(flat.logprobs[j] for j in range(start, end) if flat.token_ids[j] == token))
    return out


# ---- construction helpers --------------------------------------------------------------------


def _checked_model_dir(model_dir: str | os.PathLike[str]) -> Path:
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise InputError(f"model_dir {path}: no config.json there; expected an HF checkpoint directory")
    if not any(path.glob("*.safetensors")):
        raise InputError(f"model_dir {path}: no *.safetensors weights there")
    return path


def _checkpoint_tensor_names(model_dir: Path) -> frozenset[str]:
    """Names of the tensors a refit has to send: everything the checkpoint holds that vLLM loads."""
    from safetensors import safe_open

    names: set[str] = set()
    for shard in model_dir.glob("*.safetensors"):
        with safe_open(str(shard), framework="pt") as f:
            names.update(f.keys())
    return frozenset(n for n in names if not n.endswith(_NOT_LOADED_SUFFIXES))


def _select_executor_mode(in_process: bool) -> None:
    """vLLM reads VLLM_ENABLE_V1_MULTIPROCESSING when the engine is built; without "0" a requested
    "uni" executor silently becomes "mp". vLLM caches its env after the first engine starts, so
    drop that cache for the value to be read again."""
    import vllm.envs as envs

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
    if envs._is_envs_cache_enabled():
        envs.disable_envs_cache()


@contextlib.contextmanager
def _cpu_thread_binding(tensor_parallel_size: int) -> Iterator[None]:
    """On a CPU platform with fewer NUMA nodes than TP workers (where vLLM's automatic binding fails
    with "Not enough allowed NUMA nodes to bind threads"), bind worker i to the i-th contiguous share
    of this process's CPUs through VLLM_CPU_OMP_THREADS_BIND for the engine's start. A binding set by
    the user is kept."""
    if tensor_parallel_size == 1 or os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto") != "auto":
        yield
        return
    import vllm.utils.cpu_resource_utils as cpu_resources
    from vllm.platforms import current_platform

    if not current_platform.is_cpu() or len(cpu_resources.get_visible_memory_node()) >= tensor_parallel_size:
        yield
        return
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < tensor_parallel_size:
        raise InputError(
            f"tensor_parallel_size={tensor_parallel_size} on CPU needs a CPU per worker; this process may "
            f"use {len(cpus)} ({cpus})"
        )
    n, tp = len(cpus), tensor_parallel_size
    shares = [cpus[n * i // tp : n * (i + 1) // tp] for i in range(tp)]  # e.g. 2 CPUs, tp 2: "0|1"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "|".join(",".join(map(str, share)) for share in shares)
    try:
        yield
    finally:
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND")


def _build_llm(model_dir: Path, *, in_process: bool, **llm_kwargs: Any) -> Any:
    _select_executor_mode(in_process)
    import vllm

    # An in-process worker seeds Python/NumPy/torch global RNGs with the engine seed: keep ours.
    rng_states = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    try:
        return vllm.LLM(
            model=str(model_dir),
            distributed_executor_backend="uni" if in_process else "mp",
            **llm_kwargs,
        )
    finally:
        random.setstate(rng_states[0])
        np.random.set_state(rng_states[1])
        torch.set_rng_state(rng_states[2])


def _recording_names(
    named_tensors: Iterable[tuple[str, torch.Tensor]], seen: set[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in named_tensors:
        seen.add(name)
        yield name, tensor


def _unshared_cpu_tensors(bucket: list[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors sharing storage (tied embeddings): copy any repeated storage."""
    out: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for name, tensor in bucket:
        t = tensor.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        out[name] = t.clone() if ptr in storages else t
        storages.add(ptr)
    return out
