"""Generation engines behind one interface (`GenerationEngine`).

`VLLMEngine` is imported lazily (`from rollout.engines.vllm_engine import VLLMEngine`) so that
importing this package does not import vLLM (~15 s, and absent on the GPU machines).
"""

from rollout.engines.base import GenerationEngine, WeightUpdateRejected

__all__ = ["GenerationEngine", "WeightUpdateRejected"]
