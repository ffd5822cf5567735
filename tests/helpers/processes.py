"""Running the ``lohakit`` command as a user does: in a subprocess, interrupted with Ctrl-C."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def lohakit_ctrl_c_after(argv: list[str], out: Path, steps: int, timeout: float = 120) -> tuple[int, str]:
    """Start ``python -m lohakit *argv``, send SIGINT once ``out/metrics.jsonl`` has ``steps`` step
    records (or the process ended), and return ``(exit code, stderr)``."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "lohakit", *argv], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    try:
        deadline = time.time() + timeout
        while time.time() < deadline and proc.poll() is None:
            if metrics.is_file() and sum('"loss"' in line for line in metrics.read_text().splitlines()) >= steps:
                break
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, err


def last_checkpoint_state(out: Path) -> dict | None:
    """trainer_state.json of the highest complete checkpoint in ``out``."""
    from lohakit.app.runs import find_last_checkpoint

    ck = find_last_checkpoint(out)
    return None if ck is None else {**json.loads((ck / "trainer_state.json").read_text()), "_dir": ck}
