"""Stored responses for `previous_response_id` and GET /v1/responses/{id}: bounded in number and
age, in the memory of one ingress replica (a follow-up that another replica gets is a 400, as for
an expired one)."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

MAX_STORED = 4096
MAX_AGE_S = 3600.0


@dataclass(frozen=True, slots=True)
class StoredResponse:
    response: dict[str, Any]  # as the client got it
    messages: list[dict[str, Any]]  # the conversation so far as chat messages, instructions out


class ResponseStore:
    def __init__(self, max_stored: int = MAX_STORED, max_age_s: float = MAX_AGE_S):
        self.max_stored, self.max_age_s = max_stored, max_age_s
        self._items: OrderedDict[str, tuple[float, StoredResponse]] = OrderedDict()

    def put(self, rid: str, stored: StoredResponse) -> None:
        self._items[rid] = (time.monotonic(), stored)
        self._items.move_to_end(rid)
        while len(self._items) > self.max_stored:
            self._items.popitem(last=False)

    def get(self, rid: str) -> StoredResponse | None:
        self._expire()
        found = self._items.get(rid)
        return found[1] if found else None

    def _expire(self) -> None:
        cutoff = time.monotonic() - self.max_age_s
        while self._items and next(iter(self._items.values()))[0] < cutoff:
            self._items.popitem(last=False)
