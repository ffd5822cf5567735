"""Multi-process training on CPU: ``accelerate launch --multi_gpu --num_processes 2 -m lohakit train``.

On a machine without GPUs accelerate runs the two processes with torchrun and the gloo backend
(lohakit asks accelerate for ``cpu=True`` when no accelerator is present, which is what makes
accelerate pick multi-CPU DDP). Checks: both ranks hold bit-identical adapter weights (a
digest of every trainable tensor, gathered from each rank into trainer_state.json), each
checkpoint is written once (by rank 0, no temporary leftovers, one metrics line per step), and
the per-step loss equals a 1-process run with the same global batch (2 × 2 = 1 × 4) within
float32 tolerance (1e-5 relative: all-reduce sums gradients in another order).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lohakit.app.cli import main

pytestmark = pytest.mark.slow

PROSE = ("Hadamard products of low-rank matrices reach high rank with few parameters. " * 40)


def _accelerate() -> list[str]:
    exe = Path(sys.executable).with_name("accelerate")
    if exe.is_file():
        return [str(exe)]
    return [sys.executable, "-m", "accelerate.commands.launch"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("mp")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)).save_pretrained(str(d / "model"))
    (d / "data.txt").write_text(PROSE)
    return d


def _args(d: Path, out: Path, batch: int) -> list[str]:
    return ["train", "--model", str(d / "model"), "--data", str(d / "data.txt"), "--output-dir", str(out),
            "--max-steps", "4", "--seq-len", "32", "--batch-size", str(batch), "--eval-every", "2", "--save-every", "2",
            "-r", "2", "--target-modules", "q_proj,v_proj", "--lr", "1e-2", "--no-progress"]


def _losses(out: Path) -> list[float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    return [r["loss"] for r in lines if "loss" in r]


def test_two_processes_match_one(setup):
    d = setup
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", ACCELERATE_DISABLE_RICH="1")
    env.pop("WORLD_SIZE", None)
    cmd = [*_accelerate(), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", "0", "-m", "lohakit", *_args(d, d / "two", batch=2)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    two = d / "two"
    for step in (2, 4):
        ck = two / f"checkpoint-{step}"
        st = json.loads((ck / "trainer_state.json").read_text())
        assert st["world_size"] == 2
        digests = st["replica_digests"]
        assert len(digests) == 2 and digests[0] == digests[1], digests  # both ranks hold identical adapters
        assert {p.name for p in ck.iterdir()} == {"adapter_config.json", "adapter_model.safetensors", "optimizer.safetensors", "trainer_state.json"}
    assert not [p.name for p in two.iterdir() if p.name.startswith(".")]  # no temporary leftovers
    assert [r["step"] for r in map(json.loads, (two / "metrics.jsonl").read_text().splitlines()) if "loss" in r] == [1, 2, 3, 4]
    assert r.stdout.count("done:") == 1  # rank 0 reports once

    assert main(_args(d, d / "one", batch=4)) == 0
    torch.testing.assert_close(torch.tensor(_losses(two)), torch.tensor(_losses(d / "one")), rtol=1e-5, atol=1e-6)
    from lohakit import load_state_dict

    a = load_state_dict(two / "adapter_model.safetensors")
    b = load_state_dict(d / "one" / "adapter_model.safetensors")
    assert a and a.keys() == b.keys()  # the loop below must not pass vacuously
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def _launch(d: Path, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", ACCELERATE_DISABLE_RICH="1")
    env.pop("WORLD_SIZE", None)
    cmd = [*_accelerate(), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", "0", "-m", "lohakit", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_fsdp_two_processes_match_one_and_resume(setup):
    """--fsdp: FSDP2 over gloo; same losses and adapter as one process, and a sharded resume continues them."""
    import shutil

    d = setup
    r = _launch(d, _args(d, d / "fsdp", batch=2) + ["--fsdp"])
    assert r.returncode == 0, r.stderr[-3000:]
    fs = d / "fsdp"
    st = json.loads((fs / "checkpoint-2" / "trainer_state.json").read_text())
    assert st["world_size"] == 2 and st["replica_digests"][0] == st["replica_digests"][1]
    one = d / "one-ref"
    assert main(_args(d, one, batch=4)) == 0
    torch.testing.assert_close(torch.tensor(_losses(fs)), torch.tensor(_losses(one)), rtol=1e-5, atol=1e-6)
    from lohakit import load_state_dict

    a, b = load_state_dict(fs / "adapter_model.safetensors"), load_state_dict(one / "adapter_model.safetensors")
    assert a and a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    # resume from checkpoint-2 under FSDP: the full optimizer state is cut into shards again
    part = d / "fsdp-part"
    part.mkdir()
    shutil.copytree(fs / "checkpoint-2", part / "checkpoint-2")
    lines = [x for x in (fs / "metrics.jsonl").read_text().splitlines() if x.strip() and json.loads(x)["step"] <= 2]
    (part / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    r = _launch(d, _args(d, part, batch=2) + ["--fsdp", "--resume"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "resumed from checkpoint-2 (step 2 of 4)" in r.stdout
    torch.testing.assert_close(torch.tensor(_losses(part)), torch.tensor(_losses(fs)), rtol=1e-6, atol=1e-7)
