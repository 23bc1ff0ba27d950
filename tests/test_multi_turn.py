"""Multi-turn rollouts by hand: token layout, masks and log-probs of trajectories, environments and tools that hang,
fail or get malformed calls, episode limits, and the PPO math on masks with holes. A scripted engine stands in for
vLLM here (its replies are chosen per turn); tests/test_multi_turn_engines.py runs the real engines."""

from __future__ import annotations

import time

import pytest
import torch

from alignment.errors import UserError
from alignment.ppo.advantages import ADVANTAGE_ESTIMATORS, AdvantageParams
from alignment.ppo.batch import RolloutBatch
from alignment.ppo.rewards import last_token_index, token_level_rewards
from alignment.tiny.tokenizer import make_tokenizer
from rollout import Sample, SamplingConfig
from rollout.environments import StepResult, ToolEnvironment
from rollout.multi_turn import EpisodeLimits, MultiTurnRollouts, episode_metrics
from rollout.tool_calls import MalformedToolCall, ToolCall
from rollout.turn_tokens import TurnTokenizer

# The tiny tokenizer's words, in a template with a tool role (the tiny default's own template has none).
TOOL_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if not loop.first %} {% endif -%}"
    "{%- if message['role'] == 'user' -%}<|user|> {{ message['content'] }} <|end|>"
    "{%- elif message['role'] == 'assistant' -%}<|assistant|> {{ message['content'] }} <|end|>"
    "{%- else -%}<|user|> {{ message['content'] }} <|end|>"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{%- if messages %} {% endif -%}<|assistant|>{%- endif -%}"
)


@pytest.fixture(scope="module")
def tokenizer():
    tok = make_tokenizer()
    tok.chat_template = TOOL_TEMPLATE
    return tok


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


class ScriptedEngine:
    """Answers turn k of every trajectory with `replies[k]` (text, finish reason); log-probs -0.1 * (position + 1).
    Records every call's prompts and sampling."""

    weight_version = 3

    def __init__(self, tokenizer, replies: list[tuple[str, str]]):
        self.tokenizer, self.replies, self.calls = tokenizer, replies, []

    def generate(self, prompts, sampling):
        turn = len(self.calls)
        self.calls.append((prompts, sampling))
        text, reason = self.replies[turn]
        out = []
        for i, prompt in enumerate(prompts):
            completion = ids(self.tokenizer, text)
            out.append(Sample(prompt_index=i, prompt_ids=list(prompt), completion_ids=completion,
                              text=text.replace(" <|end|>", ""), logprobs=[-0.1 * (k + 1) for k in range(len(completion))],
                              finish_reason=reason, weight_version=self.weight_version))
        return out


def lookup(item: str) -> str:
    """Look an item's color up.

    Args:
        item: the item
    """
    return {"lamp": "red"}.get(item, "unknown")


def slow_lookup(item: str) -> str:
    """Look an item up, slowly.

    Args:
        item: the item
    """
    time.sleep(30)
    return "late"


def word_calls(tool: str):
    """A test call format in the tiny vocabulary's words: 'review <item>' calls `tool`(item=<item>)."""

    def parse(text: str) -> list[ToolCall]:
        words = text.split()
        if "review" not in words:
            return []
        at = words.index("review")
        if len(words) < at + 2:
            raise MalformedToolCall("unclosed", "a call needs an argument")
        return [ToolCall(name=tool, arguments={"item": words[at + 1]}, id="call0")]

    return parse


def tool_rollouts(tokenizer, tools, max_turns=3, max_tokens=64, step_timeout_s=5.0, tool_timeout_s=5.0):
    make_env = lambda: ToolEnvironment(tools, word_calls(tools[0].__name__), tool_timeout_s, 40)  # noqa: E731
    return MultiTurnRollouts(TurnTokenizer(tokenizer), make_env, EpisodeLimits(max_turns, max_tokens, step_timeout_s))


PROMPT = [{"role": "user", "content": "what do you think of the lamp"}]


def test_a_tool_trajectory_holds_the_sampled_tokens_and_the_environment_tokens_rendered_once(tokenizer):
    engine = ScriptedEngine(tokenizer, [("review lamp <|end|>", "stop"), ("the lamp is red . <|end|>", "stop")])
    rollouts = tool_rollouts(tokenizer, [lookup])
    prompt_ids = rollouts.prompt_ids(PROMPT)
    [sample] = rollouts.generate(engine, [prompt_ids], [{}], SamplingConfig(n=1, seed=5, max_new_tokens=8))

    turn1 = ids(tokenizer, "review lamp <|end|>")
    env = ids(tokenizer, " <|user|> red <|end|> <|assistant|>")  # the tool's answer as a user-role turn, then gen prompt
    turn2 = ids(tokenizer, "the lamp is red . <|end|>")
    assert sample.prompt_ids == prompt_ids == ids(tokenizer, "<|user|> what do you think of the lamp <|end|> <|assistant|>")
    assert sample.completion_ids == turn1 + env + turn2
    assert sample.completion_mask == [1] * len(turn1) + [0] * len(env) + [1] * len(turn2)
    assert sample.logprobs == [-0.1 * (k + 1) for k in range(len(turn1))] + [0.0] * len(env) \
        + [-0.1 * (k + 1) for k in range(len(turn2))]
    assert sample.text == "the lamp is red ."
    assert sample.finish_reason == "stop" and sample.weight_version == 3
    assert sample.episode == {"turns": 2, "tool_calls": 1, "env_reward": None, "errors": {}}
    # turn 2's prompt is the prompt, turn 1 as sampled and the environment's tokens: nothing re-rendered
    assert engine.calls[1][0] == [prompt_ids + turn1 + env]
    assert [c[1].seed for c in engine.calls] == [5, 5 + 1_000_000_007] and all(c[1].n == 1 for c in engine.calls)

    batch = RolloutBatch.from_samples([sample], [0])
    assert batch.mask[0].tolist() == [float(m) for m in sample.completion_mask]
    assert int(last_token_index(batch.mask)) == len(sample.completion_ids) - 1


def test_groups_come_prompt_major_and_finished_trajectories_leave_the_engine_calls(tokenizer):
    engine = ScriptedEngine(tokenizer, [("the lamp is red . <|end|>", "stop")])
    rollouts = tool_rollouts(tokenizer, [lookup])
    samples = rollouts.generate(engine, [rollouts.prompt_ids(PROMPT)] * 2, [{}, {}], SamplingConfig(n=3, seed=0))
    assert [s.prompt_index for s in samples] == [0, 0, 0, 1, 1, 1]
    assert len(engine.calls) == 1 and len(engine.calls[0][0]) == 6  # all answered at once: one turn, one call
    assert all(s.episode["turns"] == 1 and s.episode["tool_calls"] == 0 for s in samples)


def test_a_hung_environment_is_a_scored_failure_within_its_timeout(tokenizer):
    class Hangs:
        def reset(self, **row):
            return None

        def step(self, action):
            time.sleep(60)

    engine = ScriptedEngine(tokenizer, [("the lamp <|end|>", "stop")])
    rollouts = MultiTurnRollouts(TurnTokenizer(tokenizer), Hangs, EpisodeLimits(3, 64, step_timeout_s=0.3))
    start = time.monotonic()
    [sample] = rollouts.generate(engine, [rollouts.prompt_ids(PROMPT)], [{}], SamplingConfig(n=1))
    assert time.monotonic() - start < 5
    assert sample.episode["errors"] == {"env_step_timeout": 1} and sample.text == "the lamp"
    assert episode_metrics([sample])["rollout/errors/env_step_timeout"] == 1.0


def test_a_hung_tool_answers_with_an_error_the_model_reads_and_is_counted(tokenizer):
    engine = ScriptedEngine(tokenizer, [("review lamp <|end|>", "stop"), ("the lamp <|end|>", "stop")])
    rollouts = tool_rollouts(tokenizer, [slow_lookup], tool_timeout_s=0.3)
    start = time.monotonic()
    [sample] = rollouts.generate(engine, [rollouts.prompt_ids(PROMPT)], [{}], SamplingConfig(n=1))
    assert time.monotonic() - start < 5
    assert sample.episode["errors"] == {"tool_timeout": 1} and sample.episode["turns"] == 2


def test_a_malformed_call_ends_the_episode_as_a_scored_failure_with_its_reason(tokenizer):
    engine = ScriptedEngine(tokenizer, [("review <|end|>", "stop"), ("never asked", "stop")])
    rollouts = tool_rollouts(tokenizer, [lookup])
    [sample] = rollouts.generate(engine, [rollouts.prompt_ids(PROMPT)], [{}], SamplingConfig(n=1))
    assert len(engine.calls) == 1
    assert sample.episode["errors"] == {"malformed_call_unclosed": 1} and sample.finish_reason == "stop"


@pytest.mark.parametrize("case", ["unknown_tool", "bad_arguments", "tool_raised"])
def test_tool_errors_are_told_to_the_model_and_counted(tokenizer, case):
    def broken(item: str) -> str:
        """Fails.

        Args:
            item: the item
        """
        raise RuntimeError("boom")

    name = {"unknown_tool": "nosuch", "bad_arguments": "lookup", "tool_raised": "broken"}[case]
    env = ToolEnvironment([lookup, broken], lambda text: [ToolCall(name, {"item": "lamp"} if case != "bad_arguments"
                                                                   else {"color": "x"}, "c0")], 1.0, 100)
    result = env.step("anything")
    assert not result.done and result.info == {"tool_calls": 1, "tool_errors": [case]}
    assert result.observation[0]["role"] == "tool" and result.observation[0]["content"].startswith("error:")


def test_tool_output_is_truncated(tokenizer):
    def long_tool(item: str) -> str:
        """Long.

        Args:
            item: the item
        """
        return "x" * 500

    env = ToolEnvironment([long_tool], lambda text: [ToolCall("long_tool", {"item": "a"}, "c0")], 1.0, 20)
    assert env.step("a").observation[0]["content"] == "x" * 20 + " [truncated]"


def test_episode_limits_turns_and_tokens(tokenizer):
    # max_turns: every turn calls the tool; the third call is never answered
    engine = ScriptedEngine(tokenizer, [("review lamp <|end|>", "stop")] * 3)
    [sample] = tool_rollouts(tokenizer, [lookup], max_turns=3).generate(
        engine, [ids(tokenizer, "<|user|> the lamp <|end|> <|assistant|>")], [{}], SamplingConfig(n=1))
    assert sample.episode["turns"] == 3 and sample.episode["errors"] == {"max_turns": 1}
    assert sample.completion_mask[-1] == 1  # ends with the model's turn, no dangling environment tokens
    # max_tokens: cut inside the second turn
    engine = ScriptedEngine(tokenizer, [("review lamp <|end|>", "stop"), ("the lamp is red . <|end|>", "stop")])
    [sample] = tool_rollouts(tokenizer, [lookup], max_tokens=12).generate(
        engine, [ids(tokenizer, "<|user|> the lamp <|end|> <|assistant|>")], [{}], SamplingConfig(n=1))
    assert len(sample.completion_ids) == 12 and sample.finish_reason == "length"
    # a turn cut at max_new_tokens ends the episode
    engine = ScriptedEngine(tokenizer, [("review lamp", "length")])
    [sample] = tool_rollouts(tokenizer, [lookup]).generate(
        engine, [ids(tokenizer, "<|user|> the lamp <|end|> <|assistant|>")], [{}], SamplingConfig(n=1))
    assert sample.finish_reason == "length" and len(engine.calls) == 1


def test_an_openenv_shaped_environment_with_typed_observations_and_rewards(tokenizer):
    class Observation:  # OpenEnv's server-side Observation: carries done and reward
        def __init__(self, text, done, reward):
            self.text, self.done, self.reward = text, done, reward

    class Guess:
        def reset(self, **row):
            self.answer, self.tries = row["answer"], 0

        def step(self, action):
            self.tries += 1
            right = self.answer in action.split()
            return Observation("no" if not right else "yes", done=right or self.tries == 2, reward=1.0 if right else -0.1)

    engine = ScriptedEngine(tokenizer, [("blue <|end|>", "stop"), ("red <|end|>", "stop")])
    rollouts = MultiTurnRollouts(TurnTokenizer(tokenizer), Guess, EpisodeLimits(4, 64, 5.0),
                                 observation_to_text=lambda o: o.text)
    [sample] = rollouts.generate(engine, [rollouts.prompt_ids(PROMPT)], [{"answer": "red"}], SamplingConfig(n=1))
    assert sample.episode["turns"] == 2 and sample.episode["env_reward"] == pytest.approx(0.9)
    assert engine.calls[1][0][0][-4:] == ids(tokenizer, "<|user|> no <|end|> <|assistant|>")


def test_the_score_goes_on_the_last_model_token_and_advantages_cover_only_the_models_tokens():
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]])  # row 0: env tokens at 2, 3
    assert last_token_index(mask).tolist() == [4, 2]
    rewards = token_level_rewards(torch.tensor([2.0, -1.0]), torch.full((2, 6), 0.5), mask, kl_coef=0.1)
    assert torch.allclose(rewards, torch.tensor([[-0.05, -0.05, 0.0, 0.0, 1.95, 0.0], [-0.05, -0.05, -1.05, 0.0, 0.0, 0.0]]))
    scores = torch.tensor([1.0, 0.0])
    adv, _ = ADVANTAGE_ESTIMATORS["grpo"].compute(scores, torch.zeros(2, 6), mask, None,
                                                   AdvantageParams(gamma=1.0, lam=1.0, kl_coef=0.0, group_size=2))
    assert (adv * (1 - mask)).abs().sum() == 0  # nothing on the environment's tokens or padding
    assert adv[0, [0, 1, 4]].tolist() == pytest.approx([adv[0, 0].item()] * 3) and adv[0, 0] > 0 > adv[1, 0]


def test_a_step_result_of_the_wrong_shape_is_a_clear_error(tokenizer):
    class Wrong:
        def reset(self, **row):
            return None

        def step(self, action):
            return 42

    engine = ScriptedEngine(tokenizer, [("the <|end|>", "stop")])
    rollouts = MultiTurnRollouts(TurnTokenizer(tokenizer), Wrong, EpisodeLimits(2, 64, 5.0))
    with pytest.raises(UserError, match="not a StepResult"):
        rollouts.generate(engine, [rollouts.prompt_ids(PROMPT)], [{}], SamplingConfig(n=1))


def test_step_results_keep_their_info():
    result = StepResult(observation="x", reward=1.0, done=False, info={"error": "e"})
    assert result.info == {"error": "e"}


def _ppo_recipe(tmp_path, multi_turn: dict, advantage: str = "grpo", max_model_len: int = 512, overlong=None):
    import yaml

    from alignment.config.ppo import PPORecipe
    from alignment.config.schema import load_recipe

    raw = {"policy": {"name_or_path": "p"}, "rewards": [{"kind": "function", "function": "m:f"}],
           "prompts": {"sources": [{"path": "x.jsonl"}]}, "train": {"steps": 1}, "output": {"dir": str(tmp_path / "o")},
           "algorithm": {"advantage": advantage, **({"overlong": overlong} if overlong else {})},
           "rollout": {"max_model_len": max_model_len, "sampling": {"samples_per_prompt": 2}, "multi_turn": multi_turn}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(raw))
    return load_recipe(path, PPORecipe, check_paths=False)


def test_the_multi_turn_recipe_section_is_checked(tmp_path):
    from alignment.errors import RecipeError

    recipe = _ppo_recipe(tmp_path, {"tools": ["tests.test_multi_turn:lookup"], "max_turns": 3, "max_tokens": 128})
    assert recipe.rollout.multi_turn.max_turns == 3 and recipe.rollout.completion_tokens() == 128
    for multi_turn, advantage, message in (
            ({"tools": ["m:f"], "environment": "m:E"}, "grpo", "give either tools or an environment"),
            ({}, "grpo", "give either tools or an environment"),
            ({"tools": ["m:f"]}, "gae", "critic-free estimators only"),
            ({"tools": ["m:f"], "max_tokens": 512}, "grpo", "must leave room for the prompt"),
            ({"tools": ["m:f"], "max_turn": 2}, "grpo", "max_turn")):
        with pytest.raises(RecipeError, match=message):
            _ppo_recipe(tmp_path, multi_turn, advantage)
    with pytest.raises(RecipeError, match="overlong.buffer"):
        _ppo_recipe(tmp_path, {"tools": ["m:f"]}, overlong={"buffer": 8})


def test_the_stage_builds_rollouts_from_the_section_and_names_bad_user_code(tmp_path, tokenizer):
    from rollout.multi_turn import multi_turn_rollouts

    recipe = _ppo_recipe(tmp_path, {"tools": ["tests.test_multi_turn:lookup"], "call_format": "hermes"})
    rollouts = multi_turn_rollouts(recipe.rollout.multi_turn, tokenizer)
    assert rollouts.turn_tokens.tools[0]["function"]["name"] == "lookup"  # its JSON schema, from the docstring
    assert [fn.__name__ for fn in rollouts.make_environment().tools] == ["lookup"]
    for section, message in (({"tools": ["tests.test_multi_turn:nosuch"]}, "'nosuch' is not a function"),
                             ({"tools": ["tests.test_multi_turn:ScriptedEngine"]}, "no usable JSON schema"),
                             ({"tools": ["tests.test_multi_turn:lookup"], "call_format": "xml"}, "is not auto, hermes"),
                             ({"tools": ["tests.test_multi_turn:lookup"], "call_format": "auto"}, "auto knows no"),
                             ({"environment": "tests.test_multi_turn:StepResult"}, "no reset\\(\\) method")):
        with pytest.raises(UserError, match=message):
            multi_turn_rollouts(_ppo_recipe(tmp_path, {"call_format": "hermes", **section}).rollout.multi_turn, tokenizer)


def test_async_reward_functions_are_awaited_together():
    import asyncio

    from reward.composite import CompositeReward, RewardTerm

    async def slow_verifier(prompts, completions, **columns):  # e.g. a remote sandbox
        await asyncio.sleep(0.4)
        return [float(len(c)) for c in completions]

    def rule(prompts, completions, env_reward, **columns):
        return [float(r or 0.0) for r in env_reward]

    reward = CompositeReward([RewardTerm("0_function", slow_verifier, 1.0), RewardTerm("1_function", slow_verifier, 0.5),
                              RewardTerm("2_function", rule, 2.0)])
    start = time.monotonic()
    total, parts = reward(["p", "q"], ["ab", "c"], {"env_reward": [1.0, None]})
    assert time.monotonic() - start < 0.75  # the two 0.4 s verifiers overlapped
    assert total.tolist() == [2.0 + 1.0 + 2.0, 1.0 + 0.5 + 0.0]
    assert parts["0_function"].tolist() == [2.0, 1.0]


def test_an_environment_whose_reset_fails_still_gets_the_models_answer_scored(tokenizer):
    class BrokenReset:
        def reset(self, **row):
            raise ConnectionError("environment server down")

        def step(self, action):
            raise AssertionError("never stepped")

    engine = ScriptedEngine(tokenizer, [("the lamp <|end|>", "stop")])
    rollouts = MultiTurnRollouts(TurnTokenizer(tokenizer), BrokenReset, EpisodeLimits(3, 64, 5.0))
    [sample] = rollouts.generate(engine, [rollouts.prompt_ids(PROMPT)], [{}], SamplingConfig(n=1))
    assert sample.episode["errors"] == {"env_reset_error": 1} and sample.episode["turns"] == 1
    assert sample.completion_mask == [1] * len(sample.completion_ids)  # one model turn: the batch can score it


def test_a_turn_cut_by_the_budget_is_scored_on_what_was_kept_and_a_full_budget_is_no_cut(tokenizer):
    engine = ScriptedEngine(tokenizer, [("the lamp is red . <|end|>", "stop")])
    [sample] = tool_rollouts(tokenizer, [lookup], max_tokens=3).generate(
        engine, [ids(tokenizer, "<|user|> the lamp <|end|> <|assistant|>")], [{}], SamplingConfig(n=1))
    assert sample.completion_ids == ids(tokenizer, "the lamp is") and sample.finish_reason == "length"
    assert sample.text == "the lamp is"  # not the engine's whole turn: the reward must not see cut tokens
    engine = ScriptedEngine(tokenizer, [("the lamp is red . <|end|>", "stop")])
    [sample] = tool_rollouts(tokenizer, [lookup], max_tokens=6).generate(
        engine, [ids(tokenizer, "<|user|> the lamp <|end|> <|assistant|>")], [{}], SamplingConfig(n=1))
    assert len(sample.completion_ids) == 6 and sample.finish_reason == "stop"  # a final answer that just fits


def test_the_engines_context_ends_a_trajectory_before_a_prompt_could_overrun_it(tokenizer):
    engine = ScriptedEngine(tokenizer, [("review lamp <|end|>", "stop")] * 4)
    make_env = lambda: ToolEnvironment([lookup], word_calls("lookup"), 5.0, 40)  # noqa: E731
    prompt = ids(tokenizer, "<|user|> the lamp <|end|> <|assistant|>")
    limit = len(prompt) + 12
    rollouts = MultiTurnRollouts(TurnTokenizer(tokenizer), make_env, EpisodeLimits(4, 64, 5.0, max_model_len=limit))
    [sample] = rollouts.generate(engine, [prompt], [{}], SamplingConfig(n=1))
    assert sample.finish_reason == "length" and len(prompt) + len(sample.completion_ids) < limit
    assert all(len(p) < limit for prompts, _ in engine.calls for p in prompts)
    assert ids(tokenizer, "<|end|>")[0] in engine.calls[0][1].stop_token_ids  # the engine stops on every end of turn


@pytest.mark.parametrize("case", ["converter_raises", "reward_not_a_number", "constructor_raises", "reset_hangs"])
def test_environment_code_that_fails_is_a_scored_failure_never_a_crash(tokenizer, case):
    closed = []

    class Env:
        def __init__(self):
            if case == "constructor_raises":
                raise ConnectionError("environment server down")

        def reset(self, **row):
            if case == "reset_hangs":
                time.sleep(30)

        def step(self, action):
            return StepResult(observation="x", reward="good" if case == "reward_not_a_number" else None)

        def close(self):
            closed.append(True)

    def converter(observation):
        raise KeyError("no text field")

    engine = ScriptedEngine(tokenizer, [("the lamp <|end|>", "length" if case == "constructor_raises" else "stop")] * 2)
    rollouts = MultiTurnRollouts(TurnTokenizer(tokenizer), Env, EpisodeLimits(3, 64, 0.5),
                                 observation_to_text=converter if case == "converter_raises" else None)
    [sample] = rollouts.generate(engine, [rollouts.prompt_ids(PROMPT)], [{}], SamplingConfig(n=1))
    expected = {"converter_raises": "env_step_error", "reward_not_a_number": "env_step_error",
                "constructor_raises": "env_reset_error", "reset_hangs": "env_reset_timeout"}[case]
    assert sample.episode["errors"] == {expected: 1} and sample.episode["turns"] == 1
    if case == "constructor_raises":
        assert sample.finish_reason == "length"  # a cut answer stays cut when the environment failed too
    else:
        assert closed == [True]  # every environment is closed when its episode ends
