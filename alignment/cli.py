"""`alignment <stage> <recipe.yaml> [key.sub=value ...]`: one subcommand per pipeline stage.

Works as `alignment ...`, `python -m alignment ...` and `accelerate launch [...] -m alignment ...`.
A user mistake (UserError) is printed as one `error:` line and exits with status 2; no traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import traceback
from dataclasses import dataclass

from alignment import console
from alignment.errors import UserError


@dataclass(frozen=True)
class Stage:
    help: str
    schema: str  # "module:Class" of the recipe schema
    runner: str  # "module:function" taking the validated recipe


STAGES: dict[str, Stage] = {
    "sft": Stage("supervised fine-tuning on demonstrations", "alignment.config.sft:SFTRecipe", "alignment.stages.sft:run"),
    "rm": Stage("train a reward model on preference pairs", "alignment.config.rm:RMRecipe", "alignment.stages.rm:run"),
    "ppo": Stage("PPO against a reward, with vLLM rollouts", "alignment.config.ppo:PPORecipe", "alignment.stages.ppo:run"),
    "dpo": Stage("direct preference optimisation on preference pairs (DPO, IPO, ...)", "alignment.config.dpo:DPORecipe",
                 "alignment.stages.dpo:run"),
    "eval": Stage("compare policies on held-out prompts", "alignment.config.eval:EvalRecipe", "alignment.stages.eval:run"),
}

LABEL_ACTIONS: dict[str, Stage] = {
    "export": Stage("sample completions and export them for labelling", "alignment.config.label:ExportRecipe", "reward.labeling.export:run"),
    "import": Stage("read labelled files back as a preference dataset", "alignment.config.label:ImportRecipe", "reward.labeling.importer:run"),
    "auto": Stage("label with a rule, a reward model or an LLM judge", "alignment.config.label:AutoLabelRecipe", "reward.labeling.auto:run"),
}


def resolve(path: str):
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def load_stage_recipe(stage: Stage, recipe_path: str, overrides: list[str], check_paths: bool = True):
    from alignment.config.schema import load_recipe

    return load_recipe(recipe_path, resolve(stage.schema), overrides, check_paths=check_paths)


def _add_recipe_command(sub, name: str, stage: Stage) -> None:
    p = sub.add_parser(name, help=stage.help, description=f"{stage.help}. Override recipe keys as key.sub=value.")
    p.add_argument("recipe", nargs="?", help="recipe YAML file")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. train.learning_rate=1e-5")
    p.add_argument("--help-recipe", action="store_true", help="list every recipe key with its default and meaning")
    p.add_argument("--validate-only", action="store_true", help="check the recipe and exit")
    p.add_argument("--verbose", action="store_true", help="show the libraries' output (vLLM, DeepSpeed, TRL, ...) on the "
                   "console instead of only in <output dir>/<stage>.log (also: ALIGNMENT_VERBOSE=1)")
    p.set_defaults(stage=stage)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="alignment", description="RLHF pipeline: SFT -> reward model -> PPO -> evaluation.")
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)

    tiny = sub.add_parser("tiny", help="build the built-in tiny model, tokenizer and datasets (no hub needed)")
    tiny.add_argument("--out", default=None, help="output directory (default: outputs/tiny, or outputs/tiny_lookup)")
    tiny.add_argument("--task", choices=["review", "lookup"], default="review",
                      help="review: the tiny default (SFT, reward model, PPO); lookup: the tiny tool-use task "
                      "(alignment.tiny.lookup)")
    tiny.add_argument("--verbose", action="store_true", help="show the libraries' output on the console")

    for name, stage in STAGES.items():
        _add_recipe_command(sub, name, stage)

    label = sub.add_parser("label", help="preference labelling: export samples, import labels, automatic labelers")
    label_sub = label.add_subparsers(dest="action", metavar="<action>", required=True)
    for name, stage in LABEL_ACTIONS.items():
        _add_recipe_command(label_sub, name, stage)

    rollout = sub.add_parser("rollout", help="rollout servers (vLLM's OpenAI server) for dedicated generation devices")
    rollout_sub = rollout.add_subparsers(dest="action", metavar="<action>", required=True)
    serve = rollout_sub.add_parser("serve", help="start vLLM's OpenAI server with the flags PPO needs (generation, weight transfer)")
    from rollout.serve import add_serve_arguments

    add_serve_arguments(serve)

    validate = sub.add_parser("validate", help="validate recipes without running them (stage read from each recipe's `stage:` key)")
    validate.add_argument("recipes", nargs="+")
    validate.add_argument("--no-path-check", action="store_true", help="skip checks that local paths exist")
    validate.add_argument("--data", action="store_true", help="also load, check and clean each recipe's datasets and print the data report")
    validate.add_argument("--memory", action="store_true", help="also print each training recipe's memory plan (per rank, "
                          "from the models' config.json; nothing is loaded)")
    validate.add_argument("--accelerate-config", default=None, help="with --memory: the accelerate config the recipe will be "
                          "launched with (default: one process, no DeepSpeed)")
    validate.add_argument("--gpu-gib", type=float, default=None, help="with --memory: plan for GPUs of this many GiB "
                          "(default: this machine's GPU, else a CPU run in this machine's memory)")
    return parser


def _run(args: argparse.Namespace) -> None:
    from alignment.lifetime import exit_with_launcher_or_parent

    exit_with_launcher_or_parent()  # a rank or a server we launched must not outlive what started it
    if args.command == "tiny":
        from alignment.tiny import build_tiny
        from alignment.tiny.lookup import build_tiny_lookup

        if console.should_capture(args.verbose):
            console.capture("tiny")
        build, default_out, what = {"review": (build_tiny, "outputs/tiny", "tiny default"),
                                    "lookup": (build_tiny_lookup, "outputs/tiny_lookup", "tiny tool-use task")}[args.task]
        paths = build(args.out or default_out)
        console.keep_log_in(paths.root)
        console.say(f"{what} written to {paths.root}")
        return
    if args.command == "rollout":
        from rollout.serve import serve_from_args

        serve_from_args(args)
        return
    if args.command == "validate":
        memory = _memory_launch(args.accelerate_config, args.gpu_gib) if args.memory else None
        _validate(args.recipes, check_paths=not args.no_path_check, check_data=args.data, memory=memory)
        return
    stage: Stage = args.stage
    if args.help_recipe:
        from alignment.config.schema import describe_schema

        print("\n".join(describe_schema(resolve(stage.schema))))
        return
    if not args.recipe:
        raise UserError(f"give a recipe file: alignment {args.command} <recipe.yaml> [key=value ...]")
    recipe = load_stage_recipe(stage, args.recipe, args.overrides)
    if args.validate_only:
        print(f"{args.recipe}: ok")
        return
    if console.should_capture(args.verbose):
        console.capture(args.action if args.command == "label" else args.command)
    resolve(stage.runner)(recipe)
    from alignment.distributed import is_main, shutdown

    closing = console.closing_line()
    if closing and is_main():
        console.say(closing)
    shutdown()


# Recipe section holding each stage's data, and the kind it is read as (alignment.data.load_stage_data).
DATA_KINDS = {"sft": ("data", "sft"), "rm": ("data", "preference"), "dpo": ("data", "preference"), "ppo": ("prompts", "prompt")}


def _memory_launch(accelerate_config: str | None, gpu_gib: float | None):
    from alignment.memory_plan import GiB, Launch

    if accelerate_config is not None and not os.path.isfile(accelerate_config):
        raise UserError(f"--accelerate-config: no such file '{accelerate_config}'")
    if gpu_gib is None:
        import torch

        if torch.cuda.is_available():
            gpu_gib = torch.cuda.get_device_properties(0).total_memory / GiB
    return Launch.from_accelerate_config(accelerate_config, gpu_gib)


def _validate(paths: list[str], check_paths: bool, check_data: bool = False, memory=None) -> None:
    from alignment.config.schema import read_recipe_yaml

    for path in paths:
        name = read_recipe_yaml(path).get("stage")
        stage = STAGES.get(name) or LABEL_ACTIONS.get(str(name).removeprefix("label_"))
        if stage is None:
            raise UserError(f"{path}: key 'stage' must name a stage ({', '.join(STAGES)}, label_export, label_import, label_auto); got {name!r}")
        recipe = load_stage_recipe(stage, path, [], check_paths=check_paths)
        if check_data and name in DATA_KINDS:
            _check_data(recipe, *DATA_KINDS[name])
        print(f"{path}: ok")
        if memory is not None:
            from alignment.memory_plan import plan_recipe

            plan = plan_recipe(name, recipe, memory, recipe_path=path)
            if plan is not None:
                print(plan.render())


def _check_data(recipe, attribute: str, kind: str) -> None:
    """Load the recipe's datasets as its stage would (no model), and print the data report."""
    from alignment.config.sections import DataSection
    from alignment.data import load_stage_data

    data = getattr(recipe, attribute, None)
    if not isinstance(data, DataSection):
        return
    tokenizer = None
    if data.clean.max_tokens is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(recipe.model.name_or_path, trust_remote_code=recipe.model.trust_remote_code)
    print(load_stage_data(data, kind, tokenizer).report.summary())


# Libraries that reject a user's model, tokenizer or data with a plain exception (a chat template that raises, a
# config transformers cannot read, a column TRL does not expect): such an exception is the user's to fix.
USER_INPUT_LIBRARIES = ("transformers", "trl", "peft", "datasets", "tokenizers", "jinja2", "safetensors")


def library_rejection(exc: BaseException) -> str | None:
    """One line for an exception raised inside a library that reads the user's model or data; None otherwise.

    ALIGNMENT_TRACEBACK=1 turns this off (the full traceback then shows)."""
    if os.environ.get("ALIGNMENT_TRACEBACK") == "1" or not isinstance(exc, (ValueError, KeyError, OSError, TypeError)) \
            and type(exc).__module__.split(".")[0] != "jinja2":
        return None
    frames = traceback.extract_tb(exc.__traceback__)
    origin = frames[-1].filename.replace(os.sep, "/") if frames else ""
    library = next((lib for lib in USER_INPUT_LIBRARIES if f"/site-packages/{lib}/" in origin), None)
    if library is None:
        return None
    message = (str(exc).strip().splitlines() or [""])[0]
    return (f"{library} rejected this run's model, tokenizer or data: {type(exc).__name__}: {message} "
            "(ALIGNMENT_TRACEBACK=1 shows where)")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown and (args.command, getattr(args, "action", None)) != ("rollout", "serve"):
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.vllm_args = unknown  # `alignment rollout serve` passes options of vLLM's server through
    crashed = False
    try:
        _run(args)
    except Exception as exc:  # noqa: BLE001 (user mistakes become one line; anything else re-raises as it was)
        message = str(exc) if isinstance(exc, UserError) else library_rejection(exc)
        if message is None:
            if console.log_path() is None:
                raise
            # The libraries' output is captured: the traceback goes to the stage's log, its last line to the console.
            crashed = True
            traceback.print_exc()
            print(f"error: {type(exc).__name__}: {exc}".splitlines()[0] + f" (traceback in {console.log_path()})",
                  file=console.error_stream(), flush=True)
            return 1
        if os.environ.get("LOCAL_RANK", "0") == "0":  # under a launch, once per node (each node has its own console)
            for line in message.splitlines():
                print(f"error: {line}", file=console.error_stream(), flush=True)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=console.error_stream())
        return 130
    finally:
        console.release(keep_log=crashed)
    return 0
