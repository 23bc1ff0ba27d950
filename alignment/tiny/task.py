"""The tiny review task: vocabulary, the "human" data distribution, and the gold metric.

A prompt asks for a review of one of 24 items in one of 8 phrasings with one of 3 determiners
("write a review of the lamp", "what do you think of my lamp", ...): 576 item x phrasing x
determiner combinations, 128 of which are held out for evaluation (5 or 6 per item).

A reply looks like ``the lamp is bright , sturdy and red .`` with 1-3 adjectives drawn from 12
positive, 12 negative and 12 neutral words.

Gold score of a reply for an item (a rule, not a model), in [0, 1]:
    0 if the reply does not mention the item or contains no known adjective,
    else the fraction of its adjectives (counted with repetition) that are positive.

"Human" demonstrations (the SFT data) are only partly good: 1-3 adjectives (uniform), each
adjective's class uniform over {positive, negative, neutral} (no word repeated within a reply), and
with probability ``WRONG_ITEM_RATE`` = 0.15 the reply names a different item. Expected gold of
the demo distribution = (1 - 0.15) * 1/3 = 0.2833 (``DEMO_EXPECTED_GOLD``); std of one demo's gold
is 0.36. So an SFT policy lands near 0.28 and PPO can climb towards 1.0.

Preference pairs: two demo-distribution replies to the same prompt, redrawn until their gold
scores differ; chosen = the higher-gold reply, then the label is flipped with probability
``LABEL_NOISE`` = 0.10, so labels agree with the gold rule at rate 0.90 in expectation.

Measured on the default build (seed 0): SFT demos (3072 rows) mean gold 0.2794; preference labels
(2048 pairs) agree with the gold rule on 0.9019 of pairs. Over seeds 0-4: mean gold 0.279-0.291,
agreement 0.888-0.913 (the tests allow +-0.03 around 0.2833 and 0.90). ``build_tiny`` also writes
these numbers to ``tiny_info.json``.
"""

from __future__ import annotations

import random
import re
from typing import Any

SPECIAL_TOKENS = ["<pad>", "<unk>", "<|user|>", "<|assistant|>", "<|end|>"]
PAD_TOKEN, UNK_TOKEN, USER_TOKEN, ASSISTANT_TOKEN, EOS_TOKEN = SPECIAL_TOKENS

ITEMS = [
    "backpack", "bicycle", "blanket", "blender", "camera", "chair", "guitar", "headphones",
    "jacket", "kettle", "keyboard", "lamp", "laptop", "mattress", "mouse", "mug",
    "phone", "pillow", "printer", "sofa", "table", "toaster", "umbrella", "watch",
]
POSITIVE = [
    "beautiful", "bright", "comfortable", "durable", "elegant", "excellent",
    "great", "quiet", "reliable", "sturdy", "useful", "wonderful",
]
NEGATIVE = [
    "awful", "broken", "disappointing", "dull", "flimsy", "fragile",
    "noisy", "overpriced", "terrible", "ugly", "uncomfortable", "useless",
]
NEUTRAL = [
    "black", "blue", "green", "heavy", "large", "metal",
    "plastic", "red", "round", "small", "white", "wooden",
]
ADJECTIVE_CLASSES = {"positive": POSITIVE, "negative": NEGATIVE, "neutral": NEUTRAL}
ADJECTIVES = frozenset(POSITIVE + NEGATIVE + NEUTRAL)
POSITIVE_SET = frozenset(POSITIVE)

PHRASINGS = [
    "describe {det} {item}",
    "give me your opinion of {det} {item}",
    "how is {det} {item}",
    "review {det} {item}",
    "share your thoughts on {det} {item}",
    "tell me about {det} {item}",
    "what do you think of {det} {item}",
    "write a review of {det} {item}",
]
DETERMINERS = ["my", "the", "this"]
REPLY_WORDS = ["the", "is", "and", ",", "."]

WRONG_ITEM_RATE = 0.15
LABEL_NOISE = 0.10
DEMO_EXPECTED_GOLD = (1 - WRONG_ITEM_RATE) / 3  # 0.28333...
N_EVAL_COMBOS = 128


def vocabulary() -> list[str]:
    """All tokens, special tokens first (ids 0..4), then every word sorted."""
    words: set[str] = set(ITEMS) | ADJECTIVES | set(REPLY_WORDS) | set(DETERMINERS)
    for phrasing in PHRASINGS:
        words.update(w for w in phrasing.split() if not w.startswith("{"))
    return SPECIAL_TOKENS + sorted(words)


# ----------------------------------------------------------------------------- gold metric

_WORD = re.compile(r"[a-z]+")


def _text(completion: Any) -> str:
    """Plain text of a completion: a string, a message dict, or a list of messages."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return str(completion.get("content", ""))
    if isinstance(completion, (list, tuple)):
        return " ".join(_text(m) for m in completion)
    raise TypeError(f"completion must be text or chat messages, got {type(completion).__name__}")


def gold_score(item: str, completion_text: str) -> float:
    """Rule-based gold score in [0, 1] of a reply reviewing ``item`` (see module docstring)."""
    words = _WORD.findall(_text(completion_text).lower())
    if item not in words:
        return 0.0
    adjectives = [w for w in words if w in ADJECTIVES]
    if not adjectives:
        return 0.0
    return sum(w in POSITIVE_SET for w in adjectives) / len(adjectives)


def gold_reward(prompts: list, completions: list, item: list[str], **unused: Any) -> list[float]:
    """TRL reward-function signature: one gold score per completion (``item`` is the label column)."""
    if len(completions) != len(item):
        raise ValueError(f"gold_reward: {len(completions)} completions but {len(item)} item labels")
    return [gold_score(it, c) for it, c in zip(item, completions)]


# ----------------------------------------------------------------------------- sampling

def all_combos() -> list[tuple[str, str, str]]:
    """Every (item, phrasing, determiner) combination, sorted."""
    return [(i, p, d) for i in ITEMS for p in PHRASINGS for d in DETERMINERS]


def split_combos(rng: random.Random) -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
    """(train, eval) combos; eval holds out 5 or 6 combos of every item (128 in all)."""
    train, held = [], []
    per_item, extra = divmod(N_EVAL_COMBOS, len(ITEMS))
    for k, item in enumerate(ITEMS):
        combos = [(item, p, d) for p in PHRASINGS for d in DETERMINERS]
        rng.shuffle(combos)
        n = per_item + (1 if k < extra else 0)
        held += combos[:n]
        train += combos[n:]
    return sorted(train), sorted(held)


def prompt_text(combo: tuple[str, str, str]) -> str:
    item, phrasing, det = combo
    return phrasing.format(det=det, item=item)


def sample_demo(rng: random.Random, item: str) -> str:
    """One "human" reply from the demo distribution described in the module docstring."""
    named = item
    if rng.random() < WRONG_ITEM_RATE:
        named = rng.choice([i for i in ITEMS if i != item])
    k = rng.randint(1, 3)
    adjectives: list[str] = []
    for _ in range(k):
        cls = rng.choice(sorted(ADJECTIVE_CLASSES))
        adjectives.append(rng.choice([a for a in ADJECTIVE_CLASSES[cls] if a not in adjectives]))
    return _reply(named, adjectives)


def sample_reference(rng: random.Random, item: str) -> str:
    """A reference answer for the evaluation's BLEU/ROUGE: the item with 2 or 3 distinct positive adjectives (gold
    1.0). Many answers are as good, so overlap with it rewards the right words, not the only right answer."""
    return _reply(item, rng.sample(POSITIVE, rng.randint(2, 3)))


def _reply(item: str, adjectives: list[str]) -> str:
    if len(adjectives) == 1:
        body = adjectives[0]
    elif len(adjectives) == 2:
        body = f"{adjectives[0]} and {adjectives[1]}"
    else:
        body = f"{adjectives[0]} , {adjectives[1]} and {adjectives[2]}"
    return f"the {item} is {body} ."


def sample_preference(rng: random.Random, item: str) -> tuple[str, str, bool]:
    """(chosen, rejected, flipped): two demos with different gold, ordered by gold then maybe flipped."""
    while True:
        a, b = sample_demo(rng, item), sample_demo(rng, item)
        ga, gb = gold_score(item, a), gold_score(item, b)
        if ga != gb:
            break
    chosen, rejected = (a, b) if ga > gb else (b, a)
    flipped = rng.random() < LABEL_NOISE
    if flipped:
        chosen, rejected = rejected, chosen
    return chosen, rejected, flipped
