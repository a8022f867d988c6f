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
