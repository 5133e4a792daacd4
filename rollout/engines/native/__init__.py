"""Native generation engine: our GPTModel with a KV cache, continuous batching and on-device sampling."""

from rollout.engines.native.engine import NativeEngine

__all__ = ["NativeEngine"]
