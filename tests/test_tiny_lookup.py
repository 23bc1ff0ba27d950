"""The tiny tool-use task (alignment/tiny/lookup.py) and multi-turn GRPO on it, through the real stages: SFT and a
no-tool baseline (CLI), GRPO with the lookup tool on the colocated vLLM engine and on a rollout server (gloo weight
sync), and the evaluation of whole episodes. The task's answer needs the tool: the baseline that never calls it
fails, and GRPO makes the SFT policy call it."""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from alignment.tiny import lookup as task
from conftest import REPO, read_metrics, run_stage
from rollout.multi_turn import tool_schemas
from rollout.tool_calls import MalformedToolCall, ToolCall
from rollout.turn_tokens import TurnTokenizer

RECIPES = REPO / "recipes" / "tiny_tools"


def test_the_build_is_deterministic_and_holds_out_pairs(tmp_path):
    a, b = task.build_tiny_lookup(tmp_path / "a"), task.build_tiny_lookup(tmp_path / "b")
    for name in ("sft", "sft_guesses", "prompts", "eval_prompts"):
        assert getattr(a, name).read_bytes() == getattr(b, name).read_bytes()
    info = json.loads(a.info.read_text())
    assert abs(info["sft_tool_share"] - task.TOOL_DEMO_SHARE) < 0.03
    rows = [json.loads(line) for line in a.prompts.read_text().splitlines()]
    held = [json.loads(line) for line in a.eval_prompts.read_text().splitlines()]
    assert not {(r["item"], r["room"]) for r in rows} & {(r["item"], r["room"]) for r in held}
    assert all(r["color"] == task.color_of(r["item"], r["room"]) for r in rows + held)
    guesses = [json.loads(line)["messages"] for line in a.sft_guesses.read_text().splitlines()]
    assert guesses and all(len(m) == 2 for m in guesses)


def test_the_tool_the_call_format_and_the_gold_rule_by_hand():
    color = task.color_of("lamp", 17)
    assert task.lookup("lamp", 17) == f"the lamp in room 17 is {color}"
    assert task.lookup("dragon", 17) == task.lookup("lamp", 100) == "error no such item"
    assert len({task.color_of(item, 0) for item in task.ITEMS}) > 6  # the hash spreads colors: nothing to memorise
    assert task.parse_call("<tool_call> lookup lamp 17 </tool_call>") == [ToolCall("lookup", {"item": "lamp", "room": 17})]
    assert task.parse_call("the lamp in room 17 is red .") == []
    for text, reason in (("<tool_call> lookup lamp 17", "unclosed"), ("<tool_call> lookup lamp </tool_call>", "bad_arguments")):
        with pytest.raises(MalformedToolCall) as err:
            task.parse_call(text)
        assert err.value.reason == reason
    other = next(c for c in task.COLORS if c != color)
    assert task.gold_reward(None, [f"the lamp in room 17 is {color} .", f"the lamp in room 17 is {other} .",
                                   f"it is {color} or {other} .", "<tool_call> lookup lamp 17 </tool_call>"],
                            [color] * 4) == [1.0, 0.0, 0.0, 0.0]


def test_the_template_renders_a_tool_episode_as_the_rollouts_tokenise_it():
    tok = task.make_tokenizer()
    episode = next(d for s in range(10) if len(d := task.sample_demo(random.Random(s), "lamp", 17)) == 4)
    full = tok.apply_chat_template(episode, tokenize=False)
    color = task.color_of("lamp", 17)
    assert full == ("<|user|> what color is the lamp in room 17 <|end|> <|assistant|> <tool_call> lookup lamp 17 "
                    f"</tool_call> <|end|> <|tool|> the lamp in room 17 is {color} <|end|> <|assistant|> the lamp in "
                    f"room 17 is {color} . <|end|>")
    turns = TurnTokenizer(tok, tool_schemas([task.lookup]))
    ids = turns.prompt_ids(episode[:1]) + tok("<tool_call> lookup lamp 17 </tool_call> <|end|>")["input_ids"]
    ids += turns.environment_ids([episode[2]], ids[-1])
    ids += tok(f"the lamp in room 17 is {color} . <|end|>")["input_ids"]
    assert ids == tok(full)["input_ids"]  # token-in/token-out gives what the SFT demonstrations trained on


@pytest.fixture(scope="session")
def lookup_policies(tmp_path_factory):
    """The task's build, its SFT policy (recipes/tiny_tools/sft.yaml, ~75 s) and the no-tool baseline (~10 s)."""
    root = tmp_path_factory.mktemp("tiny_lookup")
    paths = task.build_tiny_lookup(root / "build")
    runs = {}
    for name, recipe, data in (("sft", "sft.yaml", paths.sft), ("no_tool", "sft_no_tool.yaml", paths.sft_guesses)):
        out = root / name
        run_stage("sft", RECIPES / recipe, [f"model.name_or_path={paths.base}", f"data.sources.0.path={data}",
                                             f"output.dir={out}"])
        runs[name] = out / "final"
    return SimpleNamespace(paths=paths, **runs)


def grpo_overrides(policies, out: Path, steps: int = 6) -> list[str]:
    return [f"policy.name_or_path={policies.sft}", f"prompts.sources.0.path={policies.paths.prompts}",
            f"eval.prompts={policies.paths.eval_prompts}", f"output.dir={out}", f"train.steps={steps}",
            f"eval_every={steps}", "output.save_steps=100"]


def assert_grpo_learned_to_call(metrics: list[dict], label: str) -> None:
    """Step 1 samples the SFT policy: its success (on training prompts) is the baseline; GRPO's held-out success
    at the end must beat it by more than 0.15 (128 prompts x 4 samples: standard error ~0.02)."""
    before, after = metrics[0]["ppo/gold"], metrics[-1]["eval/gold"]
    print(f"{label}: SFT success {before:.3f} -> GRPO held-out success {after:.3f}; tool calls "
          f"{metrics[0]['rollout/tool_calls']:.2f} -> {metrics[-1]['rollout/tool_calls']:.2f}")
    assert after > before + 0.15, (before, after)
    assert metrics[-1]["rollout/tool_calls"] > metrics[0]["rollout/tool_calls"]
    assert all(m["ppo/logprob_mismatch"] < 1.02 for m in metrics), "engine and trainer must agree on the model's tokens"


@pytest.mark.e2e
def test_grpo_with_the_tool_beats_sft_and_the_no_tool_baseline_fails(lookup_policies, tmp_path):
    from alignment.config.eval import EvalRecipe
    from alignment.config.ppo import PPORecipe
    from alignment.config.schema import load_recipe
    from alignment.stages import eval as eval_stage
    from alignment.stages.ppo import run
    from rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(str(lookup_policies.sft), dtype="float32", seed=0, max_model_len=256)
    try:
        out = tmp_path / "grpo"
        run(load_recipe(RECIPES / "grpo.yaml", PPORecipe, grpo_overrides(lookup_policies, out)), engine=engine)
        metrics = read_metrics(out)
        assert_grpo_learned_to_call(metrics, "colocated")
        results = eval_stage.run(load_recipe(RECIPES / "eval.yaml", EvalRecipe, [
            f"policies=[{{path: {lookup_policies.no_tool}, name: no_tool}}, {{path: {lookup_policies.sft}, name: sft}}, "
            f"{{path: {out / 'final'}, name: grpo}}]", f"prompts.path={lookup_policies.paths.eval_prompts}",
            f"output_dir={tmp_path / 'eval'}"]), engine=engine)
    finally:
        engine.close()
    per_policy = results["per_policy"]
    success = {name: r["scores"]["gold"]["value"] for name, r in per_policy.items()}
    calls = {name: r["episodes"]["tool_calls"]["value"] for name, r in per_policy.items()}
    print(f"eval success {success}, tool calls {calls}")
    assert calls["no_tool"] == 0 and success["no_tool"] < 0.2  # never calls: a guess, right ~1 time in 12
    assert success["grpo"] > success["sft"] + 0.15 and calls["grpo"] > calls["sft"]
    report = (tmp_path / "eval" / "report.md").read_text()
    assert "## Multi-turn episodes" in report and "success: gold" in report


@pytest.mark.e2e
def test_grpo_with_the_tool_on_a_rollout_server(lookup_policies, tmp_path):
    from alignment.config.ppo import PPORecipe
    from alignment.config.schema import load_recipe
    from alignment.errors import RolloutError
    from alignment.stages.ppo import run
    from rollout.remote import RemoteEngine
    from test_remote_rollouts import start_server
    from test_rollout import kill_group

    proc, url = start_server(lookup_policies.sft, tmp_path / "server.log", isolated=False)
    try:
        for _ in range(600):
            assert proc.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
            try:
                RemoteEngine(url, timeout=5).health()
                break
            except RolloutError:
                time.sleep(0.5)
        out = tmp_path / "grpo_remote"
        run(load_recipe(RECIPES / "grpo.yaml", PPORecipe, [
            *grpo_overrides(lookup_policies, out), "rollout.engine=remote", f"rollout.servers=[{url}]",
            "rollout.weight_sync=gloo"]))
    finally:
        kill_group(proc)
    metrics = read_metrics(out)
    assert all(m["sync/bytes"] > 0 for m in metrics)
    assert_grpo_learned_to_call(metrics, "rollout server")
