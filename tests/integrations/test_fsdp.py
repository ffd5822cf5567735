"""FSDP2 (torch.distributed.fsdp.fully_shard) on CPU with gloo: 2 processes == 1, adapter saved sharded == unsharded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fsdp_worker
from lohakit import LoHaModel, load_state_dict

pytestmark = pytest.mark.slow
HERE = Path(__file__).parent


def test_two_sharded_processes_train_like_one_unsharded(tmp_path):
    ref = fsdp_worker.run(world=1, rank=0, out=str(tmp_path / "ref"), shard=False)
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "fsdp_worker.py"), str(tmp_path / "fsdp")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "fsdp" / "losses.json").read_text())
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)

    ours = load_state_dict(tmp_path / "ref" / "adapter_model.safetensors")
    sharded = load_state_dict(tmp_path / "fsdp" / "adapter_model.safetensors")
    assert ours.keys() == sharded.keys()
    for k in ours:
        torch.testing.assert_close(sharded[k], ours[k], rtol=1e-5, atol=1e-6)
    cfg_a = json.loads((tmp_path / "ref" / "adapter_config.json").read_text())
    cfg_b = json.loads((tmp_path / "fsdp" / "adapter_config.json").read_text())
    assert cfg_a == cfg_b

    # the sharded save is PEFT's format: PEFT and lohakit load it onto a fresh base, same outputs
    import peft

    ids = fsdp_worker.data()[0][:2]  # build() is seeded: unload() gives the same base the workers had
    mine = LoHaModel.from_pretrained(fsdp_worker.build().unload(), str(tmp_path / "fsdp"))
    theirs = peft.PeftModel.from_pretrained(fsdp_worker.build().unload(), str(tmp_path / "fsdp"))
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, mine(input_ids=ids).logits, atol=1e-5, rtol=0)
