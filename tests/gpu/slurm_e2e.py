"""The job steps of tests/gpu/slurm_e2e.sh, and the models it loads.

  write-models PATH BYTES [PATH BYTES...] SEED
                                           safetensors files of at least the sizes
                                           (torch when it imports, else plain Python)
  step1 A                                  the job's prefetched model, bit for bit
  step2 A WORKDIR BLOCK_BYTES BLOCKS       still resident; KV swap out and back
  step3 A WORKDIR                          waits on step 2's event; reads through IPC
  switch A B                               release A, load B from the host model cache
  drop-cache PATH...                       push files out of the page cache (root)
  kv BLOCK_BYTES BLOCKS                    issue 18: swaps through the job's pool each way
                                           and both at once, and another process's waits
  kv-wait HANDLE_HEX WAITS                 (run by kv) waits on an opened handle
  kv-figures JSON PREFIX                   "NAME VALUE UNIT" lines of an aegaeon-cli kv bench JSON
  ready A                                  the first step of a job: every tensor of A
                                           a torch tensor (aegaeon_native), bit for bit
  first-use A                              a later step: views of the resident A
  plain-ready A                            the same without aegaeon: load_file(A)

Each step prints "ok - ...", "not ok - ...", "skip - ..." and "# figure: NAME VALUE
UNIT" lines, then "# done STEP". The ready, first-use and plain-ready steps also
print "# stamp: NAME EPOCH" lines: start (this file's first line), torch (torch
imported), context (CUDA context made), ready (every tensor there). On the cuda
backend torch and safetensors are required; on the host backend the tensors are
compared with the file's bytes.
"""
import time

T_START = time.time()   # before the imports: a step starts here

import json  # noqa: E402 (after T_START, as every import)
import os  # noqa: E402
import random  # noqa: E402
import struct  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

try:
    import torch
except ImportError:
    torch = None
T_TORCH = time.time()

GiB = 1 << 30
MiB = 1 << 20


def random_bytes(rnd, n):
    """n bytes from rnd; random.randbytes takes at most 2**31 bits at once."""
    return b"".join(rnd.randbytes(min(64 * MiB, n - off)) for off in range(0, n, 64 * MiB))


def say(ok, what, detail=""):
    line = ("ok - " if ok else "not ok - ") + what
    if detail:
        line += ": " + detail
    print(line.replace("\n", " | "), flush=True)
    return ok


def skip(what, why):
    print("skip - %s: %s" % (what, why), flush=True)


def figure(name, value, unit):
    print("# figure: %s %.6g %s" % (name, value, unit), flush=True)


def now():
    return time.perf_counter()


# ------------------------------------------------------------------ models

# Each layer: one tensor of each dtype, odd shapes; the small set keeps the
# same mix for files of a few MiB.
LAYER_BIG = [("BF16", (4099, 8191)), ("F16", (8191, 1021)), ("F32", (3001, 2047)), ("I8", (16383, 4093))]
LAYER_SMALL = [("BF16", (129, 255)), ("F16", (251, 33)), ("F32", (101, 67)), ("I8", (509, 127))]
EXTRA = [("norm.scale", "F32", ()), ("head.bias", "F16", (7,)), ("empty", "F32", (0, 5)),
         ("tiny", "I8", (3, 3, 3)), ("odd.bf16", "BF16", (13, 1))]
ITEM = {"BF16": 2, "F16": 2, "F32": 4, "I8": 1}


def nbytes(dtype, shape):
    n = ITEM[dtype]
    for d in shape:
        n *= d
    return n


def plan(target, edge=True):
    """(name, dtype, shape) list whose data adds up to at least target bytes;
    edge adds the EXTRA tensors (a scalar, an empty one, odd tiny shapes)."""
    layer = LAYER_BIG if target >= 1 * GiB else LAYER_SMALL
    out = [(n, dt, sh) for n, dt, sh in EXTRA] if edge else []
    total = sum(nbytes(dt, sh) for _, dt, sh in out)
    i = 0
    while total < target:
        for dt, sh in layer:
            out.append(("layers.%d.%s" % (i, dt.lower()), dt, sh))
            total += nbytes(dt, sh)
        i += 1
    return out


def write_torch(path, target, seed, edge=True):
    from safetensors.torch import save_file
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    as_int = {"BF16": (torch.int16, torch.bfloat16), "F16": (torch.int16, torch.float16),
              "F32": (torch.int32, torch.float32), "I8": (torch.int8, torch.int8)}
    tensors = {}
    for name, dt, shape in plan(target, edge):
        it, ft = as_int[dt]
        info = torch.iinfo(it)
        # Random bit patterns (NaNs included): compared as integers, bit for bit.
        t = torch.randint(info.min, info.max, shape, dtype=it, device=dev, generator=gen)
        tensors[name] = t.view(ft).cpu()
    save_file(tensors, path)


def write_plain(path, target, seed, edge=True):
    rnd = random.Random(seed)
    header, off = {}, 0
    items = plan(target, edge)
    for name, dt, shape in items:
        n = nbytes(dt, shape)
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text)
        for name, dt, shape in items:
            f.write(random_bytes(rnd, nbytes(dt, shape)))


def read_header(path):
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        h = json.loads(f.read(n))
    h.pop("__metadata__", None)
    return h, 8 + n


def file_tensor(f, header, start, name):
    b, e = header[name]["data_offsets"]
    f.seek(start + b)
    return f.read(e - b)


def has_safetensors():
    try:
        import safetensors.torch  # noqa: F401
    except ImportError:
        return False
    return True


def write_model(path, size, seed, edge=True):
    """A safetensors file of random bit patterns, readable by the job user (torch
    writes it where torch and safetensors are both there, plain Python else)."""
    (write_torch if torch is not None and has_safetensors() else write_plain)(path, size, seed, edge)
    os.chmod(path, 0o644)


def cmd_write_models(*args):
    if len(args) < 3 or len(args) % 2 == 0:
        sys.exit("write-models: expected PATH BYTES pairs and a SEED, got %s" % (args,))
    t0 = now()
    pairs = list(zip(args[:-1:2], args[1:-1:2]))
    for i, (path, size) in enumerate(pairs):
        write_model(path, int(size), int(args[-1]) + i)
    print("# wrote %s with %s in %.1f s" % (
        " and ".join("%s (%.2f GiB)" % (p, os.path.getsize(p) / GiB) for p, _ in pairs),
        "torch" if torch is not None else "plain Python", now() - t0))


def cmd_drop_cache(*paths):
    os.sync()
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)


# ------------------------------------------------------------------- steps

INT_OF = None
if torch is not None:
    INT_OF = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32,
              torch.int8: torch.int8}


def as_torch(view):
    """Zero-copy torch tensors over a DeviceArray: DLPack (every dtype), and the CUDA
    array interface where it has a type string (not BF16) and bytes."""
    views = [(torch.from_dlpack(view), "dlpack")]
    if view.dtype != "BF16" and view.size > 0:
        views.append((torch.as_tensor(view, device="cuda"), "cuda_array_interface"))
    return views


def compare_all(an, d, path, what, sample=None):
    """Every tensor of d (or those named in sample) against the file; True when all match."""
    header, start = read_header(path)
    names = sample if sample is not None else list(header)
    bad, ways, counts = [], {}, {}
    if an.device() == "cuda":
        from safetensors import safe_open
        from safetensors.torch import load_file
        if sample is None:
            t0 = now()
            ref = load_file(path, device="cuda")
            torch.cuda.synchronize()
            t_ref = now() - t0
        else:
            t_ref = None
            with safe_open(path, framework="pt", device="cuda") as f:
                ref = {name: f.get_tensor(name) for name in names}
        for name in names:
            view = d.get(name)
            if view is None:
                bad.append("%s missing" % name)
                continue
            counts[header[name]["dtype"]] = counts.get(header[name]["dtype"], 0) + 1
            try:
                r = ref[name]
                for t, way in as_torch(view):
                    same = t.dtype == r.dtype and tuple(t.shape) == tuple(r.shape)
                    same = same and torch.equal(t.view(INT_OF[t.dtype]), r.view(INT_OF[r.dtype]))
                    if t.numel() > 0 and t.data_ptr() != view.device_ptr:
                        bad.append("%s: %s copied (data_ptr %#x, view %#x)" % (name, way, t.data_ptr(),
                                                                             view.device_ptr))
                    if not same:
                        bad.append("%s through %s differs (%s %s vs %s %s)" % (
                            name, way, t.dtype, tuple(t.shape), r.dtype, tuple(r.shape)))
                    ways[way] = ways.get(way, 0) + 1
            except Exception as e:              # a failure to wrap is a result, not a crash
                bad.append("%s: %s: %s" % (name, type(e).__name__, e))
        del ref
        torch.cuda.empty_cache()
    else:
        t_ref = None
        with open(path, "rb") as f:
            for name in names:
                view = d.get(name)
                if view is None:
                    bad.append("%s missing" % name)
                    continue
                meta = header[name]
                if view.dtype != meta["dtype"] or list(view.shape) != meta["shape"]:
                    bad.append("%s: %s %s, file %s %s" % (name, view.dtype, view.shape, meta["dtype"],
                                                          meta["shape"]))
                elif view.tobytes() != file_tensor(f, header, start, name):
                    bad.append("%s differs" % name)
                counts[meta["dtype"]] = counts.get(meta["dtype"], 0) + 1
        ways["tobytes"] = len(names)
    if sample is None and len(d) != len(header):
        bad.append("%d tensors, the file has %d" % (len(d), len(header)))
    detail = "%d tensors (%s) through %s" % (
        len(names), ", ".join("%s %d" % kv for kv in sorted(counts.items())),
        ", ".join("%s %d" % kv for kv in sorted(ways.items())))
    say(not bad, what, detail if not bad else "; ".join(bad[:5]) + (" ..." if len(bad) > 5 else ""))
    return not bad, t_ref


def held_by_step(an):
    return an.stats()["job"]["blocks"]


def cmd_step1(a):
    import aegaeon_native as an
    size = os.path.getsize(a)
    t0 = now()
    d = an.load_safetensors(a)
    t_views = now() - t0
    say(an.stats()["job"] is not None, "step 1 attached to the job's agent",
        "agent pid %s" % (an.stats()["job"] or {}).get("agent_pid"))
    say(held_by_step(an) == 0, "step 1 used the job's prefetched chunks (it holds no blocks of its own)",
        "%d blocks" % held_by_step(an))
    figure("step1_model_views_s", t_views, "s")
    ok, t_ref = compare_all(an, d, a, "step 1: every tensor, zero-copy, bit for bit as safetensors loads it")
    if t_ref is not None:
        figure("safetensors_load_file_cuda_s", t_ref, "s")
        figure("safetensors_load_file_cuda_GBps", size / t_ref / 1e9, "GB/s")
    else:
        skip("safetensors.torch.load_file(device=cuda) baseline", "no torch on the host backend")
    print("# done step1", flush=True)


def cmd_step2(a, work, block_bytes, blocks):
    import aegaeon_native as an
    block_bytes, blocks = int(block_bytes), int(blocks)
    t0 = now()
    d = an.load_safetensors(a)
    t_ready = now() - t0
    figure("step2_model_ready_s", t_ready, "s")
    say(held_by_step(an) == 0, "step 2 found the model resident (no new load: it holds no blocks)")
    header, _ = read_header(a)
    names = list(header)
    compare_all(an, d, a, "step 2: first, middle and last tensors still bit-exact",
                sample=[names[0], names[len(names) // 2], names[-1]])

    total = block_bytes * blocks
    slab = an.SlabAllocator(0, total + MiB)
    pool = an.PinnedPool.from_job()
    kv = an.KVCache(0, block_bytes=block_bytes, gpu_blocks=blocks, host_blocks=blocks, slab=slab, pool=pool)
    g = kv.gpu_alloc(blocks)
    h = kv.host_alloc(blocks)
    rnd = random.Random(7)
    rnd.shuffle(h)                      # scattered: GPU block i goes to a random host block
    data = random_bytes(rnd, total)
    for i, gid in enumerate(g):
        kv.gpu_block(gid).copy_from(data[i * block_bytes:(i + 1) * block_bytes])
    outs, ins = [], []
    zero = bytes(block_bytes)
    for rep in range(3):
        t0 = now()
        kv.swap_out(g, h, wait=True)
        outs.append(now() - t0)
        if rep == 0:
            bad = [i for i, hid in enumerate(h)
                   if bytes(kv.host_block(hid)) != data[i * block_bytes:(i + 1) * block_bytes]]
            say(not bad, "KV: %d blocks of %d bytes swapped out to the job's pinned pool, bit-exact"
                % (blocks, block_bytes), "%d blocks differ" % len(bad) if bad else "")
            for gid in g:
                kv.gpu_block(gid).copy_from(zero)
        t0 = now()
        kv.swap_in(h, g, wait=True)
        ins.append(now() - t0)
    bad = [i for i, gid in enumerate(g)
           if kv.gpu_block(gid).tobytes() != data[i * block_bytes:(i + 1) * block_bytes]]
    say(not bad, "KV: %d blocks swapped back in to the GPU, bit-exact" % blocks,
        "%d blocks differ" % len(bad) if bad else "")
    figure("kv_swap_out_GBps", total / sorted(outs)[1] / 1e9, "GB/s")
    figure("kv_swap_in_GBps", total / sorted(ins)[1] / 1e9, "GB/s")

    # Export the event of one more swap-in for step 3, and live until it has waited on it.
    handle = kv.swap_in(h, g)
    tmp = os.path.join(work, "event.hex.tmp")
    with open(tmp, "w") as f:
        f.write(handle.hex())
    os.rename(tmp, os.path.join(work, "event.hex"))
    done = os.path.join(work, "step3.done")
    deadline = now() + 180
    while not os.path.exists(done) and now() < deadline:
        time.sleep(0.05)
    say(os.path.exists(done), "step 2 kept its exported event alive until step 3 was done")
    kv.wait(handle)
    kv.release(handle)
    kv.close()
    pool.close()
    slab.close()
    print("# done step2", flush=True)


def cmd_step3(a, work):
    import aegaeon_native as an
    path = os.path.join(work, "event.hex")
    deadline = now() + 180
    while not os.path.exists(path) and now() < deadline:
        time.sleep(0.05)
    try:
        if not say(os.path.exists(path), "step 3 got the event handle step 2 exported (a file in the work dir)"):
            return
        with open(path) as f:
            handle = bytes.fromhex(f.read().strip())
        t0 = now()
        an.wait_event_handle_bytes(handle, timeout=120)
        t_first = now() - t0
        t0 = now()
        an.wait_event_handle_bytes(handle, timeout=120)
        t_again = now() - t0
        say(True, "step 3 waited on step 2's KV swap-in event (another process)",
            "first wait %.0f us, again %.1f us" % (t_first * 1e6, t_again * 1e6))
        figure("event_wait_opened_us", t_again * 1e6, "us")
        # The job slab opened here through its memory IPC handle: the chunks' bytes as the file has them.
        d = an.load_safetensors(a)
        header, _ = read_header(a)
        names = list(header)
        compare_all(an, d, a, "step 3 read chunks of the model through the job slab's IPC handle",
                    sample=[names[1], names[-1]])
        say(held_by_step(an) == 0, "step 3 loaded nothing (it holds no blocks)")
    finally:
        open(os.path.join(work, "step3.done"), "w").close()
        print("# done step3", flush=True)


def cmd_switch(a, b):
    import aegaeon_native as an
    size_b = os.path.getsize(b)
    t0 = now()
    chunks = an.prefetch_file_to_gpu_chunks(a, 0)      # the job's load of A, found again
    ids = sorted(set(c["slab_id"] for c in chunks))
    an.release_prefetch_chunks(ids)
    t_rel = now()
    d = an.load_safetensors(b)
    t_end = now()
    say(True, "model switch: released A (%d blocks), B ready on the GPU" % len(ids),
        "release %.3f s, load %.3f s" % (t_rel - t0, t_end - t_rel))
    figure("model_switch_s", t_end - t0, "s")
    st = json.loads(subprocess.run(["aegaeon-cli", "status", "--json"], capture_output=True, text=True,
                                   check=True).stdout)
    on_gpu = [(l["path"], l["state"]) for l in st["loads"]]
    say(on_gpu == [(os.path.realpath(b), "loaded")], "after the switch the job's slab holds B alone",
        "loads: %s" % on_gpu)
    figure("model_switch_load_B_GBps", size_b / (t_end - t_rel) / 1e9, "GB/s")
    ok, t_ref = compare_all(an, d, b, "model B after the switch: every tensor bit-exact")
    if t_ref is not None:
        figure("safetensors_load_file_cuda_B_s", t_ref, "s")
        figure("safetensors_load_file_cuda_B_GBps", size_b / t_ref / 1e9, "GB/s")
    else:
        skip("safetensors.torch.load_file(B, device=cuda) baseline", "no torch on the host backend")
    print("# done switch", flush=True)


# --------------------------------------------------------- KV in a job (issue 18)

def timed(fn, reps):
    """The median seconds of reps calls of fn after one untimed call."""
    fn()
    ts = []
    for _ in range(reps):
        t0 = now()
        fn()
        ts.append(now() - t0)
    return sorted(ts)[len(ts) // 2]


def cmd_kv(block_bytes, blocks):
    """Swaps through the job's pool and a lease of its slab, from Python, as an engine
    would: set A out (GPU to host), set B in, each alone and both at once from two
    threads (the cache's two streams); every block checked after; then another
    process waits on an opened handle of this one's."""
    import threading
    import aegaeon_native as an
    block_bytes, n = int(block_bytes), int(blocks)
    slab = an.SlabAllocator(0, 2 * n * block_bytes + MiB)
    pool = an.PinnedPool.from_job()
    kv = an.KVCache(0, block_bytes=block_bytes, gpu_blocks=2 * n, host_blocks=2 * n, slab=slab, pool=pool)
    g = kv.gpu_alloc(2 * n)
    h = kv.host_alloc(2 * n)
    random.Random(18).shuffle(h)
    rnd = random.Random(19)
    data = [rnd.randbytes(block_bytes) for _ in range(2 * n)]   # data[i]: host block h[i] at first
    for i, hid in enumerate(h):
        kv.host_block(hid)[:] = data[i]
    kv.swap_in(h, g, wait=True)                                  # GPU block g[i] holds data[i]
    ga, gb, ha, hb = g[:n], g[n:], h[:n], h[n:]
    rot = lambda ids: ids[-1:] + ids[:-1]                        # noqa: E731 (entry i -> block i - 1)
    out_s = timed(lambda: kv.swap_out(ga, rot(ha), wait=True), 5)
    in_s = timed(lambda: kv.swap_in(hb, rot(gb), wait=True), 5)
    figure("kv_py_job_out_GBps", n * block_bytes / out_s / 1e9, "GB/s")
    figure("kv_py_job_in_GBps", n * block_bytes / in_s / 1e9, "GB/s")
    errors = []

    def both():
        th = threading.Thread(target=lambda: kv.swap_in(hb, rot(gb), wait=True))
        th.start()
        try:
            kv.swap_out(ga, rot(ha), wait=True)
        except Exception as e:      # noqa: BLE001 (reported below)
            errors.append(e)
        th.join()
    both_s = timed(both, 5)
    figure("kv_py_job_both_GBps", 2 * n * block_bytes / both_s / 1e9, "GB/s")
    bad = [i for i in range(n) if bytes(kv.host_block(ha[i - 1])) != data[i]]
    bad += [i for i in range(n) if kv.gpu_block(gb[i - 1]).tobytes() != data[n + i]]
    say(not bad and not errors, "KV from Python in the job: %d blocks of %d bytes out, in and both at once "
        "(two threads), every block bit-exact" % (n, block_bytes),
        "%d blocks differ, errors %s" % (len(bad), errors) if bad or errors else "")
    handle = kv.swap_out(ga[:1], ha[:1])
    kv.wait(handle)
    r = subprocess.run([sys.executable, __file__, "kv-wait", handle.hex(), "2000"], capture_output=True, text=True,
                       timeout=300)
    got = dict(line.split()[2:4] for line in r.stdout.splitlines() if line.startswith("# wait"))
    if say(r.returncode == 0 and "median_us" in got, "another step's process waited on this one's KV event",
           (r.stdout + r.stderr).strip()[-300:]):
        figure("kv_py_event_wait_opened_median_us", float(got["median_us"]), "us")
        figure("kv_py_event_wait_first_after_open_us", float(got["first_after_open_us"]), "us")
    kv.release(handle)
    kv.close()
    pool.close()
    slab.close()
    print("# done kv", flush=True)


def cmd_kv_wait(hex_handle, waits):
    """Another process's event: the first wait opens it (the agent answers first), then
    each wait alone, timed; prints '# wait NAME VALUE' lines."""
    import aegaeon_native as an
    handle, waits = bytes.fromhex(hex_handle), int(waits)
    an.wait_event_handle_bytes(handle, timeout=120)
    t0 = now()
    an.wait_event_handle_bytes(handle, timeout=120)
    print("# wait first_after_open_us %.3f" % ((now() - t0) * 1e6))
    ts = []
    for _ in range(waits):
        t0 = now()
        an.wait_event_handle_bytes(handle, timeout=120)
        ts.append(now() - t0)
    ts.sort()
    print("# wait median_us %.3f" % (ts[len(ts) // 2] * 1e6))
    print("# wait p99_us %.3f" % (ts[len(ts) * 99 // 100] * 1e6))


def cmd_kv_figures(path, prefix):
    with open(path) as f:
        d = json.load(f)
    for r in d["results"]:
        for k in ("out", "in", "both"):
            for way, v in r[k].items():
                if v is not None:
                    print("%s_%dKiB_%s_%s_GBps %.4g GB/s" % (prefix, r["block_bytes"] >> 10, k, way, v))


# ------------------------------------------------ what a user waits for (--userpath)

def stamp(name, t=None):
    print("# stamp: %s %.6f" % (name, time.time() if t is None else t), flush=True)


def on_gpu():
    return torch is not None and torch.cuda.is_available()


def make_context():
    """The CUDA context a torch step makes anyway, made before the clock starts."""
    if on_gpu():
        torch.cuda.init()
        torch.empty(1, device="cuda")
        torch.cuda.synchronize()


def cmd_views(a, what):
    """Every tensor of A as a torch tensor through aegaeon_native (the views
    themselves without torch), timed from the step's start; then checked."""
    stamp("start", T_START)
    stamp("torch", T_TORCH)
    make_context()
    stamp("context")
    import aegaeon_native as an
    d = an.load_safetensors(a)
    tensors = {k: torch.from_dlpack(v) for k, v in d.items()} if torch is not None else d
    if on_gpu():
        torch.cuda.synchronize()
    stamp("ready")
    say(held_by_step(an) == 0, "%s: the job's load of A, reused (the step holds no blocks)" % what,
        "%d blocks" % held_by_step(an))
    say(len(tensors) == len(d), "%s: %d tensors as %s" % (what, len(tensors),
                                                          "torch tensors" if torch is not None else "views"))
    compare_all(an, d, a, "%s: every tensor of A bit for bit" % what)


def cmd_ready(a):
    cmd_views(a, "first step")
    print("# done ready", flush=True)


def cmd_first_use(a):
    cmd_views(a, "new step")
    print("# done first-use", flush=True)


def cmd_plain_ready(a):
    """The same step in a job without aegaeon: safetensors' load_file (plain
    reads of every tensor where torch or safetensors is missing)."""
    stamp("start", T_START)
    stamp("torch", T_TORCH)
    make_context()
    stamp("context")
    header, start = read_header(a)
    try:
        from safetensors.torch import load_file
    except ImportError:
        load_file = None
    if load_file is not None:
        dev = "cuda" if on_gpu() else "cpu"
        got = load_file(a, device=dev)
        if on_gpu():
            torch.cuda.synchronize()
        how = "load_file(A, device=%r)" % dev
    else:
        with open(a, "rb") as f:
            got = {name: file_tensor(f, header, start, name) for name in header}
        how = "every tensor read with plain Python (no torch and safetensors here)"
    stamp("ready")
    say(len(got) == len(header), "plain step: %s, %d tensors" % (how, len(got)))
    print("# done plain-ready", flush=True)


def main():
    cmds = {"write-models": cmd_write_models, "drop-cache": cmd_drop_cache, "step1": cmd_step1,
            "step2": cmd_step2, "step3": cmd_step3, "switch": cmd_switch, "kv": cmd_kv,
            "kv-wait": cmd_kv_wait, "kv-figures": cmd_kv_figures, "ready": cmd_ready,
            "first-use": cmd_first_use, "plain-ready": cmd_plain_ready}
    if len(sys.argv) < 2 or sys.argv[1] not in cmds:
        sys.exit(__doc__)
    cmds[sys.argv[1]](*sys.argv[2:])


if __name__ == "__main__":
    main()
