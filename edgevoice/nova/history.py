"""The conversation so far, kept so a new Nova stream can pick up where the last one was.

A Nova Sonic stream lives at most about eight minutes, and it can be lost at any
time; each new stream starts empty. :class:`ConversationHistory` records the final
transcripts of both sides, and :meth:`ConversationHistory.events` turns the most
recent of them into the text blocks Nova accepts once, right after the system
prompt. Nova's rules for that history are enforced here:

* the first message is the user's (older assistant lines are dropped);
* at most ``max_messages`` messages (40 by default);
* one ``textInput`` carries at most ``max_input_bytes`` (1 KB); longer messages are
  split over several ``textInput`` events of the same block;
* the whole history stays under ``max_total_bytes`` (40 KB), oldest dropped first.

Consecutive lines of the same role are merged, because Nova expects the roles to
alternate.
"""

from __future__ import annotations

import collections
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from edgevoice.nova import events

HistoryRole = Literal["USER", "ASSISTANT"]


@dataclass(frozen=True)
class HistoryMessage:
    """One line of the conversation."""

    role: HistoryRole
    text: str

    @property
    def size_bytes(self) -> int:
        return len(self.text.encode("utf-8"))


@dataclass(frozen=True)
class HistoryLimits:
    """Nova's limits on replayed history."""

    max_messages: int = 40
    max_input_bytes: int = 1024
    max_total_bytes: int = 40_000


class ConversationHistory:
    """Final transcripts of one device's conversation, bounded in memory."""

    def __init__(self, limits: HistoryLimits | None = None) -> None:
        self.limits = limits or HistoryLimits()
        # Twice the replay limit: enough to merge and trim, never unbounded.
        self._messages: collections.deque[HistoryMessage] = collections.deque(
            maxlen=2 * self.limits.max_messages
        )

    def __len__(self) -> int:
        return len(self._messages)

    def add(self, role: HistoryRole, text: str) -> None:
        """Record a final transcript line; blank lines are ignored."""
        text = text.strip()
        if not text:
            return
        if self._messages and self._messages[-1].role == role:
            previous = self._messages.pop()
            text = f"{previous.text} {text}"
        # A single runaway line must not crowd out everything else.
        limit = self.limits.max_total_bytes - 1
        if len(text.encode("utf-8")) > limit:
            text = text.encode("utf-8")[-limit:].decode("utf-8", errors="ignore")
        self._messages.append(HistoryMessage(role, text))

    def drop_trailing_user(self) -> None:
        """Forget the last line if it is the user's (a question replayed as audio)."""
        if self._messages and self._messages[-1].role == events.ROLE_USER:
            self._messages.pop()

    def clear(self) -> None:
        self._messages.clear()

    def select(self) -> list[HistoryMessage]:
        """The most recent messages that fit Nova's limits, oldest first."""
        chosen: list[HistoryMessage] = []
        total = 0
        for message in reversed(self._messages):
            if len(chosen) >= self.limits.max_messages:
                break
            if total + message.size_bytes >= self.limits.max_total_bytes:
                break
            chosen.append(message)
            total += message.size_bytes
        chosen.reverse()
        while chosen and chosen[0].role != events.ROLE_USER:
            chosen.pop(0)
        return chosen

    def events(self, prompt_name: str, new_content_name: Callable[[], str]) -> list[events.Event]:
        """The text blocks that replay :meth:`select` into a new stream."""
        out: list[events.Event] = []
        for message in self.select():
            out += events.text_block(
                prompt_name,
                new_content_name(),
                message.role,
                message.text,
                # Non-interactive: context to remember, not a question to answer now.
                interactive=False,
                max_input_bytes=self.limits.max_input_bytes,
            )
        return out
