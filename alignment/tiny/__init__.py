"""The built-in tiny default: a word-level tokenizer, an untrained tiny Llama, and a review task
with a rule-based gold metric (see `alignment.tiny.task`), written to disk by `build_tiny`."""

from alignment.tiny.build import TinyPaths, build_tiny, ensure_tiny
from alignment.tiny.task import gold_reward, gold_score

DEFAULT_TINY_DIR = "outputs/tiny"

__all__ = ["DEFAULT_TINY_DIR", "TinyPaths", "build_tiny", "ensure_tiny", "gold_reward", "gold_score"]
