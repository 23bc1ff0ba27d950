"""Multi-turn rollouts are exact across chat templates: through a real vLLM engine, for seven families with
tool-calling templates (Qwen2.5, Qwen3, Llama 3.1, GLM-4.5, gpt-oss: their released templates as TRL ships them;
Hermes-2-Pro and Mistral v0.3: our rewrites of theirs, tests/data/chat_templates),
the trainer's token ids are the engine's sampled ids with the environment's tokens between them, the mask covers
exactly the sampled ids, and the trainer's log-probs of those tokens agree with the engine's. By hand: each
family's environment tokens after its end of turn, and, where the template renders conversations prefix-
consistently, the trajectory's text equals the template's rendering of the whole conversation.

One engine for all families: they share one BPE vocabulary (tests/helpers_templates.py) and one random model.
"""

from __future__ import annotations

import pytest
import torch

from alignment.ppo.batch import RolloutBatch
from alignment.ppo.forward import policy_forward
from alignment.ppo.mismatch import token_mult_prob_error
from helpers_templates import FAMILIES, family_tokenizer, save_family_tokenizer
from helpers_models import save_family_model
from rollout import SamplingConfig
from rollout.environments import StepResult
from rollout.multi_turn import EpisodeLimits, MultiTurnRollouts, tool_schemas
from rollout.turn_tokens import TurnTokenizer


def lookup(item: str) -> str:
    """Look an item's color up.

    Args:
        item: the item to look up
    """
    return "red"


TOOL_MESSAGE = {"role": "tool", "tool_call_id": "call00000", "name": "lookup", "content": "red"}  # Mistral: 9 characters

# What follows a model turn that ended with its end-of-turn token, then a tool result: each family's documented
# format (Qwen's <tool_response> in a user turn, Llama's ipython role, GLM's observation, gpt-oss's functions.*
# commentary message), and the generation prompt.
ENVIRONMENT_TEXT = {
    "qwen2.5": "\n<|im_start|>user\n<tool_response>\nred\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
    "qwen3": "\n<|im_start|>user\n<tool_response>\nred\n</tool_response><|im_end|>\n<|im_start|>assistant\n",
    "llama3.1": '<|start_header_id|>ipython<|end_header_id|>\n\n"red"<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n',
    "glm4.5": "\n<tool_response>\nred\n</tool_response><|assistant|>",
    "gpt-oss": '<|start|>functions.lookup to=assistant<|channel|>commentary<|message|>"red"<|end|><|start|>assistant',
    # Hermes-2-Pro's tool_use template: a tool role; the conversation's last tool turn has no "\n" after <|im_end|>
    "hermes2pro": "\n<|im_start|>tool\n<tool_response>\nred\n</tool_response><|im_end|><|im_start|>assistant\n",
    "mistral_v0.3": '[TOOL_RESULTS] {"content": red, "call_id": "call00000"}[/TOOL_RESULTS]',  # no generation prompt
}


def turn_tokens_of(name: str) -> TurnTokenizer:
    return TurnTokenizer(family_tokenizer(name), tool_schemas([lookup]), list(FAMILIES[name].ends))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_environment_tokens_after_the_models_end_of_turn_by_hand(name):
    turn_tokens = turn_tokens_of(name)
    tok = turn_tokens.tokenizer
    eos = tok.convert_tokens_to_ids(FAMILIES[name].eos)
    ids = turn_tokens.environment_ids([TOOL_MESSAGE], eos)
    assert tok.decode(ids, skip_special_tokens=False) == ENVIRONMENT_TEXT[name]
    assert ids == tok(ENVIRONMENT_TEXT[name], add_special_tokens=False)["input_ids"]  # encoded once, as it stands
    # A turn ended by another of the family's end tokens (Llama's <|eom_id|>, Qwen's <|endoftext|>): no second one
    for end in FAMILIES[name].ends:
        text = tok.decode(turn_tokens.environment_ids([TOOL_MESSAGE], tok.convert_tokens_to_ids(end)),
                          skip_special_tokens=False)
        assert "red" in text and not any(text.startswith(e) for e in FAMILIES[name].ends), (end, text)
    # A turn that did not end with an end-of-turn token: the end of turn is the environment's, not dropped
    other = tok.convert_tokens_to_ids("the") if "the" in tok.get_vocab() else 100
    text = tok.decode(turn_tokens.environment_ids([TOOL_MESSAGE], other), skip_special_tokens=False)
    assert any(text.startswith(end) for end in FAMILIES[name].ends) and "red" in text


@pytest.mark.parametrize("name", ["qwen2.5", "llama3.1"])
def test_a_trajectory_reads_as_the_templates_rendering_of_the_whole_conversation(name):
    """Prefix-consistent templates: prompt + model turns as sampled + environment turns decode to exactly what the
    template renders for the whole conversation, turn for turn (no token dropped or doubled at a boundary)."""
    turn_tokens = turn_tokens_of(name)
    tok = turn_tokens.tokenizer
    eos = FAMILIES[name].eos
    conversation = [{"role": "user", "content": "what color is the lamp"}]
    ids = turn_tokens.prompt_ids(conversation)
    for answer, reply in (("Let me look it up.", TOOL_MESSAGE), ("It is red.", {"role": "user", "content": "thanks"}),
                          ("You are welcome.", None)):
        ids += tok(answer + eos, add_special_tokens=False)["input_ids"]  # the model's turn, ending with its EOS
        conversation.append({"role": "assistant", "content": answer})
        if reply is not None:
            ids += turn_tokens.environment_ids([reply], ids[-1])
            conversation.append(reply)
    full = tok.apply_chat_template(conversation, tools=turn_tokens.tools, tokenize=False)
    assert tok.decode(ids, skip_special_tokens=False) == full.rstrip("\n")  # Qwen's template ends a turn with "\n"


class ThreeToolTurns:
    """An OpenEnv-shaped environment that answers the model's first two turns with a tool result, then ends."""

    def reset(self, **row):
        self.turns = 0

    def step(self, action: str) -> StepResult:
        self.turns += 1
        if self.turns == 3:
            return StepResult(done=True, reward=1.0)
        return StepResult([{**TOOL_MESSAGE, "content": f"result {self.turns}"}])


class SpyEngine:
    """Records every generate call's prompts and samples."""

    def __init__(self, engine):
        self.engine, self.calls = engine, []
        self.weight_version = engine.weight_version

    def generate(self, prompts, sampling):
        samples = self.engine.generate(prompts, sampling)
        self.calls.append((prompts, samples))
        return samples


@pytest.fixture(scope="module")
def family_engine(tmp_path_factory):
    """One vLLM engine on a random Llama over the shared vocabulary, and the same model for the trainer's side."""
    from transformers import AutoModelForCausalLM

    from rollout.vllm_engine import VLLMEngine

    root = tmp_path_factory.mktemp("families")
    model_dir = save_family_model("llama", root / "model", save_family_tokenizer("qwen2.5", root / "tokenizer"),
                                  max_positions=1024)
    engine = VLLMEngine(str(model_dir), dtype="float32", seed=0, max_model_len=1024)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    yield engine, model
    engine.close()


@pytest.mark.e2e
@pytest.mark.parametrize("name", list(FAMILIES))
def test_trajectories_through_vllm_are_the_sampled_tokens_and_the_environments(name, family_engine):
    engine, model = family_engine
    turn_tokens = turn_tokens_of(name)
    tok = turn_tokens.tokenizer
    rollouts = MultiTurnRollouts(turn_tokens, ThreeToolTurns, EpisodeLimits(max_turns=4, max_tokens=200, step_timeout_s=10))
    prompts = [[{"role": "user", "content": text}] for text in ("what color is the lamp", "look up the chair")]
    prompt_ids = [rollouts.prompt_ids(p) for p in prompts]
    # A random model rarely samples its end of turn: every 8th token id also ends a turn (and the family's ends do),
    # so turns end within a few tokens, some with the end-of-turn token, some without.
    ends = [tok.convert_tokens_to_ids(t) for t in FAMILIES[name].ends]
    stop_ids = sorted(set(ends) | set(range(7, len(tok), 8)))
    spy = SpyEngine(engine)
    samples = rollouts.generate(spy, prompt_ids, [{}, {}], SamplingConfig(n=2, temperature=1.0, max_new_tokens=24,
                                                                          seed=11, stop_token_ids=stop_ids))
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1]
    finished = [s for s in samples if s.finish_reason == "stop"]
    assert finished and max(s.episode["turns"] for s in samples) >= 2

    # Replay the engine calls: turn by turn, each unfinished trajectory's prompt is the trajectory so far; what the
    # engine sampled follows (mask 1), then the environment's tokens (mask 0), rendered once after that turn's end.
    expected = [(list(), list()) for _ in samples]  # (completion ids, mask) per trajectory
    active = list(range(len(samples)))
    for turn, (prompts_of_call, outputs) in enumerate(spy.calls):
        assert len(prompts_of_call) == len(active)
        still = []
        for position, j in enumerate(active):
            ids, mask = expected[j]
            assert prompts_of_call[position] == samples[j].prompt_ids + ids  # nothing re-rendered, nothing lost
            out = outputs[position]
            ids += out.completion_ids
            mask += [1] * len(out.completion_ids)
            if out.finish_reason == "stop" and turn + 1 < 3:  # the environment answers turns 1 and 2, ends at 3
                env = turn_tokens.environment_ids([{**TOOL_MESSAGE, "content": f"result {turn + 1}"}],
                                                  out.completion_ids[-1])
                ids += env
                mask += [0] * len(env)
                still.append(j)
        active = still
    assert not active
    for s, (ids, mask) in zip(samples, expected):
        assert s.completion_ids == ids and s.completion_mask == mask
        assert s.logprobs[: len(ids)] == [lp if m else 0.0 for lp, m in zip(s.logprobs, mask)]

    # The trainer's log-probs of the model's tokens agree with the engine's (the stage's ppo/logprob_mismatch)
    batch = RolloutBatch.from_samples(samples, [0, 0, 1, 1])
    for packed in (False, True):
        inputs = batch.model_inputs(torch.arange(len(samples)), tok.pad_token_id, torch.device("cpu"), packed)
        with torch.no_grad():
            trainer = policy_forward(model, inputs, 1.0)[0]
        mask = batch.mask[:, : inputs.completion_len]
        error = token_mult_prob_error(batch.sampler_logp[:, : inputs.completion_len], trainer, mask)
        assert error < 1.02, (name, packed, error)
    print(f"\n| {name} | turns {[s.episode['turns'] for s in samples]} | model tokens {int(batch.mask.sum())} of "
          f"{sum(len(s.completion_ids) for s in samples)} | token_mult_prob_error {error:.5f} |")
