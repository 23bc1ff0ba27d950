"""What the evaluation harness and the label exporter share: prompt rows with stable ids, policies
(resolved from paths, hub ids or the checkpoints of a run), and generation with one engine for many
policies.

One engine, many policies: the first policy starts the engine; every later policy with the same
architecture is swapped in by weight sync (`rollout.sync_weights`), which costs a fraction of a second
for small models where a fresh vLLM engine costs 40-60 s on CPU. A policy with another architecture
gets a fresh engine. With `engine: hf` each policy generates with `transformers` in this process.
The sampling parameters and seeds are identical for every policy (`SamplingConfig.prompt_seed`).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from alignment.config.eval import EngineSection, PolicySpec, PromptSection, RunSection
from alignment.errors import DataError, UserError
from alignment.ppo.logprobs import token_logprobs

log = logging.getLogger(__name__)

# config keys that must match for a policy's weights to be synced into an engine built for another
ARCH_KEYS = ("model_type", "architectures", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
             "intermediate_size", "vocab_size", "head_dim", "tie_word_embeddings", "max_position_embeddings", "rope_theta")
CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)$")


# ------------------------------------------------------------------------------------------- prompts


@dataclass
class PromptRow:
    id: str                    # the row's `id` column, else "<file stem>-<row index>"
    prompt: str | list[dict]   # text or chat messages, as in the dataset
    columns: dict = field(default_factory=dict)  # the other columns (gold labels for reward functions)


def read_normalised_rows(path: str, split: str, max_rows: int, kind: str, where_prefix: str = "") -> list[dict]:
    """The first `max_rows` rows of a dataset in file order, validated and normalised as data of `kind` ("prompt",
    "sft", ...); the first malformed row is a DataError naming it (after `where_prefix`)."""
    from alignment.config.sections import DataSource
    from alignment.data.formats import Normaliser
    from alignment.data.sources import MalformedRow, read_source

    raw = read_source(DataSource(path=path, split=split, max_rows=max_rows), "error")
    if raw.problems:
        raise DataError(raw.problems[0])
    normalise = Normaliser(kind)
    rows = []
    for item in raw.rows:
        try:
            rows.append(normalise(item.value))
        except MalformedRow as exc:
            raise DataError(f"{where_prefix}{item.where}: {exc}") from None
    return rows


def load_prompt_rows(section: PromptSection) -> list[PromptRow]:
    """The first `num_prompts` rows of the prompt set in file order, validated like any prompt dataset."""
    stem = Path(section.path).stem if Path(section.path).exists() else section.path.replace("/", "_")
    rows = []
    for index, row in enumerate(read_normalised_rows(section.path, section.split, section.num_prompts, "prompt")):
        prompt = row.pop("prompt")
        pid = str(row["id"]) if row.get("id") is not None else f"{stem}-{index:05d}"
        rows.append(PromptRow(pid, prompt, row))
    if not rows:
        raise DataError(f"prompt set '{section.path}' has no rows")
    ids = [r.id for r in rows]
    if len(set(ids)) != len(ids):
        raise DataError(f"prompt set '{section.path}': the `id` column has repeated values")
    return rows


def columns_of(rows: list[PromptRow], repeat: int = 1) -> dict[str, list]:
    """Extra columns as lists aligned with the rows, each row repeated `repeat` times (TRL reward kwargs)."""
    names = list(rows[0].columns) if rows else []
    return {c: [r.columns[c] for r in rows for _ in range(repeat)] for c in names}


# ------------------------------------------------------------------------------------------- policies


@dataclass
class Policy:
    name: str
    path: str              # what transformers / vLLM load (HF directory or hub id)
    step: int | None = None
    source: str = ""       # what the recipe named (a run checkpoint may have been converted to `path`)

    def to_dict(self) -> dict:
        return {"name": self.name, "path": self.path, "step": self.step, "source": self.source or self.path}


def default_name(path: str) -> str:
    parts = [p for p in str(path).rstrip("/").split("/") if p]
    if not parts:
        return str(path)
    if len(parts) >= 2 and (parts[-1] in ("final", "model", "policy", "hf") or CHECKPOINT_NAME.match(parts[-1])):
        parent = parts[-2] if parts[-2] != "checkpoints" or len(parts) < 3 else parts[-3]
        return f"{parent}/{parts[-1]}"
    return parts[-1]


def step_of(path: str) -> int | None:
    m = CHECKPOINT_NAME.search(str(path).rstrip("/"))
    return int(m.group(1)) if m else None


def resolve_policies(specs: list[PolicySpec], run: RunSection | None = None) -> list[Policy]:
    """Policies in recipe order, then the run's checkpoints (oldest first) and its final model; names made unique."""
    policies = [Policy(s.name or default_name(s.path), s.path, s.step if s.step is not None else step_of(s.path), s.path) for s in specs]
    for p in policies:
        if p.step is None and Path(p.path).name == "final":  # a run's final model: the run's last step
            p.step = _run_steps(Path(p.path).parent)
    if run is not None:
        policies += run_policies(run)
    seen: dict[str, int] = {}
    for p in policies:
        if p.name in seen:
            seen[p.name] += 1
            p.name = f"{p.name}#{seen[p.name]}"
        else:
            seen[p.name] = 1
    return policies


def run_policies(run: RunSection) -> list[Policy]:
    from alignment.checkpoint import list_checkpoints

    root = Path(run.dir)
    checkpoints = list_checkpoints(root / "checkpoints")
    chosen = [c for i, c in enumerate(checkpoints) if i % run.every == 0 or i == len(checkpoints) - 1]
    out = []
    for ckpt in chosen:
        step = step_of(ckpt.name)
        out.append(Policy(f"{root.name}/step-{step}", str(hf_dir_of(ckpt)), step, str(ckpt)))
    final = root / "final"
    if run.include_final and (final / "config.json").is_file():
        final_step = _run_steps(root)
        if not (final_step is not None and final_step in [p.step for p in out]):
            out.append(Policy(f"{root.name}/final", str(final), final_step, str(final)))
    if not out:
        raise UserError(f"run.dir: '{root}' has no checkpoints/checkpoint-N and no final/ model to evaluate")
    return out


def _run_steps(root: Path) -> int | None:
    try:
        return int(json.loads((root / "summary.json").read_text())["steps"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def hf_dir_of(ckpt: Path) -> Path:
    """The HF-format policy of a run checkpoint: the checkpoint itself, or its `policy_hf/` (as PPO writes)."""
    for sub in ("", "policy_hf"):
        if (ckpt / sub / "config.json").is_file():
            return ckpt / sub
    raise UserError(f"checkpoint '{ckpt}' holds no HF-format policy (config.json, or policy_hf/config.json)")


# ------------------------------------------------------------------------------------------- generation


def architecture(config) -> dict:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {k: d.get(k) for k in ARCH_KEYS}


class PolicyGenerator:
    """Generates with one engine for many policies (see module docstring); `close()` ends engines it started.

    engine: an already running engine to reuse (e.g. a test's shared vLLM engine); its weights are
    replaced by each policy's, so it must have the policies' architecture. It is not closed here.
    """

    def __init__(self, section: EngineSection, seed: int = 0, engine=None):
        self.section, self.seed = section, seed
        self.engine = engine
        self.owned = engine is None
        self.arch = self._engine_arch(engine) if engine is not None else None
        self.fresh_for: str | None = None  # path the current engine was started with and still holds
        self.version = int(getattr(engine, "weight_version", 0) or 0)
        self.restarts = 0

    @staticmethod
    def _engine_arch(engine) -> dict | None:
        path = getattr(engine, "model", None)
        if not isinstance(path, str):
            return None
        from transformers import AutoConfig

        try:
            return architecture(AutoConfig.from_pretrained(path))
        except (OSError, ValueError):
            return None

    def generate(self, policy: Policy, model, tokenizer, prompts: list[list[int]], sampling) -> list:
        """Samples (prompt-major, `sampling.n` per prompt) of `policy`, whose loaded model is `model`."""
        return self.engine_for(policy, model, tokenizer).generate(prompts, sampling)

    def engine_for(self, policy: Policy, model, tokenizer):
        """An engine that generates with `policy` (whose loaded model is `model`)."""
        if self.section.engine == "hf":
            from rollout.hf_engine import HFEngine

            return HFEngine(model, tokenizer=tokenizer, seed=self.seed, batch_size=self.section.batch_size)
        self._load(policy, model)
        return self.engine

    def _load(self, policy: Policy, model) -> None:
        from rollout import make_engine, sync_weights

        arch = architecture(model.config)
        if self.engine is not None and (self.arch is None or self.arch == arch):
            if self.fresh_for == policy.path:
                return  # the engine was just started from this very checkpoint
            self.version += 1
            sync_weights(self.engine, model, self.version)
            self.fresh_for = None
            return
        if self.engine is not None and self.owned:
            self.engine.close()
        self.restarts += self.engine is not None
        self.engine = make_engine("vllm", model=policy.path, dtype=self.section.dtype, max_model_len=self.section.max_model_len, seed=self.seed)
        self.owned, self.arch, self.fresh_for = True, arch, policy.path

    def close(self) -> None:
        if self.engine is not None and self.owned:
            self.engine.close()
        self.engine = None


def load_policy(path: str, dtype: str = "float32"):
    """(model in eval mode, tokenizer) of a checkpoint directory or hub id."""
    from transformers import AutoModelForCausalLM

    from alignment.models import DTYPES, load_tokenizer

    tokenizer = load_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    except OSError as exc:
        raise UserError(f"cannot load policy '{path}': {str(exc).splitlines()[0]}") from None
    if torch.cuda.is_available():
        model = model.cuda()
    return model.eval(), tokenizer


def completion_text(sample) -> str:
    """The completion as text: vLLM may keep the space that separates it from the prompt; strip it."""
    return sample.text.strip()


@torch.no_grad()
def sequence_logprobs(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], batch_size: int = 32,
                      masks: list[list[int]] | None = None) -> list[float]:
    """sum_t log pi(x_t | x_<t) over each completion's tokens (temperature 1), one float per sequence; with `masks`
    (multi-turn trajectories), over the tokens whose mask is 1 (the model's, not the environment's).

    Sequences are prompt + completion, right-padded; logits at position t predict token t + 1.
    """
    device = next(model.parameters()).device
    out: list[float] = []
    for start in range(0, len(prompt_ids), batch_size):
        seqs = [list(p) + list(c) for p, c in zip(prompt_ids[start : start + batch_size], completion_ids[start : start + batch_size])]
        width = max(len(s) for s in seqs)
        ids = torch.tensor([s + [0] * (width - len(s)) for s in seqs], device=device)
        mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
        logits = model(input_ids=ids, attention_mask=mask).logits
        token_logp = token_logprobs(logits[:, :-1], ids[:, 1:])[0]  # [b, width-1]: log p(ids[t+1]), chunked over the vocabulary
        for row, (p, c) in enumerate(zip(prompt_ids[start : start + batch_size], completion_ids[start : start + batch_size])):
            first = len(p) - 1  # position whose logits predict the first completion token
            logp = token_logp[row, first : first + len(c)]
            if masks is not None:
                logp = logp * torch.tensor(masks[start + row], dtype=logp.dtype, device=logp.device)
            out.append(float(logp.sum()))
    return out
