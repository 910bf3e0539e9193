"""The compile gate: every Triton kernel as the public ops launch it, compiled for real GPUs without one.

The interpreter runs a kernel's Python, not the compiled kernel; this module compiles what a GPU would.

1. :func:`record_launches` runs the public ops on small CPU tensors in the interpreter with the tiles of
   a GPU target (:func:`duo_kernels.triton.target.tiled_for`) and records every kernel launch (the
   arguments' types, alignment and values, the constexprs and options) instead of running it. The
   variants therefore come from the real launch sites; :func:`exercise_public_ops` lists the op calls
   (dtypes, top_p on/off, k buckets, optional tensors, both matmul precisions).
2. ``python -m tests.compile_gate LAUNCHES.json`` (a process without ``TRITON_INTERPRET``) specialises
   each launch with Triton's own binder for the CUDA backend, compiles it for the target with
   ``triton.compile`` and reads ``ptxas -v``: registers, stack, spill stores/loads; shared memory from
   the compiled metadata. It also binds every seeded launch with other seed (and counter) values and
   reports whether the compiled signature changed. Results are cached by Triton's source hash of the
   kernel, the specialisation and the target, under ``$DUO_KERNELS_CACHE/compile-gate``.
3. :func:`nvcc_resources` compiles ``csrc/cuda/*.cu`` with ``nvcc -Xptxas -v`` per architecture.

Budgets: spills (stores + loads, bytes per thread) may not exceed ``SPILL_BUDGETS[kernel name]`` of the
kernel's module (0 if absent; a non-zero budget needs the measurement in a comment next to it), and
shared memory may not exceed the target's per-block limit (:data:`SMEM_PER_BLOCK`).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import hashlib
import importlib
import io
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The GPU targets (compute capability x 10) and their shared memory per block with opt-in, in bytes
# (CUDA C++ Programming Guide, "Technical Specifications per Compute Capability": 163 KB on 8.0,
# 99 KB on 8.6 / 8.9, 227 KB on 9.0).
SMEM_PER_BLOCK = {80: 166912, 89: 101376, 90: 232448}
# Seed and counter values a seeded kernel is bound with: the compiled signature must not change.
SEED_VALUES = (0, 1, 16, 17, 2**31 + 16, 2**40 + 3, 2**63 + 16, 2**64 - 1)
COUNTER_VALUES = (0, 1, 16, 17, 2**31 + 16, 2**62 + 3)
COUNTER_NAMES = ("offset", "component_counter")
KERNEL_MODULES = ("curriculum", "curriculum_embedding", "dcd", "forward_process", "nelbo", "rng", "sampling")


# ---- 1. recording (in the interpreter) ---------------------------------------------------------------

def _describe(value):
    import torch
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        return {"tensor": str(value.dtype).removeprefix("torch."), "aligned": value.data_ptr() % 16 == 0}
    if isinstance(value, tl.dtype):
        return {"tl_dtype": value.name}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot record a kernel argument of type {type(value).__name__}")


@contextlib.contextmanager
def record_launches(capability: int, launches: list):
    """Within this block, Triton launches on CPU tensors are tiled for ``capability`` (80, 89, 90) and
    appended to ``launches`` instead of running (their outputs stay uninitialised)."""
    from triton.runtime.interpreter import InterpretedFunction

    from duo_kernels.triton.target import tiled_for

    def run(self, *args, grid, warmup, **kwargs):
        launches.append({"kernel": f"{self.fn.__module__}.{self.fn.__name__}", "target": capability,
                         "args": [_describe(a) for a in args],
                         "kwargs": {k: _describe(v) for k, v in kwargs.items()}})

    original = InterpretedFunction.run
    InterpretedFunction.run = run
    try:
        with tiled_for(divmod(capability, 10)):
            yield launches
    finally:
        InterpretedFunction.run = original


def exercise_public_ops():
    """Call every public op that has a Triton kernel in each launch variant it can produce."""
    import torch

    import duo_kernels as dk

    t = "triton"
    v_row, b, length = 50257, 2, 3  # odd V: GPT-2's vocabulary
    x0 = torch.randint(0, v_row, (b, length))
    gamma = torch.zeros(b, length, dtype=torch.float64)
    mask = torch.ones(b, length, dtype=torch.bool)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        logits = torch.zeros(b, length, v_row, dtype=dtype, requires_grad=True)
        for top_p in (1.0, 0.9):
            dk.ancestral_step(logits.detach(), x0, 0.5, 0.9, top_p=top_p, seed=1, impl=t)
        for probs in (False, True):
            dk.greedy_tail(logits.detach(), x0, return_probs=probs, impl=t)
        for keep in (None, mask):
            dk.usdm_nelbo(logits, x0, x0, torch.full((b, length), 0.5, dtype=torch.float64),
                          torch.full((b, length), -1.0, dtype=torch.float64), mask=keep, impl=t).sum().backward()
            for direction in ("reverse", "forward"):
                dk.dcd_kl(logits, logits.detach().float(), direction=direction, mask=keep, impl=t).sum().backward()
    d = 768
    for k in (1, 2, 3, 5, 9, 17, 33, 65, 128):  # every power-of-two bucket of k <= 128
        for compat in (False, True) if k > 1 else (False,):  # reference_compat needs k >= 2
            dk.tempered_softmax_topk(x0, gamma, v_row, k, 0.3, reference_compat=compat, seed=2, impl=t)
    ids = torch.randint(0, v_row, (b, length, 8))
    for wdtype in (torch.float32, torch.float64):  # relaxed_embedding consumes the top-k above
        weight = torch.zeros(v_row, d, dtype=wdtype, requires_grad=True)
        weights = torch.zeros(b, length, 8, requires_grad=True)
        for deterministic in (False, True):
            dk.relaxed_embedding(weight, ids, weights, deterministic=deterministic, impl=t).sum().backward()
    for wdtype in (torch.float32, torch.bfloat16):
        weight = torch.zeros(v_row, d, dtype=wdtype, requires_grad=True)
        for precision in ("highest", "high"):
            previous = torch.get_float32_matmul_precision()
            torch.set_float32_matmul_precision(precision)
            try:
                h = dk.tempered_softmax_embedding(x0, gamma, 0.3, weight, seed=4, impl=t)[0]
                h.sum().backward()
            finally:
                torch.set_float32_matmul_precision(previous)
    dk.gaussian_argmax(x0, gamma, v_row, seed=5, impl=t)
    dk.gaussian_argmax_pair(x0, gamma, gamma, v_row, seed=5, impl=t)
    dk.usdm_forward(x0, torch.full((b, length), 0.5, dtype=torch.float64), v_row, seed=5, impl=t)
    for dtype in (torch.float32, torch.float64):
        dk.rng.uniform((5,), seed=6, dtype=dtype, impl=t)
        dk.rng.normal((5,), seed=6, dtype=dtype, impl=t)
    dk.rng.randint((5,), v_row, seed=6, impl=t)


def launch_kernels() -> list[str]:
    """Qualified names of every Triton kernel the library launches (``*_kernel`` in duo_kernels.triton)."""
    names = []
    for module in KERNEL_MODULES:
        mod = importlib.import_module(f"duo_kernels.triton.{module}")
        names += [f"{mod.__name__}.{n}" for n, f in vars(mod).items()
                  if n.endswith("_kernel") and hasattr(f, "fn") and f.fn.__module__ == mod.__name__]
    return sorted(names)


def unique_launches(launches: list) -> list:
    seen, out = set(), []
    for launch in launches:
        key = json.dumps(launch, sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append(launch)
    return out


# ---- 2. compiling (a process without TRITON_INTERPRET) --------------------------------------------------

class _MockTensor:
    """What Triton's binder reads of a tensor argument: its dtype and address (alignment)."""

    def __init__(self, dtype: str, aligned: bool):
        import torch

        self.dtype = getattr(torch, dtype)
        self._ptr = 0 if aligned else 8

    def data_ptr(self):
        return self._ptr


def _materialise(value):
    import triton.language as tl

    if isinstance(value, dict) and "tensor" in value:
        return _MockTensor(value["tensor"], value["aligned"])
    if isinstance(value, dict) and "tl_dtype" in value:
        return tl.str_to_ty(value["tl_dtype"], None)
    return value


def _kernel(qualified: str):
    module, name = qualified.rsplit(".", 1)
    return importlib.import_module(module), getattr(importlib.import_module(module), name)


def _bind(kernel, backend, args, kwargs):
    from triton.runtime.jit import create_function_from_signature

    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    return binder(*args, **kwargs)


def _seed_check(kernel, backend, args, kwargs) -> str:
    """'' if rebinding the seed / counters with other values leaves the specialisation unchanged, else
    the parameters whose values change it."""
    names = [p.name for p in kernel.params]
    _, reference, _ = _bind(kernel, backend, args, kwargs)
    changed = []
    for name, values in [("seed", SEED_VALUES)] + [(c, COUNTER_VALUES) for c in COUNTER_NAMES]:
        if name not in names:
            continue
        i = names.index(name)
        for value in values:
            if i < len(args):
                trial_args, trial_kwargs = list(args), dict(kwargs)
                trial_args[i] = value
            else:
                trial_args, trial_kwargs = list(args), {**kwargs, name: value}
            _, spec, _ = _bind(kernel, backend, trial_args, trial_kwargs)
            if spec != reference:
                changed.append(f"{name}={value}: {spec[i]} vs {reference[i]}")
                break
    return "; ".join(changed)


_PTXAS_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_PTXAS_REGS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> dict:
    """Registers, stack frame and spill bytes of the (single) entry function of a ``ptxas -v`` log."""
    frame = _PTXAS_FRAME.findall(log)
    regs = _PTXAS_REGS.findall(log)
    if not frame or not regs:
        raise ValueError(f"no resource usage in the ptxas log:\n{log}")
    stack, stores, loads = (max(int(f[i]) for f in frame) for i in range(3))
    return {"registers": max(map(int, regs)), "stack": stack, "spill_stores": stores, "spill_loads": loads}


def _cache_dir() -> Path:
    return Path(os.environ.get("DUO_KERNELS_CACHE", Path.home() / ".cache" / "duo_kernels")) / "compile-gate"


def _write_atomically(path: Path, text: str) -> None:
    """A killed run leaves no partial cache entry."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas): a compile's cost on an idle machine."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def compile_launch(launch: dict) -> dict:
    """Compile one recorded launch for its target; the row of the resource table (cached)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend

    module, kernel = _kernel(launch["kernel"])
    target = GPUTarget("cuda", launch["target"], 32)
    backend = make_backend(target)
    args = [_materialise(a) for a in launch["args"]]
    kwargs = {k: _materialise(v) for k, v in launch["kwargs"].items()}
    bound, specialization, _ = _bind(kernel, backend, args, kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, dict(kwargs), bound, specialization, None)
    variant = {n: (s[0] if s[0] != "constexpr" else repr(bound[n])) for n, s in zip(signature, specialization)}
    row = {"kernel": launch["kernel"].rsplit(".", 1)[1], "target": launch["target"],
           "variant": variant,
           "num_warps": options.num_warps, "num_stages": options.num_stages,
           "budget": getattr(module, "SPILL_BUDGETS", {}).get(kernel.fn.__name__, 0),
           "seed_dependent": _seed_check(kernel, backend, args, kwargs)}
    key = hashlib.sha256(json.dumps([triton.__version__, kernel.cache_key, str(specialization),
                                     sorted(options.__dict__.items(), key=str), launch["target"]],
                                    default=str).encode()).hexdigest()
    cached = _cache_dir() / f"{key}.json"
    if cached.exists():
        return {**row, **json.loads(cached.read_text())}
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a hit in Triton's own cache would run no ptxas, so give no log
    log = io.StringIO()
    start = _cpu_seconds()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                      options=options.__dict__)
        result = {**parse_ptxas(log.getvalue()), "smem": compiled.metadata.shared, "error": "",
                  "cpu_seconds": round(_cpu_seconds() - start, 1)}
    except Exception as exc:  # the gate reports every failure in its table
        return {**row, "error": f"{type(exc).__name__}: {exc}"[:2000]}
    _write_atomically(cached, json.dumps(result))
    return {**row, **result}


def _compile_key(launch: dict) -> str:
    """The compiled variant of a launch: its kernel, target and Triton specialisation."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend

    _, kernel = _kernel(launch["kernel"])
    backend = make_backend(GPUTarget("cuda", launch["target"], 32))
    args = [_materialise(a) for a in launch["args"]]
    kwargs = {k: _materialise(v) for k, v in launch["kwargs"].items()}
    _, specialization, options = _bind(kernel, backend, args, kwargs)
    return json.dumps([launch["kernel"], launch["target"], str(specialization), sorted(options.items())],
                      default=str)


def compile_all(launches: list, workers: int) -> list[dict]:
    """One row per compiled variant (launches that differ only in values Triton does not specialise on
    compile once)."""
    variants = {}
    for launch in launches:
        variants.setdefault(_compile_key(launch), launch)
    with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(compile_launch, variants.values()))


# ---- 3. nvcc ---------------------------------------------------------------------------------------------

# Spill budgets (bytes per thread, stores + loads) of the CUDA kernels; 0 unless measured and justified.
CUDA_SPILL_BUDGETS: dict[str, int] = {}


def nvcc_resources(source: Path, arch: int, nvcc: str = "nvcc") -> list[dict]:
    """One row per kernel of ``source`` compiled for ``sm_{arch}`` with ``-Xptxas -v``."""
    includes = [f"-I{ROOT / 'csrc' / 'include'}"]  # the CUDA sources need no torch headers
    cmd = [nvcc, "-cubin", str(source), "-o", os.devnull, f"-arch=sm_{arch}", "-O3", "-std=c++17", "-Xptxas", "-v",
           "--expt-relaxed-constexpr", *includes]
    sources = sorted((ROOT / "csrc" / "include").rglob("*.h")) + sorted(source.parent.glob("*.h")) + [source]
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256(json.dumps([version, cmd[3:]] + [p.read_text() for p in sources]).encode()).hexdigest()
    cached = _cache_dir() / f"nvcc-{key}.json"
    if cached.exists():
        return json.loads(cached.read_text())
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        return [{"kernel": source.name, "target": arch, "error": done.stderr[-3000:]}]
    rows = []
    for block in re.split(r"ptxas info\s*: Compiling entry function ", done.stderr)[1:]:
        name = re.match(r"'([^']+)'", block).group(1)
        rows.append({"kernel": f"{source.name}:{_demangle(name)}", "target": arch,
                     **parse_ptxas(block), "smem": int((re.findall(r"(\d+) bytes smem", block) or [0])[0]),
                     "budget": CUDA_SPILL_BUDGETS.get(_demangle(name), 0), "error": "", "seed_dependent": ""})
    _write_atomically(cached, json.dumps(rows))
    return rows


def _demangle(name: str) -> str:
    done = subprocess.run(["c++filt", name], capture_output=True, text=True)
    full = (done.stdout.strip() or name).replace("(anonymous namespace)::", "").removeprefix("void ")
    return full.split("(")[0]


# ---- the table -------------------------------------------------------------------------------------------

def failures(rows: list[dict]) -> list[str]:
    out = []
    for r in rows:
        where = f"{r['kernel']} sm_{r['target']} {r.get('variant', '')}"
        if r.get("error"):
            out.append(f"{where}: compile error: {r['error']}")
            continue
        spills = r["spill_stores"] + r["spill_loads"]
        if spills > r["budget"]:
            out.append(f"{where}: {spills} B of spills per thread, budget {r['budget']} B")
        if r["smem"] > SMEM_PER_BLOCK[r["target"]]:
            out.append(f"{where}: {r['smem']} B of shared memory, the sm_{r['target']} limit is "
                       f"{SMEM_PER_BLOCK[r['target']]} B")
        if r.get("seed_dependent"):
            out.append(f"{where}: the compiled signature depends on {r['seed_dependent']}")
    return out


def table(rows: list[dict]) -> str:
    lines = [f"{'kernel':<42} {'sm':>3} {'regs':>4} {'stack':>6} {'spill st/ld':>13} {'smem':>7} "
             f"{'budget':>6} {'cpu s':>6}  variant"]
    for r in sorted(rows, key=lambda r: (r["kernel"], r["target"], json.dumps(r.get("variant", {})))):
        if r.get("error"):
            lines.append(f"{r['kernel']:<42} {r['target']:>3} ERROR {r['error'].splitlines()[0][:120]}")
            continue
        pointers = "/".join(sorted({v[1:] for v in r.get("variant", {}).values() if str(v).startswith("*")}))
        shown = [f"{k}={v}" for k, v in r.get("variant", {}).items()
                 if k[:1].isupper() or k in ("seed", "inv_tau", "top_p")]
        variant = ", ".join([f"*{pointers}"] * bool(pointers) + shown)
        lines.append(f"{r['kernel']:<42} {r['target']:>3} {r['registers']:>4} {r['stack']:>6} "
                     f"{r['spill_stores']:>6}/{r['spill_loads']:<6} {r['smem']:>7} {r['budget']:>6} "
                     f"{r.get('cpu_seconds', '-'):>6}  w{r.get('num_warps', '-')} s{r.get('num_stages', '-')} "
                     f"{variant}")
    cpu = sum(r.get("cpu_seconds", 0) for r in rows)
    lines.append(f"{len(rows)} compiled variants, {sum(bool(r.get('error')) for r in rows)} compile errors; "
                 f"Triton compiles took {cpu:.0f} CPU seconds when first built (cached since)")
    return "\n".join(lines)


if __name__ == "__main__":
    launches = json.loads(Path(sys.argv[1]).read_text())
    workers = int(os.environ.get("DUO_GATE_WORKERS", min(2, os.cpu_count() or 1)))
    json.dump(compile_all(launches, workers), sys.stdout)
