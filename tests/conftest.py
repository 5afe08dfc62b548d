"""The test suite's two tiers.

``python -m pytest tests`` runs everything (what CI runs). ``python -m pytest tests -m "not slow"``
is the quick tier for after each change: every module at world sizes 1 and 2, and one run
through the ``deepspeed`` launcher. A test is slow when

* it runs through the launcher (``e2e``), except :data:`QUICK_LAUNCHES`;
* it runs at a world size above 2 (a ``world_size`` parameter, or ``world3``/``on4`` in its id);
* it is marked ``@pytest.mark.slow`` (a long variant of a case the quick tier covers).
"""

from __future__ import annotations

import re

import pytest

QUICK_LAUNCHES = {"test_readme_python_blocks_run_under_the_launcher"}
"""The launcher runs in the quick tier: the README's own script, trained, saved and resumed."""

QUICK_WORLD_SIZES = (1, 2)
WORLD_SIZE_ID = re.compile(r"^(?:world|on)(\d+)$")
"""How a test's id names the ranks of a fixture parametrised over world sizes (``[world3-full]``)."""


def _world_size(item: pytest.Item) -> int | None:
    """The largest world size a test runs at: its ``world_size`` parameter or a ``world<N>`` /
    ``on<N>`` part of its id; None when it names none."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return None
    sizes = [int(m.group(1)) for part in callspec.id.split("-") if (m := WORLD_SIZE_ID.match(part))]
    if isinstance(callspec.params.get("world_size"), int):
        sizes.append(callspec.params["world_size"])
    return max(sizes, default=None)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        launched = item.get_closest_marker("e2e") is not None and item.originalname not in QUICK_LAUNCHES
        world_size = _world_size(item)
        if launched or (world_size is not None and world_size not in QUICK_WORLD_SIZES):
            item.add_marker(pytest.mark.slow)
