"""Denormal floats flushed to zero on the threads that run qconv's onnxruntime sessions.

A masked attention score (the key bias's large negative) leaves the softmax's exp at the bottom of
float32's range: MLAS clamps the exponent's input at -88.38, and exp of that (4e-39) is a denormal.
x86 takes a microcode assist for arithmetic that makes or reads denormals. Measured on an Intel Xeon
(AMX), onnxruntime 1.32, one thread: Softmax over [8, 8, 240, 200] with its masked columns took
7.8 ms, 1.0 ms with denormals flushed (1.1 ms unmasked). In the prefix-shared graph, whose every new
row masks its later new keys, Softmax went from 2.1 to 0.6 ns an element, and the whole graph ran
1.09x as fast (int8, 8 documents x 110 tokens on a 65-token prefix, 2 threads). A flushed weight is
0 instead of 4e-39; the logits were bit-identical. These figures come from an interleaved A/B run
outside benchmarks/ (two worker processes, one per setting, 7 rounds each); bench_prefix and
bench_peers measured the scorers with the flags on (BENCHMARKS.md).

onnxruntime's `session.set_denormal_as_zero` sets the flags on the session's pool threads and, once
per process, on the thread that creates the first session. The calling thread runs its share of each
op too: a thread that runs sessions without having created the first one (serve's batcher threads)
sets its own flags with flush_denormals_here(); flushing the pool threads alone gained 2%. The
creating thread keeps the flags for the rest of the process (onnxruntime's rule): torch work on it
afterwards (verify's reference) flushes too, which changes only values under 1.2e-38.
"""

from __future__ import annotations

SESSION_CONFIG = ("session.set_denormal_as_zero", "1")
_FTZ_DAZ = 0x8040  # MXCSR bits: flush to zero (15), denormals are zero (6)


def flush_denormals_here() -> bool:
    """Flush-to-zero and denormals-are-zero on the calling thread, through the C library's fenv on
    x86-64 Linux (fenv_t there: the x87 environment's 28 bytes, then MXCSR); True if they are now on.
    Elsewhere nothing changes and it returns False (onnxruntime's pool threads still flush)."""
    import ctypes
    import ctypes.util
    import platform
    import sys

    if sys.platform != "linux" or platform.machine().lower() not in ("x86_64", "amd64"):
        return False

    class FEnv(ctypes.Structure):
        _fields_ = [("x87", ctypes.c_ubyte * 28), ("mxcsr", ctypes.c_uint32)]

    try:
        libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    except OSError:
        return False
    env = FEnv()
    if libm.fegetenv(ctypes.byref(env)) != 0:
        return False
    env.mxcsr |= _FTZ_DAZ
    if libm.fesetenv(ctypes.byref(env)) != 0:
        return False
    check = FEnv()
    return libm.fegetenv(ctypes.byref(check)) == 0 and check.mxcsr & _FTZ_DAZ == _FTZ_DAZ
