"""The compile gate (tests/compile_gate.py): every Triton kernel, as the public ops launch it, compiled for
sm_80, sm_89 and sm_90 without a GPU, and the CUDA sources with nvcc; plus the loop-name lint.

``python -m pytest tests/test_compile_gate.py -s`` prints the resource table.
"""

import importlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from tests import compile_gate as gate
from tests.kernel_lint import reused_loop_names

TARGETS = tuple(gate.SMEM_PER_BLOCK)
NVCC_ARCHS = (80, 90)


def jit_functions():
    """Every @triton.jit function defined in duo_kernels.triton (kernels and device helpers)."""
    out = []
    for module in gate.KERNEL_MODULES + ("normal",):
        mod = importlib.import_module(f"duo_kernels.triton.{module}")
        out += [f for f in vars(mod).values() if hasattr(f, "fn") and f.fn.__module__ == mod.__name__]
    return out


def test_no_kernel_rebinds_a_loop_carried_name():
    problems = [p for fn in jit_functions() for p in reused_loop_names(fn)]
    assert not problems, "\n".join(problems)


def test_the_lint_finds_a_reused_name(tmp_path, monkeypatch):
    """The pattern that broke the sampling kernel's compilation: ``_`` of [R] words re-bound to [R, V] words
    inside a loop. The lint flags it; an accumulator (read before it is re-bound) is fine."""
    source = textwrap.dedent('''
        def kernel(seed, n):
            w0, _ = pair(seed)
            acc = w0
            for i in range(n):
                g0, _ = pair(seed + i)
                acc = acc + g0
            return acc
        ''')
    (tmp_path / "lint_sample.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    sample = importlib.import_module("lint_sample")
    problems = reused_loop_names(sample.kernel)
    assert len(problems) == 1 and "'_'" in problems[0], problems


def _ptxas_available() -> bool:
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        return Path(get_ptxas(80).path).exists()
    except Exception:
        return False


@pytest.mark.skipif(torch.cuda.is_available(), reason="records launches in the Triton interpreter (no GPU)")
def test_compile_gate(tmp_path):
    """Record the public ops' launches for each target, compile them, read ptxas; compile csrc/cuda with
    nvcc. Fails on a compile error, spills over budget, shared memory over the target's per-block limit, or
    a compiled signature that depends on a seed or counter value."""
    if not _ptxas_available():
        pytest.skip("no ptxas for the CUDA backend of triton")
    launches = []
    for target in TARGETS:
        with gate.record_launches(target, launches):
            gate.exercise_public_ops()
    missing = set(gate.launch_kernels()) - {launch["kernel"] for launch in launches}
    assert not missing, f"kernels no public op launched in the gate: {sorted(missing)}"
    path = tmp_path / "launches.json"
    path.write_text(json.dumps(gate.unique_launches(launches)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-m", "tests.compile_gate", str(path)], env=env, capture_output=True,
                          text=True, timeout=1200, cwd=gate.ROOT)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads(done.stdout)
    if shutil.which("nvcc"):
        for source in sorted((gate.ROOT / "csrc" / "cuda").glob("*.cu")):
            for arch in NVCC_ARCHS:
                rows += gate.nvcc_resources(source, arch)
    else:
        print("\nnvcc not found: csrc/cuda/*.cu not compiled")
    print("\n" + gate.table(rows))
    problems = gate.failures(rows)
    assert not problems, "\n".join(problems)
