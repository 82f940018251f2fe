"""The fresh processes of bench/userpath.py: one task each.

    python3 userpath_child.py '{"task": "load", "loader": "aegaeon", ...}'

Tasks (the JSON's "task"):
  write      safetensors files of random bit patterns (tests/gpu/slurm_e2e.py's)
  write-hf   a Llama-like transformers checkpoint with random weights, save_pretrained
  reference  each tensor's digest, of the bytes read straight from the file
  load       one loader: every tensor of a file a torch tensor on the device
  seed       the seed API: prefetch_file_to_gpu_chunks, wait on every chunk,
             release_all_prefetch_events(), for some rounds
  hf         a transformers model ready on the device, its parameters' digests
             and the logits of one input

Timings leave out the imports, and the CUDA context is made before the clock
starts. Digests: on the cuda backend two 64-bit sums over each tensor's 8-byte
words weighted by pseudo-random odd numbers of their index, computed on the GPU
(TorchDigest: any one changed word changes both, 8 GiB take milliseconds); on
the host backend SHA-256 of the bytes. The reference task computes them from
the file's bytes, so a load is checked bit for bit against the file. Progress
goes to stderr, the result to stdout as one line: RESULT {json}, with the
file aegaeon_native was imported from where the task imported it.
"""
import contextlib
import hashlib
import importlib
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests", "gpu"))
import slurm_e2e as models  # noqa: E402  (the model writer and header reader)

torch = models.torch
MiB = 1 << 20
ST_DTYPE = {}
if torch is not None:
    ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.float64: "F64",
                torch.int8: "I8", torch.uint8: "U8", torch.int16: "I16", torch.int32: "I32",
                torch.int64: "I64", torch.bool: "BOOL"}


def log(msg):
    print("  [child] %s" % msg, file=sys.stderr, flush=True)


def now():
    return time.monotonic()         # the clock of aegaeon_native.timings(starts=True)


class Skip(Exception):
    """The task cannot run here (a package is missing, the backend lacks it): a reason, not a failure."""


def need(name):
    try:
        return importlib.import_module(name)
    except ImportError as e:
        raise Skip("%s is not importable (%s)" % (name, e))


# ------------------------------------------------------------------ digests

def to_signed(v):
    return v - (1 << 64) if v >= 1 << 63 else v


class TorchDigest:
    """Digests of tensors on one torch device (see the module's docstring)."""
    K = [to_signed(k) for k in (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0xD6E8FEB86659FD93)]

    def __init__(self, device):
        self.device = device
        self.w = None

    def weights(self, n):
        if self.w is None or self.w[0].numel() < n:
            i = torch.arange(max(n, MiB), dtype=torch.int64, device=self.device)
            self.w = []
            for a, b in ((self.K[0], self.K[1]), (self.K[2], self.K[3])):
                x = i * a + b
                x = x ^ (x >> 31)
                x = x * self.K[1]
                self.w.append((x ^ (x >> 29)) | 1)
        return self.w[0][:n], self.w[1][:n]

    def sums(self, t):
        """The two sums (a tensor of 2) of t's bytes; t contiguous on the device."""
        b = t.detach().reshape(-1).view(torch.uint8)
        pad = -b.numel() % 8
        if pad or b.data_ptr() % 8:
            b = torch.cat((b, b.new_zeros(pad)))
        w = b.view(torch.int64)
        w1, w2 = self.weights(w.numel())
        return torch.stack(((w * w1).sum(), (w * w2).sum()))

    def many(self, tensors):
        """{name: digest} of {name: tensor}, with one synchronisation."""
        names = list(tensors)
        if not names:
            return {}
        sums = torch.stack([self.sums(tensors[n]) for n in names]).tolist()
        mask = (1 << 64) - 1
        return {n: "%d:%016x%016x" % (tensors[n].numel() * tensors[n].element_size(), a & mask, b & mask)
                for n, (a, b) in zip(names, sums)}


def host_bytes(t):
    if torch is not None and isinstance(t, torch.Tensor):
        return t.detach().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()
    return bytes(t.tobytes()) if hasattr(t, "tobytes") else bytes(t)


def sha_digest(data):
    return "%d:%s" % (len(data), hashlib.sha256(data).hexdigest()[:32])


class Checker:
    """Digests of loaded tensors the way the reference task computes them from
    the file: TorchDigest on torch_device, else SHA-256 of the bytes."""

    def __init__(self, torch_device=None):
        self.torch_digest = TorchDigest(torch_device) if torch_device else None

    def digests(self, tensors):
        if self.torch_digest is not None:
            where = torch.device(self.torch_digest.device)
            bad = [n for n, t in tensors.items() if t.device.type != where.type]
            if bad:
                raise RuntimeError("%d tensors are not on %s (%s: %s)" % (
                    len(bad), where, bad[0], tensors[bad[0]].device))
            return self.torch_digest.many(tensors)
        return {n: sha_digest(host_bytes(t)) for n, t in tensors.items()}

    def of_ranges(self, path, ranges):
        """{(offset, size): digest} of byte ranges of a file."""
        out = {}
        with open(path, "rb", buffering=0) as f:
            for off, size in ranges:
                data = bytearray(size)
                f.seek(off)
                if f.readinto(data) != size:
                    raise RuntimeError("%s: short read of %d bytes at %d" % (path, size, off))
                if self.torch_digest is None:
                    out[(off, size)] = sha_digest(data)
                else:
                    t = torch.frombuffer(data, dtype=torch.uint8) if size else torch.empty(0, dtype=torch.uint8)
                    out[(off, size)] = self.torch_digest.many({"x": t.to(self.torch_digest.device)})["x"]
        return out


def meta_of(t):
    """(dtype as safetensors names it, shape) of a torch tensor, a DeviceArray or a numpy array."""
    if torch is not None and isinstance(t, torch.Tensor):
        return ST_DTYPE.get(t.dtype, str(t.dtype)), list(t.shape)
    dt = t.dtype if isinstance(t.dtype, str) else {"float32": "F32", "float16": "F16", "int8": "I8"}.get(
        str(t.dtype), str(t.dtype))
    return dt, list(t.shape)


# ------------------------------------------------------------------ tasks

def task_write(a):
    models.write_model(a["path"], a["bytes"], a["seed"], edge=False)
    return {"bytes": os.path.getsize(a["path"]), "with": "torch" if torch is not None else "plain Python"}


def llama_config(transformers, preset):
    sizes = {  # about 4.45 GiB of bf16 weights; a tiny one for --quick
        "full": dict(vocab_size=32000, hidden_size=2560, intermediate_size=6912, num_hidden_layers=28,
                     num_attention_heads=20, num_key_value_heads=20),
        "quick": dict(vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4),
    }[preset]
    return transformers.LlamaConfig(tie_word_embeddings=False, max_position_embeddings=256, **sizes)


def task_write_hf(a):
    need("torch")
    transformers = need("transformers")
    config = llama_config(transformers, a["preset"])
    dev = "cuda:0" if a["device"] == "cuda" else "cpu"
    torch.manual_seed(a.get("seed", 5))
    if dev == "cpu":        # where torch makes it anyway (torch before 2.0 has no device context)
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    else:
        with torch.device(dev):
            model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(a["dir"], max_shard_size=a["shard"])
    for name in os.listdir(a["dir"]):
        os.chmod(os.path.join(a["dir"], name), 0o644)
    return {"params": sum(p.numel() for p in model.parameters())}


def checker(device):
    return Checker("cuda:0" if device == "cuda" else None)


def reference(check, path):
    """{name: {dtype, shape, digest}} of a safetensors file, from its bytes."""
    header, start = models.read_header(path)
    spans = {n: (start + m["data_offsets"][0], m["data_offsets"][1] - m["data_offsets"][0]) for n, m in header.items()}
    dig = check.of_ranges(path, sorted(set(spans.values())))
    return {n: {"dtype": m["dtype"], "shape": m["shape"], "digest": dig[spans[n]]} for n, m in header.items()}


def task_reference(a):
    if a["device"] == "cuda":
        need("torch")
        make_context()
    check = checker(a["device"])
    return {"files": {p: reference(check, p) for p in a["paths"]}}


def make_context():
    torch.cuda.init()
    torch.empty(1, device="cuda:0")
    torch.cuda.synchronize()


def sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def as_tensors(views):
    """DeviceArrays as torch tensors (DLPack, zero-copy); numpy arrays or the views without torch."""
    if torch is not None:
        return {k: torch.from_dlpack(v) for k, v in views.items()}
    try:
        import numpy as np
    except ImportError:
        return dict(views)
    return {k: np.asarray(v) if v.typestr else v for k, v in views.items()}


def load_aegaeon(path, device):
    import aegaeon_native as an
    views = an.load_safetensors(path, 0)
    return as_tensors(views), views


def load_safetensors(path, device):
    from safetensors.torch import load_file
    return load_file(path, device="cuda:0" if device == "cuda" else "cpu"), None


def load_fastsafetensors(path, device):
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup
    loader = SafeTensorsFileLoader(SingleGroup(), "cuda:0" if device == "cuda" else "cpu", nogds=True)
    try:
        loader.add_filenames({0: [path]})
        fb = loader.copy_files_to_device()
        try:
            return {k: fb.get_tensor(k) for k in loader.get_keys()}, None
        finally:
            fb.close()          # the tensors keep their memory (fastsafetensors >= 0.5)
    finally:
        loader.close()


def load_instanttensor(path, device, buffered=False):
    from instanttensor import BackendPolicy, safe_open
    if device != "cuda":
        raise Skip("instanttensor loads to CUDA devices only")
    extra = {"backend": BackendPolicy.BUFFERED} if buffered else {}
    with safe_open([path], framework="pt", device=0, **extra) as f:   # copy=True: tensors own their memory
        return dict(f.tensors()), None


# Each loader: (its package, the modules imported before the clock starts,
# path, device -> ({name: tensor}, what must stay alive while they are used)).
LOADERS = {
    "aegaeon": ("aegaeon_native", ["aegaeon_native"], load_aegaeon),
    "safetensors": ("safetensors", ["torch", "safetensors.torch"], load_safetensors),
    "fastsafetensors": ("fastsafetensors", ["torch", "fastsafetensors"], load_fastsafetensors),
    "instanttensor": ("instanttensor", ["torch", "instanttensor"], load_instanttensor),
    "instanttensor-buffered": ("instanttensor", ["torch", "instanttensor"],
                               lambda p, d: load_instanttensor(p, d, buffered=True)),
}


def version(package):
    try:
        from importlib.metadata import version as dist_version
        return dist_version(package)
    except Exception:       # not installed as a distribution (a build tree's module)
        return getattr(sys.modules.get(package), "__version__", "?")


def prepare(device, modules):
    """Imports and the CUDA context: what the clock leaves out."""
    t0 = now()
    for m in modules:
        need(m)
    if device == "cuda":
        need("torch")
        make_context()
    return now() - t0


def spans(an, t0=None):
    """The steps the library timed since the last call, as [name, seconds],
    with t0 (a now() time) and a module that has them [name, seconds, start
    after t0] (aegaeon_native.timings(); None where the module has none)."""
    fn = getattr(an, "timings", None)
    if fn is None:
        return None
    if t0 is not None:
        try:
            return [[name, sec, start - t0] for name, start, sec in fn(starts=True)]
        except TypeError:           # a module without starts
            pass
    return [[name, sec] for name, sec in fn()]


def task_load(a):
    package, modules, fn = LOADERS[a["loader"]]
    before = prepare(a["device"], modules)
    an = sys.modules.get("aegaeon_native") if a["loader"] == "aegaeon" else None
    if an is not None:
        spans(an)               # what the import timed is not the load's
    with profiled(a.get("profile")):
        t0 = now()
        tensors, keep = fn(a["path"], a["device"])
        sync(a["device"])
        seconds = now() - t0
    timed = spans(an, t0) if an is not None else None
    meta = {n: meta_of(t) for n, t in tensors.items()}
    digests = checker(a["device"]).digests(tensors)
    del keep
    return {"seconds": seconds, "bytes": os.path.getsize(a["path"]), "setup_s": before, "spans": timed,
            "version": version(package),
            "tensors": {n: {"dtype": meta[n][0], "shape": meta[n][1], "digest": digests[n]} for n in tensors}}


def chunk_ranges(path, sizes):
    """File ranges of a load's chunks: in file order, back to back, ending at the
    file's end (a safetensors file's chunks start after its header)."""
    size = os.path.getsize(path)
    off = size - sum(sizes)
    starts = {0}
    try:
        starts.add(models.read_header(path)[1])
    except (ValueError, OSError):
        pass
    if off not in starts:
        raise RuntimeError("%s: chunks of %d bytes in all do not end a file of %d bytes" % (path, sum(sizes), size))
    out = []
    for n in sizes:
        out.append((off, n))
        off += n
    return out


def seed_round(an, a, check, ref):
    spans(an)
    t0 = now()
    chunks = an.prefetch_file_to_gpu_chunks(a["path"], 0)
    t_list = now()
    for c in chunks:
        an.wait_event_handle_bytes(c["event_handle"])
    t_done = now()
    timed = spans(an, t0)
    ranges = chunk_ranges(a["path"], [c["size"] for c in chunks])
    missing = [r for r in ranges if r not in ref]
    ref.update(check.of_ranges(a["path"], missing))
    views = {r: an.chunk_view(c) for r, c in zip(ranges, chunks)}
    got = check.digests(as_tensors(views) if a["device"] == "cuda" else views)
    bad = [r for r in ranges if got[r] != ref[r]]
    del views, got, chunks
    spans(an)
    t1 = now()
    an.release_all_prefetch_events()
    release_ms = (now() - t1) * 1e3
    size = os.path.getsize(a["path"])
    return {"list_ms": (t_list - t0) * 1e3, "seconds": t_done - t0, "gbps": size / (t_done - t0) / 1e9,
            "release_ms": release_ms, "chunks": len(ranges), "bad_chunks": len(bad), "spans": timed,
            "release_spans": spans(an)}


def task_seed(a):
    before = prepare(a["device"], ["aegaeon_native"])
    import aegaeon_native as an
    check, ref = checker(a["device"]), {}
    rounds = []
    for i in range(a["rounds"]):
        rounds.append(seed_round(an, a, check, ref))
        log("seed round %d: list after %.1f ms, %.2f GB/s" % (i + 1, rounds[-1]["list_ms"], rounds[-1]["gbps"]))
    return {"rounds": rounds, "bytes": os.path.getsize(a["path"]), "setup_s": before}


@contextlib.contextmanager
def params_on_meta():
    """Modules made inside get their parameters on the meta device and their
    buffers (computed, not stored: rotary frequencies) where torch makes them."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None:
            p = module._parameters[name]
            module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def shards_of(directory):
    with open(os.path.join(directory, "model.safetensors.index.json")) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    return [os.path.join(directory, n) for n in files]


def aegaeon_load_into(an):
    """aegaeon_native.torch.load_into where the module has it, else None."""
    mod = getattr(an, "torch", None)
    if mod is None:
        try:
            mod = importlib.import_module("aegaeon_native.torch")
        except ImportError:
            return None
    return getattr(mod, "load_into", None)


def hf_aegaeon(transformers, a, kw, dev, config):
    import aegaeon_native as an
    from_pretrained = getattr(getattr(an, "torch", None), "from_pretrained", None)
    load_into = aegaeon_load_into(an)
    spans(an)
    if from_pretrained is not None:
        # The load starts first and runs while the model is built on the meta device.
        t0 = now()
        model = from_pretrained(a["dir"], device=dev, attn_implementation="sdpa", **kw)
        t1 = now()
        sync(a["device"])
        return model, t0, "aegaeon_native.torch.from_pretrained", [], [["from_pretrained", t1 - t0]]
    t0 = now()
    with params_on_meta():
        model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa", **kw)
    t1 = now()
    keep = []
    if load_into is not None:
        load_into(model, a["dir"])
        how = "aegaeon_native.torch.load_into"
    else:
        state = {}
        for shard in shards_of(a["dir"]):
            views = an.load_safetensors(shard, 0)
            keep.append(views)
            state.update(as_tensors(views))
        model.load_state_dict(state, assign=True, strict=True)
        how = "meta model + load_safetensors per shard + load_state_dict(assign=True)"
    t2 = now()
    model.to(dev).eval()      # the buffers made on the CPU; the parameters are there already
    sync(a["device"])
    phases = [["model built on meta (transformers)", t1 - t0], ["the checkpoint into it", t2 - t1],
              ["buffers to the device", now() - t2]]
    return model, t0, how, keep, phases


def hf_from_pretrained(transformers, a, kw, dev, config):
    t0 = now()
    model = transformers.AutoModelForCausalLM.from_pretrained(a["dir"], device_map=dev, attn_implementation="sdpa",
                                                              **kw).eval()
    return model, t0, "AutoModelForCausalLM.from_pretrained(device_map=%r)" % dev, None, None


@contextlib.contextmanager
def profiled(lines):
    """With @lines (the task's "profile"), the block under cProfile, then its
    top @lines calls by cumulative time and by their own time to stderr (the
    parent keeps stdout's RESULT line); without, the block alone."""
    if not lines:
        yield
        return
    import cProfile
    import io
    import pstats
    prof = cProfile.Profile()
    prof.enable()
    try:
        yield
    finally:
        prof.disable()
    text = io.StringIO()
    stats = pstats.Stats(prof, stream=text)
    stats.sort_stats("cumulative").print_stats(int(lines))
    stats.sort_stats("tottime").print_stats(int(lines))
    sys.stderr.write(text.getvalue())


def task_hf(a):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    before = prepare(a["device"], ["torch", "transformers"] + (["aegaeon_native"] if a["loader"] == "aegaeon" else []))
    transformers = need("transformers")
    dev = "cuda:0" if a["device"] == "cuda" else "cpu"
    kw = {"dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype": torch.bfloat16}
    # The model's code imported before the clock, as torch is: transformers
    # imports it at first use, whichever loader builds the model.
    config = transformers.AutoConfig.from_pretrained(a["dir"])
    transformers.AutoModelForCausalLM._model_mapping[type(config)]
    fn = hf_aegaeon if a["loader"] == "aegaeon" else hf_from_pretrained
    with profiled(a.get("profile")):
        model, t0, how, keep, phases = fn(transformers, a, kw, dev, config)
        sync(a["device"])
        seconds = now() - t0
    timed = spans(sys.modules["aegaeon_native"], t0) if a["loader"] == "aegaeon" else None
    if timed is not None and phases:
        timed += phases
    params = dict(model.named_parameters())
    digests = checker(a["device"]).digests(params)
    with torch.no_grad():
        ids = (torch.arange(16, device=dev) * 7 % model.config.vocab_size).unsqueeze(0)
        logits = model(input_ids=ids).logits.float().contiguous()
    data = logits.cpu().numpy().tobytes()
    with open(a["logits"], "wb") as f:
        f.write(data)
    del keep
    return {"seconds": seconds, "how": how, "setup_s": before, "spans": timed,
            "bytes": sum(os.path.getsize(s) for s in shards_of(a["dir"])),
            "params": {n: {"dtype": meta_of(p)[0], "shape": meta_of(p)[1], "digest": digests[n]}
                       for n, p in params.items()},
            "logits_digest": sha_digest(data)}


TASKS = {"write": task_write, "write-hf": task_write_hf, "reference": task_reference, "load": task_load,
         "seed": task_seed, "hf": task_hf}


def main():
    a = json.loads(sys.argv[1])
    try:
        out = TASKS[a["task"]](a)
    except Skip as e:
        out = {"skip": str(e)}
    an = sys.modules.get("aegaeon_native")
    if an is not None:          # which build ran (userpath.py --base compares two)
        out["module"] = getattr(an, "__file__", None)
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
