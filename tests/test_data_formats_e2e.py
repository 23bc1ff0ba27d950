"""The data formats people have, through the real CLI: SFT on text, messages and prompt/completion data with the
default recipe (loss_on: auto), a column-mapped source, PPO prompts given as `messages`; and the assistant-turn
masks SFT renders itself for chat templates without `{% generation %}` markers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import REPO, read_metrics, run_stage, tiny_ppo_overrides
from helpers_data import write_jsonl

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
CONVERSATION = [{"role": "user", "content": "how is my phone"}, {"role": "assistant", "content": "great phone"},
                {"role": "user", "content": "and my laptop"}, {"role": "assistant", "content": "noisy laptop"}]


@pytest.mark.parametrize("template", ["tiny", "chatml"])
def test_assistant_masks_cover_exactly_the_assistant_turns(tiny_paths, template):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from alignment.stages.sft import assistant_masked

    tokenizer = AutoTokenizer.from_pretrained(tiny_paths.base)
    if template == "chatml":  # no {% generation %} markers, like most real templates
        tokenizer.chat_template = CHATML
    row = assistant_masked(Dataset.from_list([{"messages": CONVERSATION}]), tokenizer)[0]
    assert row["input_ids"] == list(tokenizer.apply_chat_template(CONVERSATION, tokenize=True, return_dict=True)["input_ids"])
    spans, current = [], []
    for token, bit in zip(row["input_ids"], row["assistant_masks"]):
        if bit:
            current.append(token)
        elif current:
            spans.append(current)
            current = []
    spans += [current] if current else []
    # Each span is the turn's words followed by the template's end-of-turn token(s); nothing of the user turns.
    assert [tokenizer.decode(span).split()[:2] for span in spans] == [["great", "phone"], ["noisy", "laptop"]], spans
    assert all(len(span) >= 3 for span in spans)


def _sft_variants(tiny_paths, tmp_path: Path) -> dict[str, list[str]]:
    """The tiny demonstrations (conversational prompt/completion) as text, messages and renamed columns."""
    rows = [json.loads(line) for line in tiny_paths.sft.read_text().splitlines()]
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": f"{r['prompt'][-1]['content']} {r['completion'][0]['content']}"} for r in rows])
    messages = write_jsonl(tmp_path / "messages.jsonl", [{"messages": r["prompt"] + r["completion"]} for r in rows])
    renamed = write_jsonl(tmp_path / "qa.jsonl", [{"question": r["prompt"], "answer": r["completion"]} for r in rows])
    return {
        "text": [f"data.sources.0.path={text}"],
        "messages": [f"data.sources.0.path={messages}"],
        "prompt_completion": [f"data.sources.0.path={tiny_paths.sft}"],
        "mapped_columns": [f"data.sources=[{{path: {renamed}, columns: {{question: prompt, answer: completion}}}}]"],
    }


@pytest.mark.e2e
def test_sft_default_recipe_trains_on_every_format(tiny_paths, tmp_path):
    expected_loss_on = {"text": "all", "messages": "assistant", "prompt_completion": "completion", "mapped_columns": "completion"}
    for name, data in _sft_variants(tiny_paths, tmp_path).items():
        out = tmp_path / name
        proc = run_stage("sft", REPO / "recipes/tiny/sft.yaml",
                         [f"model.name_or_path={tiny_paths.base}", f"output.dir={out}", "gold_eval=null",
                          "train.max_steps=12", *data])
        summary = json.loads((out / "summary.json").read_text())
        assert summary["eval_loss_after"] < summary["eval_loss_before"], (name, summary)
        assert f"loss on: {expected_loss_on[name]}" in proc.stdout, (name, proc.stdout[-2000:])
        if name == "mapped_columns":
            assert "columns renamed: question -> prompt, answer -> completion" in proc.stdout
        probe = json.loads((out / "probe.json").read_text())
        if expected_loss_on[name] != "all":  # the prompt carries no loss
            assert all(label == -100 for label in probe["labels"][0][:3]), (name, probe["labels"][0])


@pytest.mark.e2e
def test_ppo_prompts_as_messages(tiny_paths, tiny_sft, tiny_rm, tmp_path):
    rows = [json.loads(line) for line in tiny_paths.prompts.read_text().splitlines()]
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"messages": r.pop("prompt"), **r} for r in rows])
    out = tmp_path / "ppo"
    run_stage("ppo", REPO / "recipes/tiny/ppo_grpo.yaml",
              [*tiny_ppo_overrides(tiny_paths, tiny_sft, tiny_rm, out, critic=False), f"prompts.sources.0.path={prompts}",
               "rollout.engine=hf", "train.steps=2", "eval=null"])
    metrics = read_metrics(out)
    assert len(metrics) == 2 and metrics[-1]["ppo/gold"] >= 0 and metrics[-1]["ppo/kl"] > 0
