"""Session-wide fixtures: the tiny default is built once, the vLLM engine is started once (~40 s)."""

from __future__ import annotations

import os

import pytest

# Keep vLLM's CPU KV cache small: several engines (tests, rollout servers) share a 24 GB machine.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
# One torch thread in this process and in every stage subprocess: tiny models on a shared 2-core machine only
# spin with more (a tiny SFT step goes from 0.14 s to 3 s). scripts/test.sh exports the same.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Every rollout server the tests start, and every client, share this secret (rollout/auth.py); the tests of the
# unauthenticated paths send none or another.
ROLLOUT_SECRET = "tests-rollout-secret-0123456789"
os.environ["ALIGNMENT_ROLLOUT_SECRET"] = ROLLOUT_SECRET


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory):
    """The built-in tiny default (untrained model, tokenizer, datasets), built once per test run."""
    from alignment.tiny import build_tiny

    return build_tiny(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def vllm_engine(tiny_paths):
    """One colocated vLLM engine on the tiny base model for the whole run (start-up costs ~40 s).

    Tests that need particular weights must sync them first (`engine.update_weights`): earlier tests
    may have left other weights loaded.
    """
    from rollout.vllm_engine import VLLMEngine

    engine = VLLMEngine(str(tiny_paths.base), dtype="float32", seed=0, max_model_len=256)
    yield engine
    engine.close()


# ----------------------------------------------------------------------------- trained tiny SFT policy and RM

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def stage_env(**extra: str) -> dict:
    """Environment for a stage subprocess (one torch thread, like this process: see the top of this file).

    Without the launcher variables of this process (an in-process PPO run sets LOCAL_RANK for DeepSpeed):
    a subprocess is its own launch."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


def run_stage(stage: str, recipe: str | Path, overrides: list[str], *, accelerate_config: str | None = None,
              env: dict | None = None, timeout: float = 900, check: bool = True) -> subprocess.CompletedProcess:
    """`python -m alignment <stage> <recipe> <overrides>` (or under `accelerate launch --config_file ...`)."""
    if accelerate_config is None:
        cmd = [sys.executable, "-m", "alignment", stage, str(recipe), *overrides]
    else:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
               "-m", "alignment", stage, str(recipe), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=env or stage_env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return proc


def tiny_sft_overrides(tiny, out_dir: Path) -> list[str]:
    """Point recipes/tiny/sft.yaml at a tiny build and an output dir."""
    return [f"model.name_or_path={tiny.base}", f"data.sources.0.path={tiny.sft}",
            f"gold_eval.prompts={tiny.eval_prompts}", f"output.dir={out_dir}"]


def tiny_rm_overrides(tiny, policy: Path, out_dir: Path) -> list[str]:
    """Point recipes/tiny/rm.yaml at a tiny build, a policy checkpoint and an output dir."""
    return [f"model.name_or_path={policy}", f"data.sources.0.path={tiny.preferences}",
            f"gold_agreement.prompts={tiny.eval_prompts}", f"output.dir={out_dir}"]


def even_eval_split(source: Path, out_dir: Path, n_eval: int = 128) -> list[str]:
    """Overrides that hold out the first `n_eval` distinct rows of `source` as `data.eval_sources` and train on the rest.

    With n_eval a multiple of world size x batch size, every rank's eval batches are full, so the distributed eval
    loop (which pads a short last batch with repeated rows) averages exactly the batches a single process sees.
    """
    rows = list(dict.fromkeys(source.read_text().splitlines()))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "eval.jsonl").write_text("\n".join(rows[:n_eval]) + "\n")
    (out_dir / "train.jsonl").write_text("\n".join(rows[n_eval:]) + "\n")
    return [f"data.sources.0.path={out_dir / 'train.jsonl'}", f"data.eval_sources=[{{path: {out_dir / 'eval.jsonl'}}}]"]


def _stage_result(out_dir: Path, proc: subprocess.CompletedProcess) -> SimpleNamespace:
    return SimpleNamespace(dir=out_dir, final=out_dir / "final", summary=json.loads((out_dir / "summary.json").read_text()),
                           log=proc.stdout + proc.stderr)


@pytest.fixture(scope="session")
def tiny_sft(tiny_paths, tmp_path_factory):
    """The tiny policy after SFT (recipes/tiny/sft.yaml through the real CLI, ~1 min), trained once per run.

    `.final` is the exported HF checkpoint (safetensors + tokenizer); `.summary` holds eval loss and the
    gold metric before/after; `.dir` has metrics.jsonl, checkpoints/, recipe.yaml.
    """
    out = tmp_path_factory.mktemp("tiny_sft") / "run"
    proc = run_stage("sft", REPO / "recipes/tiny/sft.yaml", tiny_sft_overrides(tiny_paths, out))
    return _stage_result(out, proc)


@pytest.fixture(scope="session")
def tiny_rm(tiny_paths, tiny_sft, tmp_path_factory):
    """The tiny reward model trained from the tiny SFT policy (recipes/tiny/rm.yaml, ~40 s), trained once per run.

    `.final` holds the RM (sequence classification, 1 label) with reward_stats.json; load it with
    `reward.scoring.RewardModelScorer(tiny_rm.final)`.
    """
    out = tmp_path_factory.mktemp("tiny_rm") / "run"
    proc = run_stage("rm", REPO / "recipes/tiny/rm.yaml", tiny_rm_overrides(tiny_paths, tiny_sft.final, out))
    return _stage_result(out, proc)


def tiny_dpo_overrides(tiny, sft, out_dir: Path) -> list[str]:
    """Point recipes/tiny/dpo.yaml at a tiny build, an SFT run and an output dir."""
    return [f"model.name_or_path={sft.final}", f"data.sources.0.path={tiny.preferences}",
            f"gold_eval.prompts={tiny.eval_prompts}", f"output.dir={out_dir}"]


@pytest.fixture(scope="session")
def tiny_dpo(tiny_paths, tiny_sft, tmp_path_factory):
    """The tiny SFT policy after DPO on the RM stage's preference pairs (recipes/tiny/dpo.yaml through the real CLI)."""
    out = tmp_path_factory.mktemp("tiny_dpo") / "run"
    proc = run_stage("dpo", REPO / "recipes/tiny/dpo.yaml", tiny_dpo_overrides(tiny_paths, tiny_sft, out))
    return _stage_result(out, proc)


def tiny_ppo_overrides(tiny, sft, rm, out_dir: Path, critic: bool = True) -> list[str]:
    """Point recipes/tiny/ppo.yaml (or ppo_grpo.yaml, critic=False) at a tiny build, SFT/RM runs and an output dir."""
    overrides = [f"policy.name_or_path={sft.final}", f"rewards.0.path={rm.final}", f"prompts.sources.0.path={tiny.prompts}",
                 f"eval.prompts={tiny.eval_prompts}", f"output.dir={out_dir}"]
    return overrides + ([f"value.name_or_path={rm.final}"] if critic else [])


def read_metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def tiny_ppo(tiny_paths, tiny_sft, tiny_rm, vllm_engine, tmp_path_factory):
    """The tiny policy after PPO (recipes/tiny/ppo.yaml: GAE with a critic, learned RM reward), run once in this
    process on the shared vLLM engine. `.final` is the exported policy, `.metrics` the rows of metrics.jsonl."""
    from alignment.config.ppo import PPORecipe
    from alignment.config.schema import load_recipe
    from alignment.stages.ppo import run

    out = tmp_path_factory.mktemp("tiny_ppo") / "run"
    run(load_recipe(REPO / "recipes/tiny/ppo.yaml", PPORecipe, tiny_ppo_overrides(tiny_paths, tiny_sft, tiny_rm, out)), engine=vllm_engine)
    return SimpleNamespace(dir=out, final=out / "final", metrics=read_metrics(out))
