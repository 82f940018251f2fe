#!/usr/bin/env python3
"""Model loading to the GPU: aegaeon prefetch against the usual ways, in one run.

Writes safetensors files of the given sizes with torch, then for each file
measures (medians over --repeat runs):
  page cache -> GPU: aegaeon (auto, mmap, read, mixed feeds) vs
                     safetensors.torch.load_file(device="cuda") and
                     torch CPU load + pin_memory() + .to("cuda")
  host cache -> GPU: aegaeon's pinned host model cache vs raw pinned H2D copy
  cold file  -> GPU: aegaeon (auto, read feed, read feed with O_DIRECT) vs
                     dd iflag=direct (raw sequential read)
  time to first chunk, and aegaeon against a naive read+cudaMemcpy loop.
Prints a table with ratios and writes every number as JSON (--out).

Needs torch with CUDA and safetensors; aegaeon-cli on PATH (or --cli).
Cold runs drop the file's pages (posix_fadvise DONTNEED, and
/proc/sys/vm/drop_caches when writable, i.e. as root).
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

GiB = 1 << 30
MiB = 1 << 20


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def write_model(path, size_bytes):
    """A llama-like layout: big bf16 matrices and small norm vectors."""
    import torch
    from safetensors.torch import save_file

    if os.path.exists(path) and os.path.getsize(path) >= size_bytes:
        return
    hidden = 8192
    mat = hidden * hidden * 2                    # 128 MiB of bf16
    tensors = {}
    total, i = 0, 0
    gen = torch.Generator().manual_seed(0)
    while total + mat <= size_bytes:
        tensors[f"layers.{i}.weight"] = torch.randn(hidden, hidden, generator=gen).to(torch.bfloat16)
        tensors[f"layers.{i}.norm"] = torch.ones(hidden, dtype=torch.float32)
        total += mat + hidden * 4
        i += 1
    left = (size_bytes - total) // 2
    if left > 0:
        tensors["tail"] = torch.randn(left, generator=gen).to(torch.bfloat16)
    log(f"writing {path} ({len(tensors)} tensors)")
    save_file(tensors, path)
    os.sync()


def drop_cache(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass


def warm_cache(path):
    with open(path, "rb", buffering=0) as f:
        while f.read(64 * MiB):
            pass


def cli(args, *extra):
    cmd = [args.cli] + list(extra)
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: rc {r.returncode}: {r.stderr.strip()}")
    return json.loads(r.stdout)


def ours(args, path, feed="auto", cold=False, direct=False):
    """GB/s and first-chunk ms of one aegaeon-cli prefetch, median of repeats
    (on args.device where args has one: bench/userpath.py runs it on the host too)."""
    rates, firsts, used = [], [], None
    for _ in range(args.repeat):
        if cold:
            drop_cache(path)
        extra = ["--feed", feed] + (["--direct"] if direct else [])
        j = cli(args, "prefetch", path, "--device", getattr(args, "device", "cuda"), "--gpu", str(args.gpu),
                "--chunk", args.chunk, "--json", "--local", *extra)
        rates.append(j["gbps"])
        firsts.append(j["first_chunk_ms"])
        used = j["feed"]
    return {"gbps": statistics.median(rates), "first_chunk_ms": statistics.median(firsts),
            "feed": used, "runs": rates}


def ours_bench(args, path, cache):
    """aegaeon-cli bench prefetch --json, its one row (ours vs read + memcpy, GB/s) as ours_gbps and naive_gbps."""
    extra = ["--cache"] if cache else []
    j = cli(args, "bench", "prefetch", path, "--device", "cuda", "--gpu", str(args.gpu),
            "--chunk", args.chunk, "--repeat", str(args.repeat), "--json", *extra)
    row = j["rows"][0]
    return {**j, "ours_gbps": row["aegaeon"], "naive_gbps": row["baseline"]}


def timed_torch(fn, repeat, size):
    import torch

    rates = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        torch.cuda.synchronize()
        rates.append(size / (time.perf_counter() - t0) / 1e9)
        del out
        torch.cuda.empty_cache()
    return {"gbps": statistics.median(rates), "runs": rates}


def st_load_cuda(path):
    from safetensors.torch import load_file
    return load_file(path, device=f"cuda:{ARGS.gpu}")


def torch_pin_copy(path):
    from safetensors.torch import load_file
    cpu = load_file(path, device="cpu")
    return {k: v.pin_memory().to(f"cuda:{ARGS.gpu}", non_blocking=True) for k, v in cpu.items()}


def raw_h2d(size):
    """Pinned host -> GPU with one big copy: the PCIe ceiling."""
    import torch

    n = min(size, 4 * GiB)
    src = torch.empty(n, dtype=torch.uint8).pin_memory()
    dst = torch.empty(n, dtype=torch.uint8, device=f"cuda:{ARGS.gpu}")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    rates = []
    for _ in range(ARGS.repeat):
        t0 = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        rates.append(n / (time.perf_counter() - t0) / 1e9)
    del src, dst
    torch.cuda.empty_cache()
    return {"gbps": statistics.median(rates), "runs": rates}


def dd_direct(path, size):
    rates = []
    for _ in range(ARGS.repeat):
        t0 = time.perf_counter()
        r = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=64M", "iflag=direct"],
                           capture_output=True, text=True)
        dt = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"dd: {r.stderr.strip()}")
        rates.append(size / dt / 1e9)
    return {"gbps": statistics.median(rates), "runs": rates}


def main():
    global ARGS
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cli", default=shutil.which("aegaeon-cli") or "aegaeon-cli")
    p.add_argument("--dir", default="/tmp/aegaeon-bench", help="where the model files go")
    p.add_argument("--sizes", default="4,16", help="file sizes in GiB, comma-separated")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--chunk", default="64MiB")
    p.add_argument("--gpu", type=int, default=0)
    p.add_argument("--skip-cold", action="store_true")
    p.add_argument("--keep", action="store_true", help="keep the model files")
    p.add_argument("--out", default="prefetch_bench.json")
    ARGS = args = p.parse_args()

    import torch
    torch.cuda.init()
    torch.empty(1, device=f"cuda:{args.gpu}")
    os.makedirs(args.dir, exist_ok=True)
    results = {"gpu": torch.cuda.get_device_name(args.gpu), "repeat": args.repeat,
               "chunk": args.chunk, "files": {}}
    rows = []

    for gib in [int(x) for x in args.sizes.split(",")]:
        path = os.path.join(args.dir, f"model-{gib}GiB.safetensors")
        write_model(path, gib * GiB)
        size = os.path.getsize(path)
        r = {}
        log(f"{path}: page cache")
        warm_cache(path)
        r["ours_auto"] = ours(args, path, "auto")
        r["ours_mmap"] = ours(args, path, "mmap")
        r["ours_read"] = ours(args, path, "read")
        r["ours_mixed"] = ours(args, path, "mixed")
        r["naive"] = ours_bench(args, path, cache=False)
        r["st_load_cuda"] = timed_torch(lambda: st_load_cuda(path), args.repeat, size)
        r["torch_pin"] = timed_torch(lambda: torch_pin_copy(path), args.repeat, size)
        log(f"{path}: host cache")
        r["ours_cache"] = ours_bench(args, path, cache=True)
        r["raw_h2d"] = raw_h2d(size)
        if not args.skip_cold:
            log(f"{path}: cold")
            r["dd_direct"] = dd_direct(path, size)
            r["ours_cold_auto"] = ours(args, path, "auto", cold=True)
            r["ours_cold_read"] = ours(args, path, "read", cold=True)
            r["ours_cold_direct"] = ours(args, path, "read", cold=True, direct=True)
        results["files"][f"{gib}GiB"] = r

        rows += [
            (f"{gib} GiB page cache", "aegaeon auto", r["ours_auto"]["gbps"], r["ours_auto"]["first_chunk_ms"], ""),
            ("", "aegaeon mmap feed", r["ours_mmap"]["gbps"], r["ours_mmap"]["first_chunk_ms"], ""),
            ("", "aegaeon read feed", r["ours_read"]["gbps"], r["ours_read"]["first_chunk_ms"], ""),
            ("", "aegaeon mixed feed", r["ours_mixed"]["gbps"], r["ours_mixed"]["first_chunk_ms"], ""),
            ("", "safetensors load_file(cuda)", r["st_load_cuda"]["gbps"], None,
             f"aegaeon {r['ours_auto']['gbps'] / r['st_load_cuda']['gbps']:.1f}x"),
            ("", "torch load + pin + .to(cuda)", r["torch_pin"]["gbps"], None,
             f"aegaeon {r['ours_auto']['gbps'] / r['torch_pin']['gbps']:.1f}x"),
            ("", "naive read + cudaMemcpy", r["naive"]["naive_gbps"], None,
             f"aegaeon {r['naive']['ours_gbps'] / r['naive']['naive_gbps']:.1f}x"),
            ("", "target >= 50 GB/s (auto)", None, None, "met" if r["ours_auto"]["gbps"] >= 50 else "NOT met"),
            (f"{gib} GiB host cache", "aegaeon pinned cache", r["ours_cache"]["ours_gbps"],
             r["ours_cache"]["first_chunk_ms"],
             f"{100 * r['ours_cache']['ours_gbps'] / r['raw_h2d']['gbps']:.0f}% of raw"),
            ("", "raw pinned H2D", r["raw_h2d"]["gbps"], None,
             "target >= 52 GB/s: " + ("met" if r["ours_cache"]["ours_gbps"] >= 52 else "NOT met")),
        ]
        if not args.skip_cold:
            dd = r["dd_direct"]["gbps"]
            for key, name in (("ours_cold_auto", "aegaeon auto"), ("ours_cold_read", "aegaeon read feed"),
                              ("ours_cold_direct", "aegaeon read + O_DIRECT")):
                rows.append((f"{gib} GiB cold" if key == "ours_cold_auto" else "", name, r[key]["gbps"],
                             r[key]["first_chunk_ms"], f"{100 * r[key]['gbps'] / dd:.0f}% of dd"))
            best_cold = max(r[k]["gbps"] for k in ("ours_cold_auto", "ours_cold_read", "ours_cold_direct"))
            rows.append(("", "dd iflag=direct", dd, None,
                         "target >= 95%: " + ("met" if best_cold >= 0.95 * dd else "NOT met")))
        if not args.keep:
            os.unlink(path)

    print(f"\n{results['gpu']}, chunks of {args.chunk}, median of {args.repeat}\n")
    print(f"{'case':<22} {'loader':<30} {'GB/s':>8} {'1st chunk':>10}  note")
    for case, name, gbps, first, note in rows:
        g = f"{gbps:8.2f}" if gbps is not None else " " * 8
        f = f"{first:8.2f}ms" if first is not None else " " * 10
        print(f"{case:<22} {name:<30} {g} {f}  {note}")
    with open(args.out, "w") as f:
        json.dump(results, f, indent=2)
    log(f"\nall numbers in {args.out}")


if __name__ == "__main__":
    main()
