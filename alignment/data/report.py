"""`DataReport`: what happened to the rows of a stage's data (read, dropped per reason, kept, mixed, split)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class SourceReport:
    """Row counts of one data source, in pipeline order."""

    label: str               # file, directory or hub id as the recipe names it
    role: str                # "train" (data.sources) or "eval" (data.eval_sources)
    weight: float = 1.0
    read: int = 0            # rows read from disk / hub (after max_rows)
    malformed: int = 0       # rows skipped as malformed (on_malformed: skip)
    kept: int = 0            # rows left after cleaning and filtering
    held_out: int = 0        # rows moved to the eval split by eval_fraction
    taken: int = 0           # rows this source put into the train mixture (may repeat rows)


@dataclass
class DataReport:
    kind: str
    format: str = ""
    sources: list[SourceReport] = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)    # reason -> rows dropped
    cleaned: Counter = field(default_factory=Counter)    # cleaning step -> rows it changed
    notes: list[str] = field(default_factory=list)       # anything else a user should know
    malformed_examples: list[str] = field(default_factory=list)  # first few skipped-row messages
    train_rows: int = 0
    eval_rows: int = 0

    @property
    def read(self) -> int:
        return sum(s.read for s in self.sources)

    def summary(self) -> str:
        """A few lines for the console: per source read/kept/taken, drops per reason, the split."""
        lines = [f"data ({self.kind}, format {self.format}): {self.read} rows read from {len(self.sources)} source(s)"]
        for s in self.sources:
            if s.role == "eval":
                lines.append(f"  eval  {s.label}: read {s.read}, kept {s.kept}")
                continue
            taken = f"{s.taken}" + (f" (x{s.taken / s.kept:.2f})" if s.kept and s.taken > s.kept else "")
            lines.append(
                f"  train {s.label}: read {s.read}, kept {s.kept}, held out {s.held_out}, "
                f"in mixture {taken} (weight {s.weight:g})"
            )
        if self.dropped:
            lines.append("  dropped: " + ", ".join(f"{reason} {n}" for reason, n in sorted(self.dropped.items())))
        if self.cleaned:
            lines.append("  cleaned: " + ", ".join(f"{step} in {n} rows" for step, n in sorted(self.cleaned.items())))
        for example in self.malformed_examples:
            lines.append(f"  skipped: {example}")
        for note in self.notes:
            lines.append(f"  note: {note}")
        lines.append(f"  kept: train {self.train_rows}, eval {self.eval_rows}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["dropped"] = dict(self.dropped)
        out["cleaned"] = dict(self.cleaned)
        return out
