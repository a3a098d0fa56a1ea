"""Every kernel compiles to PTX for sm_80 and sm_90 on the CPU, ptxas reports no spills, and the
recurrences' dot-product loops stay lean in machine code."""

import importlib.util
import json
import os
import subprocess
import sys
import warnings

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_every_kernel_compiles_without_spills(tmp_path):
    if importlib.util.find_spec("numba_cuda") is None:  # found, not imported: keeps this process's numba mode
        pytest.skip("needs numba-cuda (the gpurnn[cudasim] extra)")
    out = tmp_path / "ptx-report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("NUMBA_ENABLE_CUDASIM", "GPURNN_BACKEND")}
    done = subprocess.run([sys.executable, os.path.join(ROOT, "kernels", "ptx_report.py"), "--out", str(out)],
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads(out.read_text())
    rows = report["rows"]
    kernels = [f"{cell}_{pass_}" for cell in ("rnn", "lstm", "gru") for pass_ in ("forward", "backward")]
    projection = ["lstm_forward eval projected", "project_forward", "project_backward"]  # torch's proj_size
    kernels += ["lstm_forward eval", "gru_forward eval", "adam_update", "gather_rows", "one_hot", "softmax_xent"]
    kernels += projection
    recurrences = [f"{cell}_{pass_} {algorithm}" for cell in ("rnn", "lstm", "gru") for pass_ in ("forward", "backward")
                   for algorithm in ("fused", "persistent")]
    recurrences += [f"lstm_forward {algorithm} eval" for algorithm in ("fused", "persistent")]
    half = [f"{cell}_{pass_}" for cell in ("rnn", "lstm", "gru") for pass_ in ("forward", "backward")]
    half += ["lstm_forward eval", "gru_forward eval", "gather_rows", "one_hot"]  # half models
    half += recurrences + projection
    builds = {(r["kernel"], r["dtype"], r["arch"]) for r in rows}
    assert builds == {(k, d, a) for k in kernels + recurrences for d in ("float32", "float64")
                      for a in ("sm_80", "sm_90")} | {(k, d, a) for k in half for d in ("float16", "bfloat16")
                                                       for a in ("sm_80", "sm_90")}
    for r in rows:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        if {"fused", "persistent"} & set(r["kernel"].split()):  # fused.RECURRENCE_JIT's launch bounds:
            assert 0 < r["registers"] <= 128, r  # two blocks of 256 threads an SM
        else:
            assert 0 < r["registers"] <= 64, r  # lean enough for full occupancy at 128 threads
    lean_loops_in_machine_code(report)
    barrier_is_release_acquire(rows)
    steps_divide_in_32_bits(rows)


def barrier_is_release_acquire(rows):
    """The persistent kernels' barrier (fused.tile_barrier) in PTX: an acq_rel fence and a
    relaxed add to arrive, relaxed loads to poll and one acquire load once all have arrived
    (and the failure flag's atomic max), as CUTLASS's inter-block barrier but polling without
    acquire's L1 invalidation; no sequentially consistent ``membar.gl`` (a threadfence)
    anywhere in a recurrence. The kernels without a barrier order nothing between blocks."""
    barrier = ["atom.global.max.s32", "fence.acq_rel.gpu", "ld.global.acquire.gpu.b32",
               "ld.global.relaxed.gpu.b32", "red.relaxed.gpu.global.add.s32"]
    for r in rows:
        if "persistent" in r["kernel"].split():
            assert r["memory_order"] == barrier, r
            assert r["prefetches_before_barrier"] == 0, r  # its acquire loads empty L1: prefetch after it
        elif "fused" in r["kernel"].split():
            assert r["memory_order"] == [], r


def steps_divide_in_32_bits(rows):
    """No 64-bit integer division in a step's kernel: a step maps its threads to elements
    (b, j) with a few divisions, and as numba's int64 (or a range() whose step is set at run
    time) each was a ~70-instruction routine on the step's path, before its first load
    (14-40 of them in a fused or persistent build's machine code before v24, one in each
    pointwise step kernel). Only the embedding's gather and one-hot keep 64 bits: a table
    may hold 2**32 elements."""
    for r in rows:
        if r["kernel"] not in ("gather_rows", "one_hot"):
            assert r["wide_divisions"] == 0, r


def lean_loops_in_machine_code(report):
    """The recurrent dot products' loop, in machine code: an FMA and its loads, not index
    arithmetic (12-39 instructions an FMA before the tiles' indices were unsigned). The
    cudasim extra brings cuobjdump; elsewhere (a GPU machine's own CUDA) it may be missing
    or older than the ptxas that wrote the code: then a warning says the check was not made."""
    recurrences = [r for r in report["rows"] if {"fused", "persistent"} & set(r["kernel"].split())]
    unread = [r["sass_error"] for r in recurrences if r["sass_error"]]
    if unread and not (report["cuobjdump"] and os.sep + "nvidia" + os.sep in report["cuobjdump"]):
        warnings.warn(f"the recurrences' machine code was not read ({unread[0]}): loops not checked")
        return
    for r in recurrences:
        widening = 2 if r.get("dtype") in ("float16", "bfloat16") else 0  # both operands widened to float32
        assert r["sass_error"] is None and r["loop_fmas"] and r["loop_per_fma"] <= 11 + widening, r
        # the staging loop's loads in flight: fused.STAGE_LOADS, or one store moved up among them
        # where registers are tight (one at a time before, a wait on L2 for every element)
        assert r["stage_loads"] >= 6, r


def test_machine_code_check_fails_in_ci_but_warns_on_a_system_cuobjdump():
    """Unread machine code is a failure with the cudasim extra's cuobjdump (CI) and a
    warning with another (a GPU machine's CUDA may be older than the wheel's ptxas)."""
    row = dict(kernel="lstm_forward persistent", sass_error="cuobjdump failed: unknown ELF", loop_fmas=None,
               loop_per_fma=None)
    wheel = os.path.join("site-packages", "nvidia", "cu13", "bin", "cuobjdump")
    with pytest.raises(AssertionError):
        lean_loops_in_machine_code(dict(cuobjdump=wheel, rows=[row]))
    with pytest.warns(UserWarning, match="machine code was not read"):
        lean_loops_in_machine_code(dict(cuobjdump="/usr/local/cuda/bin/cuobjdump", rows=[row]))
    lean = dict(row, sass_error=None, loop_fmas=4, loop_per_fma=3.0, stage_loads=8)
    lean_loops_in_machine_code(dict(cuobjdump=wheel, rows=[lean]))
    slow = dict(lean, loop_per_fma=30.0)  # index arithmetic back in the loop
    with pytest.raises(AssertionError):
        lean_loops_in_machine_code(dict(cuobjdump="/usr/local/cuda/bin/cuobjdump", rows=[slow]))
    waiting = dict(lean, stage_loads=1)  # a store waiting for each load
    with pytest.raises(AssertionError):
        lean_loops_in_machine_code(dict(cuobjdump=wheel, rows=[waiting]))


def test_staging_loop_counts_the_loads_before_the_first_store():
    """kernels/ptx_report.staging_loop reads a listing as cuobjdump writes it: the innermost
    loop with loads through L2 and shared stores, and the loads it issues before a store."""
    sys.path.insert(0, os.path.join(ROOT, "kernels"))
    from ptx_report import staging_loop

    def listing(*texts):
        return "\n".join(f"        /*{16 * i:04x}*/                   {text} ;" for i, text in enumerate(texts))

    loads = [f"LDG.E.STRONG.GPU R{i}, desc[UR4][R{20 + i}.64]" for i in range(3)]
    stores = [f"@!P{i} STS [R{30 + i}], R{i}" for i in range(3)]
    assert staging_loop(listing("MOV R1, R2", *loads, *stores, "@!P0 BRA 0x0010", "EXIT")) == (3, 7)
    one_at_a_time = [text for pair in zip(loads, stores) for text in pair]
    assert staging_loop(listing(*one_at_a_time, "@P1 BRA 0x0000")) == (1, 7)
    weights = ["LDG.E R3, desc[UR4][R8.64]", "STS [R9], R3", "@P0 BRA 0x0000"]  # no load through L2
    assert staging_loop(listing(*weights)) == (0, 0)
