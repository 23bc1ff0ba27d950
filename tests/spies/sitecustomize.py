"""Spies for tests that run a stage in subprocesses: a test puts this folder on PYTHONPATH and Python imports
`sitecustomize` in every process it starts. With ALIGNMENT_SPY_SCORING=<dir>, each RewardModelScorer a process
builds records the dtype it was asked for (None: not given), and each `score_ids` call how many sequences it scored,
in <dir>/rank<RANK>.jsonl."""

import os

if os.environ.get("ALIGNMENT_SPY_SCORING"):
    import json
    from pathlib import Path

    from reward import scoring

    _log = Path(os.environ["ALIGNMENT_SPY_SCORING"]) / f"rank{os.environ.get('RANK', '0')}.jsonl"
    _init, _score_ids = scoring.RewardModelScorer.__init__, scoring.RewardModelScorer.score_ids

    def _record(entry: dict) -> None:
        _log.parent.mkdir(parents=True, exist_ok=True)
        with open(_log, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def _spied_init(self, *args, **kwargs):
        _init(self, *args, **kwargs)
        _record({"scorer_dtype": str(kwargs.get("dtype"))})

    def _spied_score_ids(self, sequences):
        _record({"scored": len(sequences)})
        return _score_ids(self, sequences)

    scoring.RewardModelScorer.__init__ = _spied_init
    scoring.RewardModelScorer.score_ids = _spied_score_ids
