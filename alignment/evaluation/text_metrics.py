"""Metrics of text against text: perplexity of a policy on held-out texts, BLEU/ROUGE of samples against references.

Perplexity: each held-out row becomes (prompt ids, scored ids) as a trained policy would see it: a completion (or a
conversation's last assistant turn) is scored given its prompt rendered as `reward.scoring.encode` renders pairs (the
chat template for messages), a plain text as a whole after its first token. Per-text NLL sums and token counts feed
`stats.perplexity`. BLEU is sacrebleu's sentence BLEU (0-100, its default smoothing); ROUGE is rouge-score's F1
(0-1); with several references a sample gets its best score.
"""

from __future__ import annotations

from dataclasses import dataclass

from alignment.config.eval import PerplexitySection
from alignment.errors import DataError


@dataclass
class HeldOutTexts:
    prompt_ids: list[list[int]]
    scored_ids: list[list[int]]
    cut: int  # rows longer than max_length, whose scored part was cut to fit


def heldout_rows(section: PerplexitySection) -> list[dict]:
    """The held-out rows of `section`, read and validated once for all policies."""
    from alignment.evaluation.generation import read_normalised_rows

    rows = read_normalised_rows(section.path, section.split, section.num_texts, "sft", where_prefix="perplexity.path: ")
    if not rows:
        raise DataError(f"perplexity.path: '{section.path}' has no rows")
    return rows


def heldout_texts(rows: list[dict], tokenizer, max_length: int) -> HeldOutTexts:
    """`heldout_rows` tokenized for `tokenizer` (policies with other tokenizers get their own), each at most
    `max_length` tokens."""
    from reward.scoring import answer_starts, encode_many

    prompts, answers, whole = [], [], []
    for row in rows:
        if "text" in row:
            whole.append(tokenizer(row["text"], add_special_tokens=True)["input_ids"])
        else:
            prompt, answer = _prompt_and_answer(row)
            prompts.append(prompt)
            answers.append(answer)
    prompt_ids = [ids[:1] for ids in whole]
    scored_ids = [ids[1:] for ids in whole]
    if prompts:
        sequences = encode_many(tokenizer, prompts, answers)
        for ids, start in zip(sequences, answer_starts(tokenizer, prompts, sequences)):
            prompt_ids.append(ids[:start])
            scored_ids.append(ids[start:])
    cut = 0
    for i, (p, s) in enumerate(zip(prompt_ids, scored_ids)):
        if len(p) + len(s) > max_length:
            cut += 1
            scored_ids[i] = s[: max(max_length - len(p), 0)]
    return HeldOutTexts(prompt_ids, scored_ids, cut)


def _prompt_and_answer(row: dict):
    if "messages" in row:
        messages = row["messages"]
        if messages[-1]["role"] != "assistant":
            raise DataError("perplexity.path: a conversation must end with an assistant turn (the one scored)")
        return messages[:-1], [messages[-1]]
    return row["prompt"], row["completion"]


def reference_scores(metric: str, completions: list[str], references: list) -> list[float]:
    """One score per completion against its references (a string or a list of strings each)."""
    refs = [[r] if isinstance(r, str) else [str(x) for x in r] for r in references]
    if metric == "bleu":
        import sacrebleu

        return [float(sacrebleu.sentence_bleu(c, r).score) for c, r in zip(completions, refs)]
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer([metric])
    return [max(scorer.score(ref, c)[metric].fmeasure for ref in r) for c, r in zip(completions, refs)]
