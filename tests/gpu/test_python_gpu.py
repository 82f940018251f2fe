#!/usr/bin/env python3
"""GPU test of aegaeon_native on a CUDA machine with torch and safetensors.

The seed example verbatim on a real file; a torch-written safetensors model
loaded and compared bit for bit with safetensors.torch.load_file; zero-copy
torch views (as_tensor through __cuda_array_interface__, from_dlpack); two
processes sharing event handles; no device memory left behind; the time of
our loader against safetensors'; a transformers model written by
save_pretrained in shards, loaded with aegaeon_native.torch.load_into and
from_pretrained and compared with transformers' from_pretrained (every
parameter bit for bit, the logits), per
tensor waits and chunk dicts on the GPU, and both times. Prints ok/not ok lines
and "N passed, N failed"; exits non-zero on failure.

Needs: the built module on PYTHONPATH (aegaeon_native.abi3.so), the PyPI
packages torch, safetensors and transformers, one GPU. AEGAEON_TEST_MODEL_GIB
sets the model size (default 2).
"""
import gc
import json
import os
import re
import shutil
import subprocess
import sys
import time
import traceback

os.environ.setdefault("AEGAEON_DEVICE", "cuda")
os.environ.setdefault("AEGAEON_CONFIG", "/dev/null")
# The prefetch slab; torch needs room beside it for load_file's copy.
os.environ.setdefault("AEGAEON_PREFETCH_SLAB", "20GiB")

import torch  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import aegaeon_native as an  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
TMP = os.environ.get("TMPDIR", "/tmp")
passed = failed = 0


def check(name, fn):
    global passed, failed
    try:
        fn()
        passed += 1
        print("ok - %s" % name, flush=True)
    except Exception:
        failed += 1
        print("not ok - %s" % name, flush=True)
        traceback.print_exc(file=sys.stdout)


def bytes_of(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


def gpu_free():
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


SEED = '''
import aegaeon_native as an
chunks = an.prefetch_file_to_gpu_chunks("/tmp/test_model.bin", gpu_id=0, chunk_bytes=32*1024*1024)
an.wait_event_handle_bytes(chunks[0]["event_handle"])
an.release_prefetch_chunks([chunks[0]["slab_id"]])
'''


def test_seed():
    size = 512 * MiB + 12345
    g = torch.Generator().manual_seed(1)
    data = torch.randint(0, 256, (size,), dtype=torch.uint8, generator=g)
    with open("/tmp/test_model.bin", "wb") as f:
        f.write(data.numpy().tobytes())
    scope = {}
    exec(SEED, scope)
    chunks = scope["chunks"]
    assert len(chunks) == (size + 32 * MiB - 1) // (32 * MiB), len(chunks)
    ref = data.cuda()
    off = chunks[0]["size"]
    for c in chunks[1:]:
        an.wait_event_handle_bytes(c["event_handle"])
        t = torch.as_tensor(an.chunk_view(c), device="cuda")
        assert t.data_ptr() == c["device_ptr"], "as_tensor copied"
        assert torch.equal(t, ref[off:off + c["size"]]), "chunk at %d differs" % off
        off += c["size"]
    assert off == size
    del t
    an.release_prefetch_chunks([c["slab_id"] for c in chunks[1:]])
    assert an.stats()["prefetch"][0]["blocks"] == 0
    r = subprocess.run([sys.executable, "-c", SEED + "print(len(chunks))"], capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == str(len(chunks)), r.stderr


def make_model(path, gib):
    g = torch.Generator().manual_seed(2)
    tensors = {}
    n = 0
    dtypes = [torch.bfloat16, torch.float16, torch.float32, torch.int64, torch.int8, torch.bool, torch.uint8]
    i = 0
    while n < gib * GiB:
        dt = dtypes[i % len(dtypes)]
        shape = (4096, 4096) if i % 3 else (11008, 4096 // (1 + i % 2))
        if dt.is_floating_point:
            t = torch.randn(shape, generator=g).to(dt)
        elif dt == torch.bool:
            t = torch.randint(0, 2, shape, generator=g).bool()
        else:
            t = torch.randint(-100, 100, shape, generator=g).to(dt)
        tensors["model.layers.%d.weight" % i] = t
        n += t.numel() * t.element_size()
        i += 1
    tensors["model.norm.bias"] = torch.randn(7, generator=g)
    tensors["model.scalar"] = torch.tensor(3.5)
    tensors["model.empty"] = torch.zeros(0, 5)
    save_file(tensors, path, metadata={"format": "pt"})
    return tensors


state = {}


def test_safetensors_bit_for_bit():
    path = os.path.join(TMP, "aegaeon_test_model.safetensors")
    gib = float(os.environ.get("AEGAEON_TEST_MODEL_GIB", "2"))
    make_model(path, gib)
    state["path"] = path
    ref = load_file(path, device="cuda")
    ours = an.load_safetensors(path, gpu_id=0)
    assert set(ours) == set(ref), set(ours) ^ set(ref)
    for name, t in ref.items():
        v = ours[name]
        mine = torch.from_dlpack(v)
        assert mine.device.type == "cuda"
        assert mine.dtype == t.dtype, (name, mine.dtype, t.dtype)
        assert tuple(mine.shape) == tuple(t.shape), (name, mine.shape, t.shape)
        if t.numel():
            assert mine.data_ptr() == v.device_ptr, "from_dlpack copied %s" % name
        assert torch.equal(bytes_of(mine), bytes_of(t)), "%s differs" % name
    del ref, ours, mine, v, t


def test_zero_copy():
    path = state["path"]
    ours = an.load_safetensors(path)
    for name, v in ours.items():
        if v.typestr is None or v.nbytes == 0:
            continue
        t = torch.as_tensor(v, device="cuda")
        assert t.data_ptr() == v.device_ptr, name
        assert tuple(t.shape) == v.shape
        break
    bf = next(v for v in ours.values() if v.dtype == "BF16")
    t16 = torch.as_tensor(bf.view("I16"), device="cuda").view(torch.bfloat16)
    assert t16.data_ptr() == bf.device_ptr
    t.reshape(-1)[0] = 42                           # writes land in our memory
    torch.cuda.synchronize()
    assert v.tobytes()[:t.element_size()] == bytes_of(t.reshape(-1)[:1]).cpu().numpy().tobytes()
    s = an.SlabAllocator(0, 64 * MiB)
    b = s.alloc(16 * MiB)
    tb = torch.as_tensor(b.view("F32"), device="cuda")
    assert tb.data_ptr() == b.device_ptr
    tb.fill_(1.5)
    torch.cuda.synchronize()
    assert b.view("F32").tobytes()[:8] == torch.tensor([1.5, 1.5]).numpy().tobytes()
    del tb, t, t16, b, bf, v, ours
    s.close()


def test_two_processes_share_events():
    path = "/tmp/test_model.bin"
    chunks = an.prefetch_file_to_gpu_chunks(path, 0, 32 * MiB)
    code = ("import aegaeon_native as an, sys, time\n"
            "t0 = time.perf_counter()\n"
            "for h in sys.argv[1:]:\n    an.wait_event_handle_bytes(bytes.fromhex(h), timeout=60)\n"
            "print(len(sys.argv) - 1)\n"
            "print(an.create_event_handle_bytes().hex(), flush=True)\n"
            "sys.stdin.read()\n")
    p = subprocess.Popen([sys.executable, "-c", code] + [c["event_handle"].hex() for c in chunks],
                         stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == str(len(chunks))
        h = bytes.fromhex(p.stdout.readline().strip())
        an.wait_event_handle_bytes(h, timeout=60)
        t0 = time.perf_counter()
        for _ in range(1000):
            an.wait_event_handle_bytes(h)
        per = (time.perf_counter() - t0) / 1000
        print("# opened-handle wait from Python: %.1f us" % (per * 1e6))
    finally:
        p.stdin.close()
        p.wait(timeout=120)
        p.stdout.close()
    assert p.returncode == 0
    an.release_prefetch_chunks([c["slab_id"] for c in chunks])


def test_no_device_memory_left():
    an.release_all_prefetch_events()
    torch.cuda.empty_cache()
    before = gpu_free()
    for _ in range(2):
        d = an.load_safetensors(state["path"])
        kv = an.KVCache(0, block_bytes=32768, gpu_blocks=4096, host_blocks=4096)
        g = kv.gpu_alloc(1024)
        h = kv.host_alloc(1024)
        kv.swap_out(g, h, wait=True)
        del d, kv
        an.release_all_prefetch_events()
    after = gpu_free()
    assert abs(before - after) < 64 * MiB, "device memory: %d MiB before, %d MiB after" % (
        before // MiB, after // MiB)


def test_timing():
    path = state["path"]
    size = os.path.getsize(path)
    with open(path, "rb") as f:                     # in the page cache for both
        while f.read(64 * MiB):
            pass
    an.load_safetensors(path)                       # the engine and its slab exist now
    runs = {"aegaeon_native.load_safetensors": [], "safetensors.torch.load_file(device=cuda)": []}
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        d = an.load_safetensors(path)
        runs["aegaeon_native.load_safetensors"].append(time.perf_counter() - t0)
        del d
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        d = load_file(path, device="cuda")
        torch.cuda.synchronize()
        runs["safetensors.torch.load_file(device=cuda)"].append(time.perf_counter() - t0)
        del d
    best = {k: min(v) for k, v in runs.items()}
    for k, v in best.items():
        print("# %-42s %7.3f s  %6.2f GB/s (%.2f GiB, best of 3)" % (k, v, size / v / 1e9, size / GiB))
    print("# ratio: aegaeon_native %.2fx safetensors" % (
        best["safetensors.torch.load_file(device=cuda)"] / best["aegaeon_native.load_safetensors"]))


TOPOLOGY = '''
import json, sys, time
import aegaeon_native as an
an.load_safetensors(sys.argv[1])
time.sleep(0.5)                         # the ring's thread would find the topology after the load's start
print(json.dumps([t[0] for t in an.timings()]))
'''


def test_topology_only_where_needed():
    """A fresh process's first load discovers the machine's topology (for its
    workers' binding) on a machine of several NUMA nodes, and not on one of one,
    where its staging ring takes the memory the import made ahead."""
    nodes = [n for n in os.listdir("/sys/devices/system/node") if re.fullmatch(r"node[0-9]+", n)]
    r = subprocess.run([sys.executable, "-c", TOPOLOGY, state["path"]], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, AEGAEON_PINNED_HUGEPAGES="never"))
    assert r.returncode == 0, r.stderr
    steps = json.loads(r.stdout.strip().splitlines()[-1])
    assert "pool usable" in steps and "load" in steps, steps
    print("# %d NUMA node(s); the first load's steps: %s" % (len(nodes), ", ".join(steps)))
    assert ("topology" in steps) == (len(nodes) > 1), steps
    # Several nodes: the pages go where the process ran, and are taken only if that is the GPU's node.
    assert "pool ahead" in steps or len(nodes) > 1, steps


def llama(transformers):
    """A Llama-like model of about 1.1 GiB in bf16, untied, in 4 shards and an index."""
    config = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                      num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4,
                                      max_position_embeddings=2048, tie_word_embeddings=False)
    d = os.path.join(TMP, "aegaeon_test_llama")
    torch.manual_seed(5)
    with torch.device("cuda"):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(d, safe_serialization=True, max_shard_size="300MB")
    del model
    torch.cuda.empty_cache()
    return config, d


def timed(fn):
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return out, time.perf_counter() - t0


def test_load_into():
    import transformers
    from aegaeon_native.torch import load_into
    config, d = llama(transformers)
    state["llama"] = d
    kw = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.bfloat16}

    def theirs():
        return transformers.LlamaForCausalLM.from_pretrained(d, device_map="cuda", **kw).eval()

    def ours():
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config, **kw)
        return load_into(model, d)

    def ours_whole():
        return an.torch.from_pretrained(d, device="cuda", **kw)

    # This machine's transformers: its initialisation must not run while the model is built on meta.
    calls, original = [], transformers.LlamaPreTrainedModel._init_weights
    transformers.LlamaPreTrainedModel._init_weights = lambda self, module: calls.append(module) or original(self, module)
    try:
        model = ours_whole()
        del model
    finally:
        transformers.LlamaPreTrainedModel._init_weights = original
    assert not calls, "transformers %s initialised %d modules of a model built on meta" % (
        transformers.__version__, len(calls))

    times = {"from_pretrained(device_map=cuda)": [], "aegaeon_native.torch.load_into": [],
             "aegaeon_native.torch.from_pretrained": []}
    for _ in range(2):
        ref, t = timed(theirs)
        times["from_pretrained(device_map=cuda)"].append(t)
        del ref
        model, t = timed(ours)
        times["aegaeon_native.torch.load_into"].append(t)
        del model
        model, t = timed(ours_whole)
        times["aegaeon_native.torch.from_pretrained"].append(t)
        del model
    ref = theirs()
    ids = (torch.arange(64, device="cuda") * 131 % config.vocab_size).unsqueeze(0)
    with torch.no_grad():
        want_logits = ref(input_ids=ids).logits
    for how in (ours, ours_whole):
        model = how()
        mine, want = dict(model.named_parameters()), dict(ref.named_parameters())
        assert list(mine) == list(want), set(mine) ^ set(want)
        for n, p in want.items():
            assert mine[n].device == p.device and mine[n].dtype == p.dtype, n
            assert torch.equal(mine[n], p), "%s differs" % n
        for n, b in ref.named_buffers():
            assert torch.equal(dict(model.named_buffers())[n], b), "buffer %s differs" % n
        with torch.no_grad():
            assert torch.equal(model(input_ids=ids).logits, want_logits), "the logits differ (%s)" % how.__name__
        del model, mine, want
    size = sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d) if f.endswith(".safetensors"))
    best = {k: min(v) for k, v in times.items()}
    for k, v in best.items():
        print("# %-42s %7.3f s  %6.2f GB/s (%.2f GiB, best of 2)" % (k, v, size / v / 1e9, size / GiB))
    print("# ratio: load_into %.2fx, from_pretrained %.2fx transformers' from_pretrained" % (
        best["from_pretrained(device_map=cuda)"] / best["aegaeon_native.torch.load_into"],
        best["from_pretrained(device_map=cuda)"] / best["aegaeon_native.torch.from_pretrained"]))
    del ref
    gc.collect()
    assert an.stats()["objects"] == 0, an.stats()


def test_model_waits_and_chunks():
    d = state["llama"]
    m = an.open_model(d, wait=False)
    names = list(m.tensors)
    m.wait(names[0], timeout=60)
    first = torch.from_dlpack(m.tensors[names[0]])
    assert first.device.type == "cuda" and first.data_ptr() == m.tensors[names[0]].device_ptr
    seen = 0
    m.wait(timeout=120)
    for c in m.chunks:
        assert c["file"] in m.files
        for name, off in c["tensors"]:
            if off >= 0:
                assert m.tensors[name].device_ptr == c["device_ptr"] + off, name
                seen += 1
    assert seen == len(names), (seen, len(names))
    ref = an.torch.load_state_dict(d, "cuda:0")
    for name in names:
        assert torch.equal(torch.from_dlpack(m.tensors[name]), ref[name]), name
    del first, ref
    m.release()
    gc.collect()
    assert an.stats()["objects"] == 0, an.stats()


def main():
    print("# %s, torch %s, Python %s" % (torch.cuda.get_device_name(0), torch.__version__,
                                         sys.version.split()[0]))
    assert an.device() == "cuda"
    check("seed example verbatim on a 512 MiB file", test_seed)
    check("torch-written safetensors loaded bit for bit as safetensors.torch.load_file", test_safetensors_bit_for_bit)
    check("zero-copy torch.as_tensor and from_dlpack views", test_zero_copy)
    check("two processes share prefetch and created event handles", test_two_processes_share_events)
    check("no device memory left after loads, KV swaps and releases", test_no_device_memory_left)
    check("timing of our loader against safetensors", test_timing)
    check("the topology discovered only on a machine of several NUMA nodes, the ring made ahead on one",
          test_topology_only_where_needed)
    check("transformers model by load_into and by from_pretrained bit for bit as transformers' from_pretrained, "
          "and their times", test_load_into)
    check("per-tensor waits and chunk dicts of a sharded model on the GPU", test_model_waits_and_chunks)
    an.release_all_prefetch_events()
    try:
        os.unlink(state.get("path", ""))
    except OSError:
        pass
    shutil.rmtree(state.get("llama", os.path.join(TMP, "aegaeon_test_llama")), ignore_errors=True)
    print("%d passed, %d failed" % (passed, failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
