"""Seeds for what a request leaves unseeded, when the operator asks for reproducible runs.

Tinker draws a fresh LoRA initialisation for a training client created without `seed`, and
fresh randomness for a sample request without `sampling_params.seed`; so does tuneforge by
default. With `TUNEFORGE_SEED` set, an unmodified script that seeds nothing (a cookbook recipe,
say) runs the same way twice on a fresh server:

- the n-th unseeded training client of the server gets a seed from (TUNEFORGE_SEED, n);
- an unseeded sample request gets one from (TUNEFORGE_SEED, its prompt tokens, how many
  unseeded requests with that prompt came before), so concurrent requests get the same seeds
  whatever order they arrive in.

Seeds are drawn when a request is submitted (once, even if it waits for admission).
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict

_PROMPTS_KEPT = 65536  # prompts whose count is remembered (least recently used forgotten)


def _mix(*parts: object) -> int:
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1  # fits a signed 64-bit seed


class DefaultSeeds:
    def __init__(self, seed: int | None) -> None:
        self.seed = seed
        self._lock = threading.Lock()
        self._models = 0
        self._prompts: OrderedDict[str, int] = OrderedDict()

    def lora(self) -> int | None:
        """The seed of the next unseeded training client (None: draw one at random)."""
        if self.seed is None:
            return None
        with self._lock:
            self._models += 1
            return _mix(self.seed, "lora", self._models)

    def sample(self, prompt: str) -> int | None:
        """The seed of an unseeded sample request for `prompt` (its serialised model input;
        None: draw one at random)."""
        if self.seed is None:
            return None
        key = hashlib.blake2b(prompt.encode(), digest_size=16).hexdigest()
        with self._lock:
            n = self._prompts.pop(key, 0) + 1
            self._prompts[key] = n
            while len(self._prompts) > _PROMPTS_KEPT:
                self._prompts.popitem(last=False)
        return _mix(self.seed, "sample", key, n)
