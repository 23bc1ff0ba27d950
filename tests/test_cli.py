"""The real CLI: malformed recipes and datasets give one `error:` line per problem, no traceback, no outputs."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from alignment.cli import build_parser, main
from helpers_data import assistant, sft_recipe, user, write_jsonl, write_yaml

CLI = [sys.executable, "-m", "alignment"]


def run_cli(capsys, *argv) -> tuple[int, list[str], str]:
    code = main(list(map(str, argv)))
    captured = capsys.readouterr()
    return code, captured.err.splitlines(), captured.out


def assert_one_error(code, err, *fragments, lines=1):
    assert code == 2
    assert len(err) == lines and all(line.startswith("error: ") for line in err), err
    text = "\n".join(err)
    assert "Traceback" not in text
    for fragment in fragments:
        assert fragment in text, (fragment, text)


@pytest.fixture
def setup(tmp_path):
    good = write_jsonl(tmp_path / "sft.jsonl", [{"prompt": user(f"q{i}"), "completion": assistant(f"a{i}")} for i in range(20)])
    out = tmp_path / "out"

    def recipe(data_path=good, name="recipe.yaml", **data_kw):
        return write_yaml(tmp_path / name, sft_recipe(data_path, out, **data_kw))

    return tmp_path, recipe, out


# -- malformed recipes -----------------------------------------------------------------------------

@pytest.mark.parametrize(
    "change, fragments",
    [
        ({"train": {"learnig_rate": 1e-5}}, ["unknown key 'train.learnig_rate'", "did you mean 'train.learning_rate'"]),
        ({"train": {"per_device_batch_size": 2.5}}, ["train.per_device_batch_size: expected an integer, got 2.5"]),
        ({"train": {"warmup_ratio": 1.5}}, ["train.warmup_ratio: must be <= 1.0, got 1.5"]),
        ({"output": None}, ["output: expected a mapping"]),
        ({"sft": {"loss_on": "prompt"}}, ["sft.loss_on: must be one of auto, completion, assistant, all; got 'prompt'"]),
        ({"model": {"name_or_path": "./missing-model"}}, ["model.name_or_path: path './missing-model' does not exist"]),
    ],
)
def test_malformed_recipe(capsys, setup, change, fragments):
    tmp_path, recipe, out = setup
    path = recipe()
    import yaml

    raw = yaml.safe_load(path.read_text())
    for key, value in change.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    write_yaml(path, raw)
    code, err, _ = run_cli(capsys, "sft", path)
    assert_one_error(code, err, str(path), *fragments)
    assert not out.exists()


def test_missing_required_key(capsys, setup):
    tmp_path, recipe, out = setup
    path = write_yaml(tmp_path / "r.yaml", {"stage": "sft", "data": {"sources": [{"path": "org/data"}]}, "output": {"dir": str(out)}})
    code, err, _ = run_cli(capsys, "sft", path)
    assert_one_error(code, err, "model: missing required key")


def test_several_problems_one_line_each(capsys, setup):
    tmp_path, recipe, out = setup
    path = recipe()
    code, err, _ = run_cli(capsys, "sft", path, "train.learning_rate=-1", "train.lr_scheduler=cosin", "data.eval_fraction=0.7")
    assert_one_error(code, err, "train.learning_rate: must be >= 0.0", "did you mean 'cosine'", "data.eval_fraction: must be <= 0.5", lines=3)
    assert not out.exists()


def test_bad_yaml(capsys, setup):
    tmp_path, _, out = setup
    path = write_yaml(tmp_path / "bad.yaml", "stage: sft\ntrain: {learning_rate: 1e-5\n")
    code, err, _ = run_cli(capsys, "sft", path)
    assert_one_error(code, err, f"{path}: not valid YAML (line")


def test_recipe_not_a_mapping(capsys, setup):
    tmp_path, _, _ = setup
    path = write_yaml(tmp_path / "list.yaml", "- stage\n- sft\n")
    for argv in (["sft", path], ["validate", path]):
        code, err, _ = run_cli(capsys, *argv)
        assert_one_error(code, err, "a recipe must be a mapping of keys to values, got list")


@pytest.mark.parametrize(
    "override, fragment",
    [
        ("train.learning_rate", "override 'train.learning_rate' must look like key.sub=value"),
        ("output.dir.sub=1", "override 'output.dir.sub=1': 'dir' holds a value, not a section"),
        ("data.sources.3.weight=2", "'3' is not an index of the list"),
    ],
)
def test_bad_override(capsys, setup, override, fragment):
    _, recipe, out = setup
    code, err, _ = run_cli(capsys, "sft", recipe(), override)
    assert_one_error(code, err, fragment)
    assert not out.exists()


def test_overrides_through_the_cli(capsys, setup, monkeypatch):
    _, recipe, _ = setup
    seen = {}
    monkeypatch.setattr("alignment.cli.resolve", _resolver(seen))
    code, _, _ = run_cli(capsys, "sft", recipe(), "train.learning_rate=1e-5", "data.sources.0.weight=3")
    assert code == 0
    assert seen["recipe"].train.learning_rate == 1e-5 and seen["recipe"].data.sources[0].weight == 3.0


def _resolver(seen):
    from alignment import cli

    real = cli.resolve

    def resolve(path):
        if path.endswith(":run"):
            return lambda recipe: seen.setdefault("recipe", recipe)
        return real(path)

    return resolve


def test_validate_only_and_validate(capsys, setup):
    _, recipe, out = setup
    path = recipe()
    code, _, stdout = run_cli(capsys, "sft", path, "--validate-only")
    assert code == 0 and f"{path}: ok" in stdout
    code, _, stdout = run_cli(capsys, "validate", path)
    assert code == 0 and f"{path}: ok" in stdout
    assert not out.exists()


def test_validate_rejects_unknown_stage(capsys, setup):
    tmp_path, _, _ = setup
    path = write_yaml(tmp_path / "r.yaml", {"stage": "orpo"})
    code, err, _ = run_cli(capsys, "validate", path)
    assert_one_error(code, err, "key 'stage' must name a stage", "'orpo'")


def test_no_recipe_given(capsys):
    code, err, _ = run_cli(capsys, "sft")
    assert_one_error(code, err, "give a recipe file")


# -- malformed datasets through `alignment validate --data` ----------------------------------------

@pytest.mark.parametrize(
    "rows, fragment",
    [
        ([{"prompt": user("q"), "completion": assistant("a")}, '{"prompt": [}'], "row 2: not valid JSON"),
        ([{"prompt": user("q"), "completion": assistant("a")}, {"prompt": user("q2")}], "row 2: 'completion' is missing"),
        ([{"messages": [{"role": "human", "content": "q"}]}], "row 1: 'messages' message 1 has role 'human'"),
        ([{"prompt": "q", "completion": 7}], "row 1: 'completion' must be a string, got int"),
    ],
)
def test_malformed_dataset(capsys, setup, rows, fragment):
    tmp_path, recipe, out = setup
    data = write_jsonl(tmp_path / "bad.jsonl", rows)
    code, err, _ = run_cli(capsys, "validate", "--data", recipe(data))
    assert_one_error(code, err, f"{data} {fragment}")
    assert not out.exists()


def test_non_numeric_margin_in_rm_data(capsys, tmp_path):
    data = write_jsonl(tmp_path / "prefs.jsonl", [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "1,5"}])
    raw = {"stage": "rm", "model": {"name_or_path": "org/m"}, "data": {"sources": [{"path": str(data)}]}, "output": {"dir": str(tmp_path / "o")}}
    code, err, _ = run_cli(capsys, "validate", "--data", write_yaml(tmp_path / "rm.yaml", raw))
    assert_one_error(code, err, f"{data} row 1: 'margin' must be a number, got '1,5'")


def test_mixed_formats_across_sources(capsys, setup):
    tmp_path, recipe, _ = setup
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "hello"}])
    path = recipe()
    import yaml

    raw = yaml.safe_load(path.read_text())
    raw["data"]["sources"].append({"path": str(text)})
    write_yaml(path, raw)
    code, err, _ = run_cli(capsys, "validate", "--data", path)
    assert_one_error(code, err, "have different formats", "text.jsonl", "sft.jsonl")


def test_empty_dataset(capsys, setup):
    tmp_path, recipe, _ = setup
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, err, _ = run_cli(capsys, "validate", "--data", recipe(empty))
    assert_one_error(code, err, f"data source '{empty}': no rows (empty dataset)")


def test_validate_data_prints_the_report(capsys, setup):
    _, recipe, out = setup
    code, _, stdout = run_cli(capsys, "validate", "--data", recipe(eval_fraction=0.1))
    assert code == 0
    assert "data (sft, format prompt/completion (conversational)): 20 rows read" in stdout
    assert "kept: train 18, eval 2" in stdout
    assert not out.exists()


# -- subprocess: help and a real traceback-free failure --------------------------------------------

HELP_COMMANDS = [[], ["tiny"], ["sft"], ["rm"], ["ppo"], ["eval"], ["label"], ["label", "export"], ["label", "import"],
                 ["label", "auto"], ["rollout"], ["rollout", "serve"], ["validate"]]


@pytest.mark.parametrize("command", HELP_COMMANDS, ids=lambda c: " ".join(c) or "alignment")
def test_help(command):
    result = subprocess.run(CLI + command + ["--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: alignment" in result.stdout and "Traceback" not in result.stderr


def test_help_recipe_lists_keys(capsys):
    code, _, stdout = run_cli(capsys, "sft", "--help-recipe")
    assert code == 0 and "train.learning_rate (default 0.0001): peak learning rate" in stdout
    assert "data.clean.max_tokens" in stdout


def test_subprocess_error_has_no_traceback(tmp_path):
    data = write_jsonl(tmp_path / "d.jsonl", [{"text": "a"}, "{nope"])
    path = write_yaml(tmp_path / "r.yaml", sft_recipe(data, tmp_path / "out"))
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(CLI + ["validate", "--data", str(path)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {data} row 2: not valid JSON (Expecting property name enclosed in double quotes at column 2)"]
    bad = subprocess.run(CLI + ["rm", str(path), "train.max_steps=lots"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        f"error: {path}: stage: must be one of rm; got 'sft'",
        f"error: {path}: train.max_steps: expected an integer, got 'lots'",
    ]
    assert not (tmp_path / "out").exists()


# -- a stage that stops on bad data leaves its output directory as it was --------------------------

MALFORMED_SFT_ROWS = [
    ['{"prompt": [}'],
    [{"prompt": user("q"), "completion": assistant("a")}, {"prompt": user("q2")}],
    [{"messages": [{"role": "human", "content": "q"}]}],
    [{"prompt": "q", "completion": 7}],
    [],
]
MALFORMED_PAIRS = [
    [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": "1,5"}],
    [{"prompt": "q", "chosen": "a"}],
]


def _snapshot(directory):
    """Every file under `directory` with its bytes and modification time (None when the directory is absent)."""
    if not directory.exists():
        return None
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("existing_run", [False, True], ids=["absent", "existing-run"])
def test_bad_data_leaves_the_output_directory_as_it_was(capsys, tmp_path, tiny_paths, existing_run):
    out = tmp_path / "run"
    if existing_run:  # another run's files: none may change
        write_yaml(out / "recipe.yaml", {"stage": "sft", "note": "the earlier run's recipe"})
        write_jsonl(out / "metrics.jsonl", [{"step": 1, "train/loss": 1.0}])
        (out / "checkpoints" / "checkpoint-1").mkdir(parents=True)
        (out / "checkpoints" / "checkpoint-1" / "state.json").write_text("{}")
    before = _snapshot(out)
    cases = ([("sft", rows) for rows in MALFORMED_SFT_ROWS] + [("rm", rows) for rows in MALFORMED_PAIRS]
             + [("ppo", [{"prompt": "q", "item": "phone"}, {"item": "laptop"}])])
    for i, (stage, rows) in enumerate(cases):
        data = write_jsonl(tmp_path / f"bad{i}.jsonl", rows)
        raw = {"stage": stage, "model": {"name_or_path": str(tiny_paths.base)}, "data": {"sources": [{"path": str(data)}]},
               "output": {"dir": str(out)}}
        if stage == "ppo":
            raw = {"stage": "ppo", "policy": {"name_or_path": str(tiny_paths.base)}, "prompts": {"sources": [{"path": str(data)}]},
                   "rewards": [{"kind": "function", "function": "alignment.tiny.task:gold_reward"}], "rollout": {"engine": "hf"},
                   "algorithm": {"advantage": "grpo"}, "train": {"steps": 1}, "output": {"dir": str(out)}}
        code, err, _ = run_cli(capsys, stage, write_yaml(tmp_path / f"{stage}{i}.yaml", raw))
        assert code == 2 and err and all(line.startswith("error: ") for line in err), (stage, rows, err)
        assert _snapshot(out) == before, (stage, rows)


def test_library_errors_from_a_users_model_or_data_are_one_line(capsys, tmp_path, tiny_paths):
    """The tiny chat template refuses a system turn (jinja2), and a tokenizer without a chat template cannot render
    messages (transformers): both stop with one `error:` line, and the output directory stays absent."""
    import shutil

    no_template = tmp_path / "no_template"
    shutil.copytree(tiny_paths.base, no_template)
    config = json.loads((no_template / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (no_template / "tokenizer_config.json").write_text(json.dumps(config))
    (no_template / "chat_template.jinja").unlink(missing_ok=True)
    system = [{"messages": [{"role": "system", "content": "be kind"}, *user("q"), *assistant("a")]}] * 4
    plain = [{"messages": [*user("q"), *assistant("a")]}] * 4
    for model, rows, fragment in [(tiny_paths.base, system, "rejected this run's model, tokenizer or data"),
                                  (no_template, plain, "chat_template")]:
        out = tmp_path / "out"
        data = write_jsonl(tmp_path / "data.jsonl", rows)
        recipe = write_yaml(tmp_path / "r.yaml", {"stage": "sft", "model": {"name_or_path": str(model)},
                                                   "data": {"sources": [{"path": str(data)}], "eval_fraction": 0.0},
                                                   "output": {"dir": str(out)}})
        code, err, _ = run_cli(capsys, "sft", recipe)
        err = [line for line in err if line.strip() and "%|" not in line]  # datasets' progress bar shares stderr
        assert_one_error(code, err, fragment)
        assert not out.exists()


def _flags(cmd: list[str]) -> dict[str, str | bool]:
    flags, i = {}, cmd.index("vllm.entrypoints.openai.api_server") + 1
    while i < len(cmd):
        takes_value = i + 1 < len(cmd) and not cmd[i + 1].startswith("--")
        flags[cmd[i]] = cmd[i + 1] if takes_value else True
        i += 2 if takes_value else 1
    return flags


@pytest.mark.parametrize("argv, on_cpu, expected, absent", [
    # GPU defaults: bf16 and the model's own context length; one replica split over each device set
    ([], False, {"--dtype": "bfloat16", "--weight-transfer-config": '{"backend": "gloo"}'},
     ["--max-model-len", "--tensor-parallel-size", "--enforce-eager"]),
    (["--devices", "2,3"], False, {"--tensor-parallel-size": "2"}, ["--max-model-len"]),
    (["--devices", "0,1,2,3", "--tensor-parallel-size", "2", "--dtype", "float32", "--max-model-len", "512",
      "--weight-sync", "nccl", "--gpu-memory-utilization", "0.5"], False,
     {"--dtype": "float32", "--max-model-len": "512", "--tensor-parallel-size": "2",
      "--weight-transfer-config": '{"backend": "nccl"}', "--gpu-memory-utilization": "0.5"}, []),
])
def test_rollout_serve_runs_vllms_server_with_the_flags_ppo_needs(argv, on_cpu, expected, absent):
    from rollout.serve import vllm_server_command

    cmd, env = vllm_server_command(build_parser().parse_args(["rollout", "serve", "--model", "m", *argv]), on_cpu=on_cpu)
    flags = _flags(cmd)
    needed = {"--model": "m", "--logprobs-mode": "processed_logprobs", "--generation-config": "vllm",
              "--worker-extension-cls": "rollout.worker_extension.WeightSyncExtension", "--host": "127.0.0.1"}
    assert {**needed, **expected}.items() <= flags.items()
    assert not set(absent) & set(flags)
    assert env["VLLM_SERVER_DEV_MODE"] == "1"  # the weight-transfer and collective_rpc routes
    if "--devices" in argv:
        assert env["CUDA_VISIBLE_DEVICES"] == argv[argv.index("--devices") + 1]


@pytest.mark.parametrize("model_context, argv, expected", [
    # CPU: float32, eager, at most 1024 tokens (the model's own context when shorter), no prefill ever split
    (2048, [], {"--max-model-len": "1024", "--max-num-seqs": "256", "--max-num-batched-tokens": str(256 * 1024)}),
    (256, [], {"--max-model-len": "256", "--max-num-batched-tokens": str(256 * 256)}),
    # options of vLLM's server pass through (the prefill budget follows a given --max-num-seqs)
    (256, ["--max-num-seqs", "8", "--load-format", "dummy"],
     {"--max-num-seqs": "8", "--load-format": "dummy", "--max-num-batched-tokens": str(8 * 256)}),
])
def test_rollout_serve_on_cpu_fits_the_models_context_and_passes_vllm_options(tiny_paths, tmp_path, model_context, argv,
                                                                              expected):
    import shutil

    from rollout.serve import vllm_server_command

    model = tmp_path / "model"
    shutil.copytree(tiny_paths.base, model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": model_context}))
    parser = build_parser()
    args, unknown = parser.parse_known_args(["rollout", "serve", "--model", str(model), *argv])
    args.vllm_args = unknown
    cmd, _ = vllm_server_command(args, on_cpu=True)
    assert {"--dtype": "float32", "--enforce-eager": True, **expected}.items() <= _flags(cmd).items()
    if argv:
        assert cmd[-len(argv):] == argv  # given last: vLLM takes the last of a repeated option
    # other commands still refuse options they do not know, and the HF engine's server takes none of vLLM's
    with pytest.raises(SystemExit):
        main(["tiny", "--out", str(tmp_path / "t"), "--max-num-seqs", "8"])
    assert main(["rollout", "serve", "--model", str(model), "--engine", "hf", "--max-num-seqs", "8"]) == 2


def test_rollout_serve_beyond_loopback_needs_a_secret(tiny_paths, monkeypatch, capsys):
    """A server on 0.0.0.0 would take weights and files from anyone who reaches its port: without a secret (or with a
    guessable one) `alignment rollout serve` stops with one line, before starting anything; the command it prints
    carries no secret."""
    monkeypatch.delenv("ALIGNMENT_ROLLOUT_SECRET")
    assert main(["rollout", "serve", "--model", str(tiny_paths.base), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--host 0.0.0.0 reaches beyond this host: set ALIGNMENT_ROLLOUT_SECRET" in err[0]
    monkeypatch.setenv("ALIGNMENT_ROLLOUT_SECRET", "short")
    assert main(["rollout", "serve", "--model", str(tiny_paths.base), "--host", "0.0.0.0", "--engine", "hf"]) == 2
    assert "ALIGNMENT_ROLLOUT_SECRET has 5 characters; use at least 16" in capsys.readouterr().err
    assert main(["rollout", "serve", "--model", str(tiny_paths.base), "--host", "0.0.0.0", "--print-command"]) == 0
    printed = capsys.readouterr().out
    assert "--middleware rollout.auth.RolloutAuthMiddleware" in printed and "short" not in printed


def test_rollout_auth_middleware_guards_every_route_but_health(monkeypatch):
    """The middleware vLLM's server runs outermost: with a secret, a bearer token compared in constant time on every
    route but /health; without one, clients on the server's own host only."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route
    from starlette.testclient import TestClient

    from rollout.auth import RolloutAuthMiddleware

    ok = lambda request: PlainTextResponse("ok")  # noqa: E731
    app = Starlette(routes=[Route(p, ok, methods=["GET", "POST"]) for p in ("/health", "/collective_rpc", "/v1/models")])

    def client(secret: str | None, host: str):
        if secret is None:
            monkeypatch.delenv("ALIGNMENT_ROLLOUT_SECRET", raising=False)
        else:
            monkeypatch.setenv("ALIGNMENT_ROLLOUT_SECRET", secret)
        return TestClient(RolloutAuthMiddleware(app), client=(host, 5000))

    with_secret = client("s" * 32, "10.0.0.7")
    assert with_secret.get("/health").status_code == 200
    for path in ("/collective_rpc", "/v1/models"):
        assert with_secret.post(path).status_code == 401
        assert with_secret.post(path, headers={"Authorization": "Bearer " + "s" * 31}).status_code == 401
        assert with_secret.post(path, headers={"Authorization": "Bearer " + "s" * 32}).status_code == 200
        assert with_secret.post(path, headers={"Authorization": "bearer " + "s" * 32}).status_code == 200
    no_secret_remote, no_secret_local = client(None, "10.0.0.7"), client(None, "127.0.0.1")
    assert no_secret_remote.post("/collective_rpc").status_code == 403
    assert "answers its own host only" in no_secret_remote.post("/collective_rpc").json()["error"]
    assert no_secret_local.post("/collective_rpc").status_code == 200
