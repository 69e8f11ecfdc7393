"""Data-parallel session runs: several single-threaded runs of one session at once, one per core.

onnxruntime runs one call on its intra-op pool, every op split across the cores with a barrier after
it. The with-past graph's many small ops (the split attention's per-head products, transposes,
softmax) leave the cores waiting at those barriers, and on a shared VM each wait stretches when a
vCPU is preempted. Independent batches need no barrier: one session opened with one intra-op thread
(its weights loaded once) and run from `workers` threads at once, each run on its own core.

Measured on bench_peers' realistic pairs (3 queries x 20 documents, 0.6B int8 with-past graph, AMD
Zen 5, 2 cores; ad hoc A/B outside benchmarks/, one process per setting, interleaved, 3 passes a
process), against one run at a time on two intra-op threads:
  - as shipped (score_shared: each query's batches queued while the next query's prefix runs),
    4 processes each: 2.47-2.87 pairs/s, median 2.64, against 2.16-2.89, median 2.56;
  - a first version that ran every query's prefix before any batch, 5 processes each: 2.58-2.93,
    median 2.76, against 2.15-2.77, median 2.36.
The gain is mostly the slow passes gone: one run at a time swings between ~2.2 and ~2.9 from one
process or pass to the next on this VM; the workers stay within 2.47-2.93.

onnxruntime's `session.run` may be called from several threads at once. The threads flush denormals
themselves (denormals.py): they are not the session's pool threads.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

_pools: dict[int, object] = {}
_lock = threading.Lock()  # serve's model threads may ask for the pool at the same moment


def physical_cores() -> int:
    """Cores this process may run on, SMT siblings counted once (onnxruntime's default thread count)."""
    cpus = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else range(os.cpu_count() or 1)
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            cores.add(str(cpu))
    return max(1, len(cores))


def pool(workers: int):
    """The process's thread pool of `workers` threads (made once, kept: a scorer is made per call of
    score_documents, and a pool per scorer would leave its threads behind)."""
    with _lock:
        if workers not in _pools:
            from concurrent.futures import ThreadPoolExecutor

            from .denormals import flush_denormals_here

            _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="qconv-run", initializer=flush_denormals_here)
        return _pools[workers]
