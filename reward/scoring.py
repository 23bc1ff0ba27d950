"""Scoring with a trained reward model: `RewardModelScorer(path).score(prompts, completions) -> Tensor[B]`.

A sequence is encoded exactly as the RM stage encoded its training pairs (`encode`): chat messages
through the tokenizer's chat template (prompt messages + one assistant message), plain text as
prompt + completion + EOS. The reward is the score head's output at the last non-pad token.
With `normalize=True` scores are standardised with the `reward_stats.json` the RM stage saved next
to the weights (mean/std of rewards over its training set).

A sequence longer than the RM's `max_length` (what it was trained on) is never cut at the end, which would
score a prefix of the answer: its prompt is trimmed from the left (a leading BOS kept) so the whole answer
fits, and `last_trimmed` counts how many were. An answer that cannot fit with at least one prompt token is
an error naming both lengths.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import torch

from alignment.errors import UserError
from alignment.micro_batches import budget_groups, index_within_segment, same_count_on_every_rank

STATS_FILE = "reward_stats.json"


def as_messages(completion) -> list[dict]:
    if isinstance(completion, str):
        return [{"role": "assistant", "content": completion}]
    if isinstance(completion, dict):
        return [completion]
    return list(completion)


def encode(tokenizer, prompt, completion) -> list[int]:
    """Token ids of prompt + completion as the RM sees them (same rule as TRL's RewardTrainer)."""
    return encode_many(tokenizer, [prompt], [completion])[0]


def encode_many(tokenizer, prompts: list, completions: list) -> list[list[int]]:
    """`encode` for many pairs: chat templates rendered, then tokenised in one batch (about 3x faster)."""
    if not prompts:
        return []
    if all(isinstance(p, str) and isinstance(c, str) for p, c in zip(prompts, completions)):
        texts = [p + c for p, c in zip(prompts, completions)]
        if tokenizer.eos_token:
            texts = [t if t.endswith(tokenizer.eos_token) else t + tokenizer.eos_token for t in texts]
        return [list(ids) for ids in tokenizer(text=texts)["input_ids"]]
    if any(isinstance(p, str) for p in prompts):
        raise ValueError("a text prompt needs a text completion (got chat messages)")
    conversations = [list(p) + as_messages(c) for p, c in zip(prompts, completions)]
    return [list(ids) for ids in tokenizer.apply_chat_template(conversations, tokenize=True, return_dict=True)["input_ids"]]


def answer_starts(tokenizer, prompts: list, sequences: list[list[int]]) -> list[int]:
    """Index in each encoded sequence of the first token that belongs to the answer (or the template after it).

    The prompt is rendered alone (chat: with the assistant turn's header, `add_generation_prompt`) and the
    answer starts where that rendering stops matching the full sequence, so tokens that merge across the
    boundary count as answer: the split errs towards keeping more.
    """
    if all(isinstance(p, str) for p in prompts):
        alone = tokenizer(text=list(prompts))["input_ids"]
    else:
        alone = tokenizer.apply_chat_template([list(p) for p in prompts], tokenize=True, add_generation_prompt=True,
                                              return_dict=True)["input_ids"]
    return [common_prefix_length(full, prefix) for full, prefix in zip(sequences, alone)]


def common_prefix_length(a: list[int], b: list[int]) -> int:
    """How many leading tokens two token sequences share: where one rendering stops being a prefix of another."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def fit_to_length(ids: list[int], answer_start: int, max_length: int, bos_id: int | None) -> list[int] | None:
    """`ids` if it fits; else the whole answer after the last prompt tokens that fit (a leading BOS kept);
    None when not even one prompt token fits beside the answer."""
    if len(ids) <= max_length:
        return ids
    head = ids[:1] if bos_id is not None and answer_start > 0 and ids[0] == bos_id else []
    prompt_room = max_length - len(head) - (len(ids) - answer_start)
    if prompt_room < 1 or answer_start - len(head) < 1:
        return None
    return head + ids[max(len(head), answer_start - prompt_room):]


def rendering_of(tokenizer, conversational: bool) -> dict:
    """How `encode` renders pairs of this kind: the record an RM keeps of what it was trained on."""
    if not conversational:
        return {"kind": "text"}
    template = getattr(tokenizer, "chat_template", None) or ""
    return {"kind": "chat_template", "chat_template_sha1": hashlib.sha1(template.encode()).hexdigest()}


def read_stats(path: str | Path) -> dict | None:
    f = Path(path) / STATS_FILE
    return json.loads(f.read_text()) if f.is_file() else None


class RewardModelScorer:
    """Batched scalar rewards from an RM checkpoint (full model, or a LoRA adapter dir that is merged on load)."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", normalize: bool = False,
                 batch_size: int = 32, max_length: int | None = None, dtype: torch.dtype = torch.float32,
                 place: Callable[[torch.nn.Module], torch.nn.Module] | None = None,
                 max_tokens: int | None = None, packed: bool = False):
        """`place` puts the loaded model where it scores (PPO: sharded under ZeRO-3 like the reference); by default
        it is moved to `device`. `batch_size` sequences per forward; with `max_tokens` also at most that many
        model-input tokens, and then every rank must score together (the forward count is evened out across ranks
        for ZeRO-3). `packed`: sequences back to back in one row, no padding (PPO's algorithm.packing)."""
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        path = Path(path)
        if not path.is_dir():
            raise UserError(f"reward model '{path}' is not a directory")
        self.path, self.device, self.batch_size = path, torch.device(device), batch_size
        self.max_tokens, self.packed = max_tokens, packed
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        if (path / "adapter_config.json").is_file():
            from transformers.integrations import is_deepspeed_zero3_enabled

            from alignment.stages.common import merge_adapter

            if is_deepspeed_zero3_enabled():  # peft would merge into partitioned (empty) weights
                raise UserError(f"reward model '{path}' is a LoRA adapter, which cannot be merged while models load "
                                "partitioned (zero3_init_flag: true); export it merged (merge_lora_on_export: true) or "
                                "launch with zero3_init_flag: false")
            self.model = merge_adapter(path, AutoModelForSequenceClassification, dtype)
        else:
            self.model = AutoModelForSequenceClassification.from_pretrained(str(path), dtype=dtype)
        if self.model.config.pad_token_id is None:
            self.model.config.pad_token_id = self.tokenizer.pad_token_id
        self.model = place(self.model.eval()) if place is not None else self.model.to(self.device).eval()
        self.stats = read_stats(path)
        # What the RM was trained on, else what its positions allow.
        self.max_length = int(max_length or (self.stats or {}).get("max_length") or self.model.config.max_position_embeddings)
        self.last_trimmed = 0  # sequences of the last `score` call whose prompt was trimmed to fit max_length
        self.normalize = normalize
        if normalize and self.stats is None:
            raise UserError(f"normalize=True but '{path}' has no {STATS_FILE} (written by `alignment rm`)")

    @torch.no_grad()
    def score_ids(self, sequences: list[list[int]]) -> torch.Tensor:
        """Rewards [B] of already encoded sequences of at most max_length tokens, in batches of similar lengths."""
        too_long = [len(s) for s in sequences if len(s) > self.max_length]
        if too_long:
            raise ValueError(f"{len(too_long)} sequence(s) longer than the reward model's max_length {self.max_length} "
                             f"(up to {max(too_long)} tokens); score() fits them by trimming their prompts")
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
        rewards = torch.zeros(len(sequences))
        for group in self._micro_batches([len(sequences[i]) for i in order]):
            rows = [order[k] for k in group]
            forward = self._packed_forward if self.packed else self._padded_forward
            rewards[rows] = forward([sequences[i] for i in rows]).float().cpu()
        if self.normalize:
            rewards = (rewards - self.stats["mean"]) / max(self.stats["std"], 1e-8)
        return rewards

    def _micro_batches(self, lengths: list[int]) -> list[list[int]]:
        """Positions in `lengths` (ascending) per forward: `batch_size` each, or by the token budget."""
        if self.max_tokens is None:
            return [list(range(s, min(s + self.batch_size, len(lengths)))) for s in range(0, len(lengths), self.batch_size)]
        input_tokens = (lambda a, b: sum(lengths[a:b])) if self.packed else (lambda a, b: (b - a) * lengths[b - 1])
        groups = budget_groups(len(lengths), input_tokens, self.batch_size, self.max_tokens)
        return same_count_on_every_rank(groups, lambda g: input_tokens(g[0], g[-1] + 1))

    def _padded_forward(self, batch: list[list[int]]) -> torch.Tensor:
        ids = torch.nn.utils.rnn.pad_sequence([torch.tensor(s, dtype=torch.long) for s in batch], batch_first=True,
                                              padding_value=self.tokenizer.pad_token_id).to(self.device)
        mask = (torch.arange(ids.shape[1]) < torch.tensor([len(s) for s in batch])[:, None]).long().to(self.device)
        return self.model(input_ids=ids, attention_mask=mask).logits[:, 0]

    def _packed_forward(self, batch: list[list[int]]) -> torch.Tensor:
        """The sequence-classification head at each sequence's last token, the sequences packed in one row (position
        ids restarting at 0 for each: transformers' packed-sequence attention; see alignment/ppo/batch.py). The head
        is read off the backbone directly: the model's own pooling finds the last token by padding, of which a packed
        row has none."""
        lengths = torch.tensor([len(s) for s in batch])
        ids = torch.tensor([t for s in batch for t in s], dtype=torch.long)[None].to(self.device)
        positions = index_within_segment(lengths)
        backbone = getattr(self.model, self.model.base_model_prefix)
        hidden = backbone(input_ids=ids, position_ids=positions[None].to(self.device), use_cache=False).last_hidden_state
        return self.model.score(hidden[0, (torch.cumsum(lengths, 0) - 1).to(self.device)])[:, 0]

    def score(self, prompts: list, completions: list) -> torch.Tensor:
        """Rewards [B] for B (prompt, completion) pairs; prompts/completions are text or chat messages.

        Over-long sequences have their prompt trimmed from the left (counted in `last_trimmed`); an answer too long
        to fit is a UserError."""
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        if prompts:
            self.check_rendering(conversational=not isinstance(prompts[0], str))
        sequences = encode_many(self.tokenizer, prompts, completions)
        long_rows = [i for i, ids in enumerate(sequences) if len(ids) > self.max_length]
        if long_rows:
            starts = answer_starts(self.tokenizer, [prompts[i] for i in long_rows], [sequences[i] for i in long_rows])
            for i, start in zip(long_rows, starts):
                fitted = fit_to_length(sequences[i], start, self.max_length, self.tokenizer.bos_token_id)
                if fitted is None:
                    raise UserError(
                        f"reward model '{self.path}': an answer of {len(sequences[i]) - start} tokens (with the template's "
                        f"closing tokens) does not fit its max_length of {self.max_length} beside any prompt; lower "
                        f"rollout.sampling.max_new_tokens or train the reward model with a larger train.max_length")
                sequences[i] = fitted
        self.last_trimmed = len(long_rows)
        return self.score_ids(sequences)

    def check_rendering(self, conversational: bool) -> None:
        """Refuse to score in another rendering than the RM was trained on (its reward_stats.json says which)."""
        trained = (self.stats or {}).get("rendering")
        if trained is None:  # an RM from before the record existed: nothing to compare
            return
        asked = rendering_of(self.tokenizer, conversational)
        if trained == asked:
            return
        if trained["kind"] != asked["kind"]:
            names = {"text": "plain text (prompt + answer + EOS)", "chat_template": "chat conversations (its chat template)"}
            raise UserError(
                f"reward model '{self.path}' was trained on {names[trained['kind']]} but is asked to score "
                f"{names[asked['kind']]}; it would read a rendering it never learned. Give prompts in the format it was "
                f"trained on ({'strings' if trained['kind'] == 'text' else 'message lists'}), or retrain it on "
                f"{'conversational' if asked['kind'] == 'chat_template' else 'plain-text'} pairs (HH-style transcripts "
                "are turned into conversations)")
        raise UserError(f"reward model '{self.path}': its tokenizer's chat template is not the one it was trained with "
                        "(reward_stats.json records another); restore the tokenizer files saved with the model")

    def answer_room(self) -> int:
        """The most answer tokens that fit beside a one-token prompt: max_length less the template's own tokens around
        a minimal exchange (the larger of its plain-text and chat renderings)."""
        renderings = [encode_many(self.tokenizer, ["?"], [""])[0]]
        if getattr(self.tokenizer, "chat_template", None):
            renderings.append(encode_many(self.tokenizer, [[{"role": "user", "content": "?"}]], [""])[0])
        return self.max_length - max(len(r) for r in renderings)
