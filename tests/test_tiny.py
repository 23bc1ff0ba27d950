"""Tests of the built-in tiny default (alignment.tiny): gold rule, determinism, model, template, data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from alignment.tiny import TinyPaths, build_tiny, gold_reward, gold_score
from alignment.tiny import task


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> TinyPaths:
    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny.base)


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


# ----------------------------------------------------------------------------- gold rule

@pytest.mark.parametrize("item, text, expected", [
    ("lamp", "the lamp is bright .", 1.0),
    ("lamp", "the lamp is bright and ugly .", 0.5),
    ("lamp", "the lamp is bright , ugly and red .", 1 / 3),
    ("lamp", "the lamp is ugly and red .", 0.0),
    ("lamp", "the chair is bright .", 0.0),            # wrong item
    ("lamp", "the lamp is .", 0.0),                     # no adjective
    ("lamp", "bright great wonderful", 0.0),            # item never mentioned
    ("lamp", "the lamp is bright bright ugly .", 2 / 3),  # adjectives counted with repetition
    ("lamp", "The Lamp is Bright.", 1.0),               # case and glued punctuation
    ("lamp", "the lamps is bright .", 0.0),             # whole-word match only
    ("mug", "", 0.0),
])
def test_gold_score_cases(item, text, expected):
    assert gold_score(item, text) == pytest.approx(expected)


def test_gold_reward_trl_signature():
    rewards = gold_reward(
        prompts=["review the lamp", "review the mug", "review the mug"],
        completions=["the lamp is great .", "the lamp is great .",
                     [{"role": "assistant", "content": "the mug is great and ugly ."}]],
        item=["lamp", "mug", "mug"],
        completion_ids=[[1], [2], [3]], trainer_state=None,  # extra TRL kwargs are ignored
    )
    assert rewards == [1.0, 0.0, 0.5]
    with pytest.raises(ValueError):
        gold_reward(prompts=["a"], completions=["a", "b"], item=["lamp"])


def test_vocabulary_is_consistent():
    vocab = task.vocabulary()
    assert vocab[:5] == task.SPECIAL_TOKENS and len(vocab) == len(set(vocab))
    assert len(task.POSITIVE) == len(task.NEGATIVE) == len(task.NEUTRAL) == 12
    assert len(task.ADJECTIVES) == 36 and not (task.ADJECTIVES & set(task.ITEMS))
    prompt_words = {w for p in task.PHRASINGS for w in p.split()}
    assert not (task.ADJECTIVES & prompt_words)


# ----------------------------------------------------------------------------- determinism

def test_two_builds_are_byte_identical(tiny, tmp_path):
    other = build_tiny(tmp_path / "again")
    a, b = _digests(tiny.root), _digests(other.root)
    assert len(a) >= 10 and "base/model.safetensors" in a and "data/sft.jsonl" in a
    assert a == b


def test_different_seed_changes_data_and_weights(tmp_path):
    from alignment.tiny.build import make_datasets
    from alignment.tiny.model import make_model

    assert make_datasets(0)[0]["sft"] != make_datasets(1)[0]["sft"]
    w0, w1 = make_model(0).model.embed_tokens.weight, make_model(1).model.embed_tokens.weight
    assert not torch.equal(w0, w1)


# ----------------------------------------------------------------------------- tokenizer + model

def test_tokenizer_round_trip_and_specials(tokenizer):
    text = "the lamp is bright , sturdy and red ."
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|end|>" and tokenizer.pad_token == "<pad>"
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert tokenizer.convert_tokens_to_ids(["<|user|>", "<|assistant|>"]) == [2, 3]
    # every word used in the datasets is in the vocabulary
    for i, word in enumerate(task.vocabulary()):
        assert tokenizer(word)["input_ids"] == [i]
    assert tokenizer("zzz the")["input_ids"] == [tokenizer.unk_token_id, tokenizer.convert_tokens_to_ids("the")]
    assert tokenizer.bos_token is None  # nothing is prepended to prompts


def test_chat_template_format_and_prefix_consistency(tokenizer):
    user = {"role": "user", "content": "review the lamp"}
    reply = {"role": "assistant", "content": "the lamp is bright ."}
    full = tokenizer.apply_chat_template([user, reply], tokenize=False)
    prefix = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    assert full == "<|user|> review the lamp <|end|> <|assistant|> the lamp is bright . <|end|>"
    assert prefix == "<|user|> review the lamp <|end|> <|assistant|>"
    assert full.startswith(prefix)
    full_ids = tokenizer(full)["input_ids"]
    prefix_ids = tokenizer(prefix)["input_ids"]
    assert full_ids[: len(prefix_ids)] == prefix_ids
    assert full_ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(full_ids[len(prefix_ids):], skip_special_tokens=True) == reply["content"]
    with pytest.raises(Exception):
        tokenizer.apply_chat_template([{"role": "system", "content": "x"}, user], tokenize=False)


def test_model_loads_and_generates(tiny, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny.base)
    cfg = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers) == (128, 2, 2, 2)
    assert cfg.hidden_size // cfg.num_attention_heads == 64  # a head size vLLM's CPU backend supports
    assert cfg.vocab_size == len(tokenizer)
    assert cfg.eos_token_id == model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert cfg.pad_token_id == model.generation_config.pad_token_id == tokenizer.pad_token_id
    assert (tiny.base / "model.safetensors").exists()
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "review the lamp"}],
                                           tokenize=False, add_generation_prompt=True)
    enc = tokenizer([prompt, prompt], return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, do_sample=True)
    assert out.shape[0] == 2 and 0 < out.shape[1] - enc["input_ids"].shape[1] <= 8
    assert torch.isfinite(model(**enc).logits).all()


# ----------------------------------------------------------------------------- datasets

def test_dataset_shapes_and_holdout(tiny):
    sft, prefs = _read(tiny.sft), _read(tiny.preferences)
    prompts, evals = _read(tiny.prompts), _read(tiny.eval_prompts)
    assert 1000 <= len(sft) <= 5000 and 1000 <= len(prefs) <= 3000
    assert 500 <= len(prompts) <= 2000 and 100 <= len(evals) <= 200
    assert set(sft[0]) == {"prompt", "completion"} and set(prefs[0]) == {"prompt", "chosen", "rejected"}
    assert set(prompts[0]) == {"prompt", "item"} and set(evals[0]) == {"prompt", "item", "reference"}
    for row in sft[:50] + prefs[:50]:
        assert [m["role"] for m in row["prompt"]] == ["user"]
        for key in ("completion", "chosen", "rejected"):
            if key in row:
                assert [m["role"] for m in row[key]] == ["assistant"]
    for row in prompts + evals:
        assert row["item"] in task.ITEMS and row["item"] in row["prompt"][0]["content"].split()
    train_texts = {r["prompt"][0]["content"] for r in sft + prefs + prompts}
    eval_texts = [r["prompt"][0]["content"] for r in evals]
    assert len(set(eval_texts)) == len(eval_texts)
    assert not (set(eval_texts) & train_texts)
    assert {r["item"] for r in evals} == set(task.ITEMS)
    # every held-out prompt has a perfect reference answer and one held-out demonstration (for perplexity)
    assert all(gold_score(r["item"], r["reference"]) == 1.0 for r in evals)
    demos = _read(tiny.eval_demos)
    assert [d["prompt"] for d in demos] == [r["prompt"] for r in evals] and set(demos[0]) == {"prompt", "completion"}


def test_demo_mean_gold_matches_documented(tiny):
    rows = _read(tiny.sft)
    golds = []
    for row in rows:
        item = next(w for w in row["prompt"][0]["content"].split() if w in task.ITEMS)
        golds.append(gold_score(item, row["completion"][0]["content"]))
    mean = sum(golds) / len(golds)
    assert abs(mean - task.DEMO_EXPECTED_GOLD) < 0.03, mean
    assert 0.2 < mean < 0.36
    wrong_item = sum(item_missing(r) for r in rows) / len(rows)
    assert abs(wrong_item - task.WRONG_ITEM_RATE) < 0.03


def item_missing(row) -> bool:
    item = next(w for w in row["prompt"][0]["content"].split() if w in task.ITEMS)
    return item not in row["completion"][0]["content"].split()


def test_preference_labels_agree_with_gold_at_noise_rate(tiny):
    rows = _read(tiny.preferences)
    agree = 0
    for row in rows:
        item = next(w for w in row["prompt"][0]["content"].split() if w in task.ITEMS)
        gc = gold_score(item, row["chosen"][0]["content"])
        gr = gold_score(item, row["rejected"][0]["content"])
        assert gc != gr  # ties were redrawn
        agree += gc > gr
    rate = agree / len(rows)
    assert abs(rate - (1 - task.LABEL_NOISE)) < 0.03, rate


# ----------------------------------------------------------------------------- vLLM (shared engine)

def test_vllm_generates_from_tiny_model(vllm_engine, tiny_paths):
    """vLLM serves the tiny model with its own tokenizer (the session's shared engine, base weights synced in)."""
    from transformers import AutoModelForCausalLM

    from rollout import SamplingConfig, sync_weights

    sync_weights(vllm_engine, AutoModelForCausalLM.from_pretrained(tiny_paths.base), version=0)  # earlier tests may have loaded others
    prompt = "<|user|> review the lamp <|end|> <|assistant|>"
    samples = vllm_engine.generate([prompt] * 4, SamplingConfig(max_new_tokens=8, temperature=1.0, seed=0))
    assert len(samples) == 4
    vocab_size = len(task.vocabulary())
    for sample in samples:
        assert 0 < len(sample.completion_ids) <= 8
        assert all(0 <= t < vocab_size for t in sample.completion_ids)
        assert isinstance(sample.text, str)
    assert samples[0].prompt_ids == [2, 64, 73, 43, 4, 3]
