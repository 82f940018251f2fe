#!/usr/bin/env python3
"""Tests of the aegaeon_native module on the host backend (make check).

Needs only Debian's python3; numpy (python3-numpy) is used when present for
the zero-copy checks and those tests are skipped without it. Run against a
build tree: PYTHONPATH=<build>/python/.libs AEGAEON_DEVICE=host python3 this.
Prints "N passed, N failed" last; exits non-zero on failure.
"""
import ctypes
import errno
import gc
import json
import os
import random
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import unittest

import testmain
from testmain import AgentCase, make_tensors, pattern, safetensors_bytes, write_file

testmain.preload_sanitizers()

TMP = testmain.host_env("aegaeon-py-")

import aegaeon_native as an  # noqa: E402

try:
    import numpy as np
except ImportError:
    np = None

MiB = 1 << 20


def fd_count():
    return len(os.listdir("/proc/self/fd"))


def child(code, **kw):
    """Runs python code in a fresh interpreter with the module's environment."""
    env = dict(os.environ)
    env.update(kw.pop("env", {}))
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=120, **kw)


class Base(unittest.TestCase):
    def assertAegaeon(self, ctx, name, errno_value=None):
        exc = ctx.exception
        self.assertIsInstance(exc, an.AegaeonError)
        self.assertIsInstance(exc, OSError)
        self.assertEqual(exc.name, name, str(exc))
        if errno_value is not None:
            self.assertEqual(exc.errno, errno_value)
            self.assertEqual(exc.code, -errno_value)
        self.assertTrue(str(exc))

    def tearDown(self):
        gc.collect()


# --------------------------------------------------------------------- module

class TestModule(Base):
    def test_device_and_info(self):
        self.assertEqual(an.device(), "host")
        self.assertEqual(an.device_count(), 1)
        info = an.gpu_info()
        self.assertEqual(info["name"], "host")
        self.assertGreater(info["total_bytes"], 0)
        self.assertEqual(an.gpu_info(gpu_id=0)["index"], 0)
        with self.assertRaises(an.AegaeonError) as c:
            an.gpu_info(7)
        self.assertAegaeon(c, "AEG_ENODEV", errno.ENODEV)
        self.assertRaises(TypeError, an.gpu_info, "0")
        self.assertRaises(ValueError, an.gpu_info, -1)

    def test_constants_and_exceptions(self):
        self.assertEqual(an.HANDLE_BYTES, 64)
        self.assertEqual(an.DEFAULT_CHUNK_BYTES, 32 * MiB)
        self.assertTrue(an.__version__)
        self.assertTrue(issubclass(an.AegaeonError, OSError))
        self.assertTrue(issubclass(an.AegaeonTimeoutError, an.AegaeonError))
        self.assertTrue(issubclass(an.AegaeonTimeoutError, TimeoutError))
        self.assertTrue(issubclass(an.AegaeonValueError, ValueError))
        self.assertRaises(TypeError, an.DeviceArray)

    def test_docstrings(self):
        names = [n for n in dir(an) if not n.startswith("_")]
        for n in names:
            obj = getattr(an, n)
            if callable(obj):
                self.assertTrue(obj.__doc__, n)
        for cls in (an.SlabAllocator, an.PinnedPool, an.KVCache, an.DeviceArray):
            for n in dir(cls):
                if not n.startswith("_") and callable(getattr(cls, n)):
                    self.assertTrue(getattr(cls, n).__doc__, "%s.%s" % (cls.__name__, n))

    def test_set_device(self):
        an.set_device("host")
        self.assertEqual(an.device(), "host")
        self.assertRaises(ValueError, an.set_device, "gpu")
        self.assertRaises(TypeError, an.set_device, 1)
        s = an.SlabAllocator(0, MiB)
        with self.assertRaises(an.AegaeonError) as c:
            an.set_device("cuda")
        self.assertAegaeon(c, "AEG_EBUSY", errno.EBUSY)
        s.close()
        self.assertEqual(an.device(), "host")

    def test_configure(self):
        self.assertRaises(ValueError, an.configure, prefetch_slab="12 parsecs")
        self.assertRaises(ValueError, an.configure, prefetch_slab=0)
        self.assertRaises(TypeError, an.configure, prefetch_slab=1.5)
        self.assertRaises(ValueError, an.configure, prefetch_threads=0)
        self.assertRaises(ValueError, an.configure, prefetch_threads=1000)
        self.assertRaises(TypeError, an.configure, device=3)
        self.assertRaises(TypeError, an.configure, "host")
        an.configure(device="host")
        path = os.path.join(TMP, "conf.bin")
        write_file(path, pattern(4096, 3))
        chunks = an.prefetch_file_to_gpu_chunks(path, 0, 4096)
        with self.assertRaises(an.AegaeonError) as c:
            an.configure(prefetch_slab="128MiB")
        self.assertAegaeon(c, "AEG_EBUSY")
        an.release_prefetch_chunks([c_["slab_id"] for c_ in chunks])
        an.release_all_prefetch_events()
        an.configure(prefetch_slab="128MiB", prefetch_threads=1)
        chunks = an.prefetch_file_to_gpu_chunks(path, 0, 4096)
        self.assertEqual(an.stats()["prefetch"][0]["slab_bytes"], 128 * MiB)
        an.release_all_prefetch_events()
        an.configure(prefetch_slab="256MiB", prefetch_threads=2)

    def test_cuda_is_never_host(self):
        r = child("import aegaeon_native as an\n"
                  "try:\n    an.device()\nexcept an.AegaeonError as e:\n    print(e.name)\n"
                  "else:\n    print('opened', an.device())",
                  env={"AEGAEON_DEVICE": "cuda"})
        self.assertEqual(r.returncode, 0, r.stderr)
        out = r.stdout.strip()
        if out != "opened cuda":   # a machine with a GPU opens it; else an error, never host
            self.assertIn(out, ("AEG_EDEVICE", "AEG_ENOTSUP", "AEG_ENODEV"))

    def test_bad_device_env(self):
        r = child("import aegaeon_native as an\ntry:\n    an.device()\nexcept an.AegaeonError as e:\n"
                  "    print(type(e).__name__, e.name, 'AEGAEON_DEVICE' in str(e))",
                  env={"AEGAEON_DEVICE": "tpu"})
        self.assertEqual(r.stdout.strip(), "AegaeonValueError AEG_EINVAL True", r.stderr)

    def test_bad_config(self):
        bad = os.path.join(TMP, "bad.conf")
        with open(bad, "w") as f:
            f.write("prefetch_threads = \"many\";\n")
        r = child("import aegaeon_native as an\ntry:\n    an.device()\nexcept an.AegaeonError as e:\n"
                  "    print(e.name, e.errno)", env={"AEGAEON_CONFIG": bad})
        self.assertEqual(r.stdout.strip(), "AEG_ECONFIG None", r.stderr)
        # Raised at first use, never at import (where the staging ring is made ahead), even with -W error.
        for conf in (bad, os.path.join(TMP, "missing.conf")):
            r = subprocess.run([sys.executable, "-W", "error", "-c", "import aegaeon_native"], capture_output=True,
                               text=True, timeout=120, env=dict(os.environ, AEGAEON_CONFIG=conf))
            self.assertEqual((r.returncode, r.stderr), (0, ""))


# ----------------------------------------------------------------------- slab

# ------------------------------------------------- signatures, stubs, numpy

def stub_path():
    """The PEP 561 stubs installed beside the module, else the source tree's."""
    here = os.path.join(os.path.dirname(an.__file__), "aegaeon_native-stubs", "__init__.pyi")
    src = os.path.join(os.environ.get("top_srcdir", os.path.join(os.path.dirname(__file__), "..", "..")),
                       "python", "aegaeon_native-stubs", "__init__.pyi")
    return here if os.path.exists(here) else src


def stub_tree():
    import ast
    with open(stub_path()) as f:
        return ast.parse(f.read())


def stub_params(fn):
    """Parameter names of a stub function, without self/cls."""
    a = fn.args
    names = [x.arg for x in a.posonlyargs + a.args]
    if a.vararg:
        names.append("*" + a.vararg.arg)
    names += [x.arg for x in a.kwonlyargs]
    if a.kwarg:
        names.append("**" + a.kwarg.arg)
    return [n for n in names if n not in ("self", "cls")]


def real_params(fn):
    """Parameter names of a function as stub_params gives them (*args, **kwargs marked)."""
    import inspect
    kinds = {inspect.Parameter.VAR_POSITIONAL: "*", inspect.Parameter.VAR_KEYWORD: "**"}
    return [kinds.get(p.kind, "") + p.name for p in inspect.signature(fn).parameters.values()
            if p.name not in ("self", "cls")]


def own_callables():
    """Every function and method the module defines (not those inherited from Python)."""
    for n in dir(an):
        obj = getattr(an, n)
        if n.startswith("__"):
            continue
        if isinstance(obj, type):
            for m, attr in vars(obj).items():
                if callable(attr) or isinstance(attr, (classmethod, staticmethod)):
                    yield "%s.%s" % (n, m), getattr(obj, m)
        elif callable(obj):
            yield n, obj


class TestInterface(Base):
    def test_signatures(self):
        import inspect
        seen = 0
        for name, fn in own_callables():
            if name.split(".")[-1] in ("__new__", "__init__", "__repr__", "__init_subclass__"):
                continue
            try:
                inspect.signature(fn)
            except (ValueError, TypeError) as e:
                self.fail("inspect.signature(%s): %s" % (name, e))
            seen += 1
        self.assertGreater(seen, 60)
        for cls in (an.SlabAllocator, an.PinnedPool, an.KVCache):
            self.assertTrue(str(inspect.signature(cls)).startswith("("), cls)
        # bound methods drop self, classmethods cls
        p = an.PinnedPool(4096, 1)
        self.assertEqual(str(inspect.signature(p.release)), "(buffer)")
        self.assertEqual(str(inspect.signature(an.PinnedPool.attach)), "(fd, gpu_id=0)")
        self.assertEqual(str(inspect.signature(an.prefetch_file_to_gpu_chunks)),
                         "(filepath, gpu_id, chunk_bytes=%d)" % an.DEFAULT_CHUNK_BYTES)
        p.close()

    def test_help_has_no_stray_marker(self):
        import pydoc
        text = pydoc.render_doc(an, renderer=pydoc.plaintext)
        self.assertIn("prefetch_file_to_gpu_chunks(filepath, gpu_id, chunk_bytes=", text)
        stray = [line for line in text.splitlines() if line.strip() == "--"]
        self.assertEqual(stray, [])

    def test_stubs_match(self):
        import ast
        tree = stub_tree()
        stubs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        names = set(stubs) | {n.target.id for n in tree.body if isinstance(n, ast.AnnAssign)}
        names |= {a.asname or a.name for n in tree.body if isinstance(n, ast.ImportFrom) and n.level for a in n.names}
        self.assertEqual({n for n in dir(an) if not n.startswith("_")} - names, set())
        checked = 0
        for name, fn in own_callables():
            cls, _, meth = name.rpartition(".")
            node = stubs.get(cls or meth)
            if cls:
                if meth.startswith("__") and meth not in ("__enter__", "__exit__", "__dlpack__", "__array__"):
                    continue
                self.assertIn(cls, stubs, name)
                node = next((m for m in stubs[cls].body if isinstance(m, ast.FunctionDef) and m.name == meth), None)
            self.assertIsNotNone(node, "%s is not in %s" % (name, stub_path()))
            if isinstance(node, ast.ClassDef):
                continue
            self.assertEqual(real_params(fn), stub_params(node), name)
            checked += 1
        self.assertGreater(checked, 55)
        # aegaeon_native.torch, built into the module, against its own stub file
        with open(stub_path().replace("__init__.pyi", "torch.pyi")) as f:
            sub = {n.name: n for n in ast.parse(f.read()).body if isinstance(n, ast.FunctionDef)}
        self.assertEqual(set(an.torch.__all__), set(sub))
        for name in an.torch.__all__:
            self.assertEqual(real_params(getattr(an.torch, name)), stub_params(sub[name]), "torch." + name)

    def test_torch_submodule(self):
        # From the one extension file: imported with it, importing torch only when used.
        r = child("import sys, aegaeon_native, aegaeon_native.torch as t\n"
                  "from aegaeon_native import torch as t2\n"
                  "print(t is t2 is sys.modules['aegaeon_native.torch'], 'torch' in sys.modules, t.__name__)\n"
                  "try:\n    t._names(None)\nexcept TypeError:\n    import traceback; traceback.print_exc()\n")
        self.assertEqual(r.stdout.split(), ["True", "False", "aegaeon_native.torch"], r.stderr)
        # tracebacks show the lines, which are inside the extension
        self.assertIn('File "aegaeon_native/torch.py"', r.stderr)
        self.assertIn("names = sorted(names)", r.stderr)
        self.assertTrue(an.torch.load_into.__doc__ and an.torch.load_state_dict.__doc__)

    def test_mypy_reads_the_stubs(self):
        # Where the stubs are installed (a wheel, a package), a type checker finds them.
        import shutil
        here = os.path.join(os.path.dirname(an.__file__), "aegaeon_native-stubs", "__init__.pyi")
        mypy = shutil.which("mypy")
        if not os.path.exists(here) or mypy is None:
            self.skipTest("the stubs are not installed beside %s, or no mypy" % an.__file__)
        good = os.path.join(TMP, "good.py")
        bad = os.path.join(TMP, "bad.py")
        with open(good, "w") as f:
            f.write("import aegaeon_native as an\nn: str = an.device()\n"
                    "c = an.prefetch_file_to_gpu_chunks('f', 0)\nk: int = c[0]['slab_id']\n"
                    "o: int = c[0]['tensors'][0][1]\nm = an.open_model('d', wait=False)\n"
                    "m.wait('x', timeout=1.5)\nf: str = m.files[0]\nload = an.torch.load_state_dict\n")
        with open(bad, "w") as f:
            f.write("import aegaeon_native as an\nn: int = an.device()\nan.prefetch_file_to_gpu_chunks('f', '0')\n"
                    "an.open_model('d').wait(3)\n")
        env = dict(os.environ, MYPY_CACHE_DIR=os.path.join(TMP, "mypy-cache"))
        args = [mypy, "--python-executable", sys.executable, "--no-error-summary"]
        r = subprocess.run(args + [good], capture_output=True, text=True, env=env, timeout=300)
        self.assertEqual((r.returncode, r.stdout), (0, ""))
        r = subprocess.run(args + [bad], capture_output=True, text=True, env=env, timeout=300)
        self.assertEqual(r.returncode, 1, r.stdout)
        self.assertIn('bad.py:2: error: Incompatible types in assignment (expression has type "str"', r.stdout)
        self.assertIn("bad.py:3: error: Argument 2 to \"prefetch_file_to_gpu_chunks\" has incompatible type",
                      r.stdout)
        self.assertIn('bad.py:4: error: Argument 1 to "wait" of "Model" has incompatible type "int"', r.stdout)

    def test_numpy_of_types_numpy_lacks(self):
        if np is None:
            self.skipTest("no numpy")
        s = an.SlabAllocator(0, MiB)
        b = s.alloc(4096)
        b.copy_from(struct.pack("<4H", 0x3F80, 0x4000, 0x4040, 0x4080))
        for dtype, raw in (("BF16", "U16"), ("F8_E4M3", "U8"), ("F8_E5M2", "U8"), ("F4", "U8")):
            v = b.view(dtype)
            with self.assertRaises(TypeError) as c:
                np.asarray(v)
            self.assertIn('numpy has no %s dtype: numpy.asarray(view.view("%s"))' % (dtype, raw), str(c.exception))
        a = np.asarray(b.view("BF16").view("U16"))
        self.assertEqual(a.dtype, np.uint16)
        self.assertEqual(list(a[:4]), [0x3F80, 0x4000, 0x4040, 0x4080])
        self.assertEqual(a.__array_interface__["data"][0], b.device_ptr)    # no copy
        self.assertEqual(np.asarray(b.view("F8_E4M3").view("U8")).shape, (4096,))
        f = b.view("F32")
        self.assertEqual(f.__array__().dtype, np.float32)
        self.assertEqual(f.__array__(np.float64).dtype, np.float64)
        del a, b, f, v
        s.close()



class TestSlab(Base):
    def test_alloc_free_stats(self):
        s = an.SlabAllocator(0, 4 * MiB)
        self.assertEqual(s.total_bytes, 4 * MiB)
        self.assertEqual(s.gpu_id, 0)
        self.assertGreater(s.device_ptr, 0)
        self.assertFalse(s.closed)
        b = s.alloc(1000)
        self.assertIsInstance(b, an.DeviceArray)
        self.assertEqual(b.size, 1024)
        self.assertEqual(b.nbytes, 1024)
        self.assertEqual(b.dtype, "U8")
        self.assertEqual(b.shape, (1024,))
        self.assertEqual(b.device_ptr % 256, 0)
        self.assertTrue(s.device_ptr <= b.device_ptr < s.device_ptr + s.total_bytes)
        self.assertTrue(b.is_host)
        st = s.stats()
        self.assertEqual((st["blocks"], st["used_bytes"], st["allocs"]), (1, 1024, 1))
        b2 = s.block(b.id)
        self.assertEqual(b2.device_ptr, b.device_ptr)
        b.copy_from(b"hello", offset=10)
        self.assertEqual(b2.tobytes()[10:15], b"hello")
        s.free(b)
        st = s.stats()
        self.assertEqual((st["blocks"], st["used_bytes"], st["frees"]), (0, 0, 1))
        del b, b2
        self.assertEqual(s.stats()["views"], 0)
        s.close()
        self.assertTrue(s.closed)
        s.close()

    def test_seed_allocate_reset_destroy(self):
        s = an.SlabAllocator(0, MiB)
        p1 = s.allocate(100)
        p2 = s.allocate(300, alignment=64)
        self.assertIsInstance(p1, int)
        self.assertNotEqual(p1, p2)
        self.assertEqual(s.stats()["blocks"], 2)
        s.free(p1)
        self.assertEqual(s.stats()["blocks"], 1)
        ids = [s.alloc(256).id for _ in range(3)]
        self.assertEqual(len(set(ids)), 3)
        gc.collect()
        s.free(ids[0])
        s.reset()
        self.assertEqual(s.stats()["blocks"], 0)
        self.assertRaises(ValueError, s.allocate, 10, alignment=512)
        self.assertRaises(ValueError, s.allocate, 10, alignment=3)
        s.destroy()
        self.assertRaises(ValueError, s.alloc, 10)
        self.assertRaises(ValueError, s.stats)

    def test_errors(self):
        self.assertRaises(TypeError, an.SlabAllocator, "0", MiB)
        self.assertRaises(TypeError, an.SlabAllocator, 0, 1.5)
        self.assertRaises(TypeError, an.SlabAllocator, 0, True)
        self.assertRaises(ValueError, an.SlabAllocator, -1, MiB)
        self.assertRaises(ValueError, an.SlabAllocator, 0, 0)
        self.assertRaises(ValueError, an.SlabAllocator, 0, 1 << 64)
        self.assertRaises(TypeError, an.SlabAllocator, 0)
        with self.assertRaises(an.AegaeonError) as c:
            an.SlabAllocator(3, MiB)
        self.assertAegaeon(c, "AEG_ENODEV", errno.ENODEV)
        with self.assertRaises(an.AegaeonError) as c:
            an.SlabAllocator(0, 1 << 62)
        self.assertAegaeon(c, "AEG_ENOSPC", errno.ENOSPC)
        self.assertIn("free", str(c.exception))
        s = an.SlabAllocator(0, MiB)
        self.assertRaises(ValueError, s.alloc, 0)
        self.assertRaises(TypeError, s.alloc, "1")
        with self.assertRaises(an.AegaeonError) as c:
            s.alloc(2 * MiB)
        self.assertAegaeon(c, "AEG_ENOSPC", errno.ENOSPC)
        self.assertEqual(s.stats()["failed_allocs"], 1)
        with self.assertRaises(an.AegaeonError) as c:
            s.free(12345)
        self.assertAegaeon(c, "AEG_ENOENT", errno.ENOENT)
        self.assertRaises(TypeError, s.free, "x")
        self.assertRaises(ValueError, s.free, -3)
        with self.assertRaises(an.AegaeonError) as c:
            s.block(999)
        self.assertAegaeon(c, "AEG_ENOENT")
        b = s.alloc(256)
        with self.assertRaises(an.AegaeonError) as c:
            s.close()
        self.assertAegaeon(c, "AEG_EBUSY", errno.EBUSY)
        self.assertRaises(ValueError, b.copy_from, b"x" * 300)
        self.assertRaises(TypeError, b.copy_from, "text")
        del b
        s.close()

    def test_export_handle(self):
        with an.SlabAllocator(0, MiB) as s:
            h = s.export_handle()
            self.assertIsInstance(h, bytes)
            self.assertEqual(len(h), 64)

    def test_views(self):
        s = an.SlabAllocator(0, MiB)
        b = s.alloc(4096)
        b.copy_from(struct.pack("<4f", 1.0, 2.0, 3.0, 4.0))
        f = b.view("F32")
        self.assertEqual(f.shape, (1024,))
        self.assertEqual(f.typestr, "<f4")
        self.assertEqual(f.id, b.id)
        self.assertEqual(b.view("U8").shape, (4096,))
        self.assertRaises(ValueError, b.view, "F128")
        with self.assertRaises(AttributeError):
            b.__cuda_array_interface__
        ai = f.__array_interface__
        self.assertEqual(ai["version"], 3)
        self.assertEqual(ai["data"], (b.device_ptr, False))
        self.assertEqual(ai["typestr"], "<f4")
        self.assertEqual(b.__dlpack_device__(), (1, 0))
        self.assertIn("F32", repr(f))
        bf = b.view("BF16")
        self.assertIsNone(bf.typestr)
        self.assertFalse(hasattr(bf, "__array_interface__"))
        bf.__dlpack__()    # an unconsumed capsule is freed with its reference
        f8 = b.view("F8_E4M3")
        self.assertRaises(BufferError, f8.__dlpack__)
        self.assertRaises(BufferError, f.__dlpack__, copy=True)
        if np is not None:
            a = np.asarray(f)
            self.assertEqual(list(a[:4]), [1.0, 2.0, 3.0, 4.0])
            a[4] = 5.0     # zero copy: written through to the block
            self.assertEqual(struct.unpack("<f", b.tobytes()[16:20])[0], 5.0)
            d = np.from_dlpack(f)
            self.assertEqual(d.__array_interface__["data"][0], b.device_ptr)
            del a, d
        del b, f, bf, f8
        gc.collect()
        self.assertEqual(s.stats()["views"], 0)
        s.close()


# ----------------------------------------------------------------- pinned pool

class TestPinned(Base):
    def test_acquire_release(self):
        p = an.PinnedPool(8192, 3)
        self.assertEqual((p.buffer_size, p.pool_size, p.gpu_id), (8192, 3, 0))
        idx, mv = p.acquire()
        self.assertIsInstance(mv, memoryview)
        self.assertFalse(mv.readonly)
        self.assertEqual(len(mv), 8192)
        mv[:5] = b"abcde"
        self.assertEqual(bytes(p.buffer(idx)[:5]), b"abcde")
        self.assertGreater(p.address(idx), 0)
        st = p.stats()
        self.assertEqual((st["in_use"], st["buffers"], st["pool_bytes"]), (1, 3, 3 * 8192))
        p.release(idx)
        self.assertEqual(p.stats()["in_use"], 0)
        self.assertRaises(ValueError, mv.__getitem__, 0)     # released with the buffer
        t = p.acquire(timeout=0)
        p.release(t)                       # acquire()'s tuple
        i2, _ = p.acquire(timeout=1.5)
        p.release(p.address(i2))           # the seed's address form
        self.assertEqual(p.stats()["in_use"], 0)
        self.assertGreaterEqual(p.fd(), 0)
        p.close()
        self.assertTrue(p.closed)
        self.assertRaises(ValueError, p.acquire)

    def test_errors(self):
        self.assertRaises(ValueError, an.PinnedPool, 1000, 2)
        self.assertRaises(ValueError, an.PinnedPool, 4096, 0)
        self.assertRaises(ValueError, an.PinnedPool, 0, 2)
        self.assertRaises(TypeError, an.PinnedPool, "4096", 2)
        self.assertRaises(TypeError, an.PinnedPool, 4096, 2.0)
        with self.assertRaises(an.AegaeonError) as c:
            an.PinnedPool(1 << 30, 1 << 20)
        self.assertIn(c.exception.name, ("AEG_ENOMEM", "AEG_ENOSPC"))
        with an.PinnedPool(4096, 1) as p:
            i, _ = p.acquire()
            with self.assertRaises(an.AegaeonTimeoutError) as c:
                p.acquire(timeout=0.05)
            self.assertIsInstance(c.exception, TimeoutError)
            self.assertAegaeon(c, "AEG_ETIMEDOUT", errno.ETIMEDOUT)
            with self.assertRaises(an.AegaeonTimeoutError):
                p.acquire(timeout=0)
            self.assertEqual(p.stats()["timeouts"], 2)
            self.assertRaises(ValueError, p.acquire, timeout=-1)
            self.assertRaises(ValueError, p.acquire, timeout=float("nan"))
            self.assertRaises(TypeError, p.acquire, timeout="1")
            self.assertRaises(ValueError, p.release, 5)
            self.assertRaises(TypeError, p.release, "0")
            self.assertRaises(ValueError, p.release, p.address(0) + 8)
            p.release(i)
            with self.assertRaises(an.AegaeonValueError) as c:
                p.release(i)
            self.assertAegaeon(c, "AEG_EINVAL", errno.EINVAL)
        self.assertRaises(TypeError, an.PinnedPool.attach, "3")
        with self.assertRaises(an.AegaeonError) as c:
            an.PinnedPool.attach(999)
        self.assertAegaeon(c, "AEG_EBADF", errno.EBADF)
        with open(os.environ["AEGAEON_CONFIG"], "rb") as f:
            with self.assertRaises(an.AegaeonValueError):
                an.PinnedPool.attach(f.fileno())

    def test_gil_released_while_waiting(self):
        p = an.PinnedPool(4096, 1)
        i, _ = p.acquire()
        done = []

        def waiter():
            try:
                p.acquire(timeout=0.6)
            except an.AegaeonTimeoutError:
                done.append("timeout")

        t = threading.Thread(target=waiter)
        t.start()
        n, end = 0, time.monotonic() + 0.4
        while time.monotonic() < end:
            n += 1
        t.join()
        self.assertEqual(done, ["timeout"])
        self.assertGreater(n, 10000)      # this thread ran while the other waited
        p.release(i)
        i, _ = p.acquire()

        def releaser():
            time.sleep(0.2)
            p.release(i)

        t = threading.Thread(target=releaser)
        t.start()
        j, _ = p.acquire(timeout=5)       # woken by the release of another thread
        t.join()
        p.release(j)
        p.close()

    def test_interrupt(self):
        p = an.PinnedPool(4096, 1)
        i, _ = p.acquire()

        class Alarm(Exception):
            pass

        def handler(signum, frame):
            raise Alarm()

        old = signal.signal(signal.SIGALRM, handler)
        try:
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            t0 = time.monotonic()
            with self.assertRaises(Alarm):
                p.acquire()               # for ever, but Ctrl-C-like signals get through
            self.assertLess(time.monotonic() - t0, 5)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)
        p.release(i)
        p.close()

    def test_shared_between_processes(self):
        p = an.PinnedPool(4096, 2)
        i, mv = p.acquire()
        mv[:11] = b"from parent"
        code = ("import aegaeon_native as an, sys\n"
                "q = an.PinnedPool.attach(%d)\n"
                "print(q.stats()['in_use'], bytes(q.buffer(%d)[:11]).decode())\n"
                "j, mv = q.acquire(timeout=1)\n"
                "mv[:10] = b'from child'\n"
                "print(j)\n" % (p.fd(), i))
        r = subprocess.run([sys.executable, "-c", code.replace("sys.argv[1]", str(p.fd()))],
                           capture_output=True, text=True, timeout=60, pass_fds=[p.fd()])
        self.assertEqual(r.returncode, 0, r.stderr)
        lines = r.stdout.split("\n")
        self.assertEqual(lines[0], "1 from parent")
        j = int(lines[1])
        self.assertNotEqual(i, j)
        # the child exited holding buffer j: it stays taken, its bytes are here
        self.assertEqual(bytes(p.buffer(j)[:10]), b"from child")
        self.assertEqual(p.stats()["in_use"], 2)
        p.release(j)
        p.release(i)
        p.close()


# --------------------------------------------------------------------- events

class TestEvents(Base):
    def test_create_wait_release(self):
        before = an.stats()["events"]
        h = an.create_event_handle_bytes()
        self.assertIsInstance(h, bytes)
        self.assertEqual(len(h), 64)
        self.assertEqual(an.stats()["events"], before + 1)
        self.assertIsNone(an.wait_event_handle_bytes(h))
        an.wait_event_handle_bytes(h, timeout=0)
        an.wait_event_handle_bytes(bytearray(h), timeout=2.5)
        an.release_event_handle_bytes(h)
        self.assertEqual(an.stats()["events"], before)
        with self.assertRaises(an.AegaeonError) as c:
            an.release_event_handle_bytes(h)
        self.assertAegaeon(c, "AEG_ENOENT", errno.ENOENT)
        h2 = an.create_event_handle_bytes(gpu_id=0)
        an.release_all_prefetch_events()
        self.assertEqual(an.stats()["events"], 0)
        with self.assertRaises(an.AegaeonError) as c:
            an.release_event_handle_bytes(h2)
        self.assertAegaeon(c, "AEG_ENOENT", errno.ENOENT)

    def test_errors(self):
        self.assertRaises(TypeError, an.wait_event_handle_bytes, 123)
        self.assertRaises(TypeError, an.wait_event_handle_bytes, "x" * 64)
        self.assertRaises(ValueError, an.wait_event_handle_bytes, b"x")
        self.assertRaises(ValueError, an.wait_event_handle_bytes, b"x" * 65)
        h = an.create_event_handle_bytes()
        self.assertRaises(ValueError, an.wait_event_handle_bytes, h, timeout=-0.5)
        self.assertRaises(TypeError, an.wait_event_handle_bytes, h, timeout="soon")
        an.release_event_handle_bytes(h)
        with self.assertRaises(an.AegaeonError) as c:
            an.wait_event_handle_bytes(b"\x00" * 64)
        self.assertAegaeon(c, "AEG_EBADF", errno.EBADF)
        with self.assertRaises(an.AegaeonError) as c:
            an.create_event_handle_bytes(gpu_id=4)
        self.assertAegaeon(c, "AEG_ENODEV")
        self.assertRaises(ValueError, an.create_event_handle_bytes, gpu_id=-1)
        self.assertRaises(TypeError, an.release_event_handle_bytes, None)

    def test_two_processes_share_a_handle(self):
        # parent's event, waited on by a child
        h = an.create_event_handle_bytes()
        r = subprocess.run(
            [sys.executable, "-c", "import aegaeon_native as an, sys\n"
             "an.wait_event_handle_bytes(bytes.fromhex(sys.argv[1]), timeout=10)\nprint('waited')",
             h.hex()], capture_output=True, text=True, timeout=60)
        self.assertEqual(r.stdout.strip(), "waited", r.stderr)
        an.release_event_handle_bytes(h)
        # child's event, waited on here while the child lives; gone with it after
        proc = subprocess.Popen(
            [sys.executable, "-c", "import aegaeon_native as an, sys\n"
             "print(an.create_event_handle_bytes().hex(), flush=True)\nsys.stdin.read()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            handle = bytes.fromhex(proc.stdout.readline().strip())
            self.assertEqual(len(handle), 64)
            an.wait_event_handle_bytes(handle, timeout=10)
            an.wait_event_handle_bytes(handle, timeout=10)    # the cached opening
        finally:
            proc.stdin.close()
            proc.wait(timeout=60)
            proc.stdout.close()
        self.assertEqual(proc.returncode, 0)

    def test_prefetch_chunk_waited_in_another_process(self):
        path = os.path.join(TMP, "shared.bin")
        data = pattern(3 * MiB, 9)
        write_file(path, data)
        chunks = an.prefetch_file_to_gpu_chunks(path, 0, MiB)
        r = subprocess.run([sys.executable, "-c", "import aegaeon_native as an, sys\n"
                            "for h in sys.argv[1:]:\n    an.wait_event_handle_bytes(bytes.fromhex(h), timeout=30)\n"
                            "print(len(sys.argv) - 1)"] + [c["event_handle"].hex() for c in chunks],
                           capture_output=True, text=True, timeout=60)
        self.assertEqual(r.stdout.strip(), str(len(chunks)), r.stderr)
        an.release_prefetch_chunks([c["slab_id"] for c in chunks])


# ------------------------------------------------------------------- prefetch

SEED = '''
import aegaeon_native as an
chunks = an.prefetch_file_to_gpu_chunks("/tmp/test_model.bin", gpu_id=0, chunk_bytes=32*1024*1024)
an.wait_event_handle_bytes(chunks[0]["event_handle"])
an.release_prefetch_chunks([chunks[0]["slab_id"]])
'''


class TestPrefetch(Base):
    def test_seed_example_verbatim(self):
        # The seed's example, its fixed /tmp path replaced by the test's own dir.
        path = os.path.join(TMP, "test_model.bin")
        seed = SEED.replace('"/tmp/test_model.bin"', repr(path))
        self.assertNotEqual(seed, SEED)
        data = pattern(80 * MiB, 2024)    # three chunks of 32 MiB
        write_file(path, data)
        scope = {}
        exec(seed, scope)
        chunks = scope["chunks"]
        self.assertEqual([c["size"] for c in chunks], [32 * MiB, 32 * MiB, 16 * MiB])
        for i, c in enumerate(chunks):
            # the seed's four keys as they were, and where the chunk comes from
            self.assertEqual(set(c), {"device_ptr", "size", "event_handle", "slab_id", "file", "file_offset",
                                      "tensors"})
            self.assertIsInstance(c["device_ptr"], int)
            self.assertIsInstance(c["slab_id"], int)
            self.assertEqual(len(c["event_handle"]), 64)
            self.assertEqual((c["file"], c["file_offset"], c["tensors"]), (path, i * 32 * MiB, []))
        st = an.stats()["prefetch"][0]
        self.assertEqual(st["chunks"], 2)
        for i, c in enumerate(chunks[1:], 1):
            an.wait_event_handle_bytes(c["event_handle"])
            self.assertEqual(an.chunk_view(c).tobytes(), data[i * 32 * MiB:i * 32 * MiB + c["size"]])
        gc.collect()
        an.release_prefetch_chunks([c["slab_id"] for c in chunks[1:]])
        self.assertEqual(an.stats()["prefetch"][0]["chunks"], 0)
        self.assertEqual(an.stats()["prefetch"][0]["blocks"], 0)
        # the seed example as a program of its own
        r = child(seed + "print(len(chunks))")
        self.assertEqual((r.returncode, r.stdout.strip()), (0, "3"), r.stderr)

    def test_chunks_and_views(self):
        path = os.path.join(TMP, "model.bin")
        data = pattern(5 * MiB + 123, 5)
        write_file(path, data)
        chunks = an.prefetch_file_to_gpu_chunks(path, 0, chunk_bytes=MiB)
        self.assertEqual(len(chunks), 6)
        self.assertEqual(sum(c["size"] for c in chunks), len(data))
        off = 0
        for c in chunks:
            an.wait_event_handle_bytes(c["event_handle"], timeout=30)
            v = an.chunk_view(c)
            self.assertEqual(v.shape, (c["size"],))
            self.assertEqual(v.device_ptr, c["device_ptr"])
            self.assertEqual(v.tobytes(), data[off:off + c["size"]])
            if np is not None:
                self.assertEqual(np.asarray(v).tobytes(), data[off:off + c["size"]])
            off += c["size"]
        self.assertEqual(an.stats()["prefetch"][0]["views"], 1)
        del v
        self.assertEqual(an.stats()["prefetch"][0]["views"], 0)
        # pathlib and bytes paths; repeated ids count once
        import pathlib
        more = an.prefetch_file_to_gpu_chunks(pathlib.Path(path), 0, 4 * MiB)
        more += an.prefetch_file_to_gpu_chunks(os.fsencode(path), 0, 8 * MiB)
        ids = [c["slab_id"] for c in chunks + more]
        an.release_prefetch_chunks(ids + ids[:2])
        st = an.stats()["prefetch"][0]
        self.assertEqual((st["chunks"], st["blocks"], st["loads"]), (0, 0, 0))

    def test_release_while_loading(self):
        path = os.path.join(TMP, "big.bin")
        write_file(path, pattern(64 * MiB, 8))
        chunks = an.prefetch_file_to_gpu_chunks(path, 0, MiB)
        an.wait_event_handle_bytes(chunks[0]["event_handle"])
        an.release_prefetch_chunks([chunks[0]["slab_id"]])   # waits for the rest of the file
        an.release_prefetch_chunks(tuple(c["slab_id"] for c in chunks[1:]))
        self.assertEqual(an.stats()["prefetch"][0]["chunks"], 0)
        chunks = an.prefetch_file_to_gpu_chunks(path, 0, MiB)
        an.release_all_prefetch_events()                    # cancels what still loads
        st = an.stats()["prefetch"][0]                      # the slab and engine stay for the next load
        self.assertEqual((st["chunks"], st["blocks"], st["loads"]), (0, 0, 0))
        for c in chunks[-1:]:
            with self.assertRaises(an.AegaeonError):
                an.wait_event_handle_bytes(c["event_handle"], timeout=5)

    def test_errors(self):
        path = os.path.join(TMP, "e.bin")
        write_file(path, b"x" * 1000)
        self.assertRaises(TypeError, an.prefetch_file_to_gpu_chunks, 123, 0, MiB)
        self.assertRaises(TypeError, an.prefetch_file_to_gpu_chunks, path, "0", MiB)
        self.assertRaises(ValueError, an.prefetch_file_to_gpu_chunks, path, 0, 0)
        self.assertRaises(ValueError, an.prefetch_file_to_gpu_chunks, path, 0, -1)
        self.assertRaises(TypeError, an.prefetch_file_to_gpu_chunks, path)
        with self.assertRaises(an.AegaeonError) as c:
            an.prefetch_file_to_gpu_chunks(os.path.join(TMP, "missing.bin"), 0, MiB)
        self.assertAegaeon(c, "AEG_ENOENT", errno.ENOENT)
        self.assertIn("missing.bin", str(c.exception))
        empty = tempfile.mkdtemp(dir=TMP)      # a directory is a model: this one holds none
        with self.assertRaises(an.AegaeonError) as c:
            an.prefetch_file_to_gpu_chunks(empty, 0, MiB)
        self.assertAegaeon(c, "AEG_ENOENT", errno.ENOENT)
        self.assertIn("no model in it", str(c.exception))
        os.rmdir(empty)
        with self.assertRaises(an.AegaeonError) as c:
            an.prefetch_file_to_gpu_chunks(path, 2, MiB)
        self.assertAegaeon(c, "AEG_ENODEV")
        # A chunk over the slab and the file is the file's size: one chunk, as for every caller.
        big = an.prefetch_file_to_gpu_chunks(path, 0, 1 << 40)
        self.assertEqual([c["size"] for c in big], [1000])
        an.release_prefetch_chunks([c["slab_id"] for c in big])
        self.assertRaises(TypeError, an.release_prefetch_chunks, 5)
        self.assertRaises(TypeError, an.release_prefetch_chunks, "12")
        self.assertRaises(TypeError, an.release_prefetch_chunks, ["a"])
        self.assertRaises(ValueError, an.release_prefetch_chunks, [-1])
        an.release_prefetch_chunks([])
        chunks = an.prefetch_file_to_gpu_chunks(path, 0, MiB)
        with self.assertRaises(an.AegaeonError) as c:
            an.release_prefetch_chunks([chunks[0]["slab_id"], 987654])
        self.assertAegaeon(c, "AEG_ENOENT", errno.ENOENT)
        self.assertEqual(an.stats()["prefetch"][0]["chunks"], 1)   # nothing released
        with self.assertRaises(an.AegaeonError):
            an.release_prefetch_chunks([chunks[0]["slab_id"]], gpu_id=5)
        self.assertRaises(TypeError, an.chunk_view, [1])
        self.assertRaises(ValueError, an.chunk_view, {"size": 1})
        with self.assertRaises(an.AegaeonError):
            an.chunk_view(dict(chunks[0], size=chunks[0]["size"] + 4096))
        self.assertRaises(ValueError, an.chunk_view, chunks[0], dtype="F99")
        an.release_prefetch_chunks([chunks[0]["slab_id"]], gpu_id=0)
        with self.assertRaises(an.AegaeonError) as c:
            an.release_prefetch_chunks([chunks[0]["slab_id"]])
        self.assertAegaeon(c, "AEG_ENOENT")
        with self.assertRaises(an.AegaeonError):
            an.chunk_view(chunks[0])

    def test_chunk_not_a_multiple_of_4k(self):
        path = os.path.join(TMP, "raw4k.bin")
        write_file(path, pattern(100000, 5))
        for chunk in (1000, 4096 + 512):
            with self.assertRaises(an.AegaeonValueError) as c:
                an.prefetch_file_to_gpu_chunks(path, 0, chunk)
            self.assertAegaeon(c, "AEG_EINVAL", errno.EINVAL)
            self.assertIn("chunk size %d bytes is not a multiple of 4 KiB" % chunk, str(c.exception))
        self.assertEqual(an.stats()["prefetch"].get(0, {}).get("blocks", 0), 0)

    def test_slab_full(self):
        an.release_all_prefetch_events()
        an.configure(prefetch_slab="2MiB")
        try:
            path = os.path.join(TMP, "full.bin")
            write_file(path, pattern(3 * MiB, 4))
            with self.assertRaises(an.AegaeonError) as c:
                an.prefetch_file_to_gpu_chunks(path, 0, MiB)
            self.assertAegaeon(c, "AEG_ENOSPC", errno.ENOSPC)
            self.assertEqual(an.stats()["prefetch"][0]["blocks"], 0)
        finally:
            an.release_all_prefetch_events()
            an.configure(prefetch_slab="256MiB")


# ---------------------------------------------------------------- safetensors

class TestSafetensors(Base):
    def test_load_and_compare(self):
        tensors = make_tensors()
        path = os.path.join(TMP, "model.safetensors")
        write_file(path, safetensors_bytes(tensors, metadata={"format": "pt"}))
        d = an.load_safetensors(path, gpu_id=0, chunk_bytes=MiB)
        self.assertEqual(list(d), list(tensors))
        for name, (dtype, shape, raw) in tensors.items():
            v = d[name]
            self.assertEqual(v.dtype, dtype, name)
            self.assertEqual(v.shape, tuple(shape), name)
            self.assertEqual(v.nbytes, len(raw), name)
            self.assertEqual(v.tobytes(), raw, name)
            if np is not None and v.typestr is not None:
                a = np.asarray(v)
                self.assertEqual(a.shape, tuple(shape))
                self.assertEqual(a.tobytes(), raw, name)
                self.assertEqual(a.__array_interface__["data"][0], v.device_ptr)   # no copy
            if np is not None and dtype not in ("BF16", "BOOL"):    # numpy's DLPack lacks them
                self.assertEqual(np.from_dlpack(v).tobytes(), raw, name)
        st = an.stats()["prefetch"][0]
        self.assertGreater(st["blocks"], 0)
        self.assertEqual(an.stats()["objects"], 1)
        del d, v
        if np is not None:
            del a
        gc.collect()
        st = an.stats()["prefetch"][0]
        self.assertEqual((st["blocks"], st["chunks"], st["views"]), (0, 0, 0))
        self.assertEqual(an.stats()["objects"], 0)

    def test_view_outlives_dict(self):
        tensors = make_tensors(7)
        path = os.path.join(TMP, "m2.safetensors")
        write_file(path, safetensors_bytes(tensors))
        keep = an.load_safetensors(path)["big.weight"]
        gc.collect()
        self.assertEqual(keep.tobytes(), tensors["big.weight"][2])
        self.assertGreater(an.stats()["prefetch"][0]["blocks"], 0)
        del keep
        gc.collect()
        self.assertEqual(an.stats()["prefetch"][0]["blocks"], 0)

    def test_bad_files(self):
        cases = {
            b"": "AEG_EFORMAT",
            struct.pack("<Q", 1 << 40) + b"{}": "AEG_EFORMAT",
            struct.pack("<Q", 2) + b"[]": "AEG_EFORMAT",
            safetensors_bytes({"t": ("F32", (4,), b"\0" * 12)}): "AEG_EFORMAT",
            safetensors_bytes({"t": ("Q7", (1,), b"\0" * 4)}): "AEG_EFORMAT",
        }
        for i, (blob, name) in enumerate(cases.items()):
            path = os.path.join(TMP, "bad%d.safetensors" % i)
            write_file(path, blob)
            with self.assertRaises(an.AegaeonError) as c:
                an.load_safetensors(path)
            self.assertEqual(c.exception.name, name, (i, str(c.exception)))
        self.assertEqual(c.exception.errno, None)
        self.assertEqual(c.exception.code, -4004)
        self.assertRaises(TypeError, an.load_safetensors, None)
        self.assertRaises(ValueError, an.load_safetensors, path, gpu_id=-2)
        st = an.stats()["prefetch"].get(0, {"blocks": 0})
        self.assertEqual(st["blocks"], 0)
        self.assertEqual(an.stats()["objects"], 0)


# ----------------------------------------------------------------------- KV

class TestKV(Base):
    def test_blocks_and_swaps(self):
        kv = an.KVCache(0, block_bytes=4096, gpu_blocks=8, host_blocks=8)
        self.assertEqual((kv.block_bytes, kv.gpu_blocks, kv.host_blocks, kv.gpu_id), (4096, 8, 8, 0))
        g = kv.gpu_alloc(3)
        h = kv.host_alloc(3)
        for i, hid in enumerate(h):
            kv.host_block(hid)[:] = bytes([i + 1]) * 4096
        ev = kv.swap_in(h, g)
        self.assertEqual(len(ev), 64)
        kv.wait(ev, timeout=10)
        an.wait_event_handle_bytes(ev)
        kv.release(ev)
        for i, gid in enumerate(g):
            self.assertEqual(kv.gpu_block(gid).tobytes(), bytes([i + 1]) * 4096)
            self.assertEqual(kv.gpu_block(gid).device_ptr, kv.gpu_ptr(gid))
        kv.gpu_block(g[0]).copy_from(b"\xee" * 4096)
        h2 = kv.host_alloc(3)
        call, layers = kv.swap_out(g, h2, layers=[1, 3])
        self.assertEqual(len(layers), 2)
        for lh in layers:
            kv.wait(lh)
        kv.wait(call)
        kv.release(call)
        self.assertEqual(bytes(kv.host_block(h2[0])), b"\xee" * 4096)
        self.assertEqual(bytes(kv.host_block(h2[2])), b"\x03" * 4096)
        self.assertIsNone(kv.swap_out(g[:1], h2[:1], wait=True))
        # copies between raw addresses
        dst = kv.host_ptr(h2[1])
        kv.copy_d2h(dst, kv.gpu_ptr(g[1]), 4096, wait=True)
        self.assertEqual(bytes(kv.host_block(h2[1])), b"\x02" * 4096)
        ev = kv.copy_h2d(kv.gpu_ptr(g[1]), kv.host_ptr(h[0]), 4096)
        kv.wait_all()
        self.assertEqual(kv.gpu_block(g[1]).tobytes(), b"\x01" * 4096)
        st = kv.stats()
        self.assertEqual((st["gpu_used"], st["host_used"], st["events_live"], st["pending"]), (3, 6, 0, 0))
        kv.gpu_free(g)
        kv.host_free(h + h2)
        st = kv.stats()
        self.assertEqual((st["gpu_used"], st["host_used"]), (0, 0))
        gc.collect()
        kv.close()
        self.assertTrue(kv.closed)
        self.assertRaises(ValueError, kv.gpu_alloc, 1)

    def test_seed_api(self):
        kv = an.KVCache(0)
        payload = pattern(100000, 11)
        kv.store_kv_async("req-1", payload)
        kv.store_kv_async("req-2", b"short")
        ids = kv.ensure_kv_on_gpu("req-1")
        self.assertEqual(len(ids), 4)
        self.assertEqual(b"".join(kv.gpu_block(i).tobytes() for i in ids)[:len(payload)], payload)
        kv.swapout_all_async()
        kv.wait_all()
        self.assertEqual(kv.stats()["gpu_used"], 0)
        self.assertEqual(kv.load_kv("req-1"), payload)
        ids = kv.ensure_kv_on_gpu("req-1")
        kv.gpu_block(ids[0]).copy_from(b"changed")
        self.assertEqual(kv.load_kv("req-1")[:7], b"changed")
        self.assertEqual(kv.load_kv("req-2"), b"short")
        kv.store_kv_async("req-2", b"replaced")
        self.assertEqual(kv.load_kv("req-2"), b"replaced")
        kv.drop_kv("req-1")
        kv.drop_kv("req-2")
        self.assertRaises(KeyError, kv.ensure_kv_on_gpu, "req-1")
        self.assertRaises(KeyError, kv.load_kv, "nope")
        self.assertRaises(TypeError, kv.store_kv_async, ["unhashable"], b"x")
        self.assertRaises(ValueError, kv.store_kv_async, "r", b"")
        self.assertRaises(TypeError, kv.store_kv_async, "r", "text")
        st = kv.stats()
        self.assertEqual((st["gpu_used"], st["host_used"], st["requests"]), (0, 0, 0))

    def test_shared_slab_and_pool(self):
        slab = an.SlabAllocator(0, MiB)
        pool = an.PinnedPool(8192, 4)
        kv = an.KVCache(0, block_bytes=4096, gpu_blocks=16, host_blocks=8, slab=slab, pool=pool)
        self.assertEqual(slab.stats()["blocks"], 1)
        self.assertEqual(pool.stats()["in_use"], 4)
        h = kv.host_alloc(1)
        kv.host_block(h[0])[:3] = b"abc"
        off = kv.host_ptr(h[0]) - pool.address(0)
        self.assertEqual(bytes(pool.buffer(off // 8192)[off % 8192:off % 8192 + 3]), b"abc")
        kv.close()
        self.assertEqual(slab.stats()["blocks"], 0)
        self.assertEqual(pool.stats()["in_use"], 0)
        slab.close()
        pool.close()

    def test_id_sequences(self):
        """Ids as lists, tuples, ranges and objects that are ints (numpy's): the same swap;
        what is no id is refused by name and position, and nothing moves."""
        kv = an.KVCache(0, block_bytes=4096, gpu_blocks=8, host_blocks=8)
        g, h = kv.gpu_alloc(4), kv.host_alloc(4)

        class Index:            # an int by __index__, as numpy.int64 is
            def __init__(self, v):
                self.v = v

            def __index__(self):
                return self.v

        for i, hid in enumerate(h):
            kv.host_block(hid)[:] = bytes([i + 7]) * 4096
        kv.swap_in(tuple(h), [Index(x) for x in g], wait=True)
        for i, gid in enumerate(g):
            self.assertEqual(kv.gpu_block(gid).tobytes(), bytes([i + 7]) * 4096)
        kv.swap_out(range(g[0], g[0] + 1), h[3:], wait=True)
        self.assertEqual(bytes(kv.host_block(h[3])), bytes([7]) * 4096)
        if np is not None:
            # numpy arrays are read in place (the array interface), any integer type and stride
            kv.swap_out(np.array(g[1:3]), np.array(h[:2], dtype=np.uint32), wait=True)
            self.assertEqual(bytes(kv.host_block(h[0])), bytes([8]) * 4096)
            kv.swap_out(np.array([g[3], 0, g[2]], dtype=np.int16)[::2], np.array(h[:2], dtype=np.uint8),
                        wait=True)
            self.assertEqual(bytes(kv.host_block(h[1])), bytes([9]) * 4096)
            for bad, err, text in ((np.array([0, -1]), ValueError, "gpu_ids[1] is negative"),
                                   (np.array([0, 8], dtype=np.uint64), ValueError,
                                    "gpu_ids[1] = 8 is out of range (0..7)"),
                                   (np.array([0.0, 1.0]), TypeError, "array of integers"),
                                   (np.array([[0, 1]]), TypeError, "one-dimensional"),
                                   (np.array([0, 1], dtype=">i4"), TypeError, "byte order")):
                with self.assertRaises(err) as c:
                    kv.swap_out(bad, h[:2])
                self.assertIn(text, str(c.exception))
        # Anything with an array interface, numpy or not: here memory of ctypes.
        buf = (ctypes.c_uint32 * 2)(g[0], g[1])
        iface = {"shape": (2,), "typestr": "<u4", "data": (ctypes.addressof(buf), False), "strides": None,
                 "version": 3}
        view = type("Ids", (), {"__array_interface__": iface})()
        kv.swap_out(view, h[2:4], wait=True)
        self.assertEqual(bytes(kv.host_block(h[2])), bytes([7]) * 4096)
        for lie, text in (({"shape": (-1,)}, "gives -1 items"), ({"data": (0, False)}, "2 items at address 0"),
                          ({"typestr": "<f8"}, "array of integers"), ({"shape": 2}, "one-dimensional"),
                          ({"mask": [1, 0]}, "masked")):
            bad = type("Ids", (), {"__array_interface__": dict(iface, **lie)})()
            with self.assertRaises((TypeError, ValueError)) as c:
                kv.swap_out(bad, h[:2])
            self.assertIn(text, str(c.exception))
        before = kv.stats()["swaps_out"]
        for bad, err, text in (([True], TypeError, "gpu_ids must be an int, not bool"),
                               ([0.0], TypeError, "gpu_ids must be an int, not float"),
                               ([0, -1], ValueError, "gpu_ids must not be negative (got -1)"),
                               ([0, 8], ValueError, "gpu_ids[1] = 8 is out of range (0..7)"),
                               ([0, 1 << 64], ValueError, "does not fit in 64 bits"),
                               ([0, Index(9)], ValueError, "gpu_ids[1] = 9 is out of range (0..7)")):
            with self.assertRaises(err) as c:
                kv.swap_out(bad, h[:len(bad)])
            self.assertIn(text, str(c.exception))
        # An __index__ that empties the list it is in: the ids are read from a copy, as they were.
        ids = [0, g[1], g[2]]

        class Shrink:
            def __index__(self):
                ids.clear()
                return g[0]

        ids[0] = Shrink()
        kv.swap_out(ids, h[:3], wait=True)
        self.assertEqual(ids, [])
        self.assertEqual(kv.stats()["swaps_out"], before + 1)
        kv.close()

    def test_errors(self):
        self.assertRaises(ValueError, an.KVCache, 0, block_bytes=100)
        self.assertRaises(ValueError, an.KVCache, 0, block_bytes=1 << 30)
        self.assertRaises(ValueError, an.KVCache, 0, gpu_blocks=0)
        self.assertRaises(ValueError, an.KVCache, 0, host_blocks=0)
        self.assertRaises(TypeError, an.KVCache, "0")
        self.assertRaises(TypeError, an.KVCache, 0, slab=5)
        self.assertRaises(TypeError, an.KVCache, 0, pool="p")
        with self.assertRaises(an.AegaeonError) as c:
            an.KVCache(3)
        self.assertAegaeon(c, "AEG_ENODEV")
        with an.PinnedPool(4096, 1) as p:
            with self.assertRaises(an.AegaeonValueError):
                an.KVCache(0, block_bytes=8192, pool=p)     # buffer not a multiple of the block
        kv = an.KVCache(0, block_bytes=4096, gpu_blocks=4, host_blocks=4)
        with self.assertRaises(an.AegaeonError) as c:
            kv.gpu_alloc(5)
        self.assertAegaeon(c, "AEG_ENOSPC")
        self.assertRaises(ValueError, kv.gpu_alloc, 0)
        self.assertRaises(TypeError, kv.gpu_alloc, "1")
        self.assertRaises(ValueError, kv.swap_out, [0, 1], [0])
        self.assertRaises(ValueError, kv.swap_out, [], [])
        self.assertRaises(ValueError, kv.swap_out, [9], [0])
        self.assertRaises(TypeError, kv.swap_out, 0, 0)
        self.assertRaises(TypeError, kv.swap_in, ["a"], [0])
        with self.assertRaises(an.AegaeonValueError):
            kv.swap_out([0, 0], [0, 1])                       # a GPU block twice
        with self.assertRaises(an.AegaeonValueError):
            kv.swap_out([0, 1], [0, 1], layers=[2, 1])
        with self.assertRaises(an.AegaeonValueError):
            kv.gpu_free([2])                                   # not allocated
        with self.assertRaises(an.AegaeonError) as c:
            kv.release(b"\x01" * 64)
        self.assertAegaeon(c, "AEG_ENOENT")
        self.assertRaises(ValueError, kv.release, b"short")
        self.assertRaises(ValueError, kv.gpu_ptr, 4)
        self.assertRaises(ValueError, kv.host_block, 10)
        with self.assertRaises(an.AegaeonValueError):
            kv.copy_h2d(kv.gpu_ptr(0), kv.gpu_ptr(0), 16)      # overlapping ranges
        self.assertRaises(ValueError, kv.copy_h2d, 0, 0, 0)
        b = kv.gpu_block(0)
        with self.assertRaises(an.AegaeonError) as c:
            kv.close()
        self.assertAegaeon(c, "AEG_EBUSY")
        del b
        kv.close()

    def per_layer_cache(self, layers, parts, piece, blocks, **kw):
        """GPU blocks in per-layer tensors as vLLM lays them out ([parts][blocks] per layer)."""
        slab = an.SlabAllocator(0, layers * parts * blocks * piece + MiB)
        region = slab.alloc(layers * parts * blocks * piece)
        bases = [region.device_ptr + s * blocks * piece for s in range(layers * parts)]
        kv = an.KVCache(0, block_bytes=layers * parts * piece, gpu_blocks=blocks, host_blocks=blocks,
                        layers=layers, parts=parts, gpu_tensors=bases, **kw)
        return slab, region, kv

    def test_per_layer_layout(self):
        L, P, piece, n = 4, 2, 1024, 12
        slab, region, kv = self.per_layer_cache(L, P, piece, n)
        st = kv.stats()
        self.assertEqual((st["layers"], st["parts"], st["block_bytes"]), (L, P, L * P * piece))
        data = pattern(L * P * n * piece, 21)
        region.copy_from(data)

        def gpu_piece(i, l, p):   # GPU block i's piece of layer l, part p, as the tensors hold it
            off = ((l * P + p) * n + i) * piece
            return data[off:off + piece]
        g = list(range(n))
        h = kv.host_alloc(n)
        random.Random(5).shuffle(h)
        self.assertEqual(kv.gpu_piece(3, 2, 1), region.device_ptr + ((2 * P + 1) * n + 3) * piece)
        call, layer_handles = kv.swap_out(g, h, layers=True)
        self.assertEqual(len(layer_handles), L)
        for lh in layer_handles:
            kv.wait(lh, timeout=10)
        kv.wait(call)
        kv.release(call)
        for i, hid in enumerate(h):
            block = bytes(kv.host_block(hid))
            for l in range(L):
                for p in range(P):
                    s0 = (l * P + p) * piece
                    self.assertEqual(block[s0:s0 + piece], gpu_piece(i, l, p), (i, l, p))
        # back in, to other blocks, every piece in place
        region.copy_from(bytes(len(data)))
        g_in = g[::-1]
        kv.swap_in(h, g_in, wait=True)
        got = region.tobytes()
        for i, gid in enumerate(g_in):
            for l in range(L):
                for p in range(P):
                    off = ((l * P + p) * n + gid) * piece
                    self.assertEqual(got[off:off + piece], gpu_piece(i, l, p))
        self.assertEqual(kv.stats()["events_kept"], L + 1)   # the call and its layers, reused by swap_in
        self.assertRaises(ValueError, kv.gpu_block, 0)
        self.assertRaises(ValueError, kv.gpu_piece, 0, L, 0)
        self.assertRaises(ValueError, kv.host_piece, 0, 0, P)
        with self.assertRaises(an.AegaeonValueError):
            kv.swap_out(g, h, layers=[n])                 # groups of entries: a one-layer cache only
        kv.close()
        del region
        slab.close()

    def test_both_directions_at_once(self):
        """A swap-out and a swap-in from two threads overlap and corrupt nothing."""
        L, P, piece, n = 2, 2, 4096, 16
        slab, region, kv = self.per_layer_cache(L, P, piece, 2 * n)
        data = pattern(L * P * 2 * n * piece, 33)
        region.copy_from(data)
        h = kv.host_alloc(2 * n)
        for i in range(n, 2 * n):                         # host blocks the swap-ins read
            kv.host_block(h[i])[:] = pattern(L * P * piece, i)
        failures = []

        def worker(out):
            for r in range(25):
                if out:
                    kv.swap_out(list(range(n)), h[:n], wait=True)
                    for i in range(n):
                        want = b"".join(data[((s * 2 * n) + i) * piece:((s * 2 * n) + i + 1) * piece]
                                        for s in range(L * P))
                        if bytes(kv.host_block(h[i])) != want:
                            failures.append(("out", r, i))
                else:
                    kv.swap_in(h[n:], list(range(n, 2 * n)), wait=True)
        threads = [threading.Thread(target=worker, args=(o,)) for o in (1, 0)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self.assertEqual(failures, [])
        got = region.tobytes()
        for i in range(n, 2 * n):
            want = pattern(L * P * piece, i)
            for s in range(L * P):
                off = (s * 2 * n + i) * piece
                self.assertEqual(got[off:off + piece], want[s * piece:(s + 1) * piece])
        st = kv.stats()
        self.assertEqual((st["swaps_out"], st["swaps_in"], st["events_live"]), (25, 25, 0))
        kv.close()
        del region
        slab.close()

    def test_layout_errors(self):
        slab = an.SlabAllocator(0, MiB)
        pool = an.PinnedPool(65536, 4)
        base = slab.allocate(64 * 1024)
        ptrs = [base + i * 8192 for i in range(8)]
        with self.assertRaises(ValueError):               # two GPU sides
            an.KVCache(0, block_bytes=8192, layers=4, parts=2, gpu_tensors=ptrs, slab=slab)
        with self.assertRaises(ValueError) as c:          # pointers for 4 x 2 tensors
            an.KVCache(0, block_bytes=8192, layers=4, parts=2, gpu_tensors=ptrs[:7], gpu_blocks=8)
        self.assertIn("7 pointers", str(c.exception))
        with self.assertRaises(an.AegaeonValueError):     # pieces of 384 bytes
            an.KVCache(0, block_bytes=3072, layers=4, parts=2, gpu_tensors=ptrs, gpu_blocks=8)
        with self.assertRaises(an.AegaeonValueError):     # tensors that overlap
            an.KVCache(0, block_bytes=8192, layers=4, parts=2, gpu_tensors=[base] * 8, gpu_blocks=8)
        with self.assertRaises(ValueError):               # two host sides
            an.KVCache(0, block_bytes=8192, gpu_blocks=4, pool=pool, host_tensors=[pool.address(0)])
        self.assertRaises(TypeError, an.KVCache, 0, gpu_tensors=5)
        kv = an.KVCache(0, block_bytes=4096, gpu_blocks=4, host_blocks=4, host_tensors=[pool.address(0)])
        self.assertRaises(ValueError, kv.host_block, 0)
        self.assertRaises(ValueError, kv.store_kv_async, "r", b"x")
        with self.assertRaises(an.AegaeonValueError):     # per-layer events need a cache of several layers
            kv.swap_out([0], [0], layers=True)
        kv.swap_out([0, 1], [1, 0], wait=True)
        self.assertEqual(kv.host_piece(1), pool.address(0) + 4096)
        kv.close()
        pool.close()
        slab.close()


# ------------------------------------------------------------------------ job

JOB_CODE = r"""
import aegaeon_native as an, json, os, sys
path, st_path = sys.argv[1], sys.argv[2]
chunks = an.prefetch_file_to_gpu_chunks(path, gpu_id=0, chunk_bytes=1 << 20)
for c in chunks:
    an.wait_event_handle_bytes(c["event_handle"], timeout=30)
ok_bytes = b"".join(an.chunk_view(c).tobytes() for c in chunks) == open(path, "rb").read()
st = an.stats()
an.release_prefetch_chunks([chunks[0]["slab_id"]])
after_one = an.stats()["job"]["blocks"]
t = an.load_safetensors(st_path)
tensors = {k: v.tobytes().hex() for k, v in t.items()}
held = an.stats()["job"]["blocks"]
del t
after_del = an.stats()["job"]["blocks"]
s = an.SlabAllocator(0, 1 << 20)
b = s.alloc(4096)
b.copy_from(b"lease")
try:
    s.export_handle()
    exported = True
except an.AegaeonError as e:
    exported = e.name
p = an.PinnedPool.from_job()
an.release_all_prefetch_events()
print(json.dumps({"device": an.device(), "job": st["job"], "ok_bytes": ok_bytes, "chunks": len(chunks),
                  "after_one": after_one, "held": held, "after_del": after_del, "tensors": tensors,
                  "left": an.stats()["job"]["blocks"], "lease": b.tobytes()[:5].decode(),
                  "exported": exported, "pool": p.buffer_size}))
"""


class TestJob(AgentCase, Base):
    """The module inside an aegaeon job: an aegaeond agent as the SPANK plugin starts it."""

    def test_job_attach(self):
        path = os.path.join(TMP, "job.bin")
        data = pattern(3 * MiB + 77, 12)
        write_file(path, data)
        tensors = make_tensors(5)
        st_path = os.path.join(TMP, "job.safetensors")
        write_file(st_path, safetensors_bytes(tensors))
        r = subprocess.run([sys.executable, "-c", JOB_CODE, path, st_path], env=self.env,
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        out = json.loads(r.stdout)
        self.assertEqual(out["device"], "host")
        self.assertEqual(out["job"]["job_id"], "7")
        self.assertEqual(out["job"]["agent_pid"], self.agent.pid)
        self.assertTrue(out["ok_bytes"])
        self.assertEqual(out["chunks"], 4)
        self.assertEqual(out["after_one"], 3)
        self.assertEqual(out["held"], 4)           # + the tensors' block
        self.assertEqual(out["after_del"], 3)      # which went with the dict
        self.assertEqual(out["left"], 0)
        self.assertEqual(out["tensors"], {k: v[2].hex() for k, v in tensors.items()})
        self.assertEqual(out["lease"], "lease")
        self.assertEqual(out["exported"], "AEG_ENOTSUP")
        self.assertEqual(out["pool"], MiB)

    def test_attach_errors(self):
        r = child("import aegaeon_native as an\ntry:\n    an.device()\nexcept an.AegaeonError as e:\n"
                  "    print(e.name, 'AEGAEON_SOCKET' in str(e))",
                  env=dict(self.env, AEGAEON_SOCKET=os.path.join(self.dir, "nope.sock")))
        self.assertEqual(r.stdout.split()[1:], ["True"], r.stderr)
        r = child("import aegaeon_native as an\nan.configure(attach=False)\nprint(an.stats()['job'], an.device())",
                  env=self.env)
        self.assertEqual(r.stdout.strip(), "None host", r.stderr)
        r = child("import aegaeon_native as an\nan.device()\ntry:\n    an.configure(attach=False)\n"
                  "except an.AegaeonError as e:\n    print(e.name)", env=self.env)
        self.assertEqual(r.stdout.strip(), "AEG_EBUSY", r.stderr)
        self.assertRaises(TypeError, an.configure, attach="yes")


    def test_one_wait_per_load(self):
        """load_safetensors in a step: one wait request for the whole file, not one per chunk."""
        tensors = make_tensors(8)
        st_path = os.path.join(TMP, "job-wait.safetensors")
        write_file(st_path, safetensors_bytes(tensors))
        code = ("import aegaeon_native as an, json, sys\n"
                "an.prepare(0)\n"
                "d = an.load_safetensors(sys.argv[1], chunk_bytes=4096)\n"
                "print(json.dumps({'names': [n for n, s in an.timings()],\n"
                "                  'tensors': {k: v.tobytes().hex() for k, v in d.items()}}))\n")
        r = subprocess.run([sys.executable, "-c", code, st_path], env=self.env,
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        out = json.loads(r.stdout)
        self.assertEqual(out["tensors"], {k: v[2].hex() for k, v in tensors.items()})
        self.assertEqual(out["names"].count("job attach"), 1, out["names"])
        self.assertEqual(out["names"].count("job prefetch"), 1, out["names"])
        self.assertLessEqual(out["names"].count("job wait"), 1, out["names"])


REUSE_CODE = r"""
import aegaeon_native as an, json, sys
d = an.load_safetensors(sys.argv[1])
chunks = an.prefetch_file_to_gpu_chunks(sys.argv[1], 0, 1 << 20)
print(json.dumps({"tensors": {k: v.tobytes().hex() for k, v in d.items()},
                  "ids": sorted(set(c["slab_id"] for c in chunks)),
                  "held": an.stats()["job"]["blocks"]}))
"""


class TestJobPrefetch(TestJob):
    """Steps find the file the job's --aegaeon-prefetch loaded, and leave it to the job."""

    def setUp(self):
        self.tensors = make_tensors(6)
        self.st_path = os.path.join(TMP, "job-prefetch.safetensors")
        write_file(self.st_path, safetensors_bytes(self.tensors))
        self.agent_args = ["--prefetch", self.st_path]
        super().setUp()

    def test_steps_reuse_the_job_load(self):
        want = {k: v[2].hex() for k, v in self.tensors.items()}
        outs = []
        for _ in range(2):      # the first step's exit must not release the job's load
            r = subprocess.run([sys.executable, "-c", REUSE_CODE, self.st_path], env=self.env,
                               capture_output=True, text=True, timeout=120)
            self.assertEqual(r.returncode, 0, r.stderr)
            outs.append(json.loads(r.stdout))
        for out in outs:
            self.assertEqual(out["tensors"], want)
            self.assertEqual(out["held"], 0)
        self.assertEqual(outs[0]["ids"], outs[1]["ids"])
        self.assertTrue(outs[0]["ids"])


# -------------------------------------------------------------------- set-up

SETUP_CODE = r"""
import aegaeon_native as an, json, sys
an.timings()
an.prepare(0)
first = [n for n, s in an.timings()]
an.prepare(0)
for _ in range(2):
    chunks = an.prefetch_file_to_gpu_chunks(sys.argv[1], 0, 1 << 20)
    for c in chunks:
        an.wait_event_handle_bytes(c["event_handle"])
    an.release_all_prefetch_events()
later = an.timings()
print(json.dumps({"first": first, "later": [n for n, s in later],
                  "seconds_ok": all(isinstance(s, float) and s >= 0 for n, s in later)}))
"""


class TestSetup(Base):
    """Set-up is paid once, ahead of need, and kept; timings() says where the time went."""

    def test_prepare_then_loads_pay_no_setup(self):
        path = os.path.join(TMP, "setup.bin")
        write_file(path, pattern(2 * MiB + 5, 21))
        r = subprocess.run([sys.executable, "-c", SETUP_CODE, path], capture_output=True, text=True,
                           timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        out = json.loads(r.stdout)
        self.assertEqual(out["first"].count("slab create"), 1, out["first"])
        self.assertEqual(out["first"].count("engine create"), 1, out["first"])
        # Two rounds of load and release_all: no slab or engine made again.
        self.assertNotIn("slab create", out["later"])
        self.assertNotIn("engine create", out["later"])
        self.assertEqual(out["later"].count("prefetch start"), 2, out["later"])
        self.assertTrue(out["seconds_ok"])

    def test_timings_with_starts(self):
        """Each load is a "load" span from its start to its last byte; starts on time.monotonic()'s clock."""
        import time
        path = os.path.join(TMP, "timings.safetensors")
        write_file(path, safetensors_bytes(make_tensors(5)))
        an.timings()
        t0 = time.monotonic()
        with an.open_model(path, 0, 4096):      # waited for: the load has ended, its span kept
            pass
        t1 = time.monotonic()
        an._span("a step", t0)
        # Only the steps begun here (a float's nanoseconds and back: within a microsecond): an
        # engine's ring thread may add its own at any time, an earlier test's load its end.
        ours = ("load", "prefetch start", "a step")
        def take():
            return [x for x in an.timings(starts=True) if x[0] in ours and x[1] >= t0 - 1e-6]
        got = take()
        self.assertEqual(take(), [])        # taken
        for name, start, sec in got:
            self.assertTrue(start + sec <= time.monotonic(), (name, t0, start, sec))
        self.assertEqual(sorted(n for n, _, _ in got), sorted(ours), got)
        step = next(x for x in got if x[0] == "a step")
        self.assertTrue(abs(step[1] - t0) <= 1e-6 and step[2] >= t1 - t0 - 1e-6, step)
        self.assertRaises(TypeError, an.timings, True)       # starts is keyword-only
        self.assertRaises(TypeError, an._span, "x")
        self.assertRaises(ValueError, an._span, "x", -1.0)
        self.assertRaises(ValueError, an._span, "x", float("nan"))
        self.assertNotIn("x", [n for n, _ in an.timings()])

    def test_ring_made_ahead_at_import(self):
        """Outside a job the first engine's staging ring is faulted in while the process imports;
        the engine takes it (a "pool ahead" step), unless turned off or made for another size (the
        tests' config gives 2 prefetch threads, 3 are asked for)."""
        code = ("import aegaeon_native as an, json, sys\n"
                "if len(sys.argv) > 1:\n    an.configure(prefetch_threads=int(sys.argv[1]))\n"
                "an.timings()\n"
                "an.prepare(0)\n"
                "print(json.dumps([n for n, s in an.timings()]))")
        env = {"AEGAEON_PINNED_HUGEPAGES": "never"}
        for args, ahead, warning in (([], "1", None), ([], "0", None), (["3"], "1", None),
                                     ([], "maybe", "AEGAEON_RING_AHEAD='maybe' is not 0 or 1")):
            with self.subTest(args=args, ahead=ahead):
                r = subprocess.run([sys.executable, "-c", code] + args, capture_output=True, text=True,
                                   timeout=120, env=dict(os.environ, AEGAEON_RING_AHEAD=ahead, **env))
                self.assertEqual(r.returncode, 0, r.stderr)
                steps = json.loads(r.stdout)
                self.assertIn("pool create", steps)
                self.assertEqual("pool ahead" in steps, ahead == "1" and not args, steps)
                if warning:
                    self.assertIn("RuntimeWarning: aegaeon_native: " + warning, r.stderr)
                else:
                    self.assertNotIn("Warning", r.stderr)

    def test_prepare_errors(self):
        self.assertRaises(TypeError, an.prepare, "0")
        self.assertRaises(ValueError, an.prepare, -1)
        with self.assertRaises(an.AegaeonError) as c:
            an.prepare(an.device_count())
        self.assertAegaeon(c, "AEG_ENODEV", errno.ENODEV)
        self.assertIsInstance(an.timings(), list)


# ----------------------------------------------------------------- lifetime

class TestLifetime(Base):
    def test_collected_objects_leave_nothing(self):
        an.release_all_prefetch_events()
        gc.collect()
        an.SlabAllocator(0, MiB).close()          # the device and its fds are open now
        base_fds = fd_count()
        base = an.stats()
        self.assertEqual((base["objects"], base["events"]), (0, 0))
        for _ in range(3):
            s = an.SlabAllocator(0, MiB)
            blocks = [s.alloc(1000) for _ in range(5)]
            p = an.PinnedPool(4096, 8)
            taken = [p.acquire() for _ in range(2)]
            kv = an.KVCache(0, block_bytes=4096, gpu_blocks=4, host_blocks=4, slab=s, pool=p)
            kv.store_kv_async("r", b"x" * 5000)
            path = os.path.join(TMP, "life.safetensors")
            write_file(path, safetensors_bytes(make_tensors(3)))
            d = an.load_safetensors(path)
            cycle = [s, p, kv, d, blocks, taken]
            cycle.append(cycle)                   # collected by the GC, not refcounts
            self.assertEqual(an.stats()["objects"], 4)     # slab, pool, cache, tensors
            del s, p, kv, d, blocks, taken, cycle
            gc.collect()
            st = an.stats()
            self.assertEqual(st["objects"], 0)
            self.assertEqual(st["prefetch"][0]["blocks"], 0)
            self.assertEqual(st["prefetch"][0]["views"], 0)
        an.release_all_prefetch_events()
        self.assertEqual(fd_count(), base_fds)

    def test_exit_with_everything_alive(self):
        path = os.path.join(TMP, "exit.safetensors")
        write_file(path, safetensors_bytes(make_tensors(4)))
        big = os.path.join(TMP, "exit.bin")
        write_file(big, pattern(32 * MiB, 6))
        code = """
import aegaeon_native as an, os, sys, threading
s = an.SlabAllocator(0, 1 << 20); b = s.alloc(4096)
p = an.PinnedPool(4096, 2); t = p.acquire()
kv = an.KVCache(0, block_bytes=4096, gpu_blocks=4, host_blocks=4)
kv.store_kv_async("r", b"y" * 9000)
d = an.load_safetensors(sys.argv[1])
chunks = an.prefetch_file_to_gpu_chunks(sys.argv[2], 0, 1 << 20)   # still loading at exit
h = an.create_event_handle_bytes()
loop = [s, p, kv, d]; loop.append(loop)
def waiter():
    an.wait_event_handle_bytes(h)
threading.Thread(target=waiter, daemon=True).start()
print(len(os.listdir('/proc/self/task')), flush=True)
"""
        mark = "aegaeon-test-%d-%f" % (os.getpid(), time.time())
        r = subprocess.run(
            [sys.executable, "-c", code, path, big], capture_output=True, text=True, timeout=60,
            env=dict(os.environ, AEGAEON_LOG="warn", AEGAEON_TEST_MARK=mark))
        self.assertEqual(r.returncode, 0, r.stderr)
        # the library warns when the device closes with anything still held
        self.assertEqual(r.stderr, "")
        self.assertGreater(int(r.stdout), 1)
        # and no process it started stayed behind
        left = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open("/proc/%s/environ" % pid, "rb") as f:
                    if mark.encode() in f.read():
                        left.append(pid)
            except OSError:
                pass
        self.assertEqual(left, [])

    def test_exit_with_threads_in_the_module(self):
        # Daemon threads calling in a loop hold the runtime lock while they wait
        # for the GIL; finalization stops them there for good, and the exit must
        # neither hang on that lock nor leave an event or load unlisted.
        big = os.path.join(TMP, "spin.bin")
        write_file(big, pattern(4 * MiB, 8))
        code = """
import aegaeon_native as an, sys, threading
s = an.SlabAllocator(0, 1 << 20)
def stats():
    an.stats()
def events():
    an.release_event_handle_bytes(an.create_event_handle_bytes())
def blocks():
    s.free(s.alloc(4096))
def loads():
    an.release_prefetch_chunks([c["slab_id"] for c in an.prefetch_file_to_gpu_chunks(sys.argv[1], 0, 1 << 20)])
def spin(fn, went):
    while True:
        fn()
        went.set()
went = []
for fn in (stats, events, blocks, loads):
    went.append(threading.Event())
    threading.Thread(target=spin, args=(fn, went[-1]), daemon=True).start()
for e in went:
    e.wait()
"""
        for _ in range(3):
            r = subprocess.run([sys.executable, "-c", code, big], capture_output=True, text=True,
                               timeout=60, env=dict(os.environ, AEGAEON_LOG="warn"))
            self.assertEqual((r.returncode, r.stderr), (0, ""))

    def test_module_free_on_interpreter_exit(self):
        # release_all at exit also covers events and chunks of a module never collected
        r = child("import aegaeon_native as an, sys\n"
                  "h = [an.create_event_handle_bytes() for _ in range(5)]\n"
                  "sys.modules['keep'] = an\n")
        self.assertEqual((r.returncode, r.stderr), (0, ""))


if __name__ == "__main__":
    testmain.run(TMP)
