"""Compile every gpurnn kernel to PTX on the CPU and read its registers and spills with ptxas.

    python kernels/ptx_report.py [--out kernels/results/ptx-report.json]

For each kernel of gpurnn.cuda.kernels and gpurnn.cuda.fused, float32 and float64 (and float16 and
bfloat16, as its uint16 bits, for the kernels half models launch: the recurrences and
kernels.HALF_KERNELS), sm_80 and sm_90:
numba.cuda.compile_ptx (no GPU needed) with the signature a launch on
workspace buffers compiles, then ``ptxas -v`` from the nvidia-cuda-nvcc wheel
(the same CUDA minor as the NVVM that wrote the PTX). Writes a JSON report
and prints a table; exits 1 if any kernel spills.

For the recurrences (gpurnn.cuda.fused) it also reads the machine code (``cuobjdump
-sass``, from the nvidia-cuda-cuobjdump and -nvdisasm wheels of the same extra) and
counts the instructions of the innermost loop with the most FMAs, the recurrent dot
products: at the small shapes these kernels are for, a step's time is mostly
instructions issued one after another by few warps, so instructions an FMA is the
figure to watch without a GPU (``loop_per_fma``; None without cuobjdump); and of the loop
that stages a step's h_prev or dgates rows into shared memory, the loads a thread has in
flight (``stage_loads``: a load from L2 takes hundreds of cycles) and its instructions an
element (``stage_per_element``). Every build's row lists the PTX instructions that order
memory between blocks (``memory_order``: the persistent kernels' barrier) and, where there
is a barrier, the prefetches written before it (``prefetches_before_barrier``: lost lines);
and every build's 64-bit integer divisions (``wide_divisions``).

NVVM writes the same PTX for sm_80 and sm_90 (apart from the ``.target`` line and
the names it mangles per compilation), so each build is compiled once and
assembled for both archs; ``same_ptx_for_every_arch`` checks that on one kernel
each run, so a numba-cuda that starts to tell the archs apart fails the report.
"""

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile


sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
os.environ.pop("NUMBA_ENABLE_CUDASIM", None)  # PTX needs the real compiler, not the simulator

ARCHS = ((8, 0), (9, 0))
HALF = ("float16", "bfloat16")  # kernels.numba_float names them without ml_dtypes


def find_tool(name):
    """A CUDA tool from the nvidia-* wheels (ptxas: nvidia-cuda-nvcc), else the PATH's."""
    try:
        import nvidia

        for root in nvidia.__path__:
            for sub in ("cu13/bin", "cuda_nvcc/bin", "cu12/bin"):
                path = os.path.join(root, sub, name)
                if os.path.exists(path):
                    return path
    except ImportError:
        pass
    return shutil.which(name)


def ptxas_stats(ptxas, ptx, arch, cuobjdump=None):
    """ptxas -v's figures for one build; with cuobjdump, also its FMA loop's (fma_loop)."""
    with tempfile.TemporaryDirectory() as tmp:
        src, cubin = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        done = subprocess.run([ptxas, "-v", f"-arch=sm_{arch[0]}{arch[1]}", src, "-o", cubin],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise RuntimeError(f"ptxas failed: {done.stderr.strip()}")
        sass, sass_error = None, None if cuobjdump else "no cuobjdump"
        if cuobjdump:
            dumped = subprocess.run([cuobjdump, "-sass", cubin], capture_output=True, text=True)
            if dumped.returncode == 0:
                sass = dumped.stdout
            else:  # e.g. a system cuobjdump older than the wheel's ptxas: the figures are missing, not wrong
                sass_error = f"cuobjdump failed: {dumped.stderr.strip()}"
    text = done.stderr + done.stdout

    def number(pattern):
        m = re.search(pattern, text)
        return int(m.group(1)) if m else 0

    loop_instructions, loop_fmas = fma_loop(sass) if sass else (None, None)
    stage_loads, stage_instructions = staging_loop(sass) if sass else (None, None)
    return dict(registers=number(r"Used (\d+) registers"), spill_stores=number(r"(\d+) bytes spill stores"),
                spill_loads=number(r"(\d+) bytes spill loads"), stack_frame=number(r"(\d+) bytes stack frame"),
                shared_static=number(r"(\d+) bytes smem"), loop_instructions=loop_instructions, loop_fmas=loop_fmas,
                loop_per_fma=round(loop_instructions / loop_fmas, 2) if loop_fmas else None,
                stage_loads=stage_loads, stage_per_element=round(stage_instructions / stage_loads, 1)
                if stage_loads else None, sass_error=sass_error)


def innermost_loops(sass):
    """The bodies (instruction texts, in order) of the innermost loops (a backward branch with
    no other inside it) in cuobjdump's listing of one kernel."""
    code = [(int(m.group(1), 16), m.group(2)) for m in re.finditer(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    loops = [(int(m.group(1), 16), at) for at, text in code for m in [re.search(r"\bBRA 0x([0-9a-f]+)", text)]
             if m and int(m.group(1), 16) <= at]
    return [[text for at, text in code if lo <= at <= hi] for lo, hi in loops
            if not any(lo <= a and b <= hi and (a, b) != (lo, hi) for a, b in loops)]


def fma_loop(sass):
    """(instructions, FMAs) of the innermost loop that holds the most FMAs; (0, 0) if none."""
    best = (0, 0)
    for body in innermost_loops(sass):
        fmas = sum(1 for text in body if re.search(r"\b[HFD]FMA2?\b", text))
        if fmas > best[1]:
            best = (len(body), fmas)
    return best


def staging_loop(sass):
    """(loads, instructions) of the step's staging loop (fused.stage: loads through L2,
    ``.STRONG.GPU``, into shared memory): the loads it issues before its first store, which
    is how many a thread has in flight (fused.STAGE_LOADS, if the compiler keeps them
    together), and its instructions; (0, 0) if there is no such loop."""
    for body in innermost_loops(sass):
        stores = [i for i, text in enumerate(body) if text.lstrip("@!P0123456789T ").startswith("STS")]
        loads = [i for i, text in enumerate(body) if "LDG" in text and "STRONG.GPU" in text]
        if stores and loads:
            return sum(1 for i in loads if i < stores[0]), len(body)
    return 0, 0


def builds():
    """(label, source, key, dtype) of every kernel build: source "kernels" (key: the kernel's
    name and signature label) or "fused" (key: cell, phase, algorithm)."""
    from gpurnn.cuda import kernels

    jobs = [(label, "kernels", (name, label), dtype) for name in kernels.KERNELS
            for dtype in ("float32", "float64") + (HALF if name in kernels.HALF_KERNELS else ())
            for label in kernels.signatures(name, dtype)]
    for algorithm in ("fused", "persistent"):
        jobs += [(f"{cell}_{phase} {algorithm}", "fused", (cell, phase, algorithm, False), dtype)
                 for cell in ("rnn", "lstm", "gru") for phase in ("forward", "backward")
                 for dtype in ("float32", "float64", *HALF)]
        jobs += [(f"lstm_forward {algorithm} eval", "fused", ("lstm", "forward", algorithm, True), dtype)
                 for dtype in ("float32", "float64", *HALF)]  # the cell state at time stride 0
    return jobs


def _ptx(job, arch):
    from gpurnn.backend import load_numba_cuda

    cuda = load_numba_cuda()
    from gpurnn.cuda import fused, kernels

    label, source, key, dtype = job
    if source == "kernels":
        kernel, signature = kernels.KERNELS[key[0]], kernels.signatures(key[0], dtype)[key[1]]
    else:
        cell, phase, algorithm, inference = key
        kernel = (fused.FUSED if algorithm == "fused" else fused.PERSISTENT)[cell, phase]
        signature = fused.signatures(cell, phase, algorithm, dtype, inference)
    launch_bounds = getattr(kernel, "targetoptions", {}).get("launch_bounds")  # registers follow from them
    return cuda.compile_ptx(kernel.py_func, signature, cc=arch, launch_bounds=launch_bounds)[0]


def _target(ptx, arch):
    """The PTX aimed at another arch: NVVM's output differs only in this line."""
    return re.sub(r"^\.target sm_\d+", f".target sm_{arch[0]}{arch[1]}", ptx, count=1, flags=re.MULTILINE)


def same_ptx_for_every_arch(job):
    """Does NVVM write the same PTX for every arch (names and .target aside)?"""
    def body(ptx):
        return re.sub(r"_cudapy_smem_\d+", "S", re.sub(r"_ZN\w+", "F", _target(ptx, ARCHS[0])))
    return len({body(_ptx(job, arch)) for arch in ARCHS}) == 1


def memory_order(ptx):
    """The distinct instructions of a build's PTX that order memory between blocks (fences,
    atomics, acquire and relaxed loads): what the persistent kernels' barrier is made of."""
    return sorted(set(re.findall(r"^\s*((?:membar|fence|red|atom|ld\.global\.(?:acquire|relaxed))\.[\w.]+)", ptx,
                                 re.MULTILINE)))


def prefetches_before_barrier(ptx):
    """Prefetches written before the persistent barrier's arrival (``red``) in the PTX's text:
    the barrier's acquire loads invalidate L1, so a line prefetched before it is lost (the
    kernels' loop bodies are laid out barrier first, prefetches after)."""
    arrival = re.search(r"^\s*red\.", ptx, re.MULTILINE)
    return len(re.findall(r"^\s*prefetch\.", ptx[:arrival.start()], re.MULTILINE)) if arrival else None


def wide_divisions(ptx):
    """64-bit integer divisions and remainders in a build's PTX: each a routine of ~70
    instructions on the GPU (ptxas adds a 32-bit path for small operands, with a branch),
    where a 32-bit one is ~15. numba divides Python ints in 64 bits, and range() with a
    step set at run time divides to count its trips."""
    return len(re.findall(r"^\s*(?:div|rem)\.[su]64", ptx, re.MULTILINE))


def compile_one(job, ptxas, cuobjdump):
    """Rows of one build, for each arch (run in a worker process: numba compiles in one thread)."""
    label, source, key, dtype = job
    ptx = _ptx(job, ARCHS[0])
    return [dict(kernel=label, dtype=dtype, arch=f"sm_{arch[0]}{arch[1]}", memory_order=memory_order(ptx),
                 prefetches_before_barrier=prefetches_before_barrier(ptx), wide_divisions=wide_divisions(ptx),
                 **ptxas_stats(ptxas, _target(ptx, arch), arch, cuobjdump if source == "fused" else None))
            for arch in ARCHS]


def main():
    import concurrent.futures
    import functools

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "ptx-report.json"))
    args = ap.parse_args()
    ptxas, cuobjdump = find_tool("ptxas"), find_tool("cuobjdump")
    if ptxas is None:
        sys.exit("ptxas not found: pip install nvidia-cuda-nvcc (the gpurnn[cudasim] extra)")
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    jobs = builds()
    with concurrent.futures.ProcessPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        same = pool.submit(same_ptx_for_every_arch, next(j for j in jobs if j[1] == "fused" and j[2][2] == "persistent"))
        rows = [r for done in pool.map(functools.partial(compile_one, ptxas=ptxas, cuobjdump=cuobjdump), jobs)
                for r in done]
        if not same.result():
            sys.exit("NVVM wrote different PTX for the archs: compile each build once per arch again")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(dict(ptxas=version, cuobjdump=cuobjdump, rows=rows), f, indent=1)
    print(f"{'kernel':<27}{'dtype':<9}{'arch':<7}{'regs':>5}{'spill st':>10}{'spill ld':>10}{'stack':>7}{'smem':>6}"
          f"{'loop/FMA':>9}")
    for r in rows:
        per_fma = "" if r["loop_per_fma"] is None else f"{r['loop_per_fma']:.1f}"
        print(f"{r['kernel']:<27}{r['dtype']:<9}{r['arch']:<7}{r['registers']:>5}{r['spill_stores']:>10}"
              f"{r['spill_loads']:>10}{r['stack_frame']:>7}{r['shared_static']:>6}{per_fma:>9}")
    if cuobjdump is None:
        print("cuobjdump not found (pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm): no loop/FMA column")
    print("Fused and persistent blocks also use dynamic shared memory (fused.shared_bytes: the staged "
          "h_prev or dgates rows, after a persistent block's G*units*H elements of W_hh; at most 48 KiB); "
          "with the registers above it decides how many blocks fit on an SM (CudaOps.persistent_plan asks "
          "the driver on the GPU).")
    spilling = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    if spilling:
        sys.exit(f"{len(spilling)} kernel builds spill registers")


if __name__ == "__main__":
    main()
