#!/usr/bin/env python3
"""KV swaps from Python, per call, and where a call's time goes.

An engine swaps a request's blocks with one call and waits for its event:
this times that call (swap_out / swap_in with wait=True, set A out and set B
in, blocks randomly placed, every block checked after) and splits it into
its parts, each the median of --repeat calls:
  ids       turning the two id lists into C arrays (a call whose lists
            differ in length: converted, then refused)
  submit    swap_out() / swap_in() returning the event's handle (ids,
            checks, the kernel queued)
  wait      kv.wait(handle) until the blocks are there
  release   kv.release(handle)
The same call from C is `aegaeon-cli kv bench` (issue, stream sync, release);
the gap between the two is the module's per-call cost. With numpy present
each way is timed twice: ids as lists of ints, and as numpy arrays (read in
place through the array interface), the rows out_numpy and in_numpy.

Outside a job the cache makes its own slab and pinned memory; with --job it
swaps through the job's pinned pool and a lease of the job's slab, as a step
of a serving engine does (run it under srun in a job with --aegaeon-slab and
--aegaeon-pinned). Prints a table, and with --json one JSON object.
Usage: kv_py_calls.py [--block 32KiB] [--blocks 8192] [--repeat 10] [--job] [--json]
"""
import argparse
import json
import random
import sys
import time

MiB = 1 << 20
UNITS = {"": 1, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}


def size(text):
    t = text.strip().upper()
    for unit in sorted(UNITS, key=len, reverse=True):
        if unit and t.endswith(unit):
            return int(t[:-len(unit)]) * UNITS[unit]
    return int(t)


def median(v):
    v = sorted(v)
    return v[len(v) // 2]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--block", type=size, default=32 << 10, help="block size (default 32KiB)")
    ap.add_argument("--blocks", type=int, default=8192, help="blocks per call (default 8192)")
    ap.add_argument("--repeat", type=int, default=10, help="calls timed per figure (default 10)")
    ap.add_argument("--job", action="store_true", help="through the job's pinned pool and slab")
    ap.add_argument("--json", action="store_true", help="print one JSON object as well")
    a = ap.parse_args()
    if a.block <= 0 or a.blocks <= 1 or a.repeat <= 0:
        ap.error("--block, --blocks (> 1) and --repeat must be positive")
    import aegaeon_native as an

    n, bb = a.blocks, a.block
    if a.job:
        slab = an.SlabAllocator(0, 2 * n * bb + MiB)
        pool = an.PinnedPool.from_job()
        kv = an.KVCache(0, block_bytes=bb, gpu_blocks=2 * n, host_blocks=2 * n, slab=slab, pool=pool)
    else:
        kv = an.KVCache(0, block_bytes=bb, gpu_blocks=2 * n, host_blocks=2 * n)
    g, h = kv.gpu_alloc(2 * n), kv.host_alloc(2 * n)
    random.Random(18).shuffle(h)
    rnd = random.Random(19)
    data = [rnd.randbytes(bb) for _ in range(2 * n)]
    for i, hid in enumerate(h):
        kv.host_block(hid)[:] = data[i]
    kv.swap_in(h, g, wait=True)                 # GPU block g[i] holds data[i]
    ga, gb, ha, hb = g[:n], g[n:], h[:n], h[n:]
    # Each call moves entry i to block i - 1 of the other side, so that a
    # block that did not move is seen; the lists are made before timing.
    ha_rot, gb_rot = ha[-1:] + ha[:-1], gb[-1:] + gb[:-1]
    calls = {"out": (kv.swap_out, ga, ha_rot), "in": (kv.swap_in, hb, gb_rot)}
    try:
        import numpy as np
    except ImportError:
        np = None
    if np is not None:
        arr = lambda ids: np.array(ids, dtype=np.uint32)     # noqa: E731
        calls["out_numpy"] = (kv.swap_out, arr(ga), arr(ha_rot))
        calls["in_numpy"] = (kv.swap_in, arr(hb), arr(gb_rot))
    rows = {}
    for way, (fn, src, dst) in calls.items():
        whole, ids, submit, wait, release = [], [], [], [], []
        fn(src, dst, wait=True)
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            fn(src, dst, wait=True)
            whole.append(time.perf_counter() - t0)
        short = dst[:-1]
        for _ in range(a.repeat):
            t0 = time.perf_counter()
            try:
                fn(src, short)
            except ValueError:
                pass
            t1 = time.perf_counter()
            handle = fn(src, dst)
            t2 = time.perf_counter()
            kv.wait(handle)
            t3 = time.perf_counter()
            kv.release(handle)
            t4 = time.perf_counter()
            ids.append(t1 - t0)
            submit.append(t2 - t1)
            wait.append(t3 - t2)
            release.append(t4 - t3)
        rows[way] = {"call_s": median(whole), "GBps": n * bb / median(whole) / 1e9, "ids_us": median(ids) * 1e6,
                     "submit_us": median(submit) * 1e6, "wait_us": median(wait) * 1e6,
                     "release_us": median(release) * 1e6}
    bad = [i for i in range(n) if bytes(kv.host_block(ha_rot[i])) != data[i]]
    bad += [i for i in range(n) if kv.gpu_block(gb_rot[i]).tobytes() != data[n + i]]
    kv.close()

    print("KV from Python, %d blocks of %d KiB a call (%s), medians of %d" %
          (n, bb >> 10, "through the job's pool and slab" if a.job else "standalone", a.repeat))
    print("%-9s %9s %8s %9s %10s %10s %11s" % ("way", "call", "GB/s", "ids", "submit", "wait", "release"))
    for way, r in rows.items():
        print("%-9s %7.2f ms %8.1f %6.0f us %7.0f us %7.0f us %8.0f us" %
              (way, r["call_s"] * 1e3, r["GBps"], r["ids_us"], r["submit_us"], r["wait_us"], r["release_us"]))
    print("every block moved bit-exact" if not bad else "%d blocks differ" % len(bad))
    if a.json:
        print(json.dumps({"block_bytes": bb, "blocks": n, "in_job": a.job, "verified": not bad, "ways": rows}))
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
