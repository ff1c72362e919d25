"""Replayed history obeys Nova's rules: USER first, <= 40 messages, 1 KB inputs, < 40 KB."""

from __future__ import annotations

import itertools
import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from edgevoice.nova.history import ConversationHistory, HistoryLimits


def names() -> Any:
    counter = itertools.count()
    return lambda: f"c{next(counter)}"


def replayed(history: ConversationHistory) -> list[tuple[str, str]]:
    """(role, full text) per block, reassembled from the events."""
    blocks: list[tuple[str, str]] = []
    for event in history.events("p", names()):
        name, body = next(iter(event["event"].items()))
        if name == "contentStart":
            assert body["type"] == "TEXT" and body["interactive"] is False
            blocks.append((body["role"], ""))
        elif name == "textInput":
            assert len(body["content"].encode()) <= 1024
            role, text = blocks[-1]
            blocks[-1] = (role, text + body["content"])
    return blocks


def test_replay_starts_with_the_user_and_keeps_order() -> None:
    history = ConversationHistory()
    history.add("ASSISTANT", "Hi, I am the assistant.")  # dropped: must start with USER
    history.add("USER", "What time is it?")
    history.add("ASSISTANT", "It is noon.")
    history.add("USER", "Thanks")
    assert replayed(history) == [
        ("USER", "What time is it?"),
        ("ASSISTANT", "It is noon."),
        ("USER", "Thanks"),
    ]


def test_consecutive_lines_of_one_role_are_merged_and_blanks_ignored() -> None:
    history = ConversationHistory()
    history.add("USER", "Hello")
    history.add("USER", "  ")
    history.add("USER", "are you there?")
    history.add("ASSISTANT", "Yes.")
    assert replayed(history) == [("USER", "Hello are you there?"), ("ASSISTANT", "Yes.")]


def test_at_most_forty_messages_most_recent_kept() -> None:
    history = ConversationHistory()
    for i in range(60):
        history.add("USER" if i % 2 == 0 else "ASSISTANT", f"line {i}")
    blocks = replayed(history)
    assert len(blocks) <= 40
    assert blocks[-1] == ("ASSISTANT", "line 59")
    assert blocks[0][0] == "USER"


def test_total_size_stays_under_forty_kilobytes_and_long_lines_are_split() -> None:
    history = ConversationHistory()
    for i in range(30):
        history.add("USER" if i % 2 == 0 else "ASSISTANT", f"{i} " + "x" * 3000)
    blocks = replayed(history)
    total = sum(len(text.encode()) for _, text in blocks)
    assert total < 40_000
    assert blocks[0][0] == "USER"
    assert blocks[-1][1].startswith("29 ")
    events = history.events("p", names())
    assert len(json.dumps(events)) > 3 * len(blocks)  # sanity: the events exist


@given(
    st.lists(
        st.tuples(st.sampled_from(["USER", "ASSISTANT"]), st.text(max_size=2500)),
        max_size=80,
    ),
    st.integers(min_value=1, max_value=40),
    st.integers(min_value=1024, max_value=40_000),
)
@settings(max_examples=150, deadline=None)
def test_limits_hold_for_any_conversation(
    lines: list[tuple[str, str]], max_messages: int, max_bytes: int
) -> None:
    history = ConversationHistory(
        HistoryLimits(max_messages=max_messages, max_total_bytes=max_bytes)
    )
    for role, text in lines:
        history.add(role, text)  # type: ignore[arg-type]
    blocks = replayed(history)
    assert len(blocks) <= max_messages
    assert sum(len(t.encode()) for _, t in blocks) < max_bytes
    if blocks:
        assert blocks[0][0] == "USER"
    assert all(a[0] != b[0] for a, b in itertools.pairwise(blocks))
