"""The open issues' GPU targets, read off a gpu_check report: met, missed, or not measured.

    python kernels/targets.py REPORT.json [REPORT.json ...] [--baseline kernels/results/<...>.json]

gpu_check prints this last. Several reports (a session's device calls each run some
stages) are read as one: a stage's figures come from the last report that has them.
Each target is the issue's own words, checked against the stage that measures it; a
stage that did not run (or failed, or was skipped past its budget) leaves its targets
"not measured", never met, and so does a target some of whose rows did not run.
Benchmark ratios are gpurnn's time over cuDNN's (below 1 is faster); training ratios
are tokens/s over torch's (above 1 is faster); memory ratios are gpurnn's MiB over
torch's.

"No row slower than at commit 061083c by more than noise" compares each row's ratio to
cuDNN with the baseline report's (by default the H100 run at 061083c): a ratio is a
same-card, same-process comparison, so it carries over between an H100 and an H200
where absolute times would not. NOISE is the slack allowed.
"""

import argparse
import json
import math
import os

HERE = os.path.dirname(os.path.abspath(__file__))
BASELINE = os.path.join(HERE, "results", "2026-11-27-h100-061083c-gpu_check.json")
NOISE = 1.10  # a row's ratio may rise 10% over the baseline's before it counts as slower
MAX_REL_ERR = 1e-4  # against cuDNN, fp32 rows (TF32 rows round their GEMM inputs to 10 bits)
HALF_MODES = ("fp16", "bf16")
MATRIX_CONFIGS = ("A", "B", "C", "D", "E", "Ab", "b1", "stream")  # bench_gpu's, the issue's new rows included
MEMORY_ROWS = ("B", "C", "E", "long")  # issue 11's memory targets
HALF_CONFIGS, HALF_MEMORY_ROWS = ("A", "B", "C", "E"), ("B", "C", "E")


def _rows(report, stage):
    """The stage's list of rows, or None where it did not run to the end."""
    value = report.get(stage)
    return value if isinstance(value, list) else None


def _name(r):
    return f"{r['cell']} {r['config']} {r['mode']} {r['pass_']}"


def _timed(rows, modes, cells=None, configs=None, passes=None):
    """The rows that ran (have a ratio), filtered."""
    return [r for r in rows if r.get("ratio") is not None and r["mode"] in modes
            and (cells is None or r["cell"] in cells) and (configs is None or r["config"] in configs)
            and (passes is None or r["pass_"] in passes)]


def _at_most(issue, target, rows, limit, what=_name, fmt=".2f"):
    """Every row's ratio at most ``limit``: the worst row, and those above."""
    if not rows:
        return dict(issue=issue, target=target, status="not measured", detail="no such rows ran")
    above = [r for r in rows if r["ratio"] > limit]
    worst = max(rows, key=lambda r: r["ratio"])
    detail = f"worst {worst['ratio']:{fmt}} ({what(worst)}) of {len(rows)} rows"
    if above:
        detail += "; above: " + ", ".join(f"{what(r)} {r['ratio']:{fmt}}" for r in above)
    return dict(issue=issue, target=target, status="missed" if above else "met", detail=detail,
                above=[what(r) for r in above])


def _require(result, wanted, ran):
    """A target met by the rows that ran is not met unless every ``wanted`` row ran."""
    missing = [w for w in wanted if w not in ran]
    if missing and result["status"] == "met":
        result.update(status="not measured", detail=result["detail"] + "; no rows of " + ", ".join(missing))
    return result


def _unmeasured(issue, target, stage, report):
    """A target whose stage has no figures, and why: not run, failed, or skipped."""
    value = report.get(stage)
    why = ("did not run" if value is None else "failed" if isinstance(value, dict) and "error" in value
           else "was skipped (budget spent)" if isinstance(value, dict) and "skipped" in value
           else "has no figures")
    return dict(issue=issue, target=target, status="not measured", detail=f"the {stage} stage {why}")


def benchmark_targets(report, baseline):
    rows = _rows(report, "benchmarks")
    fp32_tf32 = ("fp32", "tf32")
    named = [
        ("no fp32/TF32 row of the matrix above 1.0 (batch-1 and streaming rows included)", {}, 1.0),
        ("LSTM and GRU D fwd <= 0.7", dict(cells=("lstm", "gru"), configs=("D",), passes=("fwd",)), 0.7),
        ("LSTM and GRU D fwd+bwd <= 0.9", dict(cells=("lstm", "gru"), configs=("D",), passes=("fwd+bwd",)), 0.9),
        ("RNN C and D <= 1.0 both ways", dict(cells=("rnn",), configs=("C", "D")), 1.0),
        ("LSTM and GRU C fwd <= 0.4", dict(cells=("lstm", "gru"), configs=("C",), passes=("fwd",)), 0.4),
    ]
    if rows is None:
        return [_unmeasured(10, target, "benchmarks", report) for target, _, _ in named] + [
            _unmeasured(10, "relative error vs cuDNN below 1e-4 in every fp32 row", "benchmarks", report),
            _unmeasured("10, 11", "no row slower (ratio to cuDNN) than at 061083c by more than noise", "benchmarks",
                        report)]
    out = [_at_most(10, target, _timed(rows, fp32_tf32, **where), limit) for target, where, limit in named]
    geomeans = []
    for mode in fp32_tf32:
        some = _timed(rows, (mode,))
        if some:
            geomeans.append(f"{mode} {math.exp(sum(math.log(r['ratio']) for r in some) / len(some)):.2f}")
    out[0]["detail"] += "; geometric mean " + ", ".join(geomeans)
    _require(out[0], MATRIX_CONFIGS, {r["config"] for r in _timed(rows, fp32_tf32)})
    errors = [dict(r, ratio=max(r["rel_err"].values())) for r in _timed(rows, ("fp32",)) if r.get("rel_err")]
    out.append(_at_most(10, "relative error vs cuDNN below 1e-4 in every fp32 row", errors, MAX_REL_ERR, fmt=".1e"))
    out.append(regressions(rows, baseline))
    return out


def regressions(rows, baseline):
    target = "no row slower (ratio to cuDNN) than at 061083c by more than noise"
    base = {(r["cell"], r["config"], r["mode"], r["pass_"]): r["ratio"]
            for r in (_rows(baseline, "benchmarks") or []) if r.get("ratio") is not None}
    pairs = [(r, base[k]) for r in _timed(rows, ("fp32", "tf32"))
             if (k := (r["cell"], r["config"], r["mode"], r["pass_"])) in base]
    if not pairs:
        return dict(issue="10, 11", target=target, status="not measured", detail="no row shared with the baseline")
    slower = [(r, old) for r, old in pairs if r["ratio"] > old * NOISE]
    detail = f"{len(pairs)} rows compared, {len(slower)} above {NOISE:.2f}x their baseline ratio"
    if slower:
        detail += ": " + ", ".join(f"{_name(r)} {old:.2f} -> {r['ratio']:.2f}" for r, old in slower)
    return dict(issue="10, 11", target=target, status="missed" if slower else "met", detail=detail)


def memory_targets(report):
    rows = _rows(report, "memory")
    train = "training memory <= 1.0x torch/cuDNN's: LSTM B, C, E, long"
    evals = "eval forward memory <= 1.0x torch/cuDNN's: LSTM B, C, E, long"
    if rows is None:
        return [_unmeasured(11, train, "memory", report), _unmeasured(11, evals, "memory", report)]
    what = lambda r: f"{r['cell']} {r['row']} {r['pass_']}"  # noqa: E731
    picked = [r for r in rows if "error" not in r and r["cell"] == "lstm" and r.get("precision", "fp32") == "fp32"
              and r["row"] in MEMORY_ROWS]
    return [_require(_at_most(11, target, chosen, 1.0, what), MEMORY_ROWS, {r["row"] for r in chosen})
            for target, chosen in ((train, [r for r in picked if r["pass_"] == "train"]),
                                   (evals, [r for r in picked if r["pass_"] == "eval"]))]


def half_targets(report):
    half = report.get("half")
    speed = "fp16 and bf16 time <= 0.8x cuDNN's under autocast on A, B, C, E (fwd and fwd+bwd)"
    memory = "fp16 and bf16 memory <= 0.55x our own fp32"
    if not isinstance(half, dict) or not isinstance(half.get("benchmarks"), list):
        return [_unmeasured(11, speed, "half", report), _unmeasured(11, memory, "half", report)]
    rows = _timed(half["benchmarks"], HALF_MODES, configs=HALF_CONFIGS)
    mem = [dict(r, ratio=r["of_our_fp32"]) for r in half.get("memory") or [] if "of_our_fp32" in r]
    what = lambda r: f"{r['cell']} {r['row']} {r['precision']} {r['pass_']}"  # noqa: E731
    return [_require(_at_most(11, speed, rows, 0.8), HALF_CONFIGS, {r["config"] for r in rows}),
            _require(_at_most(11, memory, mem, 0.55, what), HALF_MEMORY_ROWS, {r["row"] for r in mem})]


def torch_targets(report):
    rows = _rows(report, "torch")
    target = "gpurnn.torch.LSTM's training step >= 1.4x torch.nn.LSTM's tokens/s at A and 2x512"
    if rows is None:
        return [_unmeasured(12, target, "torch", report)]
    lstm = [r for r in rows if r["cell"] == "lstm"]
    if not lstm:
        return [dict(issue=12, target=target, status="not measured", detail="no LSTM rows")]
    low = [r for r in lstm if r["ratio"] < 1.4]
    detail = ", ".join(f"{r['cell']} {r['size']} {r['ratio']:.2f}" for r in rows if r["cell"] in ("lstm", "gru"))
    result = dict(issue=12, target=target, status="missed" if low else "met", detail=detail + " (GRU for reference)")
    return [_require(result, ("A", "train default"), {r["size"] for r in lstm})]  # the 2x512 row is "train default"


def suite_and_sanitizer(report):
    out = []
    suite = report.get("suite")
    target = "the whole suite on CUDA: 0 failed"
    if isinstance(suite, dict) and "summary" in suite:
        failed = suite.get("failed") or []
        ok = suite.get("returncode") == 0 and not failed
        out.append(dict(issue="10-13", target=target, status="met" if ok else "missed",
                        detail=suite["summary"] + ("; failed: " + ", ".join(failed[:8]) if failed else "")))
    else:
        out.append(_unmeasured("10-13", target, "suite", report))
    checks = report.get("sanitizer")
    target = "compute-sanitizer memcheck, racecheck, initcheck, synccheck: 0 errors"
    if isinstance(checks, dict) and checks and not ({"error", "skipped"} & set(checks)):
        dirty = {tool: r for tool, r in checks.items()
                 if r.get("returncode") != 0 or r.get("report_lines") or not r.get("summary")}
        detail = "; ".join(f"{tool}: exit {r.get('returncode')}, {', '.join(r.get('summary') or ['no summary'])}"
                           for tool, r in checks.items())
        out.append(dict(issue="10-13", target=target, status="missed" if dirty else "met", detail=detail))
    else:
        out.append(_unmeasured("10-13", target, "sanitizer", report))
    return out


def check(report, baseline=None):
    """Every target with its status ("met", "missed", "not measured") and the figures behind it."""
    return (suite_and_sanitizer(report) + benchmark_targets(report, baseline or {}) + memory_targets(report)
            + half_targets(report) + torch_targets(report))


def table(results):
    width = max(len(r["target"]) for r in results)
    lines = [f"{'issue':<7}{'target':<{width + 2}}{'status':<14}figures"]
    lines += [f"{str(r['issue']):<7}{r['target']:<{width + 2}}{r['status']:<14}{r['detail']}" for r in results]
    counts = {s: sum(r["status"] == s for r in results) for s in ("met", "missed", "not measured")}
    lines.append(", ".join(f"{n} {s}" for s, n in counts.items()))
    return "\n".join(lines)


def merge(reports):
    """One report from several: each stage from the last report whose stage has figures
    (else from the last that has it at all, failed or skipped)."""
    merged = {}
    for report in reports:
        for stage, value in report.items():
            has_figures = not (isinstance(value, dict) and {"error", "skipped"} & set(value))
            if has_figures or stage not in merged:
                merged[stage] = value
    return merged


def load_baseline(path=BASELINE):
    with open(path) as f:
        return json.load(f)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("reports", nargs="+", help="gpu_check JSON reports, read as one (later stages win)")
    ap.add_argument("--baseline", default=BASELINE, help="the report whose ratios no row may exceed by more than noise")
    args = ap.parse_args(argv)
    reports = []
    for path in args.reports:
        with open(path) as f:
            reports.append(json.load(f))
    results = check(merge(reports), load_baseline(args.baseline))
    print(table(results))
    return results


if __name__ == "__main__":
    main()
