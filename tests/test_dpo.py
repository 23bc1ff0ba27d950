"""DPO stage through the real CLI: gold rises over SFT, the implicit reward ranks held-out pairs, the pairs are
rendered as the reward-model stage renders them, in every preference format; ZeRO-3 ranks, kill and resume, LoRA."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_stage, stage_env, tiny_dpo_overrides

RECIPE = REPO / "recipes/tiny/dpo.yaml"


def answer_logps(model_dir: Path, prompt_ids: list[list[int]], answers: list[list[int]]) -> list[float]:
    """Sum of the answers' token log-probs under a saved checkpoint, one sequence at a time (no batching to share)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    out = []
    with torch.no_grad():
        for p, a in zip(prompt_ids, answers):
            ids = torch.tensor([p + a])
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
            out.append(float(logp[len(p) - 1:].sum()))
    return out


def test_dpo_raises_gold_and_ranks_held_out_pairs_by_its_implicit_reward(tiny_dpo, tiny_sft, tiny_paths):
    """recipes/tiny/dpo.yaml: the gold metric rises over the SFT policy's, the implicit reward beta * log(pi / ref)
    ranks held-out pairs well above chance, the exported checkpoint reproduces the implicit rewards the trained model
    computed in memory, and the pairs were rendered as the reward-model stage renders them (recorded)."""
    from transformers import AutoTokenizer

    from reward.scoring import encode

    s = tiny_dpo.summary
    print(f"\nDPO: gold {s['gold_before']:.3f} -> {s['gold_after']:.3f} (SFT's own run: {tiny_sft.summary['gold_after']:.3f}); "
          f"held-out implicit-reward accuracy {s['eval']['accuracy']:.3f} on {s['eval']['num_pairs']} pairs")
    assert s["gold_after"] > s["gold_before"] + 0.08
    assert s["eval"]["accuracy"] > 0.7 and s["eval"]["num_pairs"] > 150
    assert s["rendering"]["kind"] == "chat_template"
    assert s["overlong"]["train"]["total"] > 1000

    probe = json.loads((tiny_dpo.dir / "probe.json").read_text())
    for side in ("chosen", "rejected"):
        logps = answer_logps(tiny_dpo.final, probe["prompt_ids"], probe[f"{side}_ids"])
        expected = [probe["beta"] * (lp - ref) for lp, ref in zip(logps, probe[f"ref_{side}_logps"])]
        assert expected == pytest.approx(probe[side], abs=1e-4)
    # the token ids trained on are the RM stage's encoding of the same rows
    tok = AutoTokenizer.from_pretrained(tiny_dpo.final)
    rows = [json.loads(line) for line in tiny_paths.preferences.read_text().splitlines()]
    encoded = {tuple(encode(tok, r["prompt"], r["chosen"])) for r in rows}
    assert all(tuple(p + c) in encoded for p, c in zip(probe["prompt_ids"], probe["chosen_ids"]))


def _hh(turns: list[dict]) -> str:
    return "".join(f"\n\n{'Human' if m['role'] == 'user' else 'Assistant'}: {m['content']}" for m in turns)


@pytest.mark.parametrize("form", ["hh_transcripts", "chosen_rejected_messages"])
def test_dpo_trains_on_other_preference_formats(form, tiny_paths, tiny_sft, tmp_path):
    """HH-RLHF transcripts, and chosen/rejected conversations with no separate prompt: read as conversations, rendered
    with the chat template (recorded), and the implicit reward ranks held-out pairs better than chance."""
    rows = [json.loads(line) for line in tiny_paths.preferences.read_text().splitlines()]
    if form == "hh_transcripts":
        rows = [{"chosen": _hh(r["prompt"] + r["chosen"]), "rejected": _hh(r["prompt"] + r["rejected"])} for r in rows]
    else:
        rows = [{"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in rows]
    data = tmp_path / "prefs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    run_stage("dpo", RECIPE, [*tiny_dpo_overrides(tiny_paths, tiny_sft, out), f"data.sources.0.path={data}",
                              "gold_eval=null", "train.num_epochs=1"])
    s = json.loads((out / "summary.json").read_text())
    assert s["rendering"]["kind"] == "chat_template" and s["eval"]["accuracy"] > 0.6, s["eval"]


def test_dpo_losses_and_reference_free(tiny_paths, tiny_sft, tmp_path):
    """IPO, and a reference-free run (length-normalised sigmoid with no reference: SimPO without its target margin),
    train and rank held-out pairs above chance; a reference-free run records zero reference log-probs."""
    for name, settings in (("ipo", ["dpo.loss=ipo"]), ("simpo", ["dpo.loss=sigmoid_norm", "dpo.reference=none", "dpo.beta=2.0"])):
        out = tmp_path / name
        run_stage("dpo", RECIPE, [*tiny_dpo_overrides(tiny_paths, tiny_sft, out), "gold_eval=null", "train.max_steps=40",
                                  *settings])
        s = json.loads((out / "summary.json").read_text())
        assert s["eval"]["accuracy"] > 0.6, (name, s["eval"])
    probe = json.loads((tmp_path / "simpo" / "probe.json").read_text())
    assert set(probe["ref_chosen_logps"]) == {0.0}


def test_dpo_lora_merges_on_export(tiny_paths, tiny_sft, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "lora"
    run_stage("dpo", RECIPE, [*tiny_dpo_overrides(tiny_paths, tiny_sft, out), "gold_eval=null", "train.max_steps=10",
                              "model.lora={r: 8, alpha: 16, dropout: 0.0}"])
    assert (out / "adapter" / "adapter_config.json").is_file() and not (out / "final" / "adapter_config.json").exists()
    merged, base = load_file(out / "final" / "model.safetensors"), load_file(tiny_sft.final / "model.safetensors")
    assert merged.keys() == base.keys()
    assert any(not torch.equal(merged[k], base[k]) for k in merged if "proj" in k)


def test_malformed_pairs_are_one_line_and_write_nothing(tiny_paths, tiny_sft, tmp_path):
    data = tmp_path / "bad.jsonl"
    good = tiny_paths.preferences.read_text().splitlines()[0]
    data.write_text(good + "\n" + json.dumps({"prompt": "q", "chosen": "a"}) + "\n")
    out = tmp_path / "run"
    proc = run_stage("dpo", RECIPE, [*tiny_dpo_overrides(tiny_paths, tiny_sft, out), f"data.sources.0.path={data}"],
                     check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and f"{data} row 2: 'rejected' is missing" in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not out.exists()


@pytest.mark.e2e
def test_dpo_zero3_two_ranks_resume_after_a_kill_reproduces_the_uninterrupted_weights(tiny_paths, tiny_sft, tmp_path):
    """2 ZeRO-3 ranks (reference log-probs shared between them): the run killed after its checkpoint at step 2 and run
    again resumes there and ends with the weights of the run never killed."""
    from safetensors.torch import load_file

    def command(out: Path) -> list[str]:
        return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "recipes/accelerate/cpu_zero3.yaml"), "-m", "alignment", "dpo", str(RECIPE),
                *tiny_dpo_overrides(tiny_paths, tiny_sft, out), "gold_eval=null", "train.max_steps=4",
                "output.save_steps=2", "train.per_device_batch_size=16"]

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    env = stage_env(PYTHONUNBUFFERED="1")
    assert subprocess.run(command(straight), cwd=REPO, env=env, stdout=open(tmp_path / "straight.log", "w"),
                          stderr=subprocess.STDOUT, timeout=900).returncode == 0, (tmp_path / "straight.log").read_text()[-3000:]
    killed = subprocess.Popen(command(resumed), cwd=REPO, env=env, stdout=open(tmp_path / "killed.log", "w"),
                              stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 600
    while not (resumed / "checkpoints" / "checkpoint-2").exists():
        assert killed.poll() is None and time.time() < deadline, (tmp_path / "killed.log").read_text()[-3000:]
        time.sleep(0.2)
    os.killpg(killed.pid, signal.SIGKILL)
    killed.wait()
    rerun = subprocess.run(command(resumed), cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert "resuming from" in rerun.stdout
    expected, got = load_file(straight / "final" / "model.safetensors"), load_file(resumed / "final" / "model.safetensors")
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=1e-6, msg=name)
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["eval"]["num_pairs"] > 150
