"""Weight sync on the architectures users bring (tests/helpers_models.py): a perturbed copy of a random tiny model
is synced into a running vLLM engine (fp32, CPU), which must then sample with the trainer's probabilities.
The syncs go through vLLM's weight-transfer API (our gloo backend: the path of rollout servers, and of `nccl` on
GPUs); the /dev/shm path is checked on a tied model end to end below and on the tiny Llama throughout.

One engine per family (start-up ~35 s each), closed before the next starts.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from alignment.ppo.mismatch import token_mult_prob_error
from helpers_models import FAMILIES, perturb_, save_family_model
from rollout import SamplingConfig, named_tensors
from test_rollout import PROMPTS, trainer_logprobs


@pytest.mark.e2e
@pytest.mark.parametrize("family", list(FAMILIES))
def test_synced_engine_samples_with_the_trainers_probabilities(family, tiny_paths, tmp_path):
    from transformers import AutoModelForCausalLM

    from rollout.vllm_engine import VLLMEngine

    model_dir = save_family_model(family, tmp_path / family, tiny_paths.base)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == model.config.tie_word_embeddings
    engine = VLLMEngine(str(model_dir), dtype="float32", seed=0, max_model_len=256, weight_transport="gloo")
    try:
        errors = []
        for version in (1, 2):  # two syncs: the second starts from synced, not loaded, weights
            perturb_(model, seed=version)
            engine.update_weights(named_tensors(model), version=version)
            samples = engine.generate(PROMPTS, SamplingConfig(temperature=1.0, max_new_tokens=16, n=2, seed=version))
            sampler, trainer = trainer_logprobs(model, samples, 1.0)
            errors.append(token_mult_prob_error(sampler, trainer, torch.ones_like(trainer)))
    finally:
        engine.close()
    print(f"\n| {family} | {FAMILIES[family][1]} | tied={tied} | token_mult_prob_error after syncs: "
          + ", ".join(f"{e:.5f}" for e in errors) + " |")
    assert all(e < 1.02 for e in errors), errors


@pytest.mark.e2e
def test_tied_embedding_model_through_sft_rm_ppo_and_eval(tiny_paths, tmp_path):
    """A Qwen2-shaped tied-embedding model through every stage's CLI; PPO's vLLM engine stays in sync at every step
    (probe and rollout log-probs), and the evaluation swaps the policies' weights into one vLLM engine."""
    import json

    from conftest import REPO, read_metrics, run_stage, tiny_ppo_overrides, tiny_rm_overrides, tiny_sft_overrides

    base = save_family_model("qwen2", tmp_path / "qwen2", tiny_paths.base)
    sft_dir, rm_dir, ppo_dir = tmp_path / "sft", tmp_path / "rm", tmp_path / "ppo"
    quick = ["train.num_epochs=1"]
    run_stage("sft", REPO / "recipes/tiny/sft.yaml", [*tiny_sft_overrides(tiny_paths, sft_dir), f"model.name_or_path={base}",
                                                      "gold_eval=null", *quick])
    run_stage("rm", REPO / "recipes/tiny/rm.yaml", [*tiny_rm_overrides(tiny_paths, sft_dir / "final", rm_dir),
                                                    "gold_agreement=null", *quick])
    ppo_args = tiny_ppo_overrides(tiny_paths, SimpleNamespace(final=sft_dir / "final"), SimpleNamespace(final=rm_dir / "final"),
                                  ppo_dir)
    run_stage("ppo", REPO / "recipes/tiny/ppo.yaml", [*ppo_args, "train.steps=4", "algorithm.critic_warmup_steps=1", "eval=null"])
    metrics = read_metrics(ppo_dir)
    assert len(metrics) == 4 and metrics[-1]["ppo/kl"] > 0
    assert all(m["ppo/logprob_mismatch"] < 1.02 and m["sync/probe_mult_prob_error"] < 1.02 for m in metrics), metrics
    out = tmp_path / "eval"
    policies = f"policies=[{{path: {sft_dir / 'final'}, name: sft}}, {{path: {ppo_dir / 'final'}, name: ppo}}]"
    run_stage("eval", REPO / "recipes/tiny/eval.yaml", [policies, f"prompts.path={tiny_paths.eval_prompts}", "prompts.num_prompts=16",
                                                        f"scorers.0.path={rm_dir / 'final'}", f"output_dir={out}",
                                                        f"perplexity.path={tiny_paths.eval_demos}", "perplexity.num_texts=16"])
    results = json.loads((out / "results.json").read_text())
    assert [p["name"] for p in results["policies"]] == ["sft", "ppo"]
    # perplexity on held-out demonstrations rendered with Qwen2's chat template: SFT fits them, far below the vocabulary
    assert 1 < results["per_policy"]["sft"]["perplexity"]["value"] < 20
    # KL to the reference (sft) from the engine's samples: 0 for sft itself only if the engine ran sft's weights
    assert results["per_policy"]["sft"]["kl"]["value"] == pytest.approx(0.0, abs=1e-3)
    assert results["per_policy"]["ppo"]["kl"]["value"] > 0.01
