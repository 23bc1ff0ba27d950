"""Gold evaluation: generate answers to held-out prompts with `transformers` and score them with a rule.

Used by the SFT stage (gold metric before/after training), by the RM stage (fresh completions to test
RM-vs-gold agreement) and by PPO. Prompts are chat-templated with the generation prompt exactly as the
policy sees them at training time (`alignment.models.render_prompt`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignment.config.sections import DataSection, DataSource, GoldEvalSection
from rollout.hf_engine import our_sampling_only


@dataclass
class GoldResult:
    mean: float
    scores: list[float]
    prompts: list            # as in the dataset: text or chat messages
    completions: list[str]   # decoded completions (special tokens removed)
    columns: dict[str, list] = field(default_factory=dict)  # the prompt dataset's extra (label) columns

    def to_dict(self) -> dict:
        return {"mean": self.mean, "n": len(self.scores)}


def load_prompts(section: GoldEvalSection) -> tuple[list, dict[str, list]]:
    """The first `num_prompts` prompts and their extra columns (gold labels), via the data layer."""
    from alignment.data import load_stage_data

    data = load_stage_data(DataSection(sources=[DataSource(path=section.prompts)], eval_fraction=0.0, clean=_no_dedup()), "prompt")
    rows = data.train.select(range(min(section.num_prompts, len(data.train))))
    columns = {c: list(rows[c]) for c in rows.column_names if c != "prompt"}
    return list(rows["prompt"]), columns


def _no_dedup():
    from alignment.config.sections import CleanSection

    return CleanSection(deduplicate=False)


def render(tokenizer, prompt) -> list[int]:
    from alignment.models import render_prompt

    return render_prompt(tokenizer, prompt)


@torch.no_grad()
def generate(model, tokenizer, prompts: list, max_new_tokens: int, temperature: float = 0.0, batch_size: int = 64,
             seed: int = 0, num_return_sequences: int = 1) -> list[str]:
    """Completions (decoded, special tokens skipped), `num_return_sequences` per prompt, prompt-major order.

    temperature 0 = greedy. Left padding; generation stops at the tokenizer's EOS.
    """
    device = next(model.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    out: list[str] = []
    gen = torch.Generator().manual_seed(seed)
    for start in range(0, len(prompts), batch_size):
        batch = [render(tokenizer, p) for p in prompts[start : start + batch_size]]
        width = max(len(ids) for ids in batch)
        input_ids = torch.tensor([[pad_id] * (width - len(ids)) + ids for ids in batch], device=device)
        attention = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in batch], device=device)
        kwargs = dict(do_sample=False) if temperature == 0 else dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
        with torch.random.fork_rng(devices=[]), our_sampling_only(model):
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
            ids = model.generate(
                input_ids=input_ids, attention_mask=attention, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                eos_token_id=tokenizer.eos_token_id, num_return_sequences=num_return_sequences, **kwargs,
            )
        for row in ids[:, width:]:
            out.append(tokenizer.decode(row, skip_special_tokens=True).strip())
    model.train(was_training)
    return out


def score(reward_function: str, prompts: list, completions: list[str], columns: dict[str, list]) -> list[float]:
    from reward.functions import load_reward_function

    fn = load_reward_function(reward_function)
    return [float(s) for s in fn(prompts=prompts, completions=completions, **columns)]


def gold_eval(model, tokenizer, section: GoldEvalSection, batch_size: int = 64) -> GoldResult:
    """Generate once per held-out prompt (greedy unless section.temperature > 0) and score with the rule."""
    prompts, columns = load_prompts(section)
    n = section.samples_per_prompt
    completions = generate(model, tokenizer, prompts, section.max_new_tokens, section.temperature, batch_size,
                           num_return_sequences=n)
    prompts = [p for p in prompts for _ in range(n)]  # completions come n per prompt, prompt-major
    columns = {k: [v for v in values for _ in range(n)] for k, values in columns.items()}
    scores = score(section.reward_function, prompts, completions, columns)
    return GoldResult(sum(scores) / len(scores), scores, prompts, completions, columns)


def gold_eval_path(model_dir: str | Path, section: GoldEvalSection, dtype: torch.dtype = torch.float32) -> GoldResult:
    """`gold_eval` on a saved checkpoint directory (model + tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    if torch.cuda.is_available():
        model = model.cuda()
    return gold_eval(model, tokenizer, section)
