"""Every Triton kernel compiles for Hopper (sm_90, H100 / H200) down to a cubin, with the dtypes and constexprs the
engine launches it with, and fits its shared memory: checked on a CPU (tests/hopper_compile.py, in a subprocess
without the interpreter). This catches what the interpreter lets through (types, layouts, shared memory); whether
the kernels are right is what the interpreter tests check, and how fast they run needs a GPU."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SHARED_MEMORY_PER_BLOCK = 227 * 1024  # opt-in maximum on sm_90
KERNELS = {"_store_kv_kernel", "_decode_partition_kernel", "_decode_merge_kernel", "_prefill_kernel", "_draw_kernel",
           "_uniform_kernel", "_embed_kernel", "_add_norm_kernel"}


def test_every_kernel_compiles_for_hopper() -> None:
    pytest.importorskip("triton.backends.nvidia", reason="this triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "VIVACE_TRITON_INTERPRET")}
    script = Path(__file__).with_name("hopper_compile.py")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    compiled = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert {c["kernel"] for c in compiled} == KERNELS
    for c in compiled:
        assert c["cubin_bytes"] > 0 and c["shared_bytes"] <= SHARED_MEMORY_PER_BLOCK, c
