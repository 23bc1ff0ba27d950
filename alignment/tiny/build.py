"""`build_tiny(out_dir)`: write the tiny model, tokenizer and datasets, deterministically.

Two builds with the same seed give byte-identical files (takes about a second).
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

from alignment.tiny import task
from alignment.tiny.model import save_model
from alignment.tiny.tokenizer import save_tokenizer

BUILD_VERSION = 2  # bump when the build's output changes, so ensure_tiny rebuilds
N_SFT = 3072
N_PREFERENCES = 2048
N_PROMPTS = 1024


@dataclass(frozen=True)
class TinyPaths:
    root: Path
    base: Path          # model + tokenizer (HF format, safetensors)
    data: Path
    sft: Path
    preferences: Path
    prompts: Path
    eval_prompts: Path  # held-out prompts with their `item` and a `reference` answer
    eval_demos: Path    # held-out demonstrations (the demo distribution on held-out prompts), for perplexity
    info: Path          # build manifest (seed, sizes, measured statistics)

    @classmethod
    def at(cls, out_dir: str | Path) -> "TinyPaths":
        root = Path(out_dir)
        data = root / "data"
        return cls(
            root=root, base=root / "base", data=data,
            sft=data / "sft.jsonl", preferences=data / "preferences.jsonl",
            prompts=data / "prompts.jsonl", eval_prompts=data / "eval_prompts.jsonl", eval_demos=data / "eval_demos.jsonl",
            info=root / "tiny_info.json",
        )


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, sort_keys=True) + "\n")


def make_datasets(seed: int = 0) -> tuple[dict[str, list[dict]], dict]:
    """The datasets (rows) and measured statistics; pure function of ``seed``."""
    rng = random.Random(seed)
    train, held = task.split_combos(rng)

    sft, sft_gold = [], []
    for _ in range(N_SFT):
        combo = rng.choice(train)
        reply = task.sample_demo(rng, combo[0])
        sft_gold.append(task.gold_score(combo[0], reply))
        sft.append({"prompt": _user(task.prompt_text(combo)), "completion": _assistant(reply)})

    prefs, agree = [], 0
    for _ in range(N_PREFERENCES):
        combo = rng.choice(train)
        chosen, rejected, flipped = task.sample_preference(rng, combo[0])
        agree += not flipped
        prefs.append({"prompt": _user(task.prompt_text(combo)),
                      "chosen": _assistant(chosen), "rejected": _assistant(rejected)})

    prompts = []
    for _ in range(N_PROMPTS):
        combo = rng.choice(train)
        prompts.append({"prompt": _user(task.prompt_text(combo)), "item": combo[0]})

    # The evaluation's references and demos come from a stream of their own: the training data stays as it was.
    eval_rng = random.Random(seed + 1_000_003)
    eval_prompts = [{"prompt": _user(task.prompt_text(c)), "item": c[0], "reference": task.sample_reference(eval_rng, c[0])}
                    for c in held]
    eval_demos = [{"prompt": _user(task.prompt_text(c)), "completion": _assistant(task.sample_demo(eval_rng, c[0]))}
                  for c in held]

    stats = {
        "sft_mean_gold": round(sum(sft_gold) / len(sft_gold), 4),
        "preference_label_agreement": round(agree / len(prefs), 4),
        "demo_expected_gold": round(task.DEMO_EXPECTED_GOLD, 4),
        "label_noise": task.LABEL_NOISE,
        "train_combos": len(train),
        "eval_combos": len(held),
    }
    data = {"sft": sft, "preferences": prefs, "prompts": prompts, "eval_prompts": eval_prompts, "eval_demos": eval_demos}
    return data, stats


def build_tiny(out_dir: str | Path, seed: int = 0) -> TinyPaths:
    """Write base model + tokenizer and the jsonl datasets under ``out_dir``; return the paths."""
    paths = TinyPaths.at(out_dir)
    if paths.base.exists():
        shutil.rmtree(paths.base)  # no stale files from an older build
    paths.base.mkdir(parents=True)
    paths.data.mkdir(parents=True, exist_ok=True)

    tokenizer = save_tokenizer(paths.base)
    model = save_model(paths.base, seed=seed)

    data, stats = make_datasets(seed)
    for name, rows in data.items():
        _write_jsonl(getattr(paths, name), rows)

    info = {
        "build_version": BUILD_VERSION,
        "seed": seed,
        "sizes": {name: len(rows) for name, rows in data.items()},
        "vocab_size": len(tokenizer),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        **stats,
    }
    paths.info.write_text(json.dumps(info, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return paths


def ensure_tiny(out_dir: str | Path, seed: int = 0) -> TinyPaths:
    """Build the tiny assets under ``out_dir`` unless an up-to-date build with ``seed`` is there."""
    paths = TinyPaths.at(out_dir)
    try:
        info = json.loads(paths.info.read_text(encoding="utf-8"))
        if info.get("build_version") == BUILD_VERSION and info.get("seed") == seed:
            return paths
    except (OSError, ValueError):
        pass
    return build_tiny(out_dir, seed=seed)
