"""Reward-model stage through the real CLI: held-out accuracy, stats, scoring API, over-long pairs, LoRA, ZeRO-3."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import REPO, even_eval_split, run_stage, stage_env, tiny_rm_overrides

RECIPE = REPO / "recipes/tiny/rm.yaml"


def _no_gold(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.startswith("gold_agreement")] + ["gold_agreement=null"]


def _check_probe(out: Path, model_dir: Path) -> None:
    """The exported model reproduces the rewards the in-memory trained model gave the probe pairs."""
    from reward.scoring import RewardModelScorer

    probe = json.loads((out / "probe.json").read_text())
    scorer = RewardModelScorer(model_dir)
    assert scorer.score_ids(probe["chosen_ids"]).tolist() == pytest.approx(probe["chosen"], abs=1e-5)
    assert scorer.score_ids(probe["rejected_ids"]).tolist() == pytest.approx(probe["rejected"], abs=1e-5)


def test_rm_heldout_accuracy_well_above_chance(tiny_rm):
    s = tiny_rm.summary
    e, g = s["eval"], s["gold_agreement"]
    print(f"\nRM held-out accuracy {e['accuracy']:.4f} on {e['num_pairs']} pairs (labels are 90% gold-consistent); "
          f"margin {e['margin_mean']:.3f} +- {e['margin_std']:.3f}; gold agreement {g['agreement']:.4f} on {g['pairs']} fresh pairs")
    assert e["accuracy"] > 0.7 and e["num_pairs"] > 100
    assert e["margin_mean"] > 0.3
    assert g["agreement"] > 0.7 and g["pairs"] >= 30
    # TRL's own evaluation of the in-memory model agrees with ours from the exported checkpoint
    assert s["trainer_eval"]["loss"] == pytest.approx(e["loss"], abs=2e-3)
    assert s["overlong"]["train"]["total"] > 1000 and s["overlong"]["train"]["dropped"] == s["overlong"]["train"]["overlong"]


def test_rm_export_scoring_and_stats(tiny_rm, tiny_paths):
    from transformers import AutoConfig

    from reward.scoring import RewardModelScorer, encode_many

    config = AutoConfig.from_pretrained(str(tiny_rm.final))
    assert config.num_labels == 1 and config.pad_token_id is not None
    assert "model.safetensors" in {p.name for p in tiny_rm.final.iterdir()}
    _check_probe(tiny_rm.dir, tiny_rm.final)

    stats = json.loads((tiny_rm.final / "reward_stats.json").read_text())
    assert stats["std"] > 0 and stats["num_rewards"] > 1000
    rows = [json.loads(line) for line in tiny_paths.preferences.read_text().splitlines()[:64]]
    prompts = [r["prompt"] for r in rows]
    raw = RewardModelScorer(tiny_rm.final)
    chosen, rejected = raw.score(prompts, [r["chosen"] for r in rows]), raw.score(prompts, [r["rejected"] for r in rows])
    assert chosen.shape == (64,) and (chosen > rejected).float().mean() > 0.7
    # plain-string completions (what PPO passes) score the same as assistant messages
    texts = [r["chosen"][0]["content"] for r in rows]
    assert raw.score(prompts, texts).tolist() == pytest.approx(chosen.tolist(), abs=1e-6)
    # batching does not change scores
    assert RewardModelScorer(tiny_rm.final, batch_size=5).score(prompts, texts).tolist() == pytest.approx(chosen.tolist(), abs=1e-5)
    # nor do token budgets (PPO's algorithm.micro_batch_tokens) or packing (algorithm.packing): the spy sees the
    # forwards the scorer really ran
    for budget, packed in ((None, True), (60, False), (60, True), (10**6, True)):
        scorer = RewardModelScorer(tiny_rm.final, batch_size=16, max_tokens=budget, packed=packed)
        forwards = []
        backbone = scorer.model.model
        backbone.register_forward_hook(lambda module, args, out: forwards.append(out.last_hidden_state.shape[:2]))
        assert scorer.score(prompts, texts).tolist() == pytest.approx(chosen.tolist(), abs=1e-5), (budget, packed)
        real, fed = sum(map(len, encode_many(scorer.tokenizer, prompts, texts))), sum(r * n for r, n in forwards)
        assert fed == real if packed else fed > real
        assert all(shape[0] == 1 for shape in forwards) == packed
        assert all(shape[0] * shape[1] <= budget or shape[0] == 1 for shape in forwards) if budget else len(forwards) == 4
    norm = RewardModelScorer(tiny_rm.final, normalize=True).score(prompts, texts)
    assert norm.tolist() == pytest.approx(((chosen - stats["mean"]) / stats["std"]).tolist(), abs=1e-5)


def test_rm_scores_whole_answers_of_long_sequences_by_trimming_the_prompt(tiny_rm, tiny_paths):
    """A rollout longer than the RM's max_length (64 tokens here) is scored on its whole answer after the last prompt
    tokens that fit, never on a prefix; an answer that cannot fit is a clear error."""
    from alignment.errors import UserError
    from reward.scoring import RewardModelScorer, encode

    scorer = RewardModelScorer(tiny_rm.final)
    assert scorer.max_length == 64
    row = json.loads(tiny_paths.preferences.read_text().splitlines()[0])
    answer = row["chosen"][0]["content"]
    long_prompt = [{"role": "user", "content": " ".join([row["prompt"][-1]["content"]] * 12)}]
    full = encode(scorer.tokenizer, long_prompt, answer)
    assert len(full) > 64
    answer_ids = encode(scorer.tokenizer, [], answer)  # no prompt: the assistant turn alone
    trimmed = scorer.score([long_prompt, row["prompt"]], [answer, answer])
    assert scorer.last_trimmed == 1
    # By hand: the last 64 tokens hold the whole answer turn (the tiny template has no BOS to keep).
    expected = full[-64:]
    assert expected[-len(answer_ids):] == answer_ids
    assert trimmed[0].item() == pytest.approx(scorer.score_ids([expected])[0].item(), abs=1e-6)
    assert trimmed[0].item() != pytest.approx(scorer.score_ids([full[:64]])[0].item(), abs=1e-3)  # what a prefix would get

    with pytest.raises(UserError, match=r"does not fit its max_length of 64"):
        scorer.score([row["prompt"]], [" ".join([answer] * 20)])
    assert 24 <= scorer.answer_room() < 64  # recipes/tiny/ppo.yaml's 24-token answers fit


def test_hh_style_pairs_train_an_rm_that_ranks_the_same_through_the_ppo_reward_path(tiny_paths, tiny_sft, tmp_path):
    """Preference pairs as HH-RLHF transcripts ("\\n\\nHuman: ...\\n\\nAssistant: ...") are read as conversations, so
    the RM learns the chat-template rendering that PPO's chat prompts give it: scored through PPO's reward path
    (prompts as messages, answers as strings) it ranks held-out pairs exactly as its own stage's evaluation did.
    An RM asked to score another rendering than it learned refuses with one line."""
    import shutil

    import torch

    from alignment.config.ppo import RewardSource
    from alignment.errors import UserError
    from reward.composite import CompositeReward

    def hh(turns: list[dict]) -> str:
        return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in turns)

    rows = [json.loads(line) for line in tiny_paths.preferences.read_text().splitlines()]
    hh_file = tmp_path / "hh.jsonl"
    hh_file.write_text("".join(json.dumps({"chosen": hh(r["prompt"] + r["chosen"]), "rejected": hh(r["prompt"] + r["rejected"])}) + "\n"
                               for r in rows))
    out = tmp_path / "rm"
    split = even_eval_split(hh_file, tmp_path / "split")
    proc = run_stage("rm", RECIPE, _no_gold([*tiny_rm_overrides(tiny_paths, tiny_sft.final, out), *split]))
    assert "HH-style transcripts" in proc.stdout
    stage_accuracy = json.loads((out / "summary.json").read_text())["eval"]["accuracy"]
    stats = json.loads((out / "final" / "reward_stats.json").read_text())
    assert stats["rendering"]["kind"] == "chat_template"

    held_out = [json.loads(line) for line in (tmp_path / "split" / "eval.jsonl").read_text().splitlines()]
    conversations = [(r["chosen"].split("\n\nAssistant: ")[0].removeprefix("\n\nHuman: "),
                      r["chosen"].split("\n\nAssistant: ")[1], r["rejected"].split("\n\nAssistant: ")[1]) for r in held_out]
    reward = CompositeReward.from_recipe([RewardSource(kind="model", path=str(out / "final"), normalize=False)], torch.device("cpu"))
    prompts = [[{"role": "user", "content": q}] for q, _, _ in conversations]  # how PPO's prompts come
    chosen, _ = reward(prompts, [c for _, c, _ in conversations], {})
    rejected, _ = reward(prompts, [r for _, _, r in conversations], {})
    ppo_accuracy = float((chosen > rejected).float().mean())
    print(f"\nHH-style RM: pairwise accuracy {stage_accuracy:.4f} in its stage, {ppo_accuracy:.4f} through PPO's reward path")
    assert stage_accuracy > 0.7 and abs(ppo_accuracy - stage_accuracy) < 0.02

    with pytest.raises(UserError, match=r"trained on chat conversations .* but is asked to score plain text"):
        reward([q for q, _, _ in conversations[:2]], [c for _, c, _ in conversations[:2]], {})
    as_text = tmp_path / "as_text"  # the same weights, recorded as a plain-text RM: chat prompts are refused
    shutil.copytree(out / "final", as_text)
    (as_text / "reward_stats.json").write_text(json.dumps({**stats, "rendering": {"kind": "text"}}))
    with pytest.raises(UserError, match=r"trained on plain text .* but is asked to score chat conversations"):
        CompositeReward.from_recipe([RewardSource(kind="model", path=str(as_text))], torch.device("cpu"))(prompts[:2], ["a", "b"], {})


def test_rm_overlong_pairs_counted_then_dropped_or_truncated(tiny_paths):
    from datasets import Dataset
    from transformers import AutoTokenizer

    from alignment.data.pairs import tokenize_pairs
    from reward.scoring import encode

    tok = AutoTokenizer.from_pretrained(str(tiny_paths.base))
    rows = [json.loads(line) for line in tiny_paths.preferences.read_text().splitlines()[:200]]
    data = Dataset.from_list(rows)
    lengths = [max(len(encode(tok, r["prompt"], r["chosen"])), len(encode(tok, r["prompt"], r["rejected"]))) for r in rows]
    limit = sorted(lengths)[len(lengths) // 2]  # about half the pairs are over-long
    expected = sum(n > limit for n in lengths)
    assert 0 < expected < len(rows)

    dropped, counts = tokenize_pairs(data, tok, limit, "drop", keep_columns=("margin",))
    assert counts["overlong"] == counts["dropped"] == expected and len(dropped) == len(rows) - expected
    assert max(max(len(c), len(r)) for c, r in zip(dropped["chosen_ids"], dropped["rejected_ids"])) <= limit

    truncated, counts = tokenize_pairs(data, tok, limit, "truncate", keep_columns=("margin",))
    assert counts["overlong"] == counts["truncated"] == expected
    assert len(truncated) == len(rows) - counts["identical_after_truncation"]
    assert max(max(len(c), len(r)) for c, r in zip(truncated["chosen_ids"], truncated["rejected_ids"])) <= limit
    assert set(truncated.column_names) == {"chosen_ids", "rejected_ids"}


def test_rm_lora_roundtrip_keeps_score_head(tiny_paths, tiny_sft, tmp_path):
    """LoRA RM: the adapter file carries the trained score head (modules_to_save); adapter reloaded on the base
    and the merged export both give the trained model's scores."""
    from safetensors import safe_open

    out = tmp_path / "lora"
    run_stage("rm", RECIPE, _no_gold(tiny_rm_overrides(tiny_paths, tiny_sft.final, out)) + [
        "train.max_steps=25", "model.lora={r: 8, alpha: 16, dropout: 0.0}"])
    with safe_open(str(out / "adapter" / "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert any(k.endswith("score.weight") for k in keys), keys
    assert (out / "adapter" / "reward_stats.json").exists() and (out / "final" / "reward_stats.json").exists()
    _check_probe(out, out / "adapter")
    _check_probe(out, out / "final")


@pytest.mark.e2e
def test_rm_zero3_two_processes(tiny_paths, tiny_sft, tmp_path):
    """ZeRO-3 over 2 CPU processes: ranks see different pairs; the gathered export reloads in one process
    and gives exactly the rewards the sharded model computed. After training both ranks score the exported model
    (statistics, held-out pairs, gold agreement), each half of the sequences, in the model's dtype: none waits for
    the other to do it all."""
    out, record, spied = tmp_path / "run", tmp_path / "batches", tmp_path / "scoring"
    split = even_eval_split(tiny_paths.preferences, tmp_path / "data", n_eval=128)  # 2 ranks x 2 full batches of 32
    env = stage_env(ALIGNMENT_RECORD_BATCHES=str(record), ALIGNMENT_SPY_SCORING=str(spied))
    env["PYTHONPATH"] = str(REPO / "tests" / "spies") + os.pathsep + env["PYTHONPATH"]
    run_stage("rm", RECIPE, tiny_rm_overrides(tiny_paths, tiny_sft.final, out) + split
              + ["train.max_steps=20", "output.save_steps=10", "gold_agreement.num_prompts=32",
                 "gold_agreement.samples_per_prompt=4"],
              accelerate_config=REPO / "recipes/accelerate/cpu_zero3.yaml", env=env)
    seen = [{json.loads(line)["hash"] for line in (record / f"rank{r}.jsonl").read_text().splitlines()} for r in (0, 1)]
    assert len(seen[0]) >= 20 * 32 * 0.9 and len(seen[1]) >= 20 * 32 * 0.9
    assert not seen[0] & seen[1], "both ranks were fed the same pairs"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 20
    _check_probe(out, out / "final")
    assert summary["eval"]["num_pairs"] == 128
    assert summary["trainer_eval"]["loss"] == pytest.approx(summary["eval"]["loss"], abs=1e-5)
    agreement = summary["gold_agreement"]
    assert agreement["prompts"] == 32 and agreement["pairs"] + agreement["gold_ties_skipped"] == 32 * 2  # 4 answers each
    stats_sequences = summary["reward_stats"]["num_rewards"]
    for rank in (0, 1):
        calls = [json.loads(line) for line in (spied / f"rank{rank}.jsonl").read_text().splitlines()]
        # the recipe's model.dtype, asked for explicitly (bf16 cannot train on CPU: on GPUs the same line asks for it)
        assert [c["scorer_dtype"] for c in calls if "scorer_dtype" in c] == ["torch.float32"]
        # statistics, held-out pairs (128 x 2), gold agreement (16 prompts x 2 pairs, scored a side at a time)
        assert [c["scored"] for c in calls if "scored" in c] == [stats_sequences // 2, 128, 32, 32], calls


def test_rm_runs_are_reproducible(tiny_paths, tiny_sft, tmp_path):
    """The same recipe twice gives the same weights (the new score head is seeded before the model is built)."""
    weights = []
    for run in ("a", "b"):
        out = tmp_path / run
        run_stage("rm", RECIPE, _no_gold(tiny_rm_overrides(tiny_paths, tiny_sft.final, out)) + ["train.max_steps=3"])
        weights.append((out / "final" / "model.safetensors").read_bytes())
    assert weights[0] == weights[1]
