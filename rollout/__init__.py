"""Rollout engines: vLLM colocated, remote HTTP servers, transformers fallback; weight sync.

    engine = make_engine("vllm", model="path/to/ckpt", max_model_len=512)
    samples = engine.generate(["prompt", ...], SamplingConfig(temperature=1.0, max_new_tokens=32))
    stats = engine.update_weights(named_tensors(trainer_model), version=step)

Engines import lazily: importing `rollout` does not import vLLM.
"""

from __future__ import annotations

from rollout.types import RolloutEngine, Sample, SamplingConfig, SyncStats
from rollout.weight_sync import named_tensors, sync_weights

__all__ = [
    "RolloutEngine",
    "Sample",
    "SamplingConfig",
    "SyncStats",
    "make_engine",
    "named_tensors",
    "sync_weights",
]

ENGINE_KINDS = ("vllm", "remote", "hf")


def make_engine(kind: str, **kwargs) -> RolloutEngine:
    """Build an engine: "vllm" (VLLMEngine(model, ...)), "remote" (RemoteEngine(urls, ...)),
    "hf" (HFEngine(model, ...)). Keyword arguments go to the engine's constructor."""
    if kind == "vllm":
        from rollout.vllm_engine import VLLMEngine

        return VLLMEngine(**kwargs)
    if kind == "remote":
        from rollout.remote import RemoteEngine

        return RemoteEngine(**kwargs)
    if kind == "hf":
        from rollout.hf_engine import HFEngine

        return HFEngine(**kwargs)
    raise ValueError(f"unknown rollout engine {kind!r}; choose one of {', '.join(ENGINE_KINDS)}")
