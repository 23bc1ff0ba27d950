"""Data layer: formats, malformed rows (file + row), cleaning counts, dedup, length filter, mixture, split."""

from __future__ import annotations

import json

import datasets
import pytest

from alignment.data import load_stage_data
from alignment.data.clean import normalize_whitespace, strip_control_chars, strip_html
from alignment.data.mixture import mixture_counts
from alignment.errors import DataError
from helpers_data import assistant, data_section, user, write_jsonl


def load(tmp_path, rows, kind="sft", name="d.jsonl", tokenizer=None, **kw):
    path = write_jsonl(tmp_path / name, rows)
    return load_stage_data(data_section([path], **kw), kind, tokenizer)


def error_of(tmp_path, rows, kind="sft", **kw) -> str:
    with pytest.raises(DataError) as exc:
        load(tmp_path, rows, kind, **kw)
    message = str(exc.value)
    assert "\n" not in message
    return message


# -- formats -------------------------------------------------------------------------------------

def test_sft_formats_normalise(tmp_path):
    text = load(tmp_path, [{"text": "a b", "id": 1}])
    assert text.train.column_names == ["text"] and text.format.layout == "text"
    assert any("columns not used: id" in n for n in text.report.notes)
    pc = load(tmp_path, [{"prompt": "q", "completion": " a"}])
    assert pc.train[0] == {"prompt": "q", "completion": " a"}
    conv = load(tmp_path, [{"prompt": user("q"), "completion": assistant("a")}])
    assert conv.format.conversational and conv.train[0]["completion"] == assistant("a")
    msgs = load(tmp_path, [{"messages": [{"role": "system", "content": "s", "name": "x"}, *user("q"), *assistant("a")]}])
    assert msgs.train[0]["messages"][0] == {"role": "system", "content": "s"}


def test_malformed_json_line_names_file_and_line(tmp_path):
    message = error_of(tmp_path, [{"text": "ok"}, "", '{"text": "broken"', {"text": "x"}])
    assert message.endswith("row 3: not valid JSON (Expecting ',' delimiter at column 18)")
    assert "d.jsonl row 3" in message


def test_missing_column(tmp_path):
    rows = [{"prompt": "q", "completion": "a"}] * 16 + [{"prompt": "q2"}]
    assert error_of(tmp_path, rows).endswith("d.jsonl row 17: 'completion' is missing")


def test_wrong_message_role(tmp_path):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}]
    assert "row 1: 'messages' message 2 has role 'bot' (expected one of system, user, assistant, tool)" in error_of(tmp_path, rows)


def test_message_content_must_be_string(tmp_path):
    rows = [{"prompt": [{"role": "user", "content": None}], "completion": assistant("a")}]
    assert "'prompt' message 1: 'content' must be a string, got null" in error_of(tmp_path, rows)


def test_mixed_string_and_messages_in_a_row(tmp_path):
    rows = [{"prompt": "q", "completion": assistant("a")}]
    assert "'completion' is a message list but 'prompt' is a string" in error_of(tmp_path, rows)


def test_format_changes_between_rows(tmp_path):
    rows = [{"prompt": "q", "completion": "a"}, {"prompt": user("q"), "completion": assistant("a")}]
    assert "row 2: 'prompt' is a message list but earlier rows use strings" in error_of(tmp_path, rows)


def test_non_numeric_margin(tmp_path):
    rows = [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 1.5},
            {"prompt": "q", "chosen": "c", "rejected": "d", "margin": "high"}]
    assert "row 2: 'margin' must be a number, got 'high'" in error_of(tmp_path, rows, "preference")


def test_margin_kept_as_float(tmp_path):
    out = load(tmp_path, [{"prompt": "q", "chosen": "a", "rejected": "b", "margin": 2}], "preference")
    assert out.train.column_names == ["prompt", "chosen", "rejected", "margin"] and out.train[0]["margin"] == 2.0


def test_row_not_an_object(tmp_path):
    assert "row 1: expected an object with named columns, got list" in error_of(tmp_path, [[1, 2]])


def test_no_known_columns(tmp_path):
    assert "row 1: no 'text', 'prompt'+'completion' or 'messages' column (columns: question, answer)" in error_of(
        tmp_path, [{"question": "q", "answer": "a"}])


def test_empty_dataset(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(DataError, match=r"empty.jsonl': no rows \(empty dataset\)"):
        load_stage_data(data_section([path]), "sft")


def test_empty_directory_and_unsupported_file(tmp_path):
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="directory holds no data files"):
        load_stage_data(data_section([tmp_path / "dir"]), "sft")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="unsupported data file type '.txt'"):
        load_stage_data(data_section([tmp_path / "x.txt"]), "sft")


def test_mixed_formats_across_sources_name_both(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "completion": "a"}])
    with pytest.raises(DataError) as exc:
        load_stage_data(data_section([a, b]), "sft")
    message = str(exc.value)
    assert f"data sources '{a}' and '{b}' have different formats" in message
    assert "text (plain text)" in message and "prompt/completion (plain text)" in message


def test_eval_source_must_match_train_format(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": "x"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": user("q") + assistant("a")}])
    with pytest.raises(DataError, match="have different formats"):
        load_stage_data(data_section([a], eval_sources=[{"path": str(b)}]), "sft")


def test_skip_mode_counts_malformed_rows(tmp_path):
    rows = [{"text": "a"}, "{oops", {"text": 5}, {"text": "b"}]
    out = load(tmp_path, rows, on_malformed="skip")
    assert len(out.train) == 2 and out.report.dropped["malformed"] == 2
    assert out.report.sources[0].read == 4 and out.report.sources[0].malformed == 2
    assert any("row 2: not valid JSON" in e for e in out.report.malformed_examples)
    assert "row 3: 'text' must be a string, got int" in out.report.summary()


def test_all_rows_dropped_is_an_error(tmp_path):
    with pytest.raises(DataError, match=r"all 2 rows were dropped \(malformed 2\)"):
        load(tmp_path, [{"text": 1}, {"text": 2}], on_malformed="skip")


# -- preference: implicit prompts ------------------------------------------------------------------

def test_implicit_prompt_from_conversations(tmp_path):
    rows = [{"chosen": user("sky?") + assistant("blue"), "rejected": user("sky?") + assistant("green")}]
    out = load(tmp_path, rows, "preference")
    assert out.train[0] == {"prompt": user("sky?"), "chosen": assistant("blue"), "rejected": assistant("green")}
    assert any("prompt extracted from chosen/rejected in 1 rows" in n for n in out.report.notes)


def test_implicit_prompt_from_texts_cuts_at_a_word_boundary(tmp_path):
    rows = [{"chosen": "Q: sky? A: blue", "rejected": "Q: sky? A: black"}]
    out = load(tmp_path, rows, "preference", clean={"normalize_whitespace": True})
    assert out.train[0] == {"prompt": "Q: sky? A:", "chosen": " blue", "rejected": " black"}


def test_conversations_with_string_prompt_column_use_the_shared_turns(tmp_path):
    rows = [{"prompt": "sky?", "chosen": user("sky?") + assistant("blue"), "rejected": user("sky?") + assistant("red")}]
    out = load(tmp_path, rows, "preference")
    assert out.train[0]["prompt"] == user("sky?")
    assert any("'prompt' column was ignored in 1 rows" in n for n in out.report.notes)


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"chosen": "same", "rejected": "same"}, "'chosen' and 'rejected' are identical"),
        ({"chosen": "yes", "rejected": "no"}, "share no leading words"),
        ({"chosen": user("a") + assistant("b"), "rejected": user("c") + assistant("b")}, "share no leading turns"),
        ({"chosen": assistant("b")}, "'rejected' is missing"),
        ({"prompt": user("q"), "chosen": assistant("a"), "rejected": "b"}, "'rejected' is a string but 'chosen' is a message list"),
        ({"chosen": assistant("a"), "rejected": assistant("b")}, "'prompt' is missing and 'chosen' starts with an assistant turn"),
    ],
)
def test_bad_preference_rows(tmp_path, row, expected):
    assert expected in error_of(tmp_path, [row], "preference")


# -- prompt data -----------------------------------------------------------------------------------

def test_prompt_rows_keep_extra_columns(tmp_path):
    out = load(tmp_path, [{"prompt": user("q1"), "item": "cup", "answer": 3}, {"prompt": user("q2"), "item": "mug", "answer": 4}], "prompt")
    assert out.train.column_names == ["prompt", "answer", "item"]
    assert sorted(out.train["item"]) == ["cup", "mug"]


def test_prompt_rows_must_share_columns(tmp_path):
    rows = [{"prompt": "q1", "item": "cup"}, {"prompt": "q2"}]
    assert "row 2: 'item' is missing (earlier rows have it)" in error_of(tmp_path, rows, "prompt")


def test_prompt_column_with_mixed_types_is_one_line(tmp_path):
    rows = [{"prompt": "q1", "item": "cup"}, {"prompt": "q2", "item": 3}]
    assert "d.jsonl row 2: 'item' is int but earlier rows hold str values" in error_of(tmp_path, rows, "prompt")


def test_prompt_columns_with_mixed_types_across_sources(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": "q1", "item": "cup"}])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": "q2", "item": 3}])
    with pytest.raises(DataError, match="column 'item' holds both (str and int|int and str) values across rows"):
        load_stage_data(data_section([a, b]), "prompt")


# -- cleaning --------------------------------------------------------------------------------------

def test_cleaning_functions():
    assert strip_html("<p>a &amp; <b>b</b></p><script>x()</script><!-- c -->") == "a & b"
    assert strip_html("1 < 2 and 3 > 2") == "1 < 2 and 3 > 2"
    assert strip_control_chars("a\x00b\r\nc\td\x1b") == "ab\nc\td"
    assert normalize_whitespace("  a   b \t c  \n\n\n\nd  ") == "a b c\n\nd"
    assert normalize_whitespace("  4 ", keep_start=True) == " 4"


def test_cleaning_counts_and_drops_rows_left_empty(tmp_path):
    rows = [{"text": "<b>bold</b>   text"}, {"text": "plain"}, {"text": "<br/>"}, {"text": "tab\x07bed"}]
    out = load(tmp_path, rows, clean={"strip_html": True})
    assert sorted(out.train["text"]) == ["bold text", "plain", "tabbed"]
    assert out.report.cleaned == {"html stripped": 2, "whitespace normalised": 1, "control chars removed": 1}
    assert out.report.dropped == {"'text' empty after cleaning": 1}
    summary = out.report.summary()
    assert "'text' empty after cleaning 1" in summary and "html stripped in 2 rows" in summary


def test_cleaning_keeps_the_joint_between_prompt_and_completion(tmp_path):
    out = load(tmp_path, [{"prompt": "Q:  2+2 = ", "completion": "  4  "}])
    assert out.train[0] == {"prompt": "Q: 2+2 = ", "completion": " 4"}


def test_cleaning_that_makes_chosen_equal_rejected_drops_the_pair(tmp_path):
    rows = [{"prompt": "q", "chosen": "a  b", "rejected": "a b"}, {"prompt": "q", "chosen": "x", "rejected": "y"}]
    out = load(tmp_path, rows, "preference")
    assert len(out.train) == 1 and out.report.dropped == {"chosen equals rejected after cleaning": 1}


def test_deduplicate_after_cleaning(tmp_path):
    rows = [{"text": "a b"}, {"text": "a  b"}, {"text": "c"}, {"text": "a b"}]
    out = load(tmp_path, rows)
    assert len(out.train) == 2 and out.report.dropped == {"duplicate": 2}
    kept = load(tmp_path, rows, clean={"deduplicate": False})
    assert len(kept.train) == 4 and not kept.report.dropped


def test_train_rows_that_appear_in_eval_sources_are_dropped(tmp_path):
    train = write_jsonl(tmp_path / "t.jsonl", [{"text": "a"}, {"text": "b"}, {"text": "c"}])
    held = write_jsonl(tmp_path / "e.jsonl", [{"text": "b"}])
    out = load_stage_data(data_section([train], eval_sources=[{"path": str(held)}]), "sft")
    assert sorted(out.train["text"]) == ["a", "c"] and out.eval["text"] == ["b"]
    assert out.report.dropped == {"train row also in eval_sources": 1}


# -- token length filter ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_tokenizer():
    from alignment.tiny.tokenizer import make_tokenizer

    return make_tokenizer()


def test_length_filter_uses_the_chat_template(tmp_path, tiny_tokenizer):
    short = {"prompt": user("describe my cup"), "completion": assistant("the cup is sturdy .")}
    long = {"prompt": user("describe my cup"), "completion": assistant("the cup is sturdy and durable and cheap and sturdy .")}
    # "<|user|> describe my cup <|end|> <|assistant|> the cup is sturdy . <|end|>" -> 12 tokens
    out = load(tmp_path, [short, long], tokenizer=tiny_tokenizer, clean={"max_tokens": 12})
    assert out.train["completion"] == [short["completion"]]
    assert out.report.dropped == {"longer than 12 tokens": 1}


def test_length_filter_preference_uses_the_longer_answer(tmp_path, tiny_tokenizer):
    rows = [{"prompt": "describe my cup", "chosen": " the cup is sturdy .", "rejected": " the cup is sturdy and cheap ."},
            {"prompt": "describe my cup", "chosen": " the cup is sturdy .", "rejected": " the cup is cheap ."}]
    out = load(tmp_path, rows, "preference", tokenizer=tiny_tokenizer, clean={"max_tokens": 8})
    assert len(out.train) == 1 and out.report.dropped == {"longer than 8 tokens": 1}


def test_chat_template_failure_is_a_row_error(tmp_path, tiny_tokenizer):
    rows = [{"messages": [{"role": "system", "content": "be brief"}, *user("q"), *assistant("a")]}]
    message = error_of(tmp_path, rows, tokenizer=tiny_tokenizer, clean={"max_tokens": 50})
    assert "d.jsonl row 1: the tokenizer's chat template cannot render this row" in message


def test_max_tokens_without_tokenizer_is_a_programming_error(tmp_path):
    with pytest.raises(ValueError, match="pass the stage's tokenizer"):
        load(tmp_path, [{"text": "a"}], clean={"max_tokens": 5})


# -- mixture and split -----------------------------------------------------------------------------

def test_mixture_counts_rule():
    assert mixture_counts([100, 100], [1, 1]) == [100, 100]
    assert mixture_counts([100, 10], [1, 1]) == [55, 55]
    assert mixture_counts([90, 10], [1, 3]) == [25, 75]
    assert mixture_counts([3, 3, 3], [1, 1, 1]) == [3, 3, 3]
    assert sum(mixture_counts([7, 5], [0.3, 0.7])) == 12


def test_mixture_by_weight_and_repetition(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(40)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(10)])
    out = load_stage_data(data_section([{"path": str(a), "weight": 1.0}, {"path": str(b), "weight": 4.0}]), "sft")
    texts = out.train["text"]
    assert len(texts) == 50 and sum(t.startswith("b") for t in texts) == 40
    assert {t for t in texts if t.startswith("b")} == {f"b{i}" for i in range(10)}  # 4 full passes
    assert len({t for t in texts if t.startswith("a")}) == 10  # 10 distinct rows, no repeats
    assert [s.taken for s in out.report.sources] == [10, 40]
    assert "(x4.00)" in out.report.summary()


def test_zero_weight_leaves_a_source_out(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(5)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(5)])
    out = load_stage_data(data_section([{"path": str(a)}, {"path": str(b), "weight": 0.0}]), "sft")
    assert sorted(out.train["text"]) == [f"a{i}" for i in range(5)]
    assert any("weight 0, not used" in n for n in out.report.notes)


def test_split_and_mixture_are_deterministic(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(200)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(50)])

    def run(seed):
        section = data_section([{"path": str(a)}, {"path": str(b), "weight": 2.0}], eval_fraction=0.1, seed=seed)
        out = load_stage_data(section, "sft")
        return out.train["text"], out.eval["text"]

    first, again, other = run(0), run(0), run(1)
    assert first == again and first != other
    train, held = first
    assert len(held) == 25 and not set(held) & set(train)  # 20 of a + 5 of b, never in train
    assert sum(t.startswith("b") for t in held) == 5


def test_single_source_keeps_file_order(tmp_path):
    out = load(tmp_path, [{"text": f"r{i}"} for i in range(30)], eval_fraction=0.1)
    assert out.train["text"] == [f"r{i}" for i in range(30) if f"r{i}" not in out.eval["text"]]


def test_eval_fraction_zero_gives_no_eval(tmp_path):
    out = load(tmp_path, [{"text": "a"}, {"text": "b"}], eval_fraction=0.0)
    assert out.eval is None and out.report.eval_rows == 0


def test_max_rows(tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(10)] + ["{broken"])
    out = load_stage_data(data_section([{"path": str(path), "max_rows": 4}]), "sft")
    assert sorted(out.train["text"]) == ["a0", "a1", "a2", "a3"] and out.report.sources[0].read == 4


# -- file types and the hub ------------------------------------------------------------------------

def test_json_csv_parquet_and_directories(tmp_path):
    folder = tmp_path / "mix"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps([{"prompt": "q1", "completion": "a1"}]))
    datasets.Dataset.from_list([{"prompt": "q2", "completion": "a2"}]).to_parquet(str(folder / "b.parquet"))
    (folder / "c.csv").write_text("prompt,completion\nq3,a3\nq4,\n")
    with pytest.raises(DataError, match=r"c.csv row 2: 'completion' is missing"):
        load_stage_data(data_section([folder]), "sft")
    out = load_stage_data(data_section([folder], on_malformed="skip"), "sft")
    assert sorted(out.train["prompt"]) == ["q1", "q2", "q3"]


def test_hub_source_goes_through_load_dataset(tmp_path, monkeypatch):
    calls = []

    def fake_load_dataset(path, name=None, split=None):
        calls.append((path, name, split))
        return datasets.Dataset.from_list([{"prompt": "q", "completion": "a"}])

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    section = data_section([{"path": "org/some-data", "name": "main", "split": "train_sft", "max_rows": 5}])
    out = load_stage_data(section, "sft")
    assert calls == [("org/some-data", "main", "train_sft[:5]")] and len(out.train) == 1
    assert out.report.sources[0].label == "org/some-data"


def test_hub_failure_is_one_line(monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'org/some-data' on the Hub (LocalEntryNotFoundError)\nmore lines")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError) as exc:
        load_stage_data(data_section(["org/some-data"]), "sft")
    assert str(exc.value) == ("data source 'org/some-data' (split train): cannot load from the hub "
                              "(ConnectionError: Couldn't reach 'org/some-data' on the Hub (LocalEntryNotFoundError))")


def test_tiny_datasets_load(tiny_paths):
    for kind, path in [("sft", tiny_paths.sft), ("preference", tiny_paths.preferences), ("prompt", tiny_paths.prompts)]:
        out = load_stage_data(data_section([path], eval_fraction=0.05), kind)
        assert out.format.conversational and len(out.train) > 100 and out.eval is not None
        assert out.report.read == sum(1 for _ in open(path))
