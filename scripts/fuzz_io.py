"""The long run of issue 14's reliability properties (the CI run is tests/formats/test_reliability.py).

Runs the same tests with many more hypothesis examples (random, not derandomized), longer
reader/writer races (60 s each), 100 two-writer trials, and every crash/failure point of a save,
then prints the outcome counts and any failure.

Usage:
    .venv/bin/python scripts/fuzz_io.py --examples 20000
    .venv/bin/python scripts/fuzz_io.py --examples 2000 -k mutated      # a subset (pytest -k)

Exit status 0 when every property held, 1 otherwise.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


class _Collect:
    """A pytest plugin keeping the per-test outcomes and the test module's COUNTS."""

    def __init__(self) -> None:
        self.results: dict[str, tuple[str, float]] = {}
        self.counts: dict[str, int] = {}

    def pytest_runtest_logreport(self, report) -> None:
        if report.when == "call" or (report.when == "setup" and report.outcome != "passed"):
            self.results[report.nodeid] = (report.outcome, report.duration)

    def pytest_sessionfinish(self, session) -> None:
        module = sys.modules.get("tests.formats.test_reliability") or sys.modules.get("test_reliability")
        if module is not None:
            self.counts = dict(module.COUNTS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=20000, help="hypothesis examples per property (default 20000)")
    parser.add_argument("-k", default=None, help="pytest -k expression selecting tests")
    args = parser.parse_args()
    os.environ["LOHAKIT_FUZZ_EXAMPLES"] = str(args.examples)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import pytest

    plugin = _Collect()
    argv = ["-q", "-p", "no:cacheprovider", str(ROOT / "tests" / "formats" / "test_reliability.py")]
    if args.k:
        argv += ["-k", args.k]
    t0 = time.monotonic()
    code = pytest.main(argv, plugins=[plugin])
    elapsed = time.monotonic() - t0
    print(f"\n=== fuzz_io: --examples {args.examples}, {elapsed:.0f} s ===")
    failed = [n for n, (o, _) in plugin.results.items() if o == "failed"]
    print(f"tests: {len(plugin.results)} run, {len(failed)} failed")
    for n in failed:
        print(f"  FAILED {n}")
    families: dict[str, dict[str, int]] = {}
    for key, n in sorted(plugin.counts.items()):
        family, _, outcome = key.partition("/")
        families.setdefault(family, {})[outcome] = n
    for family, outcomes in families.items():
        total = sum(outcomes.values())
        shown = ", ".join(f"{k} {v}" for k, v in outcomes.items())
        print(f"  {family:26s} {total:7d}  {shown}")
    return 0 if code == 0 and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
