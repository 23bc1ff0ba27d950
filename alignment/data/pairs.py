"""Preference pairs as token ids, for the stages that train on them (reward model, DPO).

Each side is rendered as `reward.scoring.encode` renders it, the one rendering every consumer of the pairs shares
(chat template for messages, prompt + answer + EOS for text). Over-long pairs are counted before anything drops them
(TRL's trainers drop or cut them silently), then dropped or truncated as the recipe says.
"""

from __future__ import annotations

from alignment.errors import DataError


def tokenize_pairs(dataset, tokenizer, max_length: int, overlong: str, keep_columns: tuple[str, ...] = (),
                   with_prompt_len: bool = False):
    """Add chosen_ids / rejected_ids (whole sequences); drop or truncate over-long pairs.

    Returns (dataset with those columns, the `keep_columns` it has and, with `with_prompt_len`, `prompt_len`: where
    the answer starts in both sequences, the shorter of the two prompt renderings' ends), and the counts. A pair is
    over-long when either side has more than max_length tokens; truncation keeps the first max_length tokens, and a
    pair whose two sides become identical is dropped (`identical_after_truncation`), as is, with `with_prompt_len`,
    a pair with a side whose whole answer was cut away (`answer_cut_away`).
    """
    from reward.scoring import answer_starts, encode

    def _encode(row):
        encoded = {"chosen_ids": encode(tokenizer, row["prompt"], row["chosen"]),
                   "rejected_ids": encode(tokenizer, row["prompt"], row["rejected"])}
        if with_prompt_len:
            encoded["prompt_len"] = min(answer_starts(tokenizer, [row["prompt"]] * 2,
                                                      [encoded["chosen_ids"], encoded["rejected_ids"]]))
        return encoded

    encoded = dataset.map(_encode, desc="tokenizing pairs")
    too_long = [max(len(c), len(r)) > max_length for c, r in zip(encoded["chosen_ids"], encoded["rejected_ids"])]
    counts = {"total": len(encoded), "overlong": sum(too_long), "action": overlong, "dropped": 0, "truncated": 0,
              "identical_after_truncation": 0}
    if overlong == "drop":
        keep = [i for i, long in enumerate(too_long) if not long]
        counts["dropped"] = len(encoded) - len(keep)
        encoded = encoded.select(keep)
    elif counts["overlong"]:
        encoded = encoded.map(lambda r: {"chosen_ids": r["chosen_ids"][:max_length], "rejected_ids": r["rejected_ids"][:max_length]})
        counts["truncated"] = counts["overlong"]
        keep = [i for i, (c, r) in enumerate(zip(encoded["chosen_ids"], encoded["rejected_ids"])) if c != r]
        counts["identical_after_truncation"] = len(encoded) - len(keep)
        encoded = encoded.select(keep)
        if with_prompt_len:
            keep = [i for i, (c, r, p) in enumerate(zip(encoded["chosen_ids"], encoded["rejected_ids"], encoded["prompt_len"]))
                    if min(len(c), len(r)) > p]
            counts["answer_cut_away"] = len(encoded) - len(keep)
            encoded = encoded.select(keep)
        counts["dropped"] = counts["identical_after_truncation"] + counts.get("answer_cut_away", 0)
    columns = ["chosen_ids", "rejected_ids", *(["prompt_len"] if with_prompt_len else []),
               *(c for c in keep_columns if c in encoded.column_names)]
    encoded = encoded.remove_columns([c for c in encoded.column_names if c not in columns])
    if len(encoded) == 0:
        raise DataError(f"no preference pair is at most train.max_length={max_length} tokens ({counts['overlong']} over-long)")
    return encoded, counts


def tokenize_splits(data, tokenizer, max_length: int, overlong: str, **kwargs):
    """`tokenize_pairs` on a StageData's train split and held-out split (if any): (train, eval or None, counts by
    split)."""
    train, train_counts = tokenize_pairs(data.train, tokenizer, max_length, overlong, **kwargs)
    evald, eval_counts = (tokenize_pairs(data.eval, tokenizer, max_length, overlong, **kwargs)
                          if data.eval is not None else (None, None))
    return train, evald, {"train": train_counts, "eval": eval_counts}


# Why pairs that truncation kept were dropped after all: count key -> the report's words.
PAIR_DROP_REASONS = {"identical_after_truncation": "identical after truncation", "answer_cut_away": "with an answer cut away"}


def overlong_lines(counts_by_split: dict[str, dict | None], max_length: int, noun: str = "pairs",
                   reasons: dict[str, str] = PAIR_DROP_REASONS) -> list[str]:
    """The data report's lines about over-long pairs (or SFT rows: `noun`), one per split: how many, and what became
    of them. `reasons` (count key -> words) says why some that truncation kept were dropped after all; a key the
    counts lack (`answer_cut_away` without `with_prompt_len`) is left out."""

    def outcome(counts: dict) -> str:
        if counts["action"] == "drop":
            return f"{counts['dropped']} dropped"
        why = [f"{counts[key]} {words}" for key, words in reasons.items() if key in counts]
        return f"{counts['truncated']} truncated" + (f", {' and '.join(why)}, dropped" if why else "")

    return [f"  {split} {noun} longer than {max_length} tokens: {counts['overlong']} ({counts['action']}: {outcome(counts)})"
            for split, counts in counts_by_split.items() if counts]
