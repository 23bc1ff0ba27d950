"""SFT rows longer than train.max_length: counted per split before anything cuts them, reported, then dropped or
truncated by `sft.overlong` (alignment/data/sft_rows.py); rows within the limit keep TRL's own token ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import REPO, tiny_sft_overrides

from alignment.tiny.task import ITEMS, POSITIVE

RECIPE = REPO / "recipes/tiny/sft.yaml"
MAX_LENGTH = 64  # recipes/tiny/sft.yaml
HUGE_WORDS = 200_000
WORD = POSITIVE[0]  # a word of the tiny vocabulary: one token each


def _user(text: str) -> dict:
    return {"role": "user", "content": text}


def _assistant(text: str) -> dict:
    return {"role": "assistant", "content": text}


def _tiny_rows(tiny_paths, start: int, n: int) -> list[dict]:
    return [json.loads(line) for line in tiny_paths.sft.read_text().splitlines()[start:start + n]]


def _huge(row: dict) -> dict:
    """The row with a 200,000-word completion."""
    return {**row, "completion": [_assistant(" ".join([WORD] * HUGE_WORDS))]}


def _long_prompt(row: dict) -> dict:
    """The row behind a prompt longer than max_length: truncation leaves none of its completion."""
    return {**row, "prompt": [_user(" ".join([ITEMS[0]] * 2 * MAX_LENGTH))]}


def _as_messages(row: dict) -> dict:
    return {"messages": row["prompt"] + row["completion"]}


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def trainer_data(monkeypatch):
    """The datasets the stage's SFTTrainer trains and evaluates on, after its own preparation."""
    import trl

    seen = {}

    class Spy(trl.SFTTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            seen["train"], seen["eval"] = self.train_dataset, self.eval_dataset

    monkeypatch.setattr(trl, "SFTTrainer", Spy)
    return seen


def _run(tiny_paths, out: Path, train: list[dict], evald: list[dict], *extra: str) -> dict:
    """The SFT stage in this process, 2 steps, no gold evaluation, on these train and held-out rows."""
    from alignment.config.schema import load_recipe
    from alignment.config.sft import SFTRecipe
    from alignment.stages.sft import run

    overrides = [o for o in tiny_sft_overrides(tiny_paths, out / "run") if not o.startswith("gold_eval")] + [
        "gold_eval=null", f"data.sources.0.path={_write(out / 'train.jsonl', train)}",
        f"data.eval_sources=[{{path: {_write(out / 'eval.jsonl', evald)}}}]", "train.max_steps=2", *extra]
    return run(load_recipe(RECIPE, SFTRecipe, overrides))


def _report(out: Path) -> dict:
    return json.loads((out / "run" / "data_report.json").read_text())


def _token_id(tiny_paths, word: str) -> int:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_paths.base)).convert_tokens_to_ids(word)


def _word_run(ids: list[int], word_id: int) -> int:
    """Length of the longest run of `word_id` in `ids`."""
    best = run = 0
    for token in ids:
        run = run + 1 if token == word_id else 0
        best = max(best, run)
    return best


def test_huge_row_dropped_and_reported(tiny_paths, tmp_path, capsys, trainer_data):
    train, evald = _tiny_rows(tiny_paths, 0, 96), _tiny_rows(tiny_paths, 200, 16)
    summary = _run(tiny_paths, tmp_path, train + [_huge(train[0])], evald + [_huge(evald[0])], "sft.overlong=drop")
    console = capsys.readouterr().out
    assert f"  train rows longer than {MAX_LENGTH} tokens: 1 (drop: 1 dropped)" in console
    assert f"  eval rows longer than {MAX_LENGTH} tokens: 1 (drop: 1 dropped)" in console
    counts = {"total": 97, "overlong": 1, "action": "drop", "dropped": 1, "truncated": 0, "loss_cut_away": 0}
    assert _report(tmp_path)["overlong"]["train"] == summary["overlong"]["train"] == counts
    assert _report(tmp_path)["overlong"]["eval"] == counts | {"total": 17}
    assert summary["train_rows"] == len(trainer_data["train"]) == 96 and summary["eval_rows"] == 16
    word_id = _token_id(tiny_paths, WORD)
    for split in ("train", "eval"):  # the huge row is in neither
        assert not any(_word_run(ids, word_id) > 10 for ids in trainer_data[split]["input_ids"])


def test_huge_row_truncated_and_cut_away_completion_dropped(tiny_paths, tmp_path, capsys, trainer_data):
    train, evald = _tiny_rows(tiny_paths, 0, 96), _tiny_rows(tiny_paths, 200, 16)
    summary = _run(tiny_paths, tmp_path, train + [_huge(train[0]), _long_prompt(train[1])], evald)  # the default: truncate
    assert (f"  train rows longer than {MAX_LENGTH} tokens: 2 (truncate: 2 truncated, 1 with their whole completion "
            "cut away, dropped)") in capsys.readouterr().out
    counts = {"total": 98, "overlong": 2, "action": "truncate", "dropped": 1, "truncated": 2, "loss_cut_away": 1}
    assert _report(tmp_path)["overlong"]["train"] == summary["overlong"]["train"] == counts
    assert _report(tmp_path)["overlong"]["eval"]["overlong"] == 0
    rows = trainer_data["train"]
    assert summary["train_rows"] == len(rows) == 97
    word_id, item_id = _token_id(tiny_paths, WORD), _token_id(tiny_paths, ITEMS[0])
    kept = [(ids, labels) for ids, labels in zip(rows["input_ids"], rows["labels"]) if _word_run(ids, word_id) > 10]
    assert len(kept) == 1  # the huge row, at max_length tokens, its completion carrying the loss
    ids, labels = kept[0]
    assert len(ids) == MAX_LENGTH and ids[-1] == word_id and labels[-1] == word_id
    assert not any(_word_run(ids, item_id) > 10 for ids in rows["input_ids"])  # the long-prompt row is gone


def test_messages_assistant_turns(tiny_paths, tmp_path, capsys, trainer_data):
    """Messages with loss on the assistant turns: a turn cut part-way still trains, a row whose every assistant
    turn lies beyond max_length is dropped and counted."""
    train = [_as_messages(r) for r in _tiny_rows(tiny_paths, 0, 96)]
    evald = [_as_messages(r) for r in _tiny_rows(tiny_paths, 200, 16)]
    first = train[0]["messages"]
    long_user = _user(" ".join([ITEMS[0]] * 2 * MAX_LENGTH))
    second_turn_cut = {"messages": first + [long_user, _assistant("the lamp is red .")]}  # keeps its first turn
    all_turns_cut = {"messages": [long_user, first[1]]}
    huge = {"messages": [first[0], _assistant(" ".join([WORD] * HUGE_WORDS))]}
    summary = _run(tiny_paths, tmp_path, train + [second_turn_cut, all_turns_cut, huge], evald)
    console = capsys.readouterr().out
    assert "sft: loss on: assistant" in console
    assert (f"  train rows longer than {MAX_LENGTH} tokens: 3 (truncate: 3 truncated, 1 with every assistant turn "
            "cut away, dropped)") in console
    assert summary["overlong"]["train"] == _report(tmp_path)["overlong"]["train"] == {
        "total": 99, "overlong": 3, "action": "truncate", "dropped": 1, "truncated": 3, "loss_cut_away": 1}
    rows = trainer_data["train"]
    assert len(rows) == 98 and max(len(ids) for ids in rows["input_ids"]) == MAX_LENGTH
    assert all(any(t != -100 for t in labels) for labels in rows["labels"])


def test_no_row_left_is_a_data_error(tiny_paths, tmp_path):
    from alignment.errors import DataError

    rows = [_long_prompt(r) for r in _tiny_rows(tiny_paths, 0, 4)]
    with pytest.raises(DataError, match=r"no train row is left: all 4 are longer than train.max_length=64 tokens "
                                        r"and truncating them cut away every token that carries loss"):
        _run(tiny_paths, tmp_path, rows, _tiny_rows(tiny_paths, 200, 4))
    with pytest.raises(DataError, match=r"no train row is left: .* sft.overlong=drop dropped them"):
        _run(tiny_paths, tmp_path, [_huge(r) for r in rows], _tiny_rows(tiny_paths, 200, 4), "sft.overlong=drop")
    assert not (tmp_path / "run").exists()  # nothing written on a failed start


@pytest.mark.parametrize("layout", ["prompt_completion", "text", "messages", "messages_assistant"])
def test_token_ids_are_trls_own(tiny_paths, tmp_path, layout):
    """The rows TRL's SFTTrainer prepares itself (its tokenization, truncation and dropping) are exactly the rows the
    stage hands it with `truncate`; with `drop`, exactly those that were within the limit."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from alignment.data.sft_rows import tokenize_rows
    from alignment.stages.sft import assistant_masked

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_paths.base))
    rows = _tiny_rows(tiny_paths, 0, 24)
    rows += [_huge(rows[0]), _long_prompt(rows[1])]
    completion_only = layout == "prompt_completion"
    if layout == "text":
        rows = [{"text": tokenizer.apply_chat_template(r["prompt"] + r["completion"], tokenize=False)} for r in rows]
    elif layout.startswith("messages"):
        rows = [_as_messages(r) for r in rows]
    data = Dataset.from_list(rows)
    if layout == "messages_assistant":
        data = assistant_masked(data, tokenizer)

    args = SFTConfig(output_dir=str(tmp_path), max_length=MAX_LENGTH, completion_only_loss=completion_only,
                     bf16=False, report_to=[])
    trl_rows = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(str(tiny_paths.base)), args=args,
                          train_dataset=data, processing_class=tokenizer).train_dataset
    expected = list(zip(trl_rows["input_ids"], trl_rows["labels"]))

    truncated, counts = tokenize_rows(data, tokenizer, MAX_LENGTH, "truncate", completion_only, "train")
    assert list(zip(truncated["input_ids"], truncated["labels"])) == expected
    assert counts["overlong"] == 2 and counts["loss_cut_away"] == (0 if layout in ("text", "messages") else 1)
    dropped, _ = tokenize_rows(data, tokenizer, MAX_LENGTH, "drop", completion_only, "train")
    assert list(zip(dropped["input_ids"], dropped["labels"])) == expected[:24]
