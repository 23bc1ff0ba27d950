"""Rollouts from a stock vLLM OpenAI server: one `/v1/completions` request per prompt, the prompt as token ids.

One request per prompt keeps our seeding (prompt i of a call is seeded `SamplingConfig.prompt_seed(i)`, as in the
colocated engine); the server batches concurrent requests itself. The server must report the log-probs of the distribution it
sampled from (`--logprobs-mode processed_logprobs`) and ignore the model's generation_config defaults
(`--generation-config vllm`): `alignment rollout serve` starts it so.
"""

from __future__ import annotations

from rollout.types import Sample, SamplingConfig


def completion_request(model: str, prompt: str | list[int], sampling: SamplingConfig, prompt_index: int) -> dict:
    """The /v1/completions body for one prompt: `n` samples, each token's sampled log-prob, token ids back."""
    return {
        "model": model,
        "prompt": prompt if isinstance(prompt, str) else [int(t) for t in prompt],
        "n": sampling.n,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k if sampling.top_k > 0 else 0,
        "max_tokens": sampling.max_new_tokens,
        "stop": list(sampling.stop) or None,
        "stop_token_ids": list(sampling.stop_token_ids),
        "seed": sampling.prompt_seed(prompt_index),
        "logprobs": 0,  # the sampled token's only
        "return_token_ids": True,
        "skip_special_tokens": True,
    }


def samples_from_completion(reply: dict, prompt_index: int, weight_version: int) -> tuple[list[Sample], list]:
    """A /v1/completions reply -> its samples (choice order) and each one's stop reason (a matched stop string, a
    stop token id, or None)."""
    samples, stop_reasons = [], []
    for choice in sorted(reply["choices"], key=lambda c: c["index"]):
        ids = [int(t) for t in choice.get("token_ids") or []]
        logprobs = (choice.get("logprobs") or {}).get("token_logprobs")
        if logprobs is None or len(logprobs) != len(ids):
            raise ValueError("the server returned no token ids or no per-token log-probs (is it a vLLM server?)")
        samples.append(Sample(prompt_index=prompt_index, prompt_ids=[int(t) for t in choice["prompt_token_ids"]],
                              completion_ids=ids, text=choice.get("text") or "", logprobs=[float(x) for x in logprobs],
                              finish_reason=choice.get("finish_reason") or "length", weight_version=weight_version))
        stop_reasons.append(choice.get("stop_reason"))
    return samples, stop_reasons


def set_texts(tokenizer, samples: list[Sample], stop_reasons: list) -> None:
    """Text = each completion decoded on its own, cut before a matched stop string (every engine does the same:
    vLLM's incremental detokenizer would otherwise prefix the prompt/completion separator, e.g. a space, for
    word-level tokenizers)."""
    texts = tokenizer.batch_decode([s.completion_ids for s in samples], skip_special_tokens=True)
    for s, text, stop in zip(samples, texts, stop_reasons):
        if isinstance(stop, str) and stop in text:
            text = text[: text.index(stop)]
        s.text = text
