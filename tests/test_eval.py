"""Evaluation harness on the tiny default: policies compared with scores, win rates, KL, a judge; the report's
files (PNG plots, HTML that renders in headless Chromium), determinism, run checkpoints and the vLLM path."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from alignment.cli import main
from alignment.config.eval import EvalRecipe
from alignment.config.schema import load_recipe
from alignment.errors import RecipeError

ROOT = Path(__file__).resolve().parents[1]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"




def perturbed(base: Path, target: Path, scale: float, seed: int = 0) -> Path:
    """A different policy of the same architecture: the base weights plus seeded Gaussian noise."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * scale * p.std().clamp(min=1e-3))
    model.save_pretrained(target)
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(target)
    return target


@pytest.fixture(scope="module")
def noisy_policy(tiny_paths, tmp_path_factory):
    return perturbed(tiny_paths.base, tmp_path_factory.mktemp("noisy") / "noisy", scale=0.5)


def eval_args(tiny_paths, out: Path, *extra: str) -> list[str]:
    return ["eval", str(ROOT / "recipes" / "tiny" / "eval.yaml"), f"prompts.path={tiny_paths.eval_prompts}", "prompts.num_prompts=24",
            "sampling.samples_per_prompt=2", "sampling.max_new_tokens=12", "rollout.engine=hf", "scorers=[]",
            "reference=base", "perplexity=null", f"output_dir={out}", *extra]


@pytest.fixture(scope="module")
def report_dir(tiny_paths, noisy_policy, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "report"
    policies = f"policies=[{{path: {tiny_paths.base}, name: base}}, {{path: {noisy_policy}, name: noisy}}]"
    extra = ["scorers=[{kind: function, function: 'alignment.tiny.task:gold_reward', name: gold_copy}]",
             f"judge={{model: {tiny_paths.base}, max_prompts: 4}}"]
    assert main(eval_args(tiny_paths, out, policies, *extra)) == 0
    return out


def test_report_compares_policies(report_dir):
    results = json.loads((report_dir / "results.json").read_text())
    assert [p["name"] for p in results["policies"]] == ["base", "noisy"]
    # the prompts carry reference answers: BLEU and ROUGE-L score every sample too
    assert results["scorers"] == ["gold", "bleu", "rougeL", "gold_copy"] and results["primary"] == "gold"
    base, noisy = results["per_policy"]["base"], results["per_policy"]["noisy"]
    assert base["kl"]["value"] == pytest.approx(0.0, abs=1e-5)  # the reference against itself
    assert noisy["kl"]["value"] > 0.05  # sampled KL of a different policy on its own samples
    for r in (base, noisy):
        s = r["scores"]["gold"]
        assert s["low"] <= s["value"] <= s["high"] and s["n"] == 24 and r["samples"] == 48
        assert r["scores"]["gold"] == r["scores"]["gold_copy"]
        assert 0.0 <= r["truncation_rate"] <= 1.0 and 0 < r["length"]["value"] <= 12
    (wr,) = results["win_rates"]["gold"]
    assert (wr["a"], wr["b"]) == ("base", "noisy") and wr["wins"] + wr["ties"] + wr["losses"] == 24 * 2 * 2
    assert wr["low"] <= wr["value"] <= wr["high"]
    (judged,) = results["judge"]["pairs"]
    assert judged["pairs"] == 4 and judged["wins"] + judged["ties"] + judged["losses"] == 4
    samples = (report_dir / "samples.jsonl").read_text().splitlines()
    assert len(samples) == 2 * 24 * 2
    assert set(json.loads(samples[0])["scores"]) == {"gold", "bleu", "rougeL", "gold_copy"}
    md = (report_dir / "report.md").read_text()
    assert "| base |" in md and "Win rates by gold" in md and "LLM judge" in md


def test_plots_are_real_png_files(report_dir):
    plots = sorted((report_dir / "plots").glob("*.png"))
    assert {p.name for p in plots} == {"scores_gold.png", "scores_bleu.png", "scores_rougeL.png", "scores_gold_copy.png",
                                       "win_rates_gold.png"}
    for p in plots:
        data = p.read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 5000
    html = (report_dir / "report.html").read_text()
    assert html.count("<img ") == 5 and "<table>" in html


def test_same_seed_gives_the_same_results(tiny_paths, noisy_policy, report_dir, tmp_path):
    out = tmp_path / "again"
    policies = f"policies=[{{path: {tiny_paths.base}, name: base}}, {{path: {noisy_policy}, name: noisy}}]"
    extra = ["scorers=[{kind: function, function: 'alignment.tiny.task:gold_reward', name: gold_copy}]",
             f"judge={{model: {tiny_paths.base}, max_prompts: 4}}"]
    assert main(eval_args(tiny_paths, out, policies, *extra)) == 0
    first, second = json.loads((report_dir / "results.json").read_text()), json.loads((out / "results.json").read_text())
    assert first == second
    assert (report_dir / "samples.jsonl").read_text() == (out / "samples.jsonl").read_text()


def test_checkpoints_of_a_run_give_a_reward_vs_kl_curve(tiny_paths, tmp_path):
    run = tmp_path / "ppo"
    for step, scale in ((10, 0.2), (20, 0.4)):
        perturbed(tiny_paths.base, run / "checkpoints" / f"checkpoint-{step}" / "policy_hf", scale, seed=step)
    (run / "checkpoints" / ".tmp-checkpoint-30").mkdir()  # a half-written checkpoint is ignored
    out = tmp_path / "report"
    assert main(eval_args(tiny_paths, out, f"policies=[{{path: {tiny_paths.base}, name: base}}]", f"run={{dir: {run}}}")) == 0
    results = json.loads((out / "results.json").read_text())
    assert [p["name"] for p in results["policies"]] == ["base", "ppo/step-10", "ppo/step-20"]
    assert [c["step"] for c in results["curve"]] == [10, 20]
    assert results["per_policy"]["ppo/step-20"]["kl"]["value"] > results["per_policy"]["ppo/step-10"]["kl"]["value"] > 0
    png = (out / "plots" / "reward_vs_kl.png").read_bytes()
    assert png[:8] == PNG_MAGIC and len(png) > 5000


def test_recipe_errors_are_reported_together(tmp_path):
    recipe = tmp_path / "eval.yaml"
    recipe.write_text("stage: eval\nprompts: {path: nowhere.jsonl}\nprimary: rm\noutput_dir: x\nsampling: {temprature: 1}\n")
    with pytest.raises(RecipeError) as exc:
        load_recipe(recipe, EvalRecipe)
    message = str(exc.value)
    assert "prompts.path: path 'nowhere.jsonl' does not exist" in message
    assert "unknown key 'sampling.temprature' (did you mean 'sampling.temperature'?)" in message
    recipe.write_text("stage: eval\npolicies: [{path: a/b}]\nprompts: {path: c/d}\nprimary: rm\noutput_dir: x\ngold_metric: m:f\n")
    with pytest.raises(RecipeError, match="primary: 'rm' is not a scorer name; choose one of gold"):
        load_recipe(recipe, EvalRecipe)


def _chromium() -> str:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if chromium is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium); the HTML is checked structurally elsewhere")
    return chromium


def loaded_images(report: Path, tmp_path: Path) -> dict[str, int]:
    """src -> rendered width of every image of `report` as headless Chromium loads it (0: the image did not load)."""
    probe = report.with_name("probe.html")
    probe.write_text(report.read_text().replace("</body>", "<script>window.onload = () => { document.title = JSON.stringify("
                                                "[...document.images].map(i => [i.getAttribute('src'), i.naturalWidth])); };"
                                                "</script></body>"))
    proc = subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={tmp_path / 'profile'}",
                           "--virtual-time-budget=10000", "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    title = re.search(r"<title>(.*?)</title>", proc.stdout, re.S)
    assert title, proc.stderr[-2000:]
    return dict(json.loads(html.unescape(title.group(1))))


def test_html_renders_in_headless_chromium(report_dir, tmp_path):
    chromium = _chromium()
    shot = tmp_path / "shot.png"
    proc = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", f"--user-data-dir={tmp_path / 'profile'}",
         "--window-size=1200,1600", f"--screenshot={shot}", (report_dir / "report.html").as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    assert shot.is_file(), proc.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 20000  # a blank page compresses to a few KB
    import matplotlib.image

    pixels = matplotlib.image.imread(str(shot))
    assert pixels.shape[0] >= 1000 and pixels.shape[1] >= 1000
    assert pixels[..., :3].std() > 0.05  # tables, text and plots, not an empty page


@pytest.mark.e2e
def test_vllm_engine_swaps_policies_by_weight_sync(tiny_paths, noisy_policy, vllm_engine, tmp_path):
    """One shared engine, two policies: the noisy policy's weights are synced in, then the base's again."""
    from alignment.stages.eval import run

    recipe = load_recipe(ROOT / "recipes" / "tiny" / "eval.yaml", EvalRecipe, [
        f"policies=[{{path: {tiny_paths.base}, name: base}}, {{path: {noisy_policy}, name: noisy}}, {{path: {tiny_paths.base}, name: base_again}}]",
        f"prompts.path={tiny_paths.eval_prompts}", "prompts.num_prompts=16", "sampling.max_new_tokens=12", "scorers=[]",
        "reference=base", "perplexity=null", f"output_dir={tmp_path / 'out'}", "rollout.engine=vllm"])
    results = run(recipe, engine=vllm_engine)
    samples = [json.loads(line) for line in (tmp_path / "out" / "samples.jsonl").read_text().splitlines()]
    texts = {name: [s["text"] for s in samples if s["policy"] == name] for name in ("base", "noisy", "base_again")}
    assert texts["base"] == texts["base_again"]  # same weights, same seeds -> same samples
    assert texts["base"] != texts["noisy"]
    assert results["per_policy"]["base"]["kl"]["value"] == pytest.approx(0.0, abs=1e-4)
    assert results["per_policy"]["noisy"]["kl"]["value"] > 0.05


@pytest.mark.e2e
def test_report_on_the_tiny_pipeline_ppo_wins_on_gold(tiny_paths, tiny_sft, tiny_rm, tiny_ppo, tiny_dpo, vllm_engine,
                                                      tmp_path, capsys):
    """recipes/tiny/eval.yaml on the untrained, SFT, PPO and DPO policies of this test run: both roads beat SFT on the
    gold metric with win rates whose whole interval lies above a coin flip, side by side in one report."""
    from alignment.config.eval import EvalRecipe
    from alignment.config.schema import load_recipe
    from alignment.stages.eval import run

    out = tmp_path / "report"
    policies = (f"policies=[{{path: {tiny_paths.base}, name: base}}, {{path: {tiny_sft.final}, name: sft}}, "
                f"{{path: {tiny_ppo.final}, name: ppo}}, {{path: {tiny_dpo.final}, name: dpo}}]")
    recipe = load_recipe(ROOT / "recipes" / "tiny" / "eval.yaml", EvalRecipe, [
        policies, f"prompts.path={tiny_paths.eval_prompts}", f"scorers=[{{kind: model, name: rm, path: {tiny_rm.final}}}]",
        f"perplexity.path={tiny_paths.eval_demos}", f"output_dir={out}"])
    run(recipe, engine=vllm_engine)
    results = json.loads((out / "results.json").read_text())
    gold = {name: results["per_policy"][name]["scores"]["gold"]["value"] for name in ("base", "sft", "ppo", "dpo")}
    kl = {name: results["per_policy"][name]["kl"]["value"] for name in ("ppo", "dpo")}
    print("gold by policy:", gold, "KL to SFT:", kl)
    assert min(gold["ppo"], gold["dpo"]) > gold["sft"] > gold["base"], gold
    for road in ("ppo", "dpo"):
        (vs_sft,) = [w for w in results["win_rates"]["gold"] if {w["a"], w["b"]} == {"sft", road}]
        win = vs_sft["low"] if vs_sft["a"] == road else 1 - vs_sft["high"]
        assert win > 0.5, vs_sft  # the whole 95% interval of the win rate over SFT lies above a coin flip
    assert "| dpo |" in (out / "report.md").read_text()
    assert all((out / "plots").glob("*.png")) and (out / "report.html").is_file()

    # the step of each trained policy, read from its run; each run's training curves
    steps = {p["name"]: p["step"] for p in results["policies"]}
    assert steps == {"base": None, "sft": tiny_sft.summary["steps"], "ppo": tiny_ppo.metrics[-1]["step"],
                     "dpo": tiny_dpo.summary["steps"]}
    assert [(r["dir"], r["stage"], r["policies"]) for r in results["runs"]] == [
        (str(tiny_sft.dir), "sft", ["sft"]), (str(tiny_ppo.dir), "ppo", ["ppo"]), (str(tiny_dpo.dir), "dpo", ["dpo"])]
    widths = loaded_images(out / "report.html", tmp_path)
    assert widths["plots/curves_ppo.png"] > 600 and widths["plots/curves_sft.png"] > 300, widths  # drawn in the page

    # perplexity on held-out demonstrations and overlap with the reference answers, with CIs
    per = results["per_policy"]
    ppl = {name: per[name]["perplexity"] for name in gold}
    assert all(p["low"] <= p["value"] <= p["high"] and p["n"] == 128 for p in ppl.values()), ppl
    assert ppl["sft"]["high"] < ppl["base"]["low"] / 10  # SFT learned the demonstrations' distribution
    assert {"bleu", "rougeL"} <= set(results["scorers"])
    assert per["sft"]["scores"]["rougeL"]["low"] > per["base"]["scores"]["rougeL"]["high"]

    # the console summary leads with the win rates, as the report does
    printed = capsys.readouterr().out
    assert "win rates by gold (95% CI; a tie counts half):" in printed and "ppo over sft: " in printed
