"""SFT rows as TRL's SFTTrainer trains them (`input_ids` + `labels`), over-long rows counted before anything cuts
them, then dropped or truncated as `sft.overlong` says.

TRL's `SFTTrainer._prepare_dataset` tokenizes each row (EOS after plain text and completions, the chat template for
messages, the completion mask of prompt/completion rows, the `assistant_masks` the stage renders itself, all turned
into `labels`) and, in the same method, cuts every row to `max_length` and drops those left without a label; with
packing, its best-fit-decreasing packer cuts them instead. All silently. So we run that method ourselves with its
truncation and packing off (the token ids are TRL's own, not a copy of its tokenization that could drift from it),
count the rows longer than `max_length`, drop or truncate them, and hand the trainer `input_ids` + `labels`: it then
skips its tokenization and label building (`input_ids` present), finds nothing to cut, and packs whole rows. Rows
within the limit train exactly the token ids they trained before.

With packing, rows are concatenated into sequences of `max_length` tokens; a row is over-long, as without packing,
when it alone is longer than `max_length` (TRL's packer would cut it).
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

from alignment.errors import DataError

COLUMNS = ("input_ids", "labels")  # what the trainer trains on (and the stage's probe reads)


def tokenize_rows(dataset, tokenizer, max_length: int, overlong: str, completion_only_loss: bool, split: str):
    """TRL's tokenization of `dataset` (rows, or `assistant_masked` token ids) with over-long rows dropped or
    truncated: (dataset of `COLUMNS`, counts).

    A row is over-long when it has more than max_length tokens. Truncation keeps the first max_length (TRL's
    `truncation_mode` default, which the stage keeps); a truncated row left with no token that carries loss (its
    whole completion, or every assistant turn, cut away) would train nothing and is dropped (`loss_cut_away`).
    """
    import pyarrow.compute as pc

    prepared = _prepare_untruncated(dataset, tokenizer, completion_only_loss, split).select_columns(list(COLUMNS))
    lengths = pc.list_value_length(prepared.with_format("arrow")["input_ids"]).to_numpy()
    too_long = [int(i) for i in (lengths > max_length).nonzero()[0]]
    counts = {"total": len(prepared), "overlong": len(too_long), "action": overlong, "dropped": 0, "truncated": 0,
              "loss_cut_away": 0}
    dropped = set(too_long)
    if overlong == "truncate":
        if too_long:
            prepared = prepared.map(lambda batch: {c: [v[:max_length] for v in batch[c]] for c in COLUMNS},
                                    batched=True, desc=f"truncating over-long {split} rows")
        dropped = {i for i, labels in zip(too_long, prepared.select(too_long)["labels"]) if all(t == -100 for t in labels)}
        counts.update(truncated=len(too_long), loss_cut_away=len(dropped))
    counts["dropped"] = len(dropped)
    if dropped:
        prepared = prepared.select([i for i in range(len(prepared)) if i not in dropped])
    if len(prepared) == 0:
        cause = ("sft.overlong=drop dropped them" if overlong == "drop"
                 else "truncating them cut away every token that carries loss")
        raise DataError(f"no {split} row is left: all {counts['total']} are longer than train.max_length={max_length} "
                        f"tokens and {cause}; raise train.max_length or shorten the data")
    return prepared, counts


def tokenize_splits(data, tokenizer, max_length: int, overlong: str, completion_only_loss: bool):
    """`tokenize_rows` on a StageData's train split and held-out split (if any): (train, eval or None, counts by
    split)."""
    train, train_counts = tokenize_rows(data.train, tokenizer, max_length, overlong, completion_only_loss, "train")
    evald, eval_counts = (tokenize_rows(data.eval, tokenizer, max_length, overlong, completion_only_loss, "eval")
                          if data.eval is not None else (None, None))
    return train, evald, {"train": train_counts, "eval": eval_counts}


def _prepare_untruncated(dataset, tokenizer, completion_only_loss: bool, split: str):
    """`SFTTrainer._prepare_dataset` with `max_length=None` and no packing: tokenized rows with labels, none cut.

    Called without a trainer (building one needs the model): the method reads three attributes of it, given here as
    `SFTTrainer.__init__` sets them for a text tokenizer and the stage's settings (no chat-template swap: the stage
    never sets `assistant_only_loss`, it renders assistant masks itself), and the SFTConfig defaults for the settings
    the stage leaves alone. No shuffling here: the trainer shuffles (if asked) when it prepares the result.
    """
    from trl import SFTConfig, SFTTrainer

    defaults = {f.name: f.default for f in dataclasses.fields(SFTConfig) if f.default is not dataclasses.MISSING}
    args = SimpleNamespace(**defaults | {"max_length": None, "shuffle_dataset": False})
    trainer = SimpleNamespace(_tokenizer=tokenizer, chat_template=None, completion_only_loss=completion_only_loss)
    return SFTTrainer._prepare_dataset(trainer, dataset, tokenizer, args, False, None, split)
