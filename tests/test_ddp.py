"""DDP: ``torchrun --nproc_per_node=2`` on the CPU (gloo) keeps both ranks' weights equal."""
from __future__ import annotations

import csv
import os
import socket
import subprocess
import sys


from vlp_core.io import read_json


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_ranks_on_cpu_keep_equal_weights(tiny_world, tmp_path):
    out = tmp_path / "ddp"
    overrides = ["pretrain.steps=4", "pretrain.batch_size=16", "pretrain.warmup_steps=1", "pretrain.log_every=1",
                 "pretrain.checkpoint_every=2", "model.vocab_size=128"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes=1", "--nproc_per_node=2",
           "--master_addr=127.0.0.1", f"--master_port={_free_port()}",
           "-m", "vlp_core.cli", "pretrain", "--train", f"{tiny_world / 'web.parquet'}:web",
           "--out", str(out), "--params", str(tmp_path / "none.yaml")]
    (tmp_path / "none.yaml").write_text("{}\n")
    for o in overrides:
        cmd += ["-S", o]
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stats = read_json(out / "stats.json")
    hashes = stats["extra"]["rank_state_sha256"]
    assert stats["extra"]["world_size"] == 2 and len(hashes) == 2
    assert stats["extra"]["rank_param_sha256"][0] == stats["extra"]["rank_param_sha256"][1], "ranks diverged"
    assert hashes[0] == hashes[1], "buffers differ after the final sync"
    assert stats["extra"]["steps"] == 4
    rows = list(csv.DictReader((out / "loss.csv").open()))
    assert [int(r["step"]) for r in rows] == [1, 2, 3, 4]  # written once, by rank 0
    assert (out / "model" / "config.json").is_file()
