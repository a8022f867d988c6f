"""Bounded memory: streaming a store of >= 2 GiB keeps the resident set small (release behind the cursor).

The store's pages are file-backed: once touched through the mapping they count in the process's
RSS until dropped, so without ``release_behind`` the peak RSS grows by the whole file. The stream
runs in a fresh subprocess so its VmHWM (peak RSS) is not polluted by this test process.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from streamdata.writer import StoreWriter

N_TOKENS = 1 << 30  # uint16: 2 GiB
PERIOD = 1 << 16
MiB = 1 << 20


def write_big_store(root) -> None:
    """token(p) = (p + p // 65536) mod 65536, so any window's content is known from its start."""
    w = StoreWriter(root, dtype="uint16", vocab_size=PERIOD, shard_tokens=1 << 28, settings={"memtest": N_TOKENS},
                    overwrite=True)
    block = 1 << 26
    base = np.arange(PERIOD, dtype=np.uint16)
    for pos in range(0, N_TOKENS, block):
        rows = ((pos >> 16) + np.arange(block >> 16)).astype(np.uint16)
        flat = (base[None, :] + rows[:, None]).reshape(-1)  # uint16 arithmetic wraps mod 65536
        lens = np.full(block >> 20, 1 << 20, np.int64)  # 1Mi-token documents
        w.add_documents(flat, lens, lens, lens)
    w.commit(tokenizer={"name": "memtest", "sha256": "0" * 64, "vocab_size": PERIOD}, special_tokens={},
             source={"kind": "memtest"})


CHILD = textwrap.dedent(
    """
    import json, sys
    import numpy as np, torch
    from streamdata.loader import WindowLoader

    def hwm():  # peak resident set (VmHWM), bytes
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    def expect(p):
        return (p + p // 65536) % 65536

    base = hwm()
    out = {"base": base}
    n_tok, scored = 0, 0
    with WindowLoader(sys.argv[1], chunk_size=65536, batch_windows=16, device="cpu") as loader:
        n_all = len(loader.store)
        for b in loader:
            # window w starts at w * 65536; the last one (tail "full") at n - 1 - 65536, right-aligned
            starts = np.minimum((b.first_window + np.arange(b.num_windows)) * 65536, n_all - 1 - 65536)
            ok = np.array_equal(b.windows.start, starts)
            ok &= np.array_equal(b.inputs[:, 0].numpy(), expect(starts))
            last = starts + b.lengths.numpy()
            ok &= np.array_equal(b.targets[torch.arange(b.num_windows), b.lengths - 1].numpy(), expect(last))
            if not ok:
                raise SystemExit(f"wrong tokens in batch at window {b.first_window}")
            n_tok += int((b.lengths - torch.from_numpy(b.windows.score_from)).sum())  # targets, each once
            scored += b.num_scored
    out.update(bounded=hwm() - base, tokens=n_tok, scored=scored)
    # Negative control: the same stream over the first 512 MiB without release_behind must show
    # the file's pages in the peak RSS, or this test could not see a leak at all.
    with WindowLoader(sys.argv[1], chunk_size=65536, batch_windows=16, device="cpu", release_behind=False,
                      max_tokens=1 << 28) as loader:
        for b in loader:
            pass
    out["unbounded"] = hwm() - base
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_streaming_2gib_store_keeps_peak_rss_bounded(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    if free < 3 << 30:
        pytest.skip(f"needs 3 GiB free where tmp_path lives ({tmp_path}), has {free / 2**30:.1f} GiB")
    store = tmp_path / "big"
    write_big_store(store)
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, str(store)], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-3000:]
        r = json.loads(proc.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(store, ignore_errors=True)
    assert r["tokens"] == N_TOKENS - 1 and r["scored"] == N_TOKENS - 1  # the whole stream went through
    assert r["bounded"] < 256 * MiB, f"peak RSS grew by {r['bounded'] / MiB:.0f} MiB streaming 2 GiB"
    assert r["unbounded"] > 400 * MiB, f"control without release_behind grew only {r['unbounded'] / MiB:.0f} MiB"


def test_a_1e11_token_store_starts_without_o_windows_memory(tmp_path):
    """A sparse 10^11-token raw .bin (200 GB apparent, nothing on disk). The eager plan
    held ~32 bytes per window, 3 GB here (~10^8 windows of 1024); the lazy plan and the reader's
    batch tables hold O(batch). Python/numpy heap measured with tracemalloc (numpy reports its
    arrays to it; the file's mapping is not heap)."""
    import tracemalloc

    import streamdata
    from streamdata.loader import WindowLoader

    path = tmp_path / "sparse.bin"
    n_tok = 10**11
    try:
        with open(path, "wb") as f:
            f.truncate(2 * n_tok)  # uint16: holes read as zeros
    except OSError as e:
        pytest.skip(f"no 200 GB sparse file where tmp_path lives ({e})")
    # (vocab_size at open would scan all 10^11 ids; the loader checks each span it reads instead)
    with streamdata.open_raw_bin(path, dtype="uint16", checksum=False) as store:
        tracemalloc.start()
        try:
            ld = WindowLoader(store, chunk_size=1024, batch_windows=64, device="cpu", vocab_size=66)
            windows = 1 + -(-(n_tok - 1 - 1024) // 1024)
            assert ld.full_plan_windows == len(ld.plan) == windows
            assert len(ld) == -(-windows // 64) and ld.num_scored == n_tok - 1
            it = iter(ld)
            first = next(it)
            second = next(it)
            it.close()
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
        assert first.inputs.shape == (64, 1024) and not first.inputs.any() and first.num_scored == 64 * 1024
        assert second.first_window == 64 and second.windows.start.tolist() == [1024 * w for w in range(64, 128)]
        assert peak < 64 * MiB, f"starting on 10^11 tokens peaked at {peak / MiB:.0f} MiB of heap"
    with streamdata.open_raw_bin(path, dtype="uint16", checksum=False) as store, \
            WindowLoader(store, chunk_size=1024, batch_windows=64, device="cpu", start_at=windows - 3) as last:
        (b,) = list(last)  # resuming at the end plans and reads only the end (tail "full": right-aligned)
        assert b.windows.start.tolist()[-1] == n_tok - 1 - 1024
        assert b.num_scored == (n_tok - 1) - (1024 + (windows - 4) * 1024)  # windows before: L, then a stride each
