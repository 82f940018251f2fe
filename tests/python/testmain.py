"""What the Python test files share: the sanitizer runtimes loaded first, a
unittest run that prints "N passed, N failed" last and removes the test's temp
dir, hand-made safetensors files, and an aegaeond agent as a job has one."""
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import unittest

MiB = 1 << 20


def preload_sanitizers():
    """Under --enable-sanitizers the module carries ASan, which must come first:
    runs this program again with AEGAEON_PY_PRELOAD preloaded. The interpreter's
    own allocations at exit are not leak-checked."""
    preload = os.environ.get("AEGAEON_PY_PRELOAD")
    if preload and "libasan" not in os.environ.get("LD_PRELOAD", ""):
        env = dict(os.environ, LD_PRELOAD=preload, ASAN_OPTIONS="detect_leaks=0")
        os.execve(sys.executable, [sys.executable] + sys.argv, env)


def host_env(prefix):
    """A temp dir for the test file, and the module's environment: the host
    backend, a 256 MiB prefetch slab and two prefetch threads (a small
    staging pool on shared CI machines), outside any job. Returns the dir."""
    tmp = tempfile.mkdtemp(prefix=prefix)
    conf = os.path.join(tmp, "aegaeon.conf")
    with open(conf, "w") as f:
        f.write("prefetch_threads = 2;\n")
    os.environ["AEGAEON_CONFIG"] = conf
    os.environ.setdefault("AEGAEON_DEVICE", "host")
    os.environ["AEGAEON_PREFETCH_SLAB"] = "256MiB"
    os.environ.pop("AEGAEON_SOCKET", None)
    return tmp


def run(tmp):
    """Runs the test cases of __main__, removes tmp; exits 0 when none failed."""
    try:
        suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules["__main__"])
        res = unittest.TextTestRunner(verbosity=2, stream=sys.stdout).run(suite)
        failed = len(res.failures) + len(res.errors) + len(res.unexpectedSuccesses)
        print("%d passed, %d failed" % (res.testsRun - failed - len(res.skipped), failed))
        sys.stdout.flush()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    sys.exit(0 if failed == 0 else 1)


def write_file(path, data):
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "wb") as f:
        f.write(data)
    os.rename(tmp, path)


def pattern(n, seed):
    return random.Random(seed).randbytes(n)


ST_DTYPES = {  # dtype: (struct code, item bytes)
    "F64": ("d", 8), "F32": ("f", 4), "F16": ("e", 2), "I64": ("q", 8), "I32": ("i", 4),
    "I16": ("h", 2), "I8": ("b", 1), "U8": ("B", 1), "BOOL": ("?", 1), "BF16": ("H", 2),
    "U16": ("H", 2), "U32": ("I", 4), "U64": ("Q", 8),
}


def safetensors_bytes(tensors, metadata=None):
    """A safetensors file by hand: {name: (dtype, shape, raw bytes)}."""
    header, offset, blobs = {}, 0, []
    if metadata is not None:
        header["__metadata__"] = metadata
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
        offset += len(raw)
        blobs.append(raw)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + b"".join(blobs)


def make_tensors(seed=1):
    """A tensor of every dtype in several shapes, and one larger than a MiB chunk."""
    rnd = random.Random(seed)
    out = {}
    shapes = [(3, 5), (7,), (2, 3, 4), (1,), (64, 33), (0,), (5, 1, 2)]
    for i, (dtype, (code, size)) in enumerate(ST_DTYPES.items()):
        shape = shapes[i % len(shapes)]
        n = 1
        for d in shape:
            n *= d
        if dtype == "BOOL":
            vals = [rnd.random() < 0.5 for _ in range(n)]
        elif dtype in ("F64", "F32", "F16"):
            vals = [rnd.uniform(-100, 100) for _ in range(n)]
        elif dtype.startswith("U") or dtype == "BF16":
            vals = [rnd.randrange(0, 1 << min(8 * size, 62)) for _ in range(n)]
        else:
            vals = [rnd.randrange(-(1 << (8 * size - 2)), 1 << (8 * size - 2)) for _ in range(n)]
        out["layer%d.%s" % (i, dtype.lower())] = (dtype, shape, struct.pack("<%d%s" % (n, code), *vals))
    # a tensor larger than a chunk, cut into several chunks of one block
    big = pattern(3 * MiB + 4096, seed)
    out["big.weight"] = ("F32", (len(big) // 4,), big)
    return out


class AgentCase(unittest.TestCase):
    """An aegaeond agent as the SPANK plugin starts it for a job (host device,
    GPU 0, a 64 MiB slab, agent_args more); self.env is a step's environment."""

    agent_args = []

    def setUp(self):
        agent = os.environ.get("AEGAEOND")
        if not agent or not os.access(agent, os.X_OK):
            self.skipTest("AEGAEOND (the built aegaeond) not given")
        self.dir = tempfile.mkdtemp(prefix="aeg-job-", dir="/tmp")
        self.env = dict(os.environ, AEGAEON_HOST_GPUS="1")
        self.env.pop("AEGAEON_SLABS", None)
        self.agent = subprocess.Popen(
            [agent, "--job", "7", "--runtime-dir", self.dir, "--device", "host", "--foreground",
             "--gpus", "0", "--slab", "64MiB", "--pinned", "8MiB:1MiB"] + self.agent_args,
            env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        for _ in range(2000):
            if os.path.exists(os.path.join(self.dir, "ready")) or self.agent.poll() is not None:
                break
            time.sleep(0.01)
        self.assertTrue(os.path.exists(os.path.join(self.dir, "ready")), "the agent did not start")
        self.env["AEGAEON_SOCKET"] = os.path.join(self.dir, "agent.sock")

    def tearDown(self):
        if hasattr(self, "agent"):
            self.agent.terminate()
            self.agent.communicate(timeout=30)
            shutil.rmtree(self.dir, ignore_errors=True)

    def step(self, code, *args):
        """Runs python code as a step of the job; its stdout parsed as JSON."""
        r = subprocess.run([sys.executable, "-c", code] + list(args), env=self.env,
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(r.returncode, 0, r.stderr)
        return json.loads(r.stdout)
