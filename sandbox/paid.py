"""What an emulator charged, per request: the witness a double charge cannot hide from.

Each emulator names a paid request by what the provider is paid for (TAMS: the `requestId`;
触站AI and Tencent, which have no idempotency key: a fingerprint of the paid fields, so two
submits of the same prompt, seed and size are the same request whatever the client called
them) and records every charge and refund. `GET /_sandbox/stats` shows `paid`: key ->
{label (the prompt), charges}, and `max_charges_per_request`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any


def fingerprint(*parts: Any) -> str:
    """A stable key for a paid request from the fields it is paid for."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


@dataclass
class PaidLog:
    """Charges per paid request (the caller holds the emulator's lock)."""

    charges: dict[str, int] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)

    def charge(self, key: str, label: str) -> None:
        self.charges[key] = self.charges.get(key, 0) + 1
        self.labels[key] = label[:160]

    def refund(self, key: str) -> None:
        self.charges[key] = self.charges.get(key, 0) - 1

    def snapshot(self) -> dict[str, Any]:
        return {"paid": {k: {"label": self.labels[k], "charges": n} for k, n in self.charges.items()},
                "max_charges_per_request": max(self.charges.values(), default=0)}
