"""Data layer: load a stage's datasets (hub id or local jsonl/json/parquet/csv), validate and normalise
rows per kind, clean, deduplicate, filter by length, split and mix -- with a report of every count.

    from alignment.data import load_stage_data
    data = load_stage_data(recipe.data, "sft", tokenizer)   # kinds: "sft", "preference", "prompt"
    print(data.report.summary()); trainer(train_dataset=data.train, eval_dataset=data.eval)
"""

from alignment.data.formats import Format
from alignment.data.load import KINDS, Kind, StageData, load_stage_data
from alignment.data.report import DataReport, SourceReport

__all__ = ["DataReport", "Format", "KINDS", "Kind", "SourceReport", "StageData", "load_stage_data"]
