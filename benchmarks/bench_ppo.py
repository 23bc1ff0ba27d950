"""PPO step breakdown and its spread, the limits of its parts on the step's own batch, what runs outside the
phases, and TRL's GRPOTrainer as a peer (issue 7, parts 1-3; the PPO-throughput issue).

One invocation, for the tiny default (`--model tiny`) or a ~100M-parameter random Llama (`--model 100m`):

1. **Breakdown and spread.** The real stage, `alignment.stages.ppo.run(recipe, engine=...)`, on recipes built from
   recipes/tiny/ppo_grpo.yaml (GRPO, no critic) and recipes/tiny/ppo.yaml (GAE, with a critic). Per step it
   logs time/generate, time/score, time/train, time/generate_wait, time/sync, time/step and perf/tokens_per_s to
   metrics.jsonl. Over the steps after `--warmup` warm-up steps we print, per phase, the mean, median, p10, p90, min
   and max ("other" = step - generate - score - train - sync). Modes `grpo_async` / `gae_async` run the same recipes
   with `rollout.async_generation=true` and report step / max(generate, train).
2. **Limits, on the step's own batch.** A thin wrapper around the rollout engine records every `generate` call with
   its caller (from the call stack) and size. The step's call is the one made through `RolloutSchedule` whose
   prompts x n equal train.prompts_per_step x samples_per_prompt, never the sync check's 4-prompt x 8-token probe
   (alignment/stages/sync_check.py) nor the evaluation's; the limits run on the last such call's prompts, sampling
   and samples (the last step's rollouts):
   * generate: raw `vllm.LLM.generate` (the stage's engine) on the same prompts, one request per sample forced to
     that sample's completion length (min_tokens = max_tokens, ignore_eos), no logprobs, no seeds; beside it, on
     the same batch, `engine.generate` against raw `LLM.generate` with the engine's own SamplingParams (identical
     requests) as a ratio: the engine wrapper's cost;
   * score: plain `torch.no_grad` forwards of fresh HF copies of the policy (unless the stage takes the old
     log-probs from training), the reference (and critic and reward model when the recipe has them) over the
     stage's scoring micro-batches, plus the rule reward function when the recipe has one;
   * train: plain forward + backward + `torch.optim.AdamW` of fresh HF copies of the policy (and critic) over the
     stage's own micro-batches of that step (same shuffle, epochs, minibatches; no DeepSpeed);
   * sync: one memcpy of all policy weights into a preallocated buffer (a memory-bandwidth floor).
   Reported: step / limits per phase and in total, for the mean step, the median step and the step whose batch it is.
3. **Outside the phases.** Wrappers around names of alignment.stages.ppo (for the run only) time what a step runs
   besides its phases: inside time/step, the sync check after each weight sync (its probe's engine.generate
   and the trainer's forward), advantages, the metrics all-reduce and the gold metric; after time/step, before the
   next step starts, evaluation, checkpointing, the metrics log and publishing the best policy. `--eval-every`
   and `--save-steps` turn evaluation and checkpoints on as often as a recipe would (off / once by default).
4. **Peer.** TRL 1.16 `GRPOTrainer` (transformers generation, `use_vllm=False`) on the same model, prompts,
   group size, max_new_tokens, rule reward (`alignment.tiny.task:gold_reward`), batch shape (prompts per
   step, minibatches, epochs as `num_iterations`) and KL coefficient (`beta`), in a subprocess; seconds per
   rollout batch (= per our PPO step) from its optimizer-step times, with their spread.

Models: `tiny` is the tiny default's untrained policy; GRPO modes use the rule reward (as the TRL peer does), GAE
modes a random sequence-classification model of the same shape as reward model and critic (weights do not matter
for timing; the real recipes use the tiny SFT and RM checkpoints of the same shapes). `100m` is a random Llama
(hidden 1024, 8 layers, 16 heads of 64, the tiny tokenizer, float32) with the rule reward, 8 prompts x 4 samples
x 32 tokens per step.

    export OMP_NUM_THREADS=1 VLLM_CPU_KVCACHE_SPACE=1
    python benchmarks/bench_ppo.py --model tiny --steps 6 --out tiny.json
    python benchmarks/bench_ppo.py --model 100m --steps 3 --out 100m.json
    python benchmarks/bench_ppo.py --model tiny --modes grpo --steps 3 --warmup 1 --trl-rounds 0   # smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch

SIZE_100M = {"hidden_size": 1024, "intermediate_size": 2816, "num_hidden_layers": 8, "num_attention_heads": 16,
             "num_key_value_heads": 16, "head_dim": 64, "max_position_embeddings": 512}


# ------------------------------------------------------------------------------------------ models


def make_reward_model(base: Path, out: Path, seed: int = 1) -> Path:
    """A random 1-output sequence-classification Llama shaped like `base`, with its tokenizer and
    reward_stats.json (mean 0, std 1), usable as an RM (normalize: true) and as a critic initialisation."""
    from transformers import AutoConfig, AutoTokenizer, LlamaForSequenceClassification

    cfg = AutoConfig.from_pretrained(base)
    cfg.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForSequenceClassification(cfg).float()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    (out / "reward_stats.json").write_text(json.dumps({"mean": 0.0, "std": 1.0}))
    return out


def benchmark_policy(name: str, tiny, work: Path) -> Path:
    """The policy a benchmark's `--models` entry names: "tiny" (the built-in default) or "100m" (made once in `work`)."""
    return tiny.base if name == "tiny" else make_100m_policy(tiny.base, work / "policy_100m")[0]


def make_100m_policy(base: Path, out: Path, seed: int = 0) -> tuple[Path, int]:
    """A random ~100M-parameter Llama with the tiny tokenizer (float32, safetensors)."""
    from transformers import (
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    from alignment.tiny.model import make_config

    cfg = LlamaConfig(**{**make_config().to_dict(), **SIZE_100M})
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg).float()
    model.generation_config = GenerationConfig(bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id,
                                               pad_token_id=cfg.pad_token_id)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return out, sum(p.numel() for p in model.parameters())


def n_params(path: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(path).parameters())


# ------------------------------------------------------------------------------------------ recipes


def build_recipes(model: str, tiny, policy: Path, rm: Path | None, work: Path, steps: int, modes: list[str],
                  save_steps: int | None = None, eval_every: int = 0, overrides: list[str] = ()) -> dict:
    from alignment.config.ppo import PPORecipe
    from alignment.config.schema import load_recipe

    evaluation = [f"eval.prompts={tiny.eval_prompts}", f"eval_every={eval_every}"] if eval_every else ["eval=null"]
    common = [f"policy.name_or_path={policy}", f"prompts.sources.0.path={tiny.prompts}", *evaluation,
              f"train.steps={steps}", f"output.save_steps={save_steps or steps}", "output.logging_steps=1"]
    last = list(overrides)  # the user's --set, after every default
    rule_reward = "rewards=[{kind: function, function: 'alignment.tiny.task:gold_reward'}]"  # TRL's reward too
    if model == "100m":
        common += [rule_reward, "train.prompts_per_step=8", "rollout.sampling.max_new_tokens=32", "algorithm.micro_batch_size=16",
                   "train.learning_rate=1e-6", "train.critic_learning_rate=1e-6"]
    recipes = {}
    for mode in modes:
        out = [f"output.dir={work / ('run_' + mode)}", f"rollout.async_generation={mode.endswith('_async')}"]
        if model == "tiny":  # GRPO: the rule, as the TRL peer gets; GAE: the RM, which also initialises the critic
            out.append(rule_reward if mode.startswith("grpo") else f"rewards.0.path={rm}")
        if mode.startswith("grpo"):
            recipes[mode] = load_recipe(REPO / "recipes/tiny/ppo_grpo.yaml", PPORecipe, [*common, *out, *last])
        else:  # GAE; the critic starts from the RM (tiny) or from the policy with a fresh head (100m)
            critic = rm if model == "tiny" else policy
            # steady state from step 1: no critic-only warm-up steps (those skip the actor update)
            recipes[mode] = load_recipe(REPO / "recipes/tiny" / ("ppo_async.yaml" if mode == "gae_async" else "ppo.yaml"), PPORecipe,
                                        [*common, *out, f"value.name_or_path={critic}", "algorithm.critic_warmup_steps=0",
                                         *last])
    return recipes


# ------------------------------------------------------------------------------------------ stage


@dataclass
class GenerateCall:
    """One `engine.generate` call the stage made."""

    kind: str  # "step" (the PPO step's rollouts, via RolloutSchedule), "probe" (sync check), "eval", "other"
    caller: str  # module:function that called engine.generate
    prompts: int
    n: int  # SamplingConfig.n (samples per prompt)
    max_new_tokens: int
    samples: int
    tokens: int  # completion tokens generated
    start: float  # perf_counter at the call
    seconds: float
    thread: str


def _generate_caller() -> tuple[str, str]:
    """(kind, caller) of the engine.generate call being made: who in the stage asked for it, from the call stack."""
    frame, stack = sys._getframe(2), []
    while frame is not None:
        stack.append((frame.f_globals.get("__name__", "?"), frame.f_code.co_name))
        frame = frame.f_back
    modules = {m for m, _ in stack}
    if "alignment.stages.sync_check" in modules:
        kind = "probe"
    elif ("alignment.stages.ppo", "_evaluate") in stack:
        kind = "eval"
    elif "alignment.stages.rollout_schedule" in modules or "alignment.stages.ppo" in modules:
        kind = "step"
    else:
        kind = "other"
    return kind, f"{stack[0][0]}:{stack[0][1]}"


class RecordingEngine:
    """Delegates to a rollout engine; records every `generate` call (who made it, its size and time) and keeps the
    prompts, sampling and samples of the latest call that generated the PPO step's rollouts.

    The step's call is the one made through `RolloutSchedule` (not the sync check's probe, `sync_check.py`, nor the
    evaluation's, `_evaluate`) with `prompts x n` = `train.prompts_per_step x samples_per_prompt`; the size check
    guards against a caller the stack walk would misread."""

    def __init__(self, engine, step_samples: int):
        self.inner = engine
        self.step_samples = step_samples
        self.calls: list[GenerateCall] = []
        self.step_batch = None  # (prompts, sampling, samples) of the latest step call
        self.step_index = None  # which step's call (0-based): the count of step calls before it
        self._step_calls = 0
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def weight_version(self):
        return self.inner.weight_version

    def generate(self, prompts, sampling):
        kind, caller = _generate_caller()
        t = time.perf_counter()
        samples = self.inner.generate(prompts, sampling)
        call = GenerateCall(kind, caller, len(prompts), sampling.n, sampling.max_new_tokens, len(samples),
                            sum(len(s.completion_ids) for s in samples), t, time.perf_counter() - t,
                            threading.current_thread().name)
        with self._lock:
            self.calls.append(call)
            if kind == "step" and len(samples) == self.step_samples:
                self.step_batch, self.step_index = (prompts, sampling, samples), self._step_calls
                self._step_calls += 1
        return samples

    def update_weights(self, named, version):
        return self.inner.update_weights(named, version)

    def close(self):
        pass  # the benchmark owns the engine


class StageProbe:
    """Times what a PPO step runs besides its logged phases, by wrapping names of `alignment.stages.ppo` (and
    `RolloutBatch.model_inputs`, to count padded and real tokens) for the duration of one `run`. Nothing of the stage
    changes but these wrappers, which cost microseconds. A name the stage no longer has is left alone (its line then
    reads 0)."""

    FUNCTIONS = {  # name in alignment.stages.ppo -> (label, phase whose model inputs it builds)
        "_score_tokens": ("score_forwards", "score"),
        "_train_on_batch": ("train_batch", "train"),
        "all_reduce_mean": ("metrics_all_reduce", None),
        "_evaluate": ("eval", None),
        "_save_checkpoint": ("checkpoint", None),
    }

    def __init__(self):
        self.events: list[tuple[str, float, float]] = []  # (label, start, seconds), main thread only
        self.inputs: list[tuple[float, str, int, int]] = []  # (time, phase, padded tokens, real tokens)
        self.step_starts: list[float] = []
        self.phase = None
        self._loop_state = None
        self._saved: list[tuple[object, str, object]] = []

    def _timed(self, label, fn, phase=None):
        def wrapper(*a, **k):
            previous, self.phase = self.phase, phase or self.phase
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.events.append((label, t, time.perf_counter() - t))
                self.phase = previous
        return wrapper

    def _patch(self, owner, name, value):
        self._saved.append((owner, name, getattr(owner, name)))
        setattr(owner, name, value)

    def __enter__(self):
        import dataclasses

        import alignment.stages.ppo as ppo
        from alignment.ppo.batch import RolloutBatch

        for name, (label, phase) in self.FUNCTIONS.items():
            if hasattr(ppo, name):
                self._patch(ppo, name, self._timed(label, getattr(ppo, name), phase))
        if hasattr(ppo, "_publish_policy"):
            publish = ppo._publish_policy

            def publish_policy(policy, tokenizer, target, *a, **k):
                label = "publish_final" if Path(target).name == "final" else "publish_best"
                return self._timed(label, publish)(policy, tokenizer, target, *a, **k)
            self._patch(ppo, "_publish_policy", publish_policy)
        if hasattr(ppo, "_next_prompt_rows"):
            next_rows = ppo._next_prompt_rows

            def next_prompt_rows(state, *a, **k):
                # the step's own call passes the loop's state; the async prefetch passes a copy
                if self._loop_state is None:
                    self._loop_state = state
                if state is self._loop_state:
                    self.step_starts.append(time.perf_counter())
                return next_rows(state, *a, **k)
            self._patch(ppo, "_next_prompt_rows", next_prompt_rows)
        probe = self

        class TimedSyncCheck(ppo.SyncCheck):
            def __call__(self, *a, **k):
                return probe._timed("sync_check", super().__call__)(*a, **k)

        class TimedLogger(ppo.MetricsLogger):
            def log(self, *a, **k):
                return probe._timed("log", super().log)(*a, **k)

        self._patch(ppo, "SyncCheck", TimedSyncCheck)
        self._patch(ppo, "MetricsLogger", TimedLogger)
        self._patch(ppo, "ADVANTAGE_ESTIMATORS", {
            k: dataclasses.replace(v, compute=self._timed("advantages", v.compute)) for k, v in ppo.ADVANTAGE_ESTIMATORS.items()})
        load_fn = ppo.load_reward_function  # only the gold metric's in the stage module
        self._patch(ppo, "load_reward_function", lambda spec: self._timed("gold", load_fn(spec)))
        composite = ppo.CompositeReward

        class TimedReward:
            def __init__(self, inner):
                self.inner = inner

            def __getattr__(self, name):
                return getattr(self.inner, name)

            def __call__(self, *a, **k):
                return probe._timed("reward", self.inner)(*a, **k)

        class CompositeShim:
            @staticmethod
            def from_recipe(*a, **k):
                return TimedReward(composite.from_recipe(*a, **k))

        self._patch(ppo, "CompositeReward", CompositeShim)
        model_inputs = RolloutBatch.model_inputs

        def counted(batch, *a, **k):
            inputs = model_inputs(batch, *a, **k)
            real = inputs.input_ids.numel() if inputs.attention_mask is None else inputs.attention_mask.sum()  # packed
            self.inputs.append((time.perf_counter(), self.phase or "other", int(inputs.input_ids.numel()), int(real)))
            return inputs
        self._patch(RolloutBatch, "model_inputs", counted)
        return self

    def __exit__(self, *exc):
        for owner, name, value in reversed(self._saved):
            setattr(owner, name, value)
        self._saved.clear()

    def per_step(self, calls: list[GenerateCall], n_rows: int) -> list[dict] | None:
        """Seconds per label inside each step's window (from its start to the next step's start; the last step's ends
        where the final policy is written), main-thread generate calls by kind, and padded/real tokens per phase."""
        if len(self.step_starts) != n_rows:
            return None  # skipped steps (or a changed loop): windows would not match the metrics rows
        finals = [t for label, t, _ in self.events if label == "publish_final"]
        last = max([t + d for _, t, d in self.events] or [self.step_starts[-1]])
        ends = self.step_starts[1:] + [finals[0] if finals else last]
        out = []
        for s, e in zip(self.step_starts, ends):
            row: dict = {"iteration": e - s}
            for label, t, d in self.events:
                if s <= t < e and label != "publish_final":
                    row[label] = row.get(label, 0.0) + d
                    row[f"count/{label}"] = row.get(f"count/{label}", 0) + 1
            for c in calls:
                if s <= c.start < e and c.kind in ("probe", "eval"):
                    row[f"generate_{c.kind}"] = row.get(f"generate_{c.kind}", 0.0) + c.seconds
            for t, phase, padded, real in self.inputs:
                if s <= t < e:
                    row[f"padded/{phase}"] = row.get(f"padded/{phase}", 0) + padded
                    row[f"real/{phase}"] = row.get(f"real/{phase}", 0) + real
            out.append(row)
        return out


def mean(xs):
    return sum(xs) / len(xs) if xs else float("nan")


def spread(xs: list[float]) -> dict:
    """mean, median, p10, p90, min, max of `xs` (linear interpolation between order statistics)."""
    import numpy as np

    if not xs:
        return {k: float("nan") for k in ("mean", "median", "p10", "p90", "min", "max")} | {"n": 0}
    a = np.asarray(xs, dtype=float)
    return {"mean": float(a.mean()), "median": float(np.median(a)), "p10": float(np.percentile(a, 10)),
            "p90": float(np.percentile(a, 90)), "min": float(a.min()), "max": float(a.max()), "n": len(xs)}


STEP_PARTS = ["generate", "score", "train", "sync", "other", "step"]
INSIDE = ["sync_check", "advantages", "metrics_all_reduce", "gold"]  # in time/step, outside the four phases
OUTSIDE = ["eval", "checkpoint", "log", "publish_best"]  # after time/step is taken, before the next step starts


def run_stage(recipe, engine, warmup: int) -> tuple[dict, RecordingEngine]:
    from alignment.stages.ppo import run

    step_samples = recipe.train.prompts_per_step * recipe.rollout.sampling.samples_per_prompt
    rec = RecordingEngine(engine, step_samples)
    t = time.perf_counter()
    with StageProbe() as probe:
        run(recipe, engine=rec)
    wall = time.perf_counter() - t
    rows = [json.loads(line) for line in (Path(recipe.output.dir) / "metrics.jsonl").read_text().splitlines()]
    first = warmup if len(rows) > warmup else len(rows) - 1
    kept = rows[first:]
    per_step = []
    for r in rows:
        # Async mode: the loop waits for rollouts twice (step start, before the sync); "generate" is both waits,
        # "generate_engine" the engine's own generation time, most of it hidden behind score + train.
        p = {"generate": r["time/generate"] + r.get("time/generate_wait", 0.0), "score": r["time/score"],
             "train": r["time/train"], "sync": r["time/sync"], "step": r["time/step"],
             "generate_engine": r["rollout/generate_seconds"], "tokens_per_s": r["perf/tokens_per_s"],
             "response_length": r["ppo/response_length"], "staleness": r["rollout/staleness"]}
        p["other"] = p["step"] - (p["generate"] + p["score"] + p["train"] + p["sync"])
        per_step.append(p)
    profile = probe.per_step(rec.calls, len(rows))
    if profile is not None:
        for p, q in zip(per_step, profile):
            p.update({f"inside/{k}": q.get(k, 0.0) for k in INSIDE})
            p["inside/rest"] = p["other"] - sum(q.get(k, 0.0) for k in INSIDE)
            p["iteration"] = q["iteration"]
            p["outside"] = q["iteration"] - p["step"]
            p.update({f"outside/{k}": q.get(k, 0.0) for k in OUTSIDE})
            p["outside/rest"] = p["outside"] - sum(q.get(k, 0.0) for k in OUTSIDE)
            p["sync_check_generate"] = q.get("generate_probe", 0.0)  # the probe's engine.generate, inside sync_check
            p["score/reward"], p["score/forwards"] = q.get("reward", 0.0), q.get("score_forwards", 0.0)
            p["train/batch"] = q.get("train_batch", 0.0)
            p["counts"] = {k[6:]: v for k, v in q.items() if k.startswith("count/")}
            for phase in ("score", "train", "other"):
                if f"padded/{phase}" in q:
                    p[f"tokens/{phase}"] = {"padded": q[f"padded/{phase}"], "real": q[f"real/{phase}"]}
    measured = per_step[first:]
    res = {k: mean([p[k] for p in measured]) for k in [*STEP_PARTS, "generate_engine", "tokens_per_s", "response_length",
                                                        "staleness"]}
    res["spread"] = {k: spread([p[k] for p in measured]) for k in [*STEP_PARTS, "generate_engine"]}
    if profile is not None:
        keys = [k for k in measured[0] if "/" in k and not k.startswith("tokens/")] + ["iteration", "outside", "sync_check_generate"]
        res["profile"] = {k: mean([p[k] for p in measured]) for k in keys}
        res["spread"].update({k: spread([p[k] for p in measured]) for k in ("iteration", "outside")})
        res["profile_counts"] = {k: sum(p["counts"].get(k, 0) for p in measured) for k in OUTSIDE}
        for phase in ("score", "train"):
            padded = sum(p.get(f"tokens/{phase}", {}).get("padded", 0) for p in measured)
            real = sum(p.get(f"tokens/{phase}", {}).get("real", 0) for p in measured)
            if real:
                res[f"padded_over_real_{phase}"] = padded / real
    res["step_over_max_generate_train"] = res["step"] / max(res["generate_engine"], res["train"])
    res["step_over_max_generate_score_train"] = res["step"] / max(res["generate_engine"], res["score"] + res["train"])
    res["steps_measured"] = len(measured)
    res["first_measured_step"] = first
    res["stage_wall_s"] = wall
    res["per_step"] = per_step
    # The step whose rollouts the limits run on: the last step call (one per step, so its index is the step's),
    # numbered from 1 as in metrics.jsonl.
    res["limits_step"] = rec.step_index + 1 if rec.step_index is not None else None
    by_step = {int(r["step"]): p for r, p in zip(rows, per_step)}
    res["limits_step_times"] = by_step.get(res["limits_step"])
    res["generate_calls"] = [dict(vars(c), start=c.start - t) for c in rec.calls]
    res["generate_calls_by_kind"] = {
        kind: {"calls": len(cs), "seconds": sum(c.seconds for c in cs), "samples": sorted({c.samples for c in cs}),
               "max_new_tokens": sorted({c.max_new_tokens for c in cs}), "callers": sorted({c.caller for c in cs})}
        for kind in ("step", "probe", "eval", "other") if (cs := [c for c in rec.calls if c.kind == kind])}
    return res, rec


# ------------------------------------------------------------------------------------------ limits


def best_of(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def limit_generate(engine, prompts, sampling, samples, repeats: int) -> dict:
    """On the step's own batch (same prompts, same SamplingConfig): `engine.generate` now, raw `LLM.generate` with
    the engine's SamplingParams (identical requests: same seeds, logprobs), and the limit, raw `LLM.generate` with
    one request per sample forced to that sample's completion length, no logprobs, no seeds (the engine holds the
    weights after the last update, so seeded requests do not repeat the step's lengths; forced ones do)."""
    from vllm import SamplingParams

    from rollout.vllm_engine import to_sampling_params, to_vllm_prompt

    llm = engine.llm
    exact_inputs = [{"prompt_token_ids": list(s.prompt_ids)} for s in samples]
    exact_params = [SamplingParams(n=1, temperature=sampling.temperature or 1.0, top_p=sampling.top_p,
                                   max_tokens=max(1, len(s.completion_ids)), min_tokens=max(1, len(s.completion_ids)),
                                   ignore_eos=True, detokenize=False) for s in samples]
    same_inputs = [to_vllm_prompt(p) for p in prompts]
    same_params = [to_sampling_params(sampling, i) for i in range(len(prompts))]
    llm.generate(exact_inputs[:2], exact_params[:2], use_tqdm=False)  # warm-up
    kept: dict = {}

    def via_engine():
        kept["engine"] = engine.generate(prompts, sampling)

    def raw_same():
        kept["raw"] = llm.generate(same_inputs, same_params, use_tqdm=False)

    out: dict = {"engine_generate": best_of(via_engine, repeats), "raw_engine_params": best_of(raw_same, repeats),
                 "raw_exact_lengths": best_of(lambda: llm.generate(exact_inputs, exact_params, use_tqdm=False), repeats)}
    out["tokens_step"] = sum(len(s.completion_ids) for s in samples)
    out["tokens_engine_generate"] = sum(len(s.completion_ids) for s in kept["engine"])
    out["tokens_raw_engine_params"] = sum(len(c.token_ids) for o in kept["raw"] for c in o.outputs)
    out["engine_over_raw"] = out["engine_generate"] / out["raw_engine_params"]
    return out


def _batch(samples):
    from alignment.ppo.batch import RolloutBatch

    return RolloutBatch.from_samples(samples, list(range(len(samples))))


def stage_micro_batches(batch, indices, algo) -> list:
    """The micro-batches the stage makes of `indices`: `algorithm.micro_batch_size` rows, or with
    `algorithm.micro_batch_tokens` (when this checkout has it) grouped by length up to that many padded tokens (real
    ones with `algorithm.packing`)."""
    tokens = getattr(algo, "micro_batch_tokens", None)
    if tokens is None:
        return batch.micro_batches(indices, algo.micro_batch_size)
    if packed(algo):
        return batch.micro_batches(indices, algo.micro_batch_size, max_tokens=tokens, packed=True)
    return batch.micro_batches(indices, algo.micro_batch_size, max_tokens=tokens)


def packed(algo) -> bool:
    """Whether the stage packs its micro-batches (`algorithm.packing`, when this checkout has it)."""
    return bool(getattr(algo, "packing", False))


def stage_model_inputs(batch, idx, pad_id: int, algo):
    """The inputs the stage feeds its models for the rows `idx`: padded, or packed (`algorithm.packing`)."""
    if packed(algo):
        return batch.model_inputs(idx, pad_id, torch.device("cpu"), packed=True)
    return batch.model_inputs(idx, pad_id, torch.device("cpu"))


def stage_train_plan(batch, recipe, step: int) -> list[list[list]]:
    """epochs x minibatches x micro-batches of the stage's training at `step` (its shuffle: a generator seeded
    train.seed * 7919 + step, one randperm per epoch, chunked into minibatches; one process)."""
    algo = recipe.algorithm
    gen = torch.Generator().manual_seed(recipe.train.seed * 7919 + step)
    return [[stage_micro_batches(batch, mb, algo) for mb in torch.randperm(len(batch), generator=gen).chunk(algo.minibatches)]
            for _ in range(algo.epochs)]


def padded_real(batch, groups, packed: bool = False) -> tuple[int, int]:
    real = sum(len(batch.prompt_ids[i]) + len(batch.completion_ids[i]) for g in groups for i in g.tolist())
    if packed:
        return real, real
    padded = sum(len(g) * (max(len(batch.prompt_ids[i]) for i in g.tolist()) + max(1, max(len(batch.completion_ids[i]) for i in g.tolist())))
                 for g in groups)
    return padded, real


def _reward_columns(recipe, n: int) -> tuple[list, dict]:
    """Prompts and label columns of the recipe's first prompt file, n rows (cycled): the rule reward's inputs."""
    rows = [json.loads(line) for line in Path(recipe.prompts.sources[0].path).read_text().splitlines() if line.strip()]
    rows = [rows[i % len(rows)] for i in range(n)]
    cols = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
    return [r["prompt"] for r in rows], cols


def _is_packed(inputs) -> bool:
    return getattr(inputs, "logit_positions", None) is not None


def _policy_logp(model, inputs, with_entropy=False):
    """Completion-token log-probs as plainly as HF allows (logits only where they predict completion tokens):
    [b, T_mb] padded, [K] (the real completion tokens) packed."""
    if _is_packed(inputs):
        logits = model(input_ids=inputs.input_ids, position_ids=inputs.position_ids, use_cache=False,
                       logits_to_keep=inputs.logit_positions).logits[0].float()
        targets = inputs.input_ids[0, inputs.logit_positions + 1, None]
    else:
        logits = model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, position_ids=inputs.position_ids,
                       use_cache=False, logits_to_keep=inputs.completion_len + 1).logits[:, :-1].float()
        targets = inputs.input_ids[:, inputs.completion_start:, None]
    logp_all = torch.log_softmax(logits, -1)
    logp = logp_all.gather(-1, targets).squeeze(-1)
    if with_entropy:
        return logp, -(logp_all.exp() * logp_all).sum(-1)
    return logp, None


def _values(seq_cls, inputs):
    """The head at every position [b, L], or packed at the positions before completion tokens [K]."""
    backbone = getattr(seq_cls, seq_cls.base_model_prefix)
    hidden = backbone(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                      position_ids=inputs.position_ids, use_cache=False).last_hidden_state
    if _is_packed(inputs):
        return seq_cls.score(hidden[0, inputs.logit_positions]).squeeze(-1)
    return seq_cls.score(hidden).squeeze(-1)[:, inputs.completion_start - 1 : -1]


def limit_score_train(recipe, samples, pad_id: int, repeats: int, step: int, train_repeats: int = 1) -> dict:
    """Plain HF forwards (scoring) and forward+backward+AdamW (training) on the step's token batch, in the stage's
    micro-batches: scoring over `micro_batches(all rows)`, training over the stage's epochs x shuffled minibatches x
    micro-batches at `step` (`stage_train_plan`)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    try:
        from alignment.stages.ppo import old_logprobs_come_from_training
    except ImportError:
        def old_logprobs_come_from_training(recipe):
            return False

    algo = recipe.algorithm
    batch = _batch(samples)
    score_groups = stage_micro_batches(batch, torch.arange(len(batch)), algo)
    micro = [stage_model_inputs(batch, idx, pad_id, algo) for idx in score_groups]
    plan = stage_train_plan(batch, recipe, step)
    train_inputs = {}  # the same micro-batch index tensor -> its inputs, built once (as the stage builds each anew)
    for epoch in plan:
        for minibatch in epoch:
            for idx in minibatch:
                train_inputs[id(idx)] = stage_model_inputs(batch, idx, pad_id, algo)
    policy = AutoModelForCausalLM.from_pretrained(recipe.policy.name_or_path, dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(recipe.policy.name_or_path, dtype=torch.float32).eval()
    critic = (AutoModelForSequenceClassification.from_pretrained(recipe.value.name_or_path, num_labels=1, dtype=torch.float32)
              if recipe.value is not None and algo.advantage == "gae" else None)
    rms = [AutoModelForSequenceClassification.from_pretrained(r.path, dtype=torch.float32).eval()
           for r in recipe.rewards if r.kind == "model"]
    fns = [r for r in recipe.rewards if r.kind == "function"]
    score_policy = not old_logprobs_come_from_training(recipe)  # else the stage takes them from the training forward
    res: dict = {"score_policy_forward": score_policy,
                 "score_models": (["policy"] if score_policy else []) + ["reference"] + (["critic"] if critic is not None else [])
                 + ["reward model"] * len(rms)}

    @torch.no_grad()
    def score():
        for inputs in micro:
            if score_policy:
                _policy_logp(policy, inputs, with_entropy=True)
            _policy_logp(reference, inputs)
            if critic is not None:
                _values(critic, inputs)
            for rm in rms:
                if _is_packed(inputs):  # the head read off the backbone, as RewardModelScorer reads a packed row
                    _values(rm, inputs)
                else:
                    rm(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask)

    policy.eval()
    score()  # warm-up
    res["score_forwards"] = best_of(score, repeats)
    res["score"] = res["score_forwards"]
    if fns:
        from reward.functions import load_reward_function

        fn = load_reward_function(fns[0].function)
        prompts, cols = _reward_columns(recipe, len(samples))
        texts = [s.text for s in samples]
        res["score_reward_fn"] = best_of(lambda: fn(prompts=prompts, completions=texts, **cols), repeats)
        res["score"] += res["score_reward_fn"]

    models = [policy] + ([critic] if critic is not None else [])
    for m in models:
        m.train()
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-7) for m in models]

    def micro_step(idx):
        inputs = train_inputs[id(idx)]
        # packed outputs hold the real completion tokens only: the mask is all ones there
        mask = 1.0 if _is_packed(inputs) else batch.mask[idx, : inputs.completion_len]
        tokens = batch.mask[idx].sum().clamp(min=1)
        logp, _ = _policy_logp(policy, inputs, with_entropy=algo.entropy_coef > 0)
        (-(logp * mask).sum() / tokens).backward()
        if critic is not None:
            v = _values(critic, inputs)
            ((v * mask) ** 2).sum().div(tokens).backward()

    def optimizer_step():
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)

    micro_step(plan[0][0][0])  # warm-up: allocates gradients and AdamW states
    optimizer_step()

    def train():
        for epoch in plan:
            for minibatch in epoch:
                for idx in minibatch:
                    micro_step(idx)
                optimizer_step()

    res["train"] = best_of(train, train_repeats)  # each repeat steps AdamW again (lr 1e-7): same work

    flat = torch.empty(sum(p.numel() for p in policy.parameters()))

    def memcpy():
        off = 0
        for p in policy.parameters():
            flat[off : off + p.numel()].copy_(p.detach().reshape(-1))
            off += p.numel()

    memcpy()
    res["sync"] = best_of(memcpy, repeats)
    res["torch_threads"] = torch.get_num_threads()
    res["micro_batches_score"] = len(micro)
    res["micro_batches_train"] = sum(len(mb) for epoch in plan for mb in epoch)
    res["tokens_score"] = dict(zip(("padded", "real"), padded_real(batch, score_groups, packed(algo))))
    res["tokens_train"] = dict(zip(("padded", "real"), padded_real(batch, [g for e in plan for mb in e for g in mb],
                                                                   packed(algo))))
    return res


def measure_limits(engine, recipe, rec: RecordingEngine, pad_id: int, repeats: int, step: int, train_repeats: int = 1) -> dict:
    """All limits on the step's batch (`rec.step_batch`), and their sum."""
    if rec.step_batch is None:
        raise RuntimeError(f"no engine.generate call of the PPO step ({rec.step_samples} samples) was recorded; calls: "
                           + "; ".join(f"{c.kind} {c.caller} {c.samples}" for c in rec.calls))
    prompts, sampling, samples = rec.step_batch
    limits = limit_generate(engine, prompts, sampling, samples, repeats)
    limits.update(limit_score_train(recipe, samples, pad_id, repeats, step, train_repeats))
    limits["generate"] = limits["raw_exact_lengths"]
    limits["sum"] = sum(limits[p] for p in ["generate", "score", "train", "sync"])
    limits["batch"] = {"prompts": len(prompts), "n": sampling.n, "samples": len(samples), "max_new_tokens": sampling.max_new_tokens,
                       "completion_tokens": sum(len(s.completion_ids) for s in samples),
                       "completion_lengths": spread([len(s.completion_ids) for s in samples])}
    return limits


# ------------------------------------------------------------------------------------------ TRL peer


def trl_worker(cfg: dict) -> dict:
    """TRL GRPOTrainer with the stage's batch shape; runs in its own process (see run_trl)."""
    from datasets import load_dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from alignment.tiny.task import gold_reward

    tok = AutoTokenizer.from_pretrained(cfg["model"])
    ds = load_dataset("json", data_files=cfg["prompts"], split="train")
    group, per_step = cfg["group"], cfg["prompts_per_step"]
    completions = per_step * group
    per_device = completions // cfg["minibatches"]  # one optimizer step per minibatch, as the stage does
    opt_steps_per_round = cfg["minibatches"] * cfg["epochs"]
    args = GRPOConfig(
        output_dir=cfg["out"], use_vllm=False, per_device_train_batch_size=per_device, gradient_accumulation_steps=1,
        steps_per_generation=cfg["minibatches"], num_generations=group, max_completion_length=cfg["max_new_tokens"],
        num_iterations=cfg["epochs"], beta=cfg["beta"], temperature=cfg["temperature"], learning_rate=cfg["lr"],
        max_steps=cfg["rounds"] * opt_steps_per_round, logging_steps=1, save_strategy="no", report_to=[],
        bf16=False, use_cpu=True, disable_tqdm=True, seed=0, dataloader_num_workers=0,
    )
    stamps: list[float] = []

    class Stamp(TrainerCallback):
        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())

    t0 = time.perf_counter()
    trainer = GRPOTrainer(model=cfg["model"], reward_funcs=gold_reward, args=args, train_dataset=ds,
                          processing_class=tok, callbacks=[Stamp()])
    setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    trainer.train()
    # seconds per rollout batch: the time of each round of `opt_steps_per_round` optimizer steps
    ends = [t1] + stamps
    rounds = [ends[(i + 1) * opt_steps_per_round] - ends[i * opt_steps_per_round]
              for i in range(len(stamps) // opt_steps_per_round)]
    return {"setup_s": setup, "round_s": rounds, "opt_steps_per_round": opt_steps_per_round,
            "per_device_train_batch_size": per_device, "steps_per_generation": cfg["minibatches"],
            "num_iterations": cfg["epochs"], "beta": cfg["beta"]}


def run_trl(recipe, prompts_path: Path, work: Path, rounds: int, warmup: int) -> dict:
    algo, s = recipe.algorithm, recipe.rollout.sampling
    cfg = {"model": recipe.policy.name_or_path, "prompts": str(prompts_path), "group": s.samples_per_prompt,
           "prompts_per_step": recipe.train.prompts_per_step, "minibatches": algo.minibatches, "epochs": algo.epochs,
           "max_new_tokens": s.max_new_tokens, "temperature": s.temperature or 1.0, "lr": recipe.train.learning_rate,
           "beta": algo.kl.coef if algo.kl.placement == "loss" else 0.0, "rounds": rounds, "out": str(work / "trl")}
    cfg_file, res_file = work / "trl_cfg.json", work / "trl_result.json"
    cfg_file.write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, __file__, "--trl-worker", str(cfg_file), "--trl-result", str(res_file)],
                          check=False, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        return {"error": (proc.stdout[-1500:] + proc.stderr[-3000:])}
    res = json.loads(res_file.read_text())
    kept = res["round_s"][warmup:] or res["round_s"][-1:]
    res["step_s"] = mean(kept)
    res["spread"] = spread(kept)
    return res


# ------------------------------------------------------------------------------------------ main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", choices=["tiny", "100m"], default="tiny")
    ap.add_argument("--steps", type=int, default=None, help="PPO steps per mode (default: tiny 6, 100m 3)")
    ap.add_argument("--warmup", type=int, default=None, help="first steps left out of the statistics (default: tiny 2, 100m 1)")
    ap.add_argument("--modes", default=None, help="comma list of grpo,gae,grpo_async,gae_async "
                    "(default: tiny all four; 100m grpo,grpo_async)")
    ap.add_argument("--trl-rounds", type=int, default=None, help="TRL rollout batches (default: steps); 0 skips TRL")
    ap.add_argument("--repeats", type=int, default=3, help="best-of repeats for the raw generate/score limits")
    ap.add_argument("--train-repeats", type=int, default=None, help="best-of repeats for the training limit "
                    "(default: --repeats for tiny, 1 for 100m, whose one pass takes half a minute)")
    ap.add_argument("--save-steps", type=int, default=None, help="output.save_steps (default: steps, one checkpoint at "
                    "the end; the shipped tiny recipes save every 10)")
    ap.add_argument("--eval-every", type=int, default=0, help="run the recipes' evaluation (128 held-out prompts x 4) "
                    "every N steps (default 0: eval off; the shipped tiny recipes evaluate every 10)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a recipe override for every mode "
                    "(repeatable), e.g. --set algorithm.packing=true; TRL's run is unchanged")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--trl-worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--trl-result", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_worker:
        Path(args.trl_result).write_text(json.dumps(trl_worker(json.loads(Path(args.trl_worker).read_text()))))
        return

    tiny_model = args.model == "tiny"
    steps = args.steps or (6 if tiny_model else 3)
    warmup = args.warmup if args.warmup is not None else (2 if tiny_model else 1)
    modes = (args.modes or ("grpo,gae,grpo_async,gae_async" if tiny_model else "grpo,grpo_async")).split(",")
    trl_rounds = steps if args.trl_rounds is None else args.trl_rounds
    train_repeats = args.train_repeats or (args.repeats if tiny_model else 1)
    t_start = time.perf_counter()
    result: dict = {"model": args.model, "steps": steps, "warmup": warmup, "host_cores": os.cpu_count(),
                    "omp_threads": os.environ.get("OMP_NUM_THREADS"), "torch_threads": torch.get_num_threads(),
                    "save_steps": args.save_steps or steps,
                    "eval_every": args.eval_every, "modes": {}}

    from alignment.tiny import build_tiny
    from rollout.vllm_engine import VLLMEngine

    with tempfile.TemporaryDirectory(prefix="bench_ppo_") as tmp:
        work = Path(tmp)
        tiny = build_tiny(work / "tiny")
        if tiny_model:
            policy, rm = tiny.base, make_reward_model(tiny.base, work / "rm")
            result["params"] = n_params(policy)
        else:
            (policy, result["params"]), rm = make_100m_policy(tiny.base, work / "policy100m"), None
        recipes = build_recipes(args.model, tiny, policy, rm, work, steps, modes, save_steps=args.save_steps or steps,
                                eval_every=args.eval_every, overrides=args.set)
        r0 = next(iter(recipes.values()))
        t = time.perf_counter()
        engine = VLLMEngine(str(policy), dtype="float32", seed=0, max_model_len=r0.rollout.max_model_len)
        result["engine_start_s"] = time.perf_counter() - t
        from transformers import AutoTokenizer

        pad_id = AutoTokenizer.from_pretrained(policy).pad_token_id
        try:
            for mode, recipe in recipes.items():
                s = recipe.rollout.sampling
                row: dict = {"prompts_per_step": recipe.train.prompts_per_step, "samples_per_prompt": s.samples_per_prompt,
                             "max_new_tokens": s.max_new_tokens, "micro_batch_size": recipe.algorithm.micro_batch_size,
                             "micro_batch_tokens": getattr(recipe.algorithm, "micro_batch_tokens", None),
                             "minibatches": recipe.algorithm.minibatches, "epochs": recipe.algorithm.epochs}
                print(f"== {args.model} {mode}: stage, {steps} steps", flush=True)
                row["stage"], rec = run_stage(recipe, engine, warmup)
                result["modes"][mode] = row
                if mode.endswith("_async"):  # same batches as the synchronous mode: only the stage is timed
                    continue
                print(f"== {args.model} {mode}: limits on the last step's rollouts", flush=True)
                row["limits"] = measure_limits(engine, recipe, rec, pad_id, args.repeats, step=rec.step_index,
                                               train_repeats=train_repeats)
                add_ratios(row)
        finally:
            engine.close()
        if trl_rounds > 0 and "grpo" in recipes:
            print(f"== {args.model}: TRL GRPOTrainer, {trl_rounds} rollout batches", flush=True)
            trl = run_trl(recipes["grpo"], tiny.prompts, work, trl_rounds, warmup)
            result["trl"] = trl
            if "step_s" in trl and "grpo" in result["modes"]:
                result["ours_over_trl"] = result["modes"]["grpo"]["stage"]["step"] / trl["step_s"]
                if "grpo_async" in result["modes"]:
                    result["ours_async_over_trl"] = result["modes"]["grpo_async"]["stage"]["step"] / trl["step_s"]
    result["wall_s"] = time.perf_counter() - t_start
    print_table(result)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2))


def add_ratios(row: dict) -> None:
    """step/limits per phase and in total: the mean and the median of the measured steps, and the step whose
    rollouts the limits ran on (the last), over the limits."""
    st, lim = row["stage"], row["limits"]
    last = st["limits_step_times"]
    ratios = {}
    for p in ["generate", "score", "train", "sync"]:
        ratios[p] = {"mean": st[p] / lim[p], "median": st["spread"][p]["median"] / lim[p],
                     "limits_step": last[p] / lim[p] if last else float("nan")}
    ratios["total"] = {"mean": st["step"] / lim["sum"], "median": st["spread"]["step"]["median"] / lim["sum"],
                       "limits_step": last["step"] / lim["sum"] if last else float("nan")}
    row["step_over_limits_by_phase"] = ratios
    row["step_over_limits"] = ratios["total"]["mean"]
    row["tokens_last_step"] = lim["batch"]["completion_tokens"]


def _s(x: float) -> str:
    return f"{x:8.3f}" if x == x else f"{'-':>8}"


def print_spread_table(st: dict, lim: dict | None, ratios: dict | None) -> None:
    sp, last = st["spread"], st.get("limits_step_times")
    head = f"{'part':<9} {'mean':>8} {'median':>8} {'p10':>8} {'p90':>8} {'min':>8} {'max':>8} {'share':>6}"
    if lim:
        head += f" | {'step ' + str(st['limits_step']):>8} {'limit':>8} {'step/lim':>8} {'med/lim':>8}"
    print(head)
    for p in STEP_PARTS:
        q = sp[p]
        line = (f"{p:<9} {_s(q['mean'])} {_s(q['median'])} {_s(q['p10'])} {_s(q['p90'])} {_s(q['min'])} {_s(q['max'])} "
                f"{q['mean'] / st['step']:>6.0%}")
        if lim:
            lv = lim["sum"] if p == "step" else lim.get(p)
            r = ratios.get("total" if p == "step" else p)
            line += (f" | {_s(last[p]) if last else _s(float('nan'))} {_s(lv) if lv is not None else _s(float('nan'))} "
                     f"{r['limits_step']:>8.2f} {r['median']:>8.2f}" if r else
                     f" | {_s(last[p]) if last else _s(float('nan'))} {'(none)':>8}")
        print(line)


def print_profile(st: dict) -> None:
    pr = st.get("profile")
    if not pr:
        print("profile: not available (the stage skipped steps, or its loop changed: step starts do not match the "
              "metrics rows)")
        return
    n = st["steps_measured"]
    counts = st.get("profile_counts", {})
    print(f"outside the phases, mean per measured step ({n}):")
    print(f"  in time/step, 'other' {pr['inside/rest'] + sum(pr[f'inside/{k}'] for k in INSIDE):.3f} s: "
          f"sync check {pr['inside/sync_check']:.3f} (its probe's engine.generate {pr['sync_check_generate']:.3f}, the "
          f"trainer's forward the rest), advantages {pr['inside/advantages']:.3f}, metrics all-reduce "
          f"{pr['inside/metrics_all_reduce']:.3f}, gold metric {pr['inside/gold']:.3f}, rest {pr['inside/rest']:.3f} "
          "(NaN checks, KL, metric tensors)")
    it = st["spread"]["iteration"]
    print(f"  after time/step, before the next step starts: {pr['outside']:.3f} s (loop iteration {pr['iteration']:.3f}, "
          f"median {it['median']:.3f} [{it['min']:.3f}-{it['max']:.3f}]): "
          f"eval {pr['outside/eval']:.3f} ({counts.get('eval', 0)} in {n} steps), checkpoint {pr['outside/checkpoint']:.3f} "
          f"({counts.get('checkpoint', 0)} in {n} steps), metrics log {pr['outside/log']:.3f}, "
          f"publish best {pr['outside/publish_best']:.3f}, rest {pr['outside/rest']:.3f}")
    print(f"  score = reward {pr['score/reward']:.3f} + forwards {pr['score/forwards']:.3f} + rest "
          f"{st['score'] - pr['score/reward'] - pr['score/forwards']:.3f}; train = PPO epochs {pr['train/batch']:.3f} + "
          f"rest {st['train'] - pr['train/batch']:.3f}")
    pad = [f"{ph} {st[f'padded_over_real_{ph}']:.2f}" for ph in ("score", "train") if f"padded_over_real_{ph}" in st]
    if pad:
        print(f"  padded/real tokens of the stage's micro-batches: {', '.join(pad)}")


def print_table(r: dict) -> None:
    print(f"\nmodel {r['model']} ({r['params'] / 1e6:.2f}M params), {r['steps']} steps, first {r['warmup']} left out; "
          f"{r['torch_threads']} torch thread(s); vLLM start {r['engine_start_s']:.0f} s; wall {r['wall_s']:.0f} s; "
          f"checkpoint every {r['save_steps']} steps, "
          f"eval every {r['eval_every'] or '-'} steps")
    for mode, row in r["modes"].items():
        st = row["stage"]
        calls = st["generate_calls_by_kind"]
        print(f"\n[{mode}] {row['prompts_per_step']} prompts x {row['samples_per_prompt']} samples x <= {row['max_new_tokens']} "
              f"tokens (mean length {st['response_length']:.1f}), micro {row['micro_batch_size']}"
              + (f" / {row['micro_batch_tokens']} tokens" if row.get("micro_batch_tokens") else "")
              + f", {row['minibatches']} minibatches x {row['epochs']} epochs; steps {st['first_measured_step'] + 1}-"
              f"{st['first_measured_step'] + st['steps_measured']} measured; seconds")
        print("engine.generate calls: " + "; ".join(
            f"{k} {v['calls']} x {'/'.join(map(str, v['samples']))} samples <= {'/'.join(map(str, v['max_new_tokens']))} "
            f"tokens ({', '.join(c.split(':')[-1] for c in v['callers'])}) {v['seconds']:.2f} s" for k, v in calls.items()))
        if "limits" not in row:  # async
            print_spread_table(st, None, None)
            print(f"engine generate {st['generate_engine']:.3f} s (waited {st['generate']:.3f}); "
                  f"step/max(generate, train) {st['step_over_max_generate_train']:.2f}, "
                  f"step/max(generate, score + train) {st['step_over_max_generate_score_train']:.2f}; "
                  f"staleness {st['staleness']:.2f}; tokens/s {st['tokens_per_s']:.0f}")
            print_profile(st)
            continue
        lim, ratios = row["limits"], row["step_over_limits_by_phase"]
        b = lim["batch"]
        print_spread_table(st, lim, ratios)
        print(f"step/limits: mean {ratios['total']['mean']:.2f}, median {ratios['total']['median']:.2f}, step "
              f"{st['limits_step']} (the limits' batch) {ratios['total']['limits_step']:.2f}; by phase (median): "
              + ", ".join(f"{p} {ratios[p]['median']:.2f}" for p in ["generate", "score", "train", "sync"]))
        cl = b["completion_lengths"]
        print(f"limits' batch: step {st['limits_step']}'s rollouts, {b['prompts']} prompts x n={b['n']} = {b['samples']} "
              f"samples <= {b['max_new_tokens']} tokens, {b['completion_tokens']} completion tokens (lengths median "
              f"{cl['median']:.0f}, {cl['min']:.0f}-{cl['max']:.0f})")
        print(f"generate on that batch: engine.generate {lim['engine_generate']:.3f} s, raw LLM.generate with the same "
              f"SamplingParams {lim['raw_engine_params']:.3f} s -> engine/raw {lim['engine_over_raw']:.2f} "
              f"({lim['tokens_engine_generate']}/{lim['tokens_raw_engine_params']} tokens, today's weights); limit: raw, "
              f"the step's lengths forced, no logprobs {lim['raw_exact_lengths']:.3f} s ({lim['tokens_step']} tokens)")
        print(f"score limit: forwards {lim['score_forwards']:.3f} s ({', '.join(lim['score_models'])})"
              + (f" + reward function {lim['score_reward_fn']:.3f} s" if "score_reward_fn" in lim else "")
              + f"; micro-batches score {lim['micro_batches_score']}, train {lim['micro_batches_train']}; padded/real "
              f"tokens score {lim['tokens_score']['padded'] / lim['tokens_score']['real']:.2f}, train "
              f"{lim['tokens_train']['padded'] / lim['tokens_train']['real']:.2f}")
        print(f"tokens/s end to end {st['tokens_per_s']:.0f}")
        print_profile(st)
    if "trl" in r:
        t = r["trl"]
        if "error" in t:
            print(f"\nTRL: failed: {t['error'][-800:]}")
        else:
            q = t["spread"]
            print(f"\nTRL GRPOTrainer (transformers generate): {t['step_s']:.3f} s per rollout batch "
                  f"({t['opt_steps_per_round']} optimizer steps); median {q['median']:.3f}, p10 {q['p10']:.3f}, p90 "
                  f"{q['p90']:.3f}, min {q['min']:.3f}, max {q['max']:.3f} over {q['n']}; rounds "
                  f"{[round(x, 2) for x in t['round_s']]}"
                  + (f"; ours/TRL (GRPO) = {r['ours_over_trl']:.2f}" if "ours_over_trl" in r else "")
                  + (f", async ours/TRL = {r['ours_async_over_trl']:.2f}" if "ours_async_over_trl" in r else ""))


if __name__ == "__main__":
    main()
