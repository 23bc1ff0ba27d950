"""Labelling file formats: the exported item, its labels, and the three file layouts (read and write).

An **item** (one line of `items.jsonl`) is what a labeler judges: a prompt and 2 (pair) or k (k-wise)
completions, each completion with its provenance::

    {"id": "eval_prompts-00003/0-1", "kind": "pair", "prompt_id": "eval_prompts-00003",
     "prompt": [{"role": "user", "content": "review the lamp"}], "columns": {"item": "lamp"},
     "completions": [{"text": "...", "policy": "sft", "policy_path": "outputs/tiny/sft/final",
                      "policy_step": null, "weight_version": 0, "sample_index": 0,
                      "finish_reason": "stop", "num_tokens": 9}, ...],
     "sampling": {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 24, "n": 2, "seed": 0},
     "seed": 0, "label": null}

A **label** fills `label` (the labelled JSONL that `alignment label auto` writes and `import` reads):
  pair:   {"choice": "A" | "B" | "tie" | "skip", "margin": 0.4?, "labeler": "..."}
  k-wise: {"scores": [s_0, ..., s_k-1]}  (higher is better, equal scores are ties)
          or {"ranking": [i_best, ..., i_worst]}  or {"choice": "skip"}

Label Studio: `label_studio_tasks.json` (import: one task per item, the whole item under data.meta) and
`label_studio_config.xml` (pairs: a Choices control A/B/Tie; k-wise: a 1-5 Rating per answer).
Reading accepts Label Studio's JSON *export* (tasks with `annotations[].result[].value.choices|rating`,
`was_cancelled`). Argilla: `argilla_records.json` (v2 records: fields + metadata, with the item as
`metadata.item_json`) and `argilla_settings.json` (fields, the question, metadata names); reading accepts
records with responses (nested `responses: {question: [{value, status}]}`, flattened
`question.responses` columns, or v1 `responses: [{values, status}]`).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from alignment.errors import DataError

CHOICES = ("A", "B", "tie", "skip")
LS_CHOICE_VALUES = {"A": "A", "B": "B", "tie": "Tie", "skip": "Skip"}
PAIR_QUESTION = "preference"
RANK_QUESTION = "ranking"
MAX_RATING = 5


class MalformedItem(Exception):
    """A row that is not a usable item or label; the caller adds file and row."""


# ------------------------------------------------------------------------------------------- items


def prompt_as_text(prompt) -> str:
    """A prompt for display: text as is; messages as `role: content` lines (one user turn: its content)."""
    if isinstance(prompt, str):
        return prompt
    if len(prompt) == 1 and prompt[0].get("role") == "user":
        return str(prompt[0].get("content", ""))
    return "\n".join(f"{m.get('role')}: {m.get('content')}" for m in prompt)


def check_item(item: object) -> dict:
    """Validate the fields every item needs; returns it."""
    if not isinstance(item, dict):
        raise MalformedItem(f"expected an object, got {type(item).__name__}")
    for key in ("id", "prompt", "completions"):
        if key not in item:
            raise MalformedItem(f"'{key}' is missing")
    if not isinstance(item["prompt"], (str, list)) or not item["prompt"]:
        raise MalformedItem("'prompt' must be a non-empty string or list of messages")
    comps = item["completions"]
    if not isinstance(comps, list) or len(comps) < 2:
        raise MalformedItem("'completions' must be a list of at least 2 completions")
    for i, c in enumerate(comps):
        if not isinstance(c, dict) or not isinstance(c.get("text"), str):
            raise MalformedItem(f"completion {i} must be an object with a string 'text'")
    kind = item.get("kind", "pair" if len(comps) == 2 else "kwise")
    if kind not in ("pair", "kwise") or (kind == "pair" and len(comps) != 2):
        raise MalformedItem(f"'kind' must be 'pair' (2 completions) or 'kwise', got {kind!r} with {len(comps)} completions")
    item.setdefault("kind", kind)
    return item


def check_label(label: object, item: dict) -> dict | None:
    """Validate and normalise a label (None: unlabelled)."""
    if label is None:
        return None
    if not isinstance(label, dict):
        raise MalformedItem(f"'label' must be an object, got {type(label).__name__}")
    k = len(item["completions"])
    out = dict(label)
    if "choice" in label:
        choice = normalise_choice(label["choice"])
        if choice is None or (item["kind"] == "kwise" and choice != "skip"):
            allowed = "A, B, tie, skip" if item["kind"] == "pair" else "skip (k-wise items take 'scores' or 'ranking')"
            raise MalformedItem(f"'label.choice' must be one of {allowed}; got {label['choice']!r}")
        out["choice"] = choice
    elif "scores" in label:
        scores = label["scores"]
        if not isinstance(scores, list) or len(scores) != k or not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
            raise MalformedItem(f"'label.scores' must be a list of {k} numbers")
    elif "ranking" in label:
        ranking = label["ranking"]
        if not isinstance(ranking, list) or sorted(ranking) != list(range(k)):
            raise MalformedItem(f"'label.ranking' must order all completion indices 0..{k - 1}, best first")
    else:
        raise MalformedItem("'label' needs 'choice', 'scores' or 'ranking'")
    if "margin" in out and out["margin"] is not None and (isinstance(out["margin"], bool) or not isinstance(out["margin"], (int, float))):
        raise MalformedItem(f"'label.margin' must be a number, got {out['margin']!r}")
    return out


def normalise_choice(value) -> str | None:
    text = str(value).strip().lower()
    table = {"a": "A", "b": "B", "1": "A", "2": "B", "response_a": "A", "response_b": "B", "answer_a": "A", "answer_b": "B",
             "tie": "tie", "equal": "tie", "same": "tie", "skip": "skip", "skipped": "skip", "discard": "skip", "discarded": "skip"}
    return table.get(text)


# ------------------------------------------------------------------------------------------- writers


def write_jsonl(path: str | Path, rows: list[dict]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", newline="\n") as fh:
        for row in rows:
            fh.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
    tmp.replace(path)
    return path


def write_json(path: str | Path, value) -> Path:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(value, ensure_ascii=False, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def label_studio_task(item: dict) -> dict:
    data = {"prompt": prompt_as_text(item["prompt"]), "item_id": item["id"], "meta": {"item": item}}
    if item["kind"] == "pair":
        data["answer_a"], data["answer_b"] = item["completions"][0]["text"], item["completions"][1]["text"]
    else:
        for i, c in enumerate(item["completions"]):
            data[f"answer_{i}"] = c["text"]
    return {"data": data}


def label_studio_config(kind: str, k: int = 2) -> str:
    """The labelling interface (Label Studio XML) matching `label_studio_task`."""
    if kind == "pair":
        choices = "".join(f'<Choice value="{v}"/>' for v in ("A", "B", "Tie"))
        return (
            "<View>\n"
            '  <Header value="Prompt"/>\n  <Text name="prompt" value="$prompt"/>\n'
            '  <View style="display: flex; gap: 1em;">\n'
            '    <View style="flex: 50%;"><Header value="Answer A"/><Text name="answer_a" value="$answer_a"/></View>\n'
            '    <View style="flex: 50%;"><Header value="Answer B"/><Text name="answer_b" value="$answer_b"/></View>\n'
            "  </View>\n"
            f'  <Header value="Which answer is better?"/>\n  <Choices name="{PAIR_QUESTION}" toName="prompt" choice="single" required="true">{choices}</Choices>\n'
            "</View>\n"
        )
    answers = "".join(
        f'  <Header value="Answer {i}"/>\n  <Text name="answer_{i}" value="$answer_{i}"/>\n'
        f'  <Rating name="rating_{i}" toName="answer_{i}" maxRating="{MAX_RATING}" required="true"/>\n'
        for i in range(k)
    )
    return f'<View>\n  <Header value="Prompt"/>\n  <Text name="prompt" value="$prompt"/>\n{answers}</View>\n'


def argilla_record(item: dict) -> dict:
    fields = {"prompt": prompt_as_text(item["prompt"])}
    for i, c in enumerate(item["completions"]):
        fields[_argilla_field(item, i)] = c["text"]
    sampling = item.get("sampling") or {}
    metadata = {
        "prompt_id": item.get("prompt_id"),
        "seed": item.get("seed"),
        "temperature": sampling.get("temperature"),
        "max_new_tokens": sampling.get("max_new_tokens"),
        "policies": ",".join(sorted({str(c.get("policy")) for c in item["completions"]})),
        "item_json": json.dumps(item, ensure_ascii=False, sort_keys=True),
    }
    return {"id": item["id"], "fields": fields, "metadata": metadata}


def _argilla_field(item: dict, i: int) -> str:
    return ("response_a", "response_b")[i] if item["kind"] == "pair" else f"response_{i}"


def argilla_settings(kind: str, k: int = 2) -> dict:
    """Dataset settings for Argilla 2.x (`rg.Settings(fields=..., questions=..., metadata=...)`)."""
    names = ["response_a", "response_b"] if kind == "pair" else [f"response_{i}" for i in range(k)]
    fields = [{"name": "prompt", "type": "text", "required": True}] + [{"name": n, "type": "text", "required": True} for n in names]
    if kind == "pair":
        question = {"name": PAIR_QUESTION, "type": "label_selection", "labels": ["A", "B", "tie"], "required": True,
                    "title": "Which response is better?"}
    else:
        question = {"name": RANK_QUESTION, "type": "ranking", "values": names, "required": True,
                    "title": "Rank the responses, best first"}
    metadata = [{"name": "prompt_id", "type": "terms"}, {"name": "seed", "type": "integer"}, {"name": "temperature", "type": "float"},
                {"name": "max_new_tokens", "type": "integer"}, {"name": "policies", "type": "terms"}, {"name": "item_json", "type": "terms", "visible_for_annotators": False}]
    return {"guidelines": "Compare the responses to the prompt. Skip (discard) a record you cannot judge.",
            "fields": fields, "questions": [question], "metadata": metadata}


# ------------------------------------------------------------------------------------------- readers


@dataclass
class Row:
    where: str                   # "file row N" (1-based line / element number)
    item: dict
    label: dict | None           # normalised label, None = unlabelled
    annotators: int = 0          # annotations combined into the label (Label Studio / Argilla)
    disagreement: bool = False   # several annotations that did not all agree


@dataclass
class ReadResult:
    rows: list[Row] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # malformed rows, with file and row (on_malformed=skip)
    formats: Counter = field(default_factory=Counter)


def detect_format(path: Path) -> str:
    if path.suffix == ".jsonl":
        return "jsonl"
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return "jsonl"  # JSON Lines under another suffix
    if isinstance(value, dict):
        value = value.get("records") or value.get("tasks") or [value]
    first = value[0] if isinstance(value, list) and value else {}
    if isinstance(first, dict) and "data" in first:
        return "label_studio"
    if isinstance(first, dict) and "fields" in first:
        return "argilla"
    return "jsonl"


def read_labelled(path: str | Path, fmt: str = "auto", on_malformed: str = "error", multiple: str = "majority") -> ReadResult:
    """Rows (item + label) of a labelled file of any supported format; malformed rows raise DataError naming
    file and row, or with on_malformed='skip' are collected in `problems`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"labelled file '{path}' does not exist")
    fmt = detect_format(path) if fmt == "auto" else fmt
    result = ReadResult()
    parse = {"jsonl": _parse_jsonl_row, "label_studio": _parse_label_studio, "argilla": _parse_argilla}[fmt]
    for where, value in _raw_rows(path, fmt, on_malformed, result):
        try:
            row = parse(value, multiple)
        except MalformedItem as exc:
            if on_malformed == "error":
                raise DataError(f"{where}: {exc}") from None
            result.problems.append(f"{where}: {exc}")
            continue
        row.where = where
        result.rows.append(row)
        result.formats[fmt] += 1
    return result


def _raw_rows(path: Path, fmt: str, on_malformed: str, result: ReadResult):
    text = path.read_text(encoding="utf-8")
    if fmt == "jsonl" or path.suffix == ".jsonl":
        try:  # a JSON array written to a .json file is also accepted for the plain format
            if fmt == "jsonl" and path.suffix != ".jsonl":
                value = json.loads(text)
                if isinstance(value, list):
                    yield from ((f"{path} row {i}", v) for i, v in enumerate(value, 1))
                    return
        except ValueError:
            pass
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                yield f"{path} row {n}", json.loads(line)
            except ValueError as exc:
                if on_malformed == "error":
                    raise DataError(f"{path} row {n}: not valid JSON ({exc.msg} at column {exc.colno})") from None
                result.problems.append(f"{path} row {n}: not valid JSON ({exc.msg})")
        return
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})") from None
    if isinstance(value, dict):
        value = value.get("records") or value.get("tasks") or [value]
    if not isinstance(value, list):
        raise DataError(f"{path}: expected a JSON array of {'tasks' if fmt == 'label_studio' else 'records'}")
    yield from ((f"{path} row {i}", v) for i, v in enumerate(value, 1))


def _parse_jsonl_row(value, multiple: str) -> Row:
    item = check_item(value)
    return Row("", item, check_label(item.get("label"), item))


# -- Label Studio export ---------------------------------------------------------------------------


def _parse_label_studio(task, multiple: str) -> Row:
    if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
        raise MalformedItem("a Label Studio task must be an object with 'data'")
    meta = task["data"].get("meta") or {}
    item = meta.get("item") if isinstance(meta, dict) else None
    if item is None:
        raise MalformedItem("task data has no 'meta.item' (export the tasks with `alignment label export`)")
    item = check_item(dict(item))
    item.pop("label", None)
    votes = []
    for ann in task.get("annotations") or []:
        if not isinstance(ann, dict):
            raise MalformedItem("an annotation must be an object")
        if ann.get("was_cancelled"):
            votes.append({"choice": "skip"})
            continue
        votes.append(_label_studio_result(ann.get("result") or [], item))
    if not votes:
        return Row("", item, None)
    label, disagreement = combine(votes, item, multiple)
    return Row("", item, label, annotators=len(votes), disagreement=disagreement)


def _label_studio_result(result: list, item: dict) -> dict:
    if item["kind"] == "pair":
        for r in result:
            if r.get("from_name") == PAIR_QUESTION or r.get("type") == "choices":
                choices = (r.get("value") or {}).get("choices") or []
                choice = normalise_choice(choices[0]) if choices else None
                if choice is None:
                    raise MalformedItem(f"annotation choice {choices!r} is not one of A, B, Tie, Skip")
                return {"choice": choice}
        return {"choice": "skip"}  # submitted without a choice
    ratings = {}
    for r in result:
        name = str(r.get("from_name", ""))
        if name.startswith("rating_") and "rating" in (r.get("value") or {}):
            ratings[int(name.split("_", 1)[1])] = float(r["value"]["rating"])
    if len(ratings) != len(item["completions"]):
        if not ratings:
            return {"choice": "skip"}
        raise MalformedItem(f"annotation rates {len(ratings)} of {len(item['completions'])} answers")
    return {"scores": [ratings[i] for i in range(len(item["completions"]))]}


# -- Argilla ---------------------------------------------------------------------------------------


def _parse_argilla(record, multiple: str) -> Row:
    if not isinstance(record, dict) or not isinstance(record.get("fields"), dict):
        raise MalformedItem("an Argilla record must be an object with 'fields'")
    metadata = record.get("metadata") or {}
    if metadata.get("item_json"):
        try:
            item = json.loads(metadata["item_json"])
        except ValueError:
            raise MalformedItem("'metadata.item_json' is not valid JSON") from None
    else:  # a record made elsewhere: rebuild a minimal item from the fields
        f = record["fields"]
        names = ["response_a", "response_b"] if "response_a" in f else sorted((k for k in f if k.startswith("response_")), key=lambda k: int(k.split("_")[1]))
        item = {"id": str(record.get("id")), "prompt": f.get("prompt"), "completions": [{"text": f.get(n)} for n in names]}
    item = check_item(item)
    item.pop("label", None)
    votes = [_argilla_vote(value, status, item) for value, status in _argilla_responses(record)]
    if record.get("status") == "discarded" and not votes:
        votes = [{"choice": "skip"}]
    if not votes:
        return Row("", item, None)
    label, disagreement = combine(votes, item, multiple)
    return Row("", item, label, annotators=len(votes), disagreement=disagreement)


def _argilla_responses(record: dict) -> list[tuple[object, str]]:
    """(value, status) of every user's response to our question, in any of the record layouts."""
    question = None
    out = []
    responses = record.get("responses")
    if isinstance(responses, dict):  # v2 nested
        for question in (PAIR_QUESTION, RANK_QUESTION):
            for r in responses.get(question) or []:
                out.append((r.get("value"), r.get("status", "submitted")))
    elif isinstance(responses, list):  # v1: [{values: {q: {value}}, status}]
        for r in responses:
            values = r.get("values") or {}
            q = values.get(PAIR_QUESTION) or values.get(RANK_QUESTION)
            out.append((q.get("value") if isinstance(q, dict) else None, r.get("status", "submitted")))
    for question in (PAIR_QUESTION, RANK_QUESTION):  # v2 flattened columns
        values = record.get(f"{question}.responses")
        if values:
            statuses = record.get(f"{question}.responses.status") or ["submitted"] * len(values)
            out.extend(zip(values, statuses))
    return out


def _argilla_vote(value, status: str, item: dict) -> dict:
    if status == "discarded" or value is None:
        return {"choice": "skip"}
    if item["kind"] == "pair":
        choice = normalise_choice(value)
        if choice is None:
            raise MalformedItem(f"response {value!r} is not one of A, B, tie")
        return {"choice": choice}
    if not isinstance(value, list):
        raise MalformedItem(f"a ranking response must be a list, got {value!r}")
    k = len(item["completions"])
    scores = [None] * k
    for entry in value:
        name, rank = (entry.get("value"), entry.get("rank")) if isinstance(entry, dict) else (entry, None)
        try:
            i = int(str(name).rsplit("_", 1)[1])
        except (IndexError, ValueError):
            raise MalformedItem(f"ranking value {name!r} is not a response_<i> field") from None
        if not 0 <= i < k:
            raise MalformedItem(f"ranking names response_{i} but the item has {k} responses")
        scores[i] = -float(rank if rank is not None else value.index(entry) + 1)  # rank 1 is best: higher score
    if any(s is None for s in scores):
        raise MalformedItem(f"ranking covers {sum(s is not None for s in scores)} of {k} responses")
    return {"scores": scores}


# -- several annotations -> one label ------------------------------------------------------------------


def combine(votes: list[dict], item: dict, multiple: str) -> tuple[dict, bool]:
    """One label from several annotators' labels: majority vote of choices (a draw between A and B is a
    tie), or the mean of scores; 'latest' takes the last one. Skips only win when nobody labelled."""
    labels = [check_label(v, item) for v in votes]
    real = [v for v in labels if v.get("choice") != "skip"]
    disagreement = len({json.dumps(v, sort_keys=True) for v in labels}) > 1
    if not real:
        return {"choice": "skip", "annotators": len(labels)}, disagreement
    if multiple == "latest":
        return {**real[-1], "annotators": len(labels)}, disagreement
    if "choice" in real[0] and all("choice" in v for v in real):
        counts = Counter(v["choice"] for v in real)
        top = counts.most_common()
        choice = top[0][0] if len(top) == 1 or top[0][1] > top[1][1] else "tie"
        return {"choice": choice, "annotators": len(labels), "votes": dict(counts)}, disagreement
    if all("scores" in v for v in real):
        k = len(real[0]["scores"])
        mean = [sum(v["scores"][i] for v in real) / len(real) for i in range(k)]
        return {"scores": mean, "annotators": len(labels)}, disagreement
    return {**real[-1], "annotators": len(labels)}, disagreement
