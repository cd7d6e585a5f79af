"""Counters the scheduler keeps for `/metrics` (monotonic totals; rates are the reader's job)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


@dataclass
class Stats:
    busy_seconds: float = 0.0  # everything the engine thread ran
    passes: int = 0
    trained_tokens: int = 0
    training_seconds: float = 0.0
    batch_size_counts: dict[int, int] = field(
        default_factory=lambda: dict.fromkeys(BATCH_SIZE_BUCKETS, 0))
    batch_size_sum: int = 0
    sample_requests: int = 0
    sampled_tokens: int = 0
    decode_steps: int = 0

    def record_pass(self, requests: int, tokens: int, seconds: float) -> None:
        self.passes += 1
        self.trained_tokens += tokens
        self.training_seconds += seconds
        self.batch_size_sum += requests
        for bound in BATCH_SIZE_BUCKETS:
            if requests <= bound:
                self.batch_size_counts[bound] += 1

    @classmethod
    def total(cls, parts: list[Stats]) -> Stats:
        """The sum of several schedulers' counters."""
        out = cls()
        for part in parts:
            for f in fields(cls):
                value = getattr(part, f.name)
                if isinstance(value, dict):
                    mine = getattr(out, f.name)
                    for k, v in value.items():
                        mine[k] = mine.get(k, 0) + v
                else:
                    setattr(out, f.name, getattr(out, f.name) + value)
        return out
