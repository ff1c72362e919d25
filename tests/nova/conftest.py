"""Everything under tests/nova is a Nova Sonic test (``-m nova`` selects them).

Modules that need the AWS SDK skip themselves on Python < 3.12 with
``pytest.importorskip``; the pure cores run everywhere.
"""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/nova/" in item.nodeid.replace("\\", "/"):
            item.add_marker(pytest.mark.nova)
