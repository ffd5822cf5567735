"""Print max abs / rel error of lohakit vs PEFT's LoHa per test case (same factor values).

Usage: .venv/bin/python scripts/peft_parity.py
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

import torch  # noqa: E402

from test_peft_parity import PEFT_CASES, parity  # noqa: E402


def main() -> None:
    print(f"{'case':28s} {'path':13s} {'max abs err':>12s} {'max rel err':>12s}")
    for case in PEFT_CASES:
        for path in ("factored", "materialised", "auto"):
            torch.manual_seed(0)
            a, r = parity(case, path, r=4, alpha=6.0)
            print(f"{case.name:28s} {path:13s} {a:12.3e} {r:12.3e}")


if __name__ == "__main__":
    main()
