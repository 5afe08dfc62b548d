"""Make ``tests/`` importable (its float64 references) when only ``tests/e2e`` is collected."""

import sys
from pathlib import Path

TESTS = str(Path(__file__).resolve().parents[1])
if TESTS not in sys.path:
    sys.path.insert(0, TESTS)
