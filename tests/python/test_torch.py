#!/usr/bin/env python3
"""aegaeon_native.torch on the host backend, CPU tensors (make check).

load_state_dict against the file, tensor by tensor, without a copy (and a
tensor-parallel rank's parts with the tp_* arguments); load_into of
a tiny Llama-like transformers model written by save_pretrained in several
shards, against from_pretrained: every parameter bit for bit, the logits equal;
tied and untied weights, buffers rebuilt, base and head models, the errors.
Needs torch and transformers: where this python lacks them it runs again
under $AEGAEON_TORCH_PYTHON, else $AEGAEON_CI_TOOLS/torch/bin/python3 (the
venv scripts/install-deps.sh makes); with neither its tests are skipped.
Run against a build tree: PYTHONPATH=<build>/python/.libs AEGAEON_DEVICE=host
python3 this. Prints "N passed, N failed" last.
"""
import gc
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import unittest
import warnings


def have_torch():
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


if not have_torch():
    other = os.environ.get("AEGAEON_TORCH_PYTHON") or os.path.join(
        os.environ.get("AEGAEON_CI_TOOLS", "/opt/aegaeon-ci"), "torch", "bin", "python3")
    if os.access(other, os.X_OK) and os.environ.get("AEGAEON_TORCH_TEST_REEXEC") != "1":
        os.environ["AEGAEON_TORCH_TEST_REEXEC"] = "1"
        os.execv(other, [other] + sys.argv)

import testmain  # noqa: E402
from testmain import MiB, make_tensors, safetensors_bytes, write_file  # noqa: E402

testmain.preload_sanitizers()

TMP = testmain.host_env("aegaeon-torch-")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import aegaeon_native as an  # noqa: E402

if have_torch():
    import torch
    import transformers
    transformers.logging.disable_progress_bar()
else:
    torch = transformers = None
NEEDS = unittest.skipIf(torch is None, "no torch and transformers here, nor in $AEGAEON_TORCH_PYTHON "
                        "(scripts/install-deps.sh makes that venv)")


def held():
    gc.collect()
    st = an.stats()
    return st["objects"], st["prefetch"].get(0, {"blocks": 0})["blocks"]


def llama_config(tied, layers=3):
    return transformers.LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=160,
                                    num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=128, tie_word_embeddings=tied)


def save_llama(directory, config, dtype=None, cls=None):
    """A model of random weights, as save_pretrained writes it: several shards and an index."""
    torch.manual_seed(7)
    model = (cls or transformers.LlamaForCausalLM)(config)
    if dtype is not None:
        model = model.to(dtype)
    model.generation_config.max_new_tokens = 7
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="100KB")
    return directory


def on_meta(cls, config, dtype=None, buffers_too=True):
    """The model on the meta device: torch >= 2.0 makes it under torch.device("meta"),
    parameters and buffers alike; older ones get the same by hand."""
    dtype = dtype or torch.float32
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        if buffers_too and hasattr(torch, "get_default_device"):
            with torch.device("meta"):
                return cls(config)
        from aegaeon_native.torch import _ParamsOnMeta
        with _ParamsOnMeta(torch, dtype):
            model = cls(config)
    finally:
        torch.set_default_dtype(old)
    if buffers_too:
        for mod in model.modules():
            for n, b in list(mod._buffers.items()):
                mod._buffers[n] = b.to("meta")
            for n, v in list(vars(mod).items()):
                if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter):
                    setattr(mod, n, v.to("meta"))
    return model


def assert_same_model(case, model, ref, config):
    """@model as transformers' @ref: every parameter and buffer (names, dtypes, shapes, bytes,
    devices), eval mode, and the outputs of one input to the bit."""
    ours, theirs = dict(model.named_parameters()), dict(ref.named_parameters())
    case.assertEqual(list(ours), list(theirs))
    for n in theirs:
        case.assertEqual((ours[n].dtype, ours[n].shape), (theirs[n].dtype, theirs[n].shape), n)
        case.assertTrue(torch.equal(ours[n], theirs[n]), n)
    ours, theirs = dict(model.named_buffers()), dict(ref.named_buffers())
    case.assertEqual(list(ours), list(theirs))
    for n in theirs:
        case.assertTrue(torch.equal(ours[n], theirs[n]) and ours[n].device == theirs[n].device, n)
    case.assertFalse(model.training)
    ids = (torch.arange(24) * 37 % config.vocab_size).unsqueeze(0)
    with torch.no_grad():
        a, b = model(input_ids=ids), ref(input_ids=ids)
    a, b = (a.logits, b.logits) if hasattr(a, "logits") else (a.last_hidden_state, b.last_hidden_state)
    case.assertTrue(torch.equal(a, b))


@NEEDS
class TestStateDict(unittest.TestCase):
    def test_tensors_are_the_file(self):
        tensors = make_tensors(21)
        path = os.path.join(TMP, "sd.safetensors")
        write_file(path, safetensors_bytes(tensors))
        lacking = [d for d, t in (("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")) if not hasattr(torch, t)]
        if lacking:     # this torch has no such dtype: a clear error, nothing left
            with self.assertRaises(TypeError) as c:
                an.torch.load_state_dict(path)
            self.assertIn("which this torch (%s) has no dtype for" % torch.__version__, str(c.exception))
            self.assertEqual(held(), (0, 0))
            tensors = {k: v for k, v in tensors.items() if v[0] not in lacking}
            write_file(path, safetensors_bytes(tensors))
        sd = an.torch.load_state_dict(path, "cpu", chunk_bytes=MiB)
        self.assertEqual(list(sd), list(tensors))
        views = an.load_model(path)
        for name, (dtype, shape, raw) in tensors.items():
            t = sd[name]
            self.assertEqual(t.device, torch.device("cpu"), name)
            self.assertEqual(tuple(t.shape), tuple(shape), name)
            self.assertEqual(str(t.dtype), "torch." + an.torch._DTYPES[dtype], name)
            self.assertEqual(t.contiguous().view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"",
                             raw, name)
        # no copy: tensors of one chunk lie as in the file, as the chunk's own views do
        m = an.open_model(path, chunk_bytes=MiB)
        pairs = 0
        for c in m.chunks:
            starts = [(n, off) for n, off in c["tensors"] if off >= 0 and sd[n].numel()]
            for n, off in starts:
                self.assertEqual(m.tensors[n].device_ptr - c["device_ptr"], off, n)
                self.assertEqual(sd[n].data_ptr() - sd[starts[0][0]].data_ptr(), off - starts[0][1], n)
                pairs += 1
        self.assertGreater(pairs, 8)
        del views, m, t
        self.assertEqual(held()[0], 1)
        keep = sd["big.weight"]
        del sd
        self.assertEqual(held()[0], 1)              # one tensor keeps the whole load
        self.assertEqual(keep.numpy().tobytes(), tensors["big.weight"][2])
        del keep
        self.assertEqual(held(), (0, 0))

    def test_devices(self):
        path = os.path.join(TMP, "dev.safetensors")
        write_file(path, safetensors_bytes({"w": ("F32", (2,), b"\0" * 8)}))
        self.assertEqual(an.torch.load_state_dict(path, torch.device("cpu"))["w"].device.type, "cpu")
        self.assertEqual(an.torch.load_state_dict(path, 0)["w"].device.type, "cpu")
        with self.assertRaises(ValueError) as c:
            an.torch.load_state_dict(path, "cuda:0")
        self.assertIn("the host backend", str(c.exception))
        self.assertRaises(TypeError, an.torch.load_state_dict, path, 1.5)
        self.assertRaises(TypeError, an.torch.load_state_dict, path, True)
        self.assertRaises(ValueError, an.torch.load_state_dict, path, -1)
        with self.assertRaises(an.AegaeonError):
            an.torch.load_state_dict(path, 5)
        with self.assertRaises(an.AegaeonError):
            an.torch.load_state_dict(os.path.join(TMP, "missing"))
        self.assertEqual(held(), (0, 0))

    def test_tensor_parallel_slices(self):
        """The tp_* arguments reach load_model: each rank's tensors are torch's chunks of the file's."""
        shapes = {"layers.0.q_proj.weight": (8, 6), "layers.0.o_proj.weight": (6, 8), "norm.weight": (6,)}
        tensors = {n: ("F32", s, testmain.pattern(4 * (s[0] * (s[1] if len(s) > 1 else 1)), i))
                   for i, (n, s) in enumerate(shapes.items())}
        path = os.path.join(TMP, "tp.safetensors")
        write_file(path, safetensors_bytes(tensors))
        full = {n: torch.frombuffer(bytearray(raw), dtype=torch.int32).reshape(s) for n, (_, s, raw) in tensors.items()}
        dims = {"layers.0.q_proj.weight": 0, "layers.0.o_proj.weight": 1}
        for rank in range(2):
            sd = an.torch.load_state_dict(path, "cpu", tp_rank=rank, tp_world=2)
            for name, t in full.items():
                want = t.chunk(2, dims[name])[rank] if name in dims else t
                # As int32 bits: random bytes make NaNs, which no float equals.
                self.assertTrue(torch.equal(sd[name].view(torch.int32), want.contiguous()), name)
        sd = an.torch.load_state_dict(path, tp_rank=1, tp_world=3, tp_preset="none", tp_rules={"norm.weight": 0})
        self.assertEqual([tuple(t.shape) for t in sd.values()], [(8, 6), (6, 8), (2,)])
        del sd
        with self.assertRaises(ValueError) as c:
            an.torch.load_state_dict(path, tp_rank=1)
        self.assertIn("tp_rank=1 needs tp_world", str(c.exception))
        self.assertEqual(held(), (0, 0))


@NEEDS
class TestLoadInto(unittest.TestCase):
    """A transformers model filled by load_into runs as from_pretrained's does."""

    def compare(self, config, dtype, buffers_too, cls=None):
        cls = cls or transformers.LlamaForCausalLM
        d = save_llama(tempfile.mkdtemp(dir=TMP), config, dtype, cls)
        self.assertGreater(len([n for n in os.listdir(d) if n.endswith(".safetensors")]), 2)
        ref = cls.from_pretrained(d, torch_dtype=dtype or torch.float32).eval()
        model = on_meta(cls, config, dtype or torch.float32, buffers_too)
        self.assertIs(an.torch.load_into(model, d), model)
        assert_same_model(self, model, ref, config)
        self.assertEqual(model.generation_config.max_new_tokens, 7)
        return model

    def test_tied_buffers_on_meta(self):
        model = self.compare(llama_config(tied=True), None, buffers_too=True)
        self.assertIs(model.lm_head.weight, model.model.embed_tokens.weight)
        self.assertEqual(held()[0], 1)              # the model holds the load
        del model
        self.assertEqual(held(), (0, 0))

    def test_untied_buffers_on_cpu(self):
        model = self.compare(llama_config(tied=False), None, buffers_too=False)
        self.assertIsNot(model.lm_head.weight, model.model.embed_tokens.weight)

    def test_bfloat16(self):
        self.compare(llama_config(tied=True, layers=2), torch.bfloat16, buffers_too=True)

    def test_base_model(self):
        """A head model's file into the base model, and a base model's file into a head model."""
        config = llama_config(tied=False, layers=2)
        d = save_llama(tempfile.mkdtemp(dir=TMP), config)
        base = on_meta(transformers.LlamaModel, config)
        with self.assertRaises(KeyError) as c:
            an.torch.load_into(base, d)
        self.assertIn("lm_head.weight, which LlamaModel has no place for (strict=False", str(c.exception))
        base = on_meta(transformers.LlamaModel, config)
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            an.torch.load_into(base, d, strict=False)
        self.assertTrue(any("left out lm_head.weight" in str(x.message) for x in w))
        ref = transformers.LlamaModel.from_pretrained(d)
        for n, p in ref.named_parameters():
            self.assertTrue(torch.equal(dict(base.named_parameters())[n], p), n)
        # the base model's own checkpoint into a model with a head lacks the head
        b = tempfile.mkdtemp(dir=TMP)
        base.save_pretrained(b, safe_serialization=True)
        head = on_meta(transformers.LlamaForCausalLM, config)
        with self.assertRaises(KeyError) as c:
            an.torch.load_into(head, b)
        self.assertIn("lacks lm_head.weight, which LlamaForCausalLM needs", str(c.exception))
        del base, head, ref
        self.assertEqual(held(), (0, 0))

    def test_errors(self):
        d = save_llama(tempfile.mkdtemp(dir=TMP), llama_config(tied=True, layers=2))
        other = llama_config(tied=True, layers=2)
        other.intermediate_size = 96
        with self.assertRaises(ValueError) as c:
            an.torch.load_into(on_meta(transformers.LlamaForCausalLM, other), d)
        self.assertIn("size mismatch for model.layers.0.mlp.down_proj.weight: the file has (64, 160), "
                      "the model (64, 96)", str(c.exception))

        class Plain(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.register_buffer("scale", torch.ones(3, device="meta"), persistent=False)

        path = os.path.join(TMP, "plain.safetensors")
        write_file(path, safetensors_bytes({}))
        with self.assertRaises(ValueError) as c:
            an.torch.load_into(Plain(), path)
        self.assertIn("scale on the meta device: load_into rebuilds them for models made from a config",
                      str(c.exception))
        with self.assertRaises(an.AegaeonError):
            an.torch.load_into(on_meta(transformers.LlamaForCausalLM, other), os.path.join(TMP, "none"))
        self.assertEqual(held(), (0, 0))


FAILING_LOAD = r"""
import gc, json, sys, torch, transformers, aegaeon_native as an
config = transformers.AutoConfig.from_pretrained(sys.argv[1])
with an.torch._ParamsOnMeta(torch, None):
    model = transformers.LlamaForCausalLM(config)
out = {}
try:
    an.torch.load_into(model, sys.argv[1])
except an.AegaeonError as e:
    out["error"] = [e.name, str(e)]
out["meta"] = [n for n, p in model.named_parameters() if p.is_meta]
del model
gc.collect()
st = an.stats()
out["held"] = [st["objects"], st["prefetch"].get(0, {"blocks": 0})["blocks"]]
print(json.dumps(out))
"""


@NEEDS
class TestFailingLoad(unittest.TestCase):
    """load_into fills the model while its checkpoint loads: a read error after the load
    started is raised by the wait, last, and nothing stays held (tests/faults' shim)."""

    def test_read_error_after_the_start(self):
        shim = os.path.join(os.environ.get("top_builddir", ""), "tests", "faults", ".libs", "libaegfault.so")
        self.assertTrue(os.path.exists(shim), "%s: make check builds it" % shim)
        d = save_llama(tempfile.mkdtemp(dir=TMP), llama_config(tied=True, layers=2))
        shards = sorted(n for n in os.listdir(d) if n.endswith(".safetensors"))
        hurt = max(shards, key=lambda n: os.path.getsize(os.path.join(d, n)))
        self.assertGreater(os.path.getsize(os.path.join(d, hurt)), 64 << 10)
        preload = " ".join(x for x in (os.environ.get("AEGAEON_PY_PRELOAD"), shim) if x)
        env = dict(os.environ, LD_PRELOAD=preload, ASAN_OPTIONS="detect_leaks=0", AEGAEON_FAULT="eio",
                   AEGAEON_FAULT_FILE=os.path.join(d, hurt), AEGAEON_FAULT_AT=str(32 << 10))
        r = subprocess.run([sys.executable, "-c", FAILING_LOAD, d], env=env, capture_output=True, text=True,
                           timeout=300)
        self.assertEqual(r.returncode, 0, r.stderr[-3000:])
        out = json.loads(r.stdout.strip().splitlines()[-1])
        self.assertEqual(out["error"][0], "AEG_EIO", out)
        self.assertIn(hurt, out["error"][1])
        self.assertEqual(out["meta"], [])           # filled before the wait raised
        self.assertEqual(out["held"], [0, 0])


@NEEDS
class TestFromPretrained(unittest.TestCase):
    """from_pretrained: the load started before the model is built, the model as transformers' own."""

    def same(self, model, ref, config):
        assert_same_model(self, model, ref, config)

    def test_as_transformers(self):
        for tied, dtype in ((True, None), (False, torch.bfloat16)):
            config = llama_config(tied=tied, layers=2)
            d = save_llama(tempfile.mkdtemp(dir=TMP), config, dtype)
            ref = transformers.AutoModelForCausalLM.from_pretrained(d, torch_dtype=dtype or torch.float32).eval()
            model = an.torch.from_pretrained(d, torch_dtype=dtype or torch.float32)
            self.assertIsInstance(model, transformers.LlamaForCausalLM)
            self.same(model, ref, config)
            self.assertEqual(model.generation_config.max_new_tokens, 7)
            self.assertEqual(model.lm_head.weight is model.model.embed_tokens.weight, tied)
            self.assertEqual(held()[0], 1)          # the model's tensors hold the load, nothing else
            del model
            self.assertEqual(held(), (0, 0))

    def test_its_steps_are_timed(self):
        """timings(starts=True) lays the build and the fill beside the load: each shard's load, then the wait."""
        import time
        config = llama_config(tied=False, layers=2)
        d = save_llama(tempfile.mkdtemp(dir=TMP), config)
        an.timings()
        t0 = time.monotonic()
        model = an.torch.from_pretrained(d)
        t1 = time.monotonic()
        steps = {}
        for name, start, sec in an.timings(starts=True):
            # its own steps: an engine's ring thread may add others at any time
            if name in ("load", "model build", "model fill", "load wait") and start >= t0 - 1e-6:
                steps.setdefault(name, []).append((start, start + sec))
        shards = [n for n in os.listdir(d) if n.endswith(".safetensors")]
        self.assertEqual(len(steps["load"]), len(shards), steps)
        for name in ("model build", "load wait", "model fill"):
            self.assertEqual(len(steps[name]), 1, (name, steps))
        for name, spans in steps.items():
            for start, end in spans:
                self.assertTrue(t0 - 1e-6 <= start <= end <= t1, (name, t0, start, end, t1))
        build, fill, wait = steps["model build"][0], steps["model fill"][0], steps["load wait"][0]
        self.assertTrue(build[1] <= fill[0] <= fill[1] <= wait[0], steps)     # filled while it loads
        self.assertTrue(all(end <= wait[1] for _, end in steps["load"]), steps)   # waited for every shard
        del model
        self.assertEqual(held(), (0, 0))

    def test_model_class_and_config(self):
        config = llama_config(tied=False, layers=2)
        d = save_llama(tempfile.mkdtemp(dir=TMP), config)
        ref = transformers.LlamaForCausalLM.from_pretrained(d).eval()
        model = an.torch.from_pretrained(d, model_class=transformers.LlamaForCausalLM,
                                         config=transformers.AutoConfig.from_pretrained(d))
        self.same(model, ref, config)
        # the model's base alone from the same files, as from_pretrained leaves the head out
        base = an.torch.from_pretrained(d, model_class=transformers.LlamaModel, strict=False)
        self.assertIsInstance(base, transformers.LlamaModel)
        for n, p in transformers.LlamaModel.from_pretrained(d).named_parameters():
            self.assertTrue(torch.equal(dict(base.named_parameters())[n], p), n)
        del model, base
        self.assertEqual(held(), (0, 0))

    def test_opened_model_into_load_into(self):
        """load_into takes what open_model(wait=False) gave: the load runs while the model is built."""
        config = llama_config(tied=True, layers=2)
        d = save_llama(tempfile.mkdtemp(dir=TMP), config)
        ref = transformers.LlamaForCausalLM.from_pretrained(d).eval()
        loaded = an.open_model(d, 0, wait=False)
        model = on_meta(transformers.LlamaForCausalLM, config)
        self.assertIs(an.torch.load_into(model, loaded), model)
        loaded.release()                            # the model's tensors keep the memory
        self.same(model, ref, config)
        self.assertEqual(model.generation_config.max_new_tokens, 7)
        del model
        self.assertEqual(held(), (0, 0))

    def test_build_runs_no_initialisation(self):
        """The model's _init_weights never runs while from_pretrained builds it (its results are replaced)."""
        config = llama_config(tied=False, layers=2)
        d = save_llama(tempfile.mkdtemp(dir=TMP), config)
        calls = []
        cls = transformers.LlamaPreTrainedModel
        original = cls._init_weights

        def counted(self, module):
            calls.append(type(module).__name__)
            return original(self, module)
        cls._init_weights = counted
        try:
            model = an.torch.from_pretrained(d)
        finally:
            cls._init_weights = original
        self.assertEqual(calls, [])
        ref = transformers.AutoModelForCausalLM.from_pretrained(d).eval()
        self.same(model, ref, config)
        del model
        self.assertEqual(held(), (0, 0))

    def test_build_puts_torch_back(self):
        """Building on meta skips the initialisers, and puts torch back after, an error too."""
        from aegaeon_native.torch import _ParamsOnMeta
        inits = dict(vars(torch.nn.init))
        register, dtype = torch.nn.Module.register_parameter, torch.get_default_dtype()
        with _ParamsOnMeta(torch, torch.float16):
            self.assertIsNot(torch.nn.init.normal_, inits["normal_"])
            torch.nn.init.kaiming_uniform_(torch.empty(8, 8, device="meta"))
            linear = torch.nn.Linear(2, 3)
            self.assertEqual((linear.weight.device.type, linear.weight.dtype), ("meta", torch.float16))
        with self.assertRaises(RuntimeError):
            with _ParamsOnMeta(torch, torch.float16):
                raise RuntimeError("construction failed")
        self.assertEqual(dict(vars(torch.nn.init)), inits)
        self.assertIs(torch.nn.Module.register_parameter, register)
        self.assertEqual(torch.get_default_dtype(), dtype)
        self.assertEqual(torch.nn.Linear(2, 3).weight.device.type, "cpu")

    def test_errors(self):
        config = llama_config(tied=True, layers=2)
        d = save_llama(tempfile.mkdtemp(dir=TMP), config)
        with an.open_model(d, 0, wait=False) as loaded:
            with self.assertRaises(ValueError) as c:
                an.torch.load_into(on_meta(transformers.LlamaForCausalLM, config), loaded, chunk_bytes=MiB)
            self.assertIn("give chunk_bytes to open_model()", str(c.exception))
            with self.assertRaises(ValueError) as c:
                an.torch.load_into(on_meta(transformers.LlamaForCausalLM, config), loaded, device=1)
            self.assertIn("is on GPU 0", str(c.exception))
        with self.assertRaises(ValueError):
            an.torch.load_into(on_meta(transformers.LlamaForCausalLM, config), loaded)   # released
        self.assertEqual(held(), (0, 0))
        # a config whose shapes differ from the file's: refused, the load released
        other = llama_config(tied=True, layers=2)
        other.intermediate_size = 96
        with self.assertRaises(ValueError) as c:
            an.torch.from_pretrained(d, config=other)
        self.assertIn("size mismatch for model.layers.0.mlp.down_proj.weight", str(c.exception))
        self.assertEqual(held(), (0, 0))
        # a directory whose config.json is not JSON: transformers' error, the load released. (Without
        # a config.json at all, transformers guesses the model type from the path's name, and a
        # temporary name such as ".../tmpt6mpt..." made it an MPT model: not deterministic.)
        bare = tempfile.mkdtemp(dir=TMP)
        for n in os.listdir(d):
            if n.endswith((".safetensors", ".json")) and n != "config.json":
                os.link(os.path.join(d, n), os.path.join(bare, n))
        write_file(os.path.join(bare, "config.json"), b"{ not json")
        with self.assertRaises((OSError, ValueError)):
            an.torch.from_pretrained(bare)
        self.assertEqual(held(), (0, 0))
        with self.assertRaises(an.AegaeonError):
            an.torch.from_pretrained(os.path.join(TMP, "none"))
        self.assertEqual(held(), (0, 0))


if __name__ == "__main__":
    testmain.run(TMP)
