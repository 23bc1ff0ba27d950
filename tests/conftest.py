"""Session-wide fixtures: the tiny default is built once, the vLLM engine is started once (~40 s)."""

from __future__ import annotations

import os

import pytest

# Keep vLLM's CPU KV cache small: several engines (tests, rollout servers) share a 24 GB machine.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    """The built-in tiny default (untrained model, tokenizer, datasets), built once per test run."""
    from alignment.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def vllm_engine(tiny_paths):
    """One colocated vLLM engine on the tiny base model for the whole run (start-up costs ~40 s).

    Tests that need particular weights must sync them first (`engine.update_weights`): earlier tests
    may have left other weights loaded.
    """
    from rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(str(tiny_paths.base), dtype="float32", seed=0, max_model_len=256)
    yield engine
    engine.close()
