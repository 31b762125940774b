"""Do two CPUs round a training step the same way?  One attention block under bf16 autocast
(forward and the weight gradient) and one fp32 matmul, computed with each CPU kernel family
oneDNN may pick, fingerprinted bit for bit.

    .venv/bin/python bench/rounding.py                 # this machine: the default and each ISA cap
    .venv/bin/python bench/rounding.py --isa default   # one fingerprint (compare across machines)

Each ISA cap runs in a fresh process with ``ONEDNN_MAX_CPU_ISA`` set (oneDNN reads it once, at
load), so one machine shows what a machine without AMX or without AVX512-BF16 would compute.
Seeded training is bit-identical where the fingerprints agree (same torch, same thread count);
where they differ, a run of thousands of steps carries the last-bit difference into other
weights, and the same seed gives other numbers (about the seed spread).  ``vlp_core.precision
.arithmetic`` records the instruction sets in every run's ``stats.json`` for that reason.
Seconds; not a test.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys

CAPS = ("default", "AVX512_CORE_AMX", "AVX512_CORE_BF16", "AVX512_CORE", "AVX2")


def fingerprint() -> dict[str, str]:
    """sha256 prefixes of a bf16 attention block's output and weight gradient, and of an fp32 matmul."""
    import torch

    torch.manual_seed(0)
    torch.set_num_threads(2)
    x, y = torch.randn(64, 32, 256), torch.randn(64, 32, 256)
    lin = torch.nn.Linear(256, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a = lin(x)
        attn = torch.softmax(a @ a.transpose(1, 2) / 16, -1) @ a
    ((attn.float() - y) ** 2).mean().backward()

    def h(t) -> str:
        return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()[:12]

    return {"bf16 forward": h(attn), "bf16 grad": h(lin.weight.grad), "fp32 matmul": h(x.reshape(-1, 256) @ lin.weight.T)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--isa", default=None, help="one oneDNN ISA cap (or 'default'): print its fingerprint only")
    a = p.parse_args()
    if a.isa:
        if a.isa != "default" and os.environ.get("ONEDNN_MAX_CPU_ISA") != a.isa:  # oneDNN reads it at load
            env = {**os.environ, "ONEDNN_MAX_CPU_ISA": a.isa}
            return subprocess.run([sys.executable, __file__, "--isa", a.isa], env=env).returncode
        print(f"{a.isa:<18} " + "  ".join(f"{k} {v}" for k, v in fingerprint().items()), flush=True)
        return 0
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from vlp_core.precision import arithmetic

    print(f"this machine: {arithmetic('cpu')}")
    for cap in CAPS:
        env = {**os.environ, **({} if cap == "default" else {"ONEDNN_MAX_CPU_ISA": cap})}
        subprocess.run([sys.executable, __file__, "--isa", cap], env=env, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
