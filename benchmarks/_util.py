"""Small helpers shared by the benchmark scripts (timing, tables, JSON output, machine identity)."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any, Callable, Sequence


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def best_of(fn: Callable[[], Any], repeat: int = 3) -> tuple[float, Any]:
    """Minimum wall time of ``repeat`` runs (seconds) and the last result: the least-disturbed run."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def table(rows: Sequence[Sequence[Any]], header: Sequence[str]) -> str:
    cells = [[str(c) for c in header]] + [[f"{c:,.3g}" if isinstance(c, float) and abs(c) < 100 else
                                           (f"{c:,.0f}" if isinstance(c, float) else str(c)) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_json(out_dir: str | None, name: str, payload: dict[str, Any]) -> Path | None:
    if not out_dir:
        return None
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    f = path / name
    f.write_text(json.dumps({"machine": machine(), "time": time.strftime("%Y-%m-%d %H:%M:%S"), **payload}, indent=2) + "\n")
    return f


# ---- memory and device helpers shared by bench_eval and the suite ----------------------------------
def proc_status_kb(field: str) -> int | None:
    """A ``/proc/self/status`` field in kB (``VmRSS``, ``VmHWM``), None where unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def trim_heap() -> None:
    """Return freed heap memory to the OS (glibc ``malloc_trim``), so a run's RSS growth is not hidden
    by memory an earlier run freed but the allocator kept. A no-op elsewhere."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


class PeakMemory:
    """Peak memory above the start of a ``with`` block, in bytes.

    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats`` (tensor memory the
    caching allocator handed out), minus what was allocated at the start. CPU: peak resident set
    (VmHWM, reset at the start through /proc/self/clear_refs) minus the resident set at the start,
    after ``malloc_trim`` (memory the allocator still holds from earlier runs would hide growth).
    ``device_bytes`` / ``rss_bytes`` are None where not measured (``rss_exact`` False: VmHWM could not
    be reset, so the figure is the process's lifetime peak minus the start, an upper bound).
    """

    def __init__(self, device):
        import torch

        dev = torch.device(device)
        self.cuda = dev.type == "cuda"
        # Trap: without a device argument the cuda memory calls measure the *current* device
        # (cuda:0 by default), not the one benchmarked on cuda:N.
        self.device = torch.device("cuda", torch.cuda.current_device() if dev.index is None else dev.index) \
            if self.cuda else dev
        self.device_bytes: int | None = None
        self.rss_bytes: int | None = None
        self.rss_exact = True

    def __enter__(self) -> "PeakMemory":
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._dev0 = torch.cuda.memory_allocated(self.device)
        else:
            trim_heap()
        self.rss_exact = reset_peak_rss()
        self._rss0 = proc_status_kb("VmRSS")
        return self

    def __exit__(self, *exc) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize(self.device)
            self.device_bytes = torch.cuda.max_memory_allocated(self.device) - self._dev0
        hwm = proc_status_kb("VmHWM")
        if hwm is not None and self._rss0 is not None:
            self.rss_bytes = max(0, hwm - self._rss0) * 1024

    @property
    def bytes(self) -> int | None:
        """The figure to report: device memory on CUDA, resident set on CPU."""
        return self.device_bytes if self.cuda else self.rss_bytes


def sync(device) -> None:
    """Wait for queued device work (CUDA); a no-op on CPU. Only around timed regions, never inside."""
    if getattr(device, "type", str(device)) == "cuda":
        import torch

        torch.cuda.synchronize(device)


def fmt_rate(x: float | None) -> str:
    """Tokens/s in k or M with 3 significant digits; 'n/a' for None."""
    if x is None or x != x:
        return "n/a"
    if x >= 1e9:
        return f"{x / 1e9:,.3g}G"
    if x >= 1e6:
        return f"{x / 1e6:,.3g}M"
    if x >= 1e3:
        return f"{x / 1e3:,.3g}k"
    return f"{x:,.3g}"


def fmt_bytes(x: int | None) -> str:
    if x is None:
        return "n/a"
    for unit, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(x) >= k:
            return f"{x / k:,.3g} {unit}"
    return f"{x} B"


def one_line_errors(prog: str, flags: Sequence[str] = ("device", "store", "model", "chunk_size", "tokens")):
    """Decorator for a benchmark's ``main(argv)``: a user error (a ``StreamdataError``: no GPU for
    ``--device cuda``, a missing store, ...) is one line on stderr in flag terms and exit 2, as the CLIs do;
    and no library progress bars when stderr is a pipe or a log file, as the CLIs do."""
    import functools
    import sys

    from streamdata.errors import StreamdataError, in_cli_terms

    names = {f: "--" + f.replace("_", "-") for f in flags}

    def wrap(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def run(argv=None) -> int:
            if not sys.stderr.isatty():  # library bars drawn into a pipe or a log file are noise
                from evaluator.progress import quiet_library_bars

                quiet_library_bars()
            try:
                return main(argv)
            except StreamdataError as e:
                print(f"{prog}: error: {in_cli_terms(str(e), names)}", file=sys.stderr)
                return 2

        return run

    return wrap


def auto_batch_rows(run: Callable[[int | str], dict[str, Any]], sizes: Sequence[int], old_rule: int,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """``batch_size="auto"`` (measured, evaluator/autobatch.py) against a sweep of fixed sizes and
    against the rule auto followed before (``old_rule``: the CPU's fixed guess, or on CUDA the
    memory estimate, i.e. the bound): one run each of ``run(batch) -> the engine's results`` on the
    same tokens, in this order (auto first: no warmer than the others). The figures are the
    engine's tokens_per_second; ratios: auto / the sweep's best (goal >= 0.95), auto / the old rule."""
    auto = run("auto")
    fixed: dict[int, float] = {}
    for s in dict.fromkeys([*sizes, old_rule]):
        fixed[s] = run(s)["tokens_per_second"]
        log(f"  batch {s:>4}: {fmt_rate(fixed[s])} tok/s")
    best = max(fixed, key=fixed.get)
    a = auto["tokens_per_second"]
    log(f"  auto: {fmt_rate(a)} tok/s ({auto.get('batch_size_choice')})")
    return {"auto_tok_per_s": a, "auto_choice": auto.get("batch_size_choice"), "fixed_tok_per_s": {str(k): v for k, v in fixed.items()},
            "best_fixed": best, "old_rule": old_rule, "ratio_auto_vs_best_fixed": a / fixed[best],
            "ratio_auto_vs_old_rule": a / fixed[old_rule]}


def auto_batch_table(d: dict[str, Any]) -> str:
    """The rows of :func:`auto_batch_rows` as a table."""
    c = d.get("auto_choice") or {}
    rows = [["auto (measured)", c.get("chosen"), fmt_rate(d["auto_tok_per_s"]), "1.00x"]]
    for k, v in d["fixed_tok_per_s"].items():
        what = "fixed" + (", best of the sweep" if int(k) == d["best_fixed"] else "") + \
               (", the old auto rule" if int(k) == d["old_rule"] else "")
        rows.append([what, k, fmt_rate(v), f"{d['auto_tok_per_s'] / v:.2f}x"])
    return (table(rows, ["batch", "size", "scored tok/s", "auto / this"])
            + f"\nauto vs best fixed {d['ratio_auto_vs_best_fixed']:.2f}x (goal >= 0.95x); auto vs the old rule "
              f"{d['ratio_auto_vs_old_rule']:.2f}x; ladder {c.get('ladder')}")
