"""Rewards from an HTTP endpoint: POST {"prompts", "completions", <columns>} -> {"rewards": [float, ...]}.

Bounded retries with backoff; after the last attempt a clear UserError names the URL and the last failure.
"""

from __future__ import annotations

import time

import requests

from alignment.errors import UserError


class RemoteRewardError(UserError):
    pass


class RemoteReward:
    def __init__(self, url: str, timeout_s: float = 30.0, retries: int = 3, backoff_s: float = 0.5):
        self.url, self.timeout_s, self.retries, self.backoff_s = url, timeout_s, retries, backoff_s
        self.__name__ = f"http:{url}"

    def __call__(self, prompts: list, completions: list[str], **columns) -> list[float]:
        payload = {"prompts": prompts, "completions": completions, **columns}
        last = "no attempt made"
        for attempt in range(1, self.retries + 1):
            try:
                response = requests.post(self.url, json=payload, timeout=self.timeout_s)
                response.raise_for_status()
                rewards = response.json()["rewards"]
                if len(rewards) != len(completions):
                    raise ValueError(f"returned {len(rewards)} rewards for {len(completions)} completions")
                return [float(r) for r in rewards]
            except (requests.RequestException, ValueError, KeyError, TypeError) as exc:
                last = f"{type(exc).__name__}: {exc}"
                if attempt < self.retries:
                    time.sleep(self.backoff_s * 2 ** (attempt - 1))
        raise RemoteRewardError(f"reward endpoint {self.url} failed {self.retries} times; last error: {last}")
