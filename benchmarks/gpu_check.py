"""The whole GPU check in one command: the CUDA tests and every GPU benchmark, judged against the goals.

    python -m benchmarks.gpu_check --out DIR [--budget-s 470] [--skip STEP ...] [--dry-run]

On one GPU, in under 8 minutes (``--budget-s``; each step has its own timeout, cut to what is left
of the budget; a step that fails or times out is recorded and the rest still run):

- ``tests``: pytest over every test file that holds CUDA-marked tests (``-m cuda``), then the
  inductor test of ``--compile`` (``STREAMEVAL_TEST_INDUCTOR=1``); pass/fail/skip counts from JUnit XML;
- ``demo``: the README's first command, ``streameval demo --full`` (the full-size demo, 1,000,000
  tokens) on the device, into a temporary folder: its wall time (tokenizing the stdlib included);
- ``eval``: ``benchmarks.bench_eval --compile`` on a synthetic store of random ids (GPT-2-small-shaped
  random model, bf16, chunk 1024, overlap 512, 512Ki tokens): end to end vs compute only, overlap 0
  vs the seed's batch-1 loop, overlap 512 vs the transformers guide loop, eager and compiled; and
  ``--auto-batch`` on 4Mi tokens: batch auto (measured) vs the best of a fixed-size sweep (goal
  >= 0.95x) and vs the old rule (the memory estimate);
- ``loader``: ``benchmarks.bench_loader`` (chunk 1024, 32 windows per batch): the loader alone, set
  against the model's consumption (compute-only positions per second from ``eval``);
- ``memory``: ``benchmarks.bench_scaling --part eval`` at 1M and 100M tokens: device peak while streaming;
- ``docs``: ``benchmarks.bench_docs`` (parallel documents in kv-cache mode vs batch 1; the issue's
  Llama shape, 600 documents of 100-4,000 tokens), when the module exists (else "not available"),
  with ``--auto-batch``: the same auto-batch rows for parallel documents;
- ``precision``: ``benchmarks.bench_precision --device cuda`` (the embedded model, document mode,
  chunked kv-cache and the full forward in fp32/bf16/fp16, each against the fp32 full forward): the
  bf16 chunked distance over the bf16 full forward's own (goal <= 2x);
- ``distributed``: ``benchmarks.bench_distributed --device cuda`` over every visible GPU, when there
  are two or more.

Writes DIR/gpu_check.json (every step: command, exit code, seconds, its JSON; the summary rows),
DIR/gpu_check.png (value / goal per measure; needs matplotlib) and each step's log and JSON under
DIR/STEP/, and prints one table: measure, value, goal, pass/fail. Without CUDA it says so in one
line and exits 1 (no numbers are made up). ``--dry-run`` runs the same steps on the CPU at toy sizes
(fast; no figure means anything) to prove the plumbing; its rows are marked "dry run".

Dependencies: torch, transformers, numpy, tokenizers, tqdm, pytest (the tests step) and matplotlib
(the PNG); never datasets or zarr (the stores are written by streamdata's writer from synthetic
ids). On a machine without some of them, see docs/benchmarks.md, "GPU check" (wheels carried along).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
STEPS = ("tests", "demo", "eval", "loader", "memory", "docs", "precision", "distributed")
# The goals (ratios measured in one run, same model and tokens).
GOALS = {
    "end_to_end_vs_compute": 0.97,
    "loader_vs_model": 10.0,
    "overlap0_vs_seed_loop": 8.0,
    "overlap512_vs_guide": 3.5,
    "overlap512_compiled_vs_guide": 4.5,  # the moonshot with --compile
    "docs_parallel_vs_batch1": 5.0,
    "memory_1M_vs_100M": 0.05,  # relative difference of the device peaks, at most
    "bf16_chunked_vs_full": 2.0,  # chunked kv-cache's distance from fp32 over the bf16 full forward's, at most
    "auto_batch_vs_best_fixed": 0.95,  # batch_size="auto" (measured) over the best size of a fixed-size sweep
}


def tiny_model(vocab: int = 512):
    """The dry run's model: a 1-layer GPT-2 with random weights (``benchmarks.gpu_check:tiny_model``)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=1, n_embd=32, n_head=2, n_positions=64, vocab_size=vocab, bos_token_id=None,
                     eos_token_id=None)
    return GPT2LMHeadModel(cfg).eval()


def cuda_test_files(root: Path = ROOT) -> list[str]:
    """Test files (relative to ``root``) that hold CUDA-marked tests."""
    out = []
    for f in sorted((root / "tests").rglob("test_*.py")):
        text = f.read_text(encoding="utf-8", errors="replace")
        if "pytest.mark.cuda" in text:
            out.append(str(f.relative_to(root)))
    return out


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout: float
    env: dict[str, str] = field(default_factory=dict)
    rc: int | None = None
    seconds: float = 0.0
    status: str = "not run"  # ok | failed (rc N) | timed out | not available | skipped: ...
    data: Any = None


def run_step(step: Step, folder: Path, deadline: float, reserve: float = 5.0) -> Step:
    """Run ``step.argv`` from the repository root with its output in ``folder/STEP.log``, killed
    at its timeout or at the overall deadline, whichever comes first."""
    left = deadline - time.monotonic() - reserve
    if left < min(20.0, step.timeout):
        step.status = f"skipped: {max(0, left):.0f} s left of the budget"
        return step
    limit = min(step.timeout, left)
    folder.mkdir(parents=True, exist_ok=True)
    log = folder / f"{step.name}.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", **step.env}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    t0 = time.monotonic()
    with open(log, "w") as f:
        f.write("$ " + " ".join(step.argv) + "\n")
        f.flush()
        # a new session: a timeout kills the step's whole process group (torchrun's workers too)
        p = subprocess.Popen(step.argv, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            step.rc = p.wait(timeout=limit)
            step.status = "ok" if step.rc == 0 else f"failed (rc {step.rc})"
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, 9)
            p.wait()
            step.status = f"timed out after {limit:.0f} s"
    step.seconds = time.monotonic() - t0
    return step


def _json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def junit_counts(path: Path) -> dict[str, int] | None:
    """passed/failed/errors/skipped of a pytest JUnit XML file."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    c = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return {"passed": c["tests"] - c["failures"] - c["errors"] - c["skipped"], "failed": c["failures"],
            "errors": c["errors"], "skipped": c["skipped"]}


def synthetic_store(path: Path, tokens: int, vocab: int, doc_tokens: int = 1 << 20) -> Path:
    """A store of random ids written by streamdata's writer (no datasets, no tokenizer)."""
    from .bench_loader import build_synthetic

    return build_synthetic(path, tokens, vocab=vocab, doc_tokens=doc_tokens)


def plan_steps(out: Path, store: Path, dry: bool, device: str, gpus: int) -> list[Step]:
    py = sys.executable
    d = {s: out / s for s in STEPS}
    steps = []
    files = cuda_test_files()
    tests = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", *files, "-m", "cuda",
             f"--junitxml={d['tests'] / 'cuda.xml'}"]
    inductor = [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs",
                "tests/evaluator/test_compile.py::test_inductor_compiled_equals_eager_fp32",
                f"--junitxml={d['tests'] / 'inductor.xml'}"]
    # one step, two pytest runs: the second runs even when the first has failures
    steps.append(Step("tests", ["bash", "-c", " ; ".join(_q(c) for c in (tests, inductor)) + " ; exit 0"],
                      170, {"STREAMEVAL_TEST_INDUCTOR": "0" if dry else "1"}))
    # the demo into a fresh temporary folder beside the store: timed from scratch, never a reused run
    demo = [py, "-m", "evaluator", "demo", *(["--max-tokens", "3000", "--chunk-size", "64", "--overlap", "16", "--device", "cpu"] if dry
                                             else ["--full", "--device", device]), "--out", str(store.parent / "demo")]
    steps.append(Step("demo", demo, 90))
    if dry:
        ev = ["--device", "cpu", "--tokens", "400", "--chunk-size", "32", "--overlap", "16", "--batch-size", "4",
              "--repeat", "1", "--model", "benchmarks.gpu_check:tiny_model", "--threads", "1"]
        ld = ["--store", str(store), "--chunk-size", "64", "--overlap", "16", "--batch-windows", "4", "--repeat", "1"]
        mem = ["--lengths", "1e4", "1e5", "--chunk-size", "64", "--batch-windows", "4", "--lines", "2", "--device", "cpu"]
        dist = ["--procs", "2", "--tokens", "2000", "--chunk-size", "32", "--batch-size", "4", "--layers", "1",
                "--hidden", "32", "--repeat", "1", "--device", "cpu"]
        docs = ["--device", "cpu", "--docs", "12", "--min-len", "8", "--max-len", "60", "--positions", "64",
                "--batch-size", "4", "--layers", "1", "--hidden", "32", "--heads", "2", "--kv-heads", "1",
                "--intermediate", "64", "--vocab", "512", "--repeat", "1"]
        prec = ["--device", "cpu", "--docs", "3", "--max-len", "48", "--chunk-size", "16", "--dtypes", "float32,bfloat16"]
        env = {"STREAMEVAL_COMPILE_BACKEND": "aot_eager"}  # graph capture without code generation: seconds
    else:
        # 512Ki tokens: the batch-1 loops (~70k tok/s) take ~8 s a run; ours ~1 s
        # the auto-batch rows on 4Mi tokens (~4 s a run): the ladder spends at most a tenth of a run
        ev = ["--tokens", str(1 << 19), "--chunk-size", "1024", "--overlap", "512", "--dtype", "bfloat16",
              "--repeat", "2", "--device", device, "--auto-tokens", str(1 << 22)]
        ld = ["--tokens", str(32 << 20), "--chunk-size", "1024", "--overlap", "512", "--batch-windows", "32",
              "--repeat", "2"]
        mem = ["--lengths", "1e6", "1e8", "--device", device]
        dist = ["--procs", str(gpus), "--device", "cuda", "--repeat", "2"]
        # the issue's shape (bench_docs' CUDA defaults) but 600 of its 2,000 documents and one round,
        # so that batch 1 (the slow side) fits the budget
        docs = ["--device", "cuda", "--docs", "600", "--repeat", "1"]
        prec = ["--device", "cuda"]
        env = {}
    steps.append(Step("eval", [py, "-m", "benchmarks.bench_eval", "--store", str(store), *ev, "--compile",
                               "--auto-batch", "--out", str(d["eval"])], 220, env))
    steps.append(Step("loader", [py, "-m", "benchmarks.bench_loader", *ld, "--workers", "0", "--out", str(d["loader"])], 45))
    steps.append(Step("memory", [py, "-m", "benchmarks.bench_scaling", "--part", "eval", *mem, "--out", str(d["memory"])], 45))
    steps.append(Step("docs", [py, "-m", "benchmarks.bench_docs", *docs, "--auto-batch", "--out", str(d["docs"])], 120))
    steps.append(Step("precision", [py, "-m", "benchmarks.bench_precision", *prec, "--out", str(d["precision"])], 45))
    if dry or gpus > 1:
        steps.append(Step("distributed", [py, "-m", "benchmarks.bench_distributed", *dist, "--out", str(d["distributed"])], 90))
    return steps


def _q(argv: list[str]) -> str:
    import shlex

    return " ".join(shlex.quote(a) for a in argv)


def collect(step: Step, out: Path) -> None:
    folder = out / step.name
    if step.name == "tests":
        step.data = {k: junit_counts(folder / f"{k}.xml") for k in ("cuda", "inductor")}
    elif step.name == "demo":  # its report is in its own --out
        step.data = _json(Path(step.argv[step.argv.index("--out") + 1]) / "results.json")
    else:
        files = sorted(folder.glob("*.json")) if folder.is_dir() else []
        step.data = _json(files[0]) if files else None


# ---- the summary --------------------------------------------------------------------------------
def _get(d: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _find_ratio(d: Any) -> tuple[str, float] | None:
    """bench_docs' parallel-vs-batch-1 ratio: the first numeric value under a key naming a ratio or
    speed-up (its JSON is another module's; read defensively)."""
    if isinstance(d, dict):
        for k, v in d.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool) and any(w in k.lower() for w in ("ratio", "speedup", "speed_up", "vs")):
                return k, float(v)
        for v in d.values():
            r = _find_ratio(v)
            if r is not None:
                return r
    return None


def summarize(steps: dict[str, Step]) -> list[dict[str, Any]]:
    """One row per measure: value, goal, pass (True/False/None: not measured)."""
    rows: list[dict[str, Any]] = []

    def row(measure: str, value: Any, goal: str, ok: bool | None, note: str = "") -> None:
        rows.append({"measure": measure, "value": value, "goal": goal, "pass": ok, "note": note})

    t = steps.get("tests")
    if t is not None:
        parts = []
        ok: bool | None = None
        for k in ("cuda", "inductor"):
            c = (t.data or {}).get(k)
            if c is not None:
                parts.append(f"{k}: {c['passed']} passed, {c['failed'] + c['errors']} failed, {c['skipped']} skipped")
                ok = (ok is not False) and c["failed"] + c["errors"] == 0
        if not parts and not t.status.startswith("skipped"):  # pytest ran but wrote no results: a failure
            ok = False
        row("CUDA tests", "; ".join(parts) or "no results", "0 failed", ok,
            "" if parts else f"{t.status}; see tests/tests.log" if t.status == "ok" else t.status)

    dm = steps.get("demo")
    if dm is not None:
        r = dm.data if dm.status == "ok" else None
        row("demo, full size: wall time (s)", dm.seconds if r else None, "(no goal)", None,
            f"{r['total_tokens']:,} tokens scored in {r['total_time']:.1f} s ({r['tokens_per_second']:,.0f} tok/s), "
            f"perplexity {r['perplexity']:.1f}" if r else dm.status)

    e = steps.get("eval")
    ev = e.data if e is not None else None
    pr, rt = _get(ev, "paired_ratios") or {}, _get(ev, "ratios") or {}

    def ratio(key: str) -> float | None:
        return pr.get(key, rt.get(key))

    def add_ratio(measure: str, key: str, goal_key: str, note: str = "") -> None:
        v = ratio(key)
        g = GOALS[goal_key]
        row(measure, v, f">= {g:g}x", None if v is None else v >= g, note if v is not None else (e.status if e else "not run"))

    if e is not None:
        add_ratio("end to end vs compute only", "ours/compute", "end_to_end_vs_compute", "per-round median")
        ours = _get(ev, "results", "ours", "tok_per_s")
        add_ratio("overlap 0, chunk 1024 vs the seed's batch-1 loop", "ours/quickref", "overlap0_vs_seed_loop",
                  f"ours {ours / 1e3:,.0f}k tok/s (moonshot 1M)" if ours else "")
        add_ratio("overlap 512, chunk 1024 vs the transformers guide loop", "ours_overlap/guide", "overlap512_vs_guide")
        add_ratio("overlap 512 compiled vs the guide loop (moonshot)", "ours_overlap_compiled/guide",
                  "overlap512_compiled_vs_guide")
        v = ratio("ours_compiled/ours")
        row("compiled vs eager, overlap 0", v, "(no goal)", None, "" if v is not None else e.status)

    ld = steps.get("loader")
    if ld is not None:
        wl = next((r for r in (_get(ld.data, "results") or []) if r.get("variant") == "(d) WindowLoader"
                   and r.get("overlap") == 0), None)
        comp = _get(ev, "results", "compute")
        model_rate = comp["positions"] / comp["seconds"] if comp and comp.get("seconds") else None
        v = wl["tok_per_s"] / model_rate if wl and model_rate else None
        g = GOALS["loader_vs_model"]
        row("loader alone vs the model's consumption", v, f">= {g:g}x", None if v is None else v >= g,
            f"loader {wl['tok_per_s'] / 1e6:,.0f}M tok/s, model {model_rate / 1e3:,.0f}k positions/s"
            if v is not None else ld.status if wl is None else "needs the eval step's compute-only row")

    m = steps.get("memory")
    if m is not None:
        evr = _get(m.data, "evaluator") or []
        peaks = [r.get("cuda_peak") for r in evr]
        if len(peaks) >= 2 and all(isinstance(p, (int, float)) and p > 0 for p in peaks):
            v = max(peaks) / min(peaks) - 1
            row("device memory streaming 1M vs 100M tokens", v, f"<= {GOALS['memory_1M_vs_100M']:.0%} apart",
                v <= GOALS["memory_1M_vs_100M"], "relative difference of the CUDA peaks")
        else:
            row("device memory streaming 1M vs 100M tokens", None, "<= 5% apart", None,
                "no CUDA peak (CPU run)" if evr else m.status)

    dcs = steps.get("docs")
    if dcs is not None:
        if dcs.status == "not available":
            row("document mode kv-cache, parallel vs batch 1", None, ">= 5x", None, "not available (no benchmarks.bench_docs)")
        else:
            found = _find_ratio(dcs.data)
            g = GOALS["docs_parallel_vs_batch1"]
            row("document mode kv-cache, parallel vs batch 1", found[1] if found else None, f">= {g:g}x",
                None if found is None else found[1] >= g, f"bench_docs '{found[0]}'" if found else dcs.status)

    # batch_size="auto" (evaluator/autobatch.py) vs a sweep of fixed sizes and vs the old rule: the
    # auto_batch block of bench_eval (sliding) and bench_docs (parallel documents)
    for name, step in (("sliding", e), ("parallel documents", dcs)):
        if step is None:
            continue
        ab = _get(step.data, "auto_batch")
        v = _get(ab, "ratio_auto_vs_best_fixed")
        g = GOALS["auto_batch_vs_best_fixed"]
        row(f"batch auto vs the best fixed size, {name}", v, f">= {g:g}x", None if v is None else v >= g,
            f"auto chose {_get(ab, 'auto_choice', 'chosen')}, the sweep's best {_get(ab, 'best_fixed')}"
            if v is not None else step.status if step.status != "ok" else "no auto_batch rows")
        v = _get(ab, "ratio_auto_vs_old_rule")
        row(f"batch auto vs the old rule ({_get(ab, 'old_rule')}), {name}", v, "(no goal)", None,
            "" if v is not None else "no auto_batch rows")

    pc = steps.get("precision")
    if pc is not None:
        v = _get(pc.data, "dtypes", "bfloat16", "ratio_mean_abs")
        g = GOALS["bf16_chunked_vs_full"]
        row("kv-cache bf16: distance from fp32, chunked / full forward", v, f"<= {g:g}x", None if v is None else v <= g,
            "bench_precision, mean |diff| per target" if v is not None else pc.status)

    ds = steps.get("distributed")
    if ds is not None:  # bench_distributed's rows: {variant: {..., vs_1_process}}; the torchrun row
        multi = next((r for k, r in (_get(ds.data, "rows") or {}).items() if "torchrun" in k), None)
        v = multi.get("vs_1_process") if isinstance(multi, dict) else None
        row("distributed over every GPU vs 1", v, "(no goal)", None,
            "bench_distributed: P processes / 1 process" if v is not None else ds.status)
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.3f}" if abs(v) < 10 else f"{v:,.1f}"
    return str(v)


def print_table(rows: list[dict[str, Any]], dry: bool) -> None:
    from ._util import table

    flag = {True: "pass", False: "FAIL", None: "-"}
    print(table([[r["measure"], _fmt(r["value"]), r["goal"], ("dry run" if dry else flag[r["pass"]]), r["note"]]
                 for r in rows], ["measure", "value", "goal", "pass/fail", "note"]))


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> Path | None:
    """Bars of value / goal for the measures with a numeric goal (1.0 = the goal met exactly)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    pts = []
    for r in rows:
        v, g = r["value"], r["goal"]
        if not isinstance(v, (int, float)) or not g.startswith(">= "):
            continue
        pts.append((r["measure"], v / float(g[3:].rstrip("x"))))
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(pts) + 1.5))
    if pts:
        names, vals = zip(*pts)
        ax.barh(range(len(pts)), vals, color=["tab:green" if x >= 1 else "tab:red" for x in vals])
        ax.set_yticks(range(len(pts)), names, fontsize=8)
        ax.invert_yaxis()
    ax.axvline(1.0, color="k", lw=1)
    ax.set_xlabel("measured / goal (>= 1: met)")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu_check", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="folder for gpu_check.json, gpu_check.png and each step's files")
    ap.add_argument("--budget-s", type=float, default=460.0, help="seconds for all steps together (default: %(default)g)")
    ap.add_argument("--skip", nargs="*", default=[], choices=STEPS, metavar="STEP",
                    help=f"steps to leave out: {', '.join(STEPS)}")
    ap.add_argument("--device", default="cuda", help="the GPU to check (default: cuda)")
    ap.add_argument("--dry-run", action="store_true",
                    help="no GPU: the same steps on the CPU at toy sizes, to prove the plumbing (the figures mean nothing)")
    a = ap.parse_args(argv)

    import torch

    if not a.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False): run it on a GPU machine, "
              "or pass --dry-run to exercise the steps on the CPU", file=sys.stderr)
        return 1
    deadline = time.monotonic() + a.budget_s
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    name = torch.cuda.get_device_name(0) if gpus else "cpu (dry run)"
    print(f"gpu_check: {name}, {gpus} GPU(s), torch {torch.__version__}; budget {a.budget_s:.0f} s", flush=True)
    tmp = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    steps: dict[str, Step] = {}
    try:
        t0 = time.perf_counter()
        # random ids over GPT-2's vocabulary (bench_eval builds a GPT-2-small-shaped model over it);
        # 4Mi tokens: the eval step's auto-batch runs (--auto-tokens), its other rows read the first 512Ki
        store = synthetic_store(tmp / "store", 2000 if a.dry_run else (1 << 22) + 1, 512 if a.dry_run else 50257,
                                doc_tokens=500 if a.dry_run else 1 << 20)
        print(f"synthetic store: {time.perf_counter() - t0:.1f} s", flush=True)
        for step in plan_steps(out, store, a.dry_run, a.device, gpus):
            if step.name in a.skip:
                step.status = "skipped: --skip"
            elif step.name == "docs" and not (ROOT / "benchmarks" / "bench_docs.py").is_file():
                step.status = "not available"
            else:
                print(f"[{step.name}] {' '.join(step.argv[-6:])} ...", flush=True)
                run_step(step, out / step.name, deadline)
                collect(step, out)
            print(f"[{step.name}] {step.status} ({step.seconds:.0f} s)", flush=True)
            steps[step.name] = step
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows = summarize(steps)
    print()
    print_table(rows, a.dry_run)
    from ._util import machine

    payload = {
        "command": "python -m benchmarks.gpu_check " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": machine(), "device": name, "gpus": gpus, "dry_run": a.dry_run,
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "budget_s": a.budget_s, "goals": GOALS,
        "summary": rows,
        "steps": {k: {"argv": s.argv, "status": s.status, "rc": s.rc, "seconds": s.seconds, "data": s.data}
                  for k, s in steps.items()},
    }
    (out / "gpu_check.json").write_text(json.dumps(payload, indent=2, default=str) + "\n")
    png = plot(rows, out / "gpu_check.png", f"gpu_check: {name} ({time.strftime('%Y-%m-%d')})")
    print(f"\nwrote {out / 'gpu_check.json'}" + (f", {png}" if png else " (no PNG: matplotlib is not installed)"))
    failed = [s.name for s in steps.values() if s.status.startswith(("failed", "timed out"))]
    if failed:
        print(f"steps that failed: {', '.join(failed)} (logs in {out}/STEP/STEP.log)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
