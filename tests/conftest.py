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
