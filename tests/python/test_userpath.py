#!/usr/bin/env python3
"""bench/userpath.py on the host backend with small files (make check).

The GPU machine runs the same command at full size (bash bundle/gpu-run.sh
userpath); here every row runs on the host backend, the baselines this machine
lacks are skipped with their reason, and the Slurm rows run on a throwaway
cluster when this is root with Slurm installed. Also: a tensor that differs
from the file fails the run, a row that does not fit --budget is skipped, and
(where torch imports) the GPU runs' digest tells apart what it must.
Run against a build tree: PYTHONPATH=<build>/python/.libs AEGAEOND=<build>/aegaeond.
Prints "N passed, N failed" last.
"""
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import unittest

import testmain

testmain.preload_sanitizers()

TOP = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
USERPATH = os.path.join(TOP, "bench", "userpath.py")
sys.path.insert(0, os.path.join(TOP, "bench"))
import userpath_child  # noqa: E402
BUILD = os.path.dirname(os.path.abspath(os.environ.get("AEGAEOND", "aegaeond")))
TMP = tempfile.mkdtemp(prefix="aegaeon-userpath-test-")
os.chmod(TMP, 0o755)            # the Slurm jobs' user reads the model
CONF = os.path.join(TMP, "aegaeon.conf")
with open(CONF, "w") as f:
    f.write("prefetch_threads = 2;\n")     # a small staging pool on shared CI machines
ENV = dict(os.environ, AEGAEON_CONFIG=CONF, AEGAEON_DEVICE="host", AEGAEON_PREFETCH_SLAB="256MiB")
ENV.pop("AEGAEON_SOCKET", None)
MODELS = os.path.join(TMP, "models")


def userpath(*args, timeout=150, env=None):
    cmd = [sys.executable, USERPATH, "--device", "host", "--quick", "--cli", os.path.join(BUILD, "aegaeon-cli"),
           "--builddir", BUILD, "--dir", MODELS] + list(args)
    return subprocess.run(cmd, capture_output=True, text=True, env=env or ENV, timeout=timeout)


def rows_of(path):
    with open(path) as f:
        return {r["id"]: r for r in json.load(f)["rows"]}


class FullQuickRun(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.out = os.path.join(TMP, "userpath.json")
        cls.r = userpath("--out", cls.out, "--slurm-repeat", "1")
        cls.rows = rows_of(cls.out) if os.path.exists(cls.out) else {}
        table = cls.r.stdout[cls.r.stdout.find("| # |"):]
        print("\n# the table of the quick run:\n" + "".join("# " + line + "\n" for line in table.splitlines()))

    def test_exits_0_and_prints_the_table(self):
        self.assertEqual(self.r.returncode, 0, self.r.stdout[-3000:] + self.r.stderr[-2000:])
        self.assertIn("| # | what the user waits for | aegaeon | same-run baselines |", self.r.stdout)
        self.assertRegex(self.r.stdout, r"\[ *[0-9.]+ s\] fresh: round 1 of 3")

    def test_every_row_is_there(self):
        want = {"pinned", "engine", "seed", "fresh", "hf", "slurm-ready", "slurm-ready-hp", "slurm-overhead"}
        self.assertLessEqual(want, set(self.rows), sorted(self.rows))
        for rid, r in self.rows.items():
            self.assertIn(r["status"], ("ok", "skipped"), "%s: %s" % (rid, r["checked"]))
            if r["status"] == "skipped":
                self.assertTrue(r["checked"], "%s skipped without a reason" % rid)

    def test_fresh_processes_load_every_tensor_bit_for_bit(self):
        r = self.rows["fresh"]
        ours = r["data"]["aegaeon"]
        self.assertEqual((len(ours["seconds"]), ours["bad"], ours["error"]), (3, [], None))
        self.assertRegex(r["checked"], r"every tensor \(\d+\) against the file")
        if any(ours["spans"]):          # aegaeon_native.timings(): where the time went, and when
            self.assertRegex(r["breakdown"], r"^[a-z ]+ [0-9.]+ ms")
            self.assertRegex(r["timeline"], r"^run of [0-9.]+ s: .*\bload \+[0-9.]+\.\.\+[0-9.]+")
            self.assertIn("- fresh, run of", self.r.stdout)
        for name in ("safetensors", "fastsafetensors", "instanttensor"):
            b = r["data"][name]
            self.assertTrue(b["seconds"] or b["skip"], "%s neither ran nor said why: %s" % (name, b))

    def test_seed_rounds_checked(self):
        r = self.rows["seed"]
        self.assertEqual(r["status"], "ok", r["checked"])
        self.assertEqual(len(r["data"]["rounds"]), 3)
        self.assertEqual(len(r["data"]["processes"]), 3)
        self.assertTrue(r["checked"].endswith("identical"), r["checked"])

    def test_engine_and_pinned_measured(self):
        self.assertGreater(self.rows["engine"]["data"]["gbps"], 0)
        self.assertGreater(self.rows["pinned"]["data"]["4 KiB"]["ms_per_gib"], 0)
        self.assertIn("mmap+MAP_POPULATE", self.rows["pinned"]["baselines"])

    def test_slurm_rows_ran_or_say_why(self):
        r = self.rows["slurm-ready"]
        if r["status"] == "skipped":
            self.assertRegex(r["checked"], "root|Slurm|sanitizer")
            return
        self.assertRegex(r["checked"], r"^\d+ checks passed, 0 failed")
        self.assertIn("up_submit_to_ready_s", r["data"])
        self.assertIn("plain_submit_to_ready_s", r["data"])
        self.assertEqual(self.rows["slurm-new-step"]["status"], "ok")
        self.assertEqual(self.rows["slurm-agent"]["status"], "ok")


class Checks(unittest.TestCase):
    def test_a_tensor_that_differs_from_the_file_fails_the_run(self):
        out = os.path.join(TMP, "fresh.json")
        r = userpath("--rows", "fresh", "--repeat", "1", "--out", out)
        self.assertEqual(r.returncode, 0, r.stdout[-2000:])
        side = [os.path.join(MODELS, n) for n in os.listdir(MODELS) if n.startswith("model-a-") and
                n.endswith(".host-digests.json")]
        self.assertEqual(len(side), 1)
        with open(side[0]) as f:
            doc = json.load(f)
        name = sorted(doc["tensors"])[3]
        good = doc["tensors"][name]["digest"]
        doc["tensors"][name]["digest"] = good[:-1] + ("0" if good[-1] != "0" else "1")
        with open(side[0], "w") as f:
            json.dump(doc, f)
        try:
            r = userpath("--rows", "fresh", "--repeat", "1", "--out", out)
        finally:
            doc["tensors"][name]["digest"] = good
            with open(side[0], "w") as f:
                json.dump(doc, f)
        self.assertEqual(r.returncode, 1, r.stdout[-2000:])
        row = rows_of(out)["fresh"]
        self.assertEqual(row["status"], "failed")
        self.assertIn("%s: bytes differ" % name, row["data"]["aegaeon"]["bad"])
        self.assertIn("WRONG BYTES", row["ours"])

    def test_a_row_over_the_budget_is_skipped_with_the_reason(self):
        out = os.path.join(TMP, "budget.json")
        r = userpath("--rows", "seed", "--budget", "1", "--out", out)
        self.assertEqual(r.returncode, 0, r.stdout[-2000:])
        row = rows_of(out)["seed"]
        self.assertEqual(row["status"], "skipped")
        self.assertRegex(row["checked"], r"budget left, it takes about \d+ s")

    def test_only_the_models_the_rows_read_are_written(self):
        """Writing a model counts against --budget: a row that reads none writes none."""
        d = tempfile.mkdtemp(dir=TMP)
        out = os.path.join(TMP, "nomodels.json")
        r = userpath("--rows", "seed", "--budget", "1", "--dir", d, "--out", out)
        self.assertEqual(r.returncode, 0, r.stdout[-2000:])
        self.assertEqual([n for n in os.listdir(d) if "model-a" in n], [])     # fresh and slurm read A
        self.assertEqual(len([n for n in os.listdir(d) if n.startswith("model-b") and n.endswith(".safetensors")]), 1)

    def test_bad_arguments(self):
        r = userpath("--rows", "fresh,nosuch")
        self.assertEqual(r.returncode, 2)
        self.assertIn("unknown rows ['nosuch']", r.stderr)


def module_dir():
    """The directory on PYTHONPATH holding the aegaeon_native under test."""
    for d in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if d and glob.glob(os.path.join(d, "aegaeon_native*.so")):
            return d
    raise unittest.SkipTest("no aegaeon_native*.so on PYTHONPATH")


class BaseBuild(unittest.TestCase):
    """--base: another build's module beside this one's, in alternating fresh processes."""

    @classmethod
    def setUpClass(cls):
        cls.base = tempfile.mkdtemp(dir=TMP, prefix="base-")
        for f in glob.glob(os.path.join(module_dir(), "aegaeon_native*.so")):
            shutil.copy(f, cls.base)            # a copy: another file, as another build's would be
        cls.out = os.path.join(TMP, "base.json")
        cls.r = userpath("--rows", "seed,fresh", "--repeat", "2", "--base", cls.base, "--base-label", "v0 abc123",
                         "--out", cls.out)
        cls.rows = rows_of(cls.out) if os.path.exists(cls.out) else {}

    def test_exits_0(self):
        self.assertEqual(self.r.returncode, 0, self.r.stdout[-3000:] + self.r.stderr[-2000:])

    def test_each_build_runs_its_own_module(self):
        data = self.rows["fresh"]["data"]
        self.assertEqual(len(data["aegaeon-base"]["seconds"]), 2)
        self.assertEqual(len(data["aegaeon"]["seconds"]), 2)
        self.assertTrue(data["aegaeon-base"]["module"].startswith(self.base + os.sep), data["aegaeon-base"])
        self.assertFalse(data["aegaeon"]["module"].startswith(self.base + os.sep), data["aegaeon"])

    def test_the_two_take_turns_at_going_first(self):
        lines = [ln.split("]", 1)[1].strip() for ln in self.r.stdout.splitlines()
                 if re.search(r"\] +aegaeon(-base)? run \d", ln)]
        order = [ln.split(" run ")[0] + " " + ln.split(" run ")[1].split(":")[0] for ln in lines]
        self.assertEqual(order, ["aegaeon 1", "aegaeon-base 1", "aegaeon-base 2", "aegaeon 2"], lines)
        seed = [ln for ln in self.r.stdout.splitlines() if re.search(r"seed: process \d", ln)]
        self.assertEqual(len(seed), 4, seed)
        self.assertIn("(base build)", seed[1])
        self.assertIn("(base build)", seed[2])

    def test_rows_give_both_and_the_ratio(self):
        fresh, seed = self.rows["fresh"], self.rows["seed"]
        self.assertIn("the base build (v0 abc123)", fresh["baselines"])
        self.assertRegex(fresh["ratio"], r"\d\.\d{3}x the base build")
        self.assertIn("the base build (v0 abc123): rounds 1/2/3", seed["baselines"])
        self.assertRegex(seed["ratio"], r"rounds 1/2/3 at [\d.]+x/[\d.]+x/[\d.]+x the base build's GB/s")
        self.assertEqual(len(seed["data"]["base_processes"]), 2)
        self.assertEqual(seed["status"], "ok", seed["checked"])

    def test_this_build_from_the_base_dir_fails(self):
        """A base that is this build's own directory: the comparison would compare nothing."""
        out = os.path.join(TMP, "samebase.json")
        r = userpath("--rows", "fresh", "--repeat", "1", "--base", module_dir(), "--out", out)
        self.assertEqual(r.returncode, 1, r.stdout[-2000:])
        row = rows_of(out)["fresh"]
        self.assertEqual(row["status"], "failed")
        self.assertIn("imported the base build's aegaeon_native", row["data"]["aegaeon"]["error"])

    def test_a_base_without_the_module(self):
        r = userpath("--rows", "fresh", "--base", TMP)
        self.assertEqual(r.returncode, 2)
        self.assertIn("no aegaeon_native*.so there", r.stderr)


class BaseEnv(unittest.TestCase):
    """--base-env without --base: this build against itself with one switch changed."""

    def test_one_switch_measured_alone(self):
        out = os.path.join(TMP, "baseenv.json")
        env = dict(ENV, AEGAEON_PINNED_HUGEPAGES="never")      # the ring made ahead: no huge pages for it
        env.pop("AEGAEON_TOPOLOGY_XML", None)
        r = userpath("--rows", "fresh", "--repeat", "2", "--base-env", "AEGAEON_RING_AHEAD=0", "--out", out, env=env)
        self.assertEqual(r.returncode, 0, r.stdout[-3000:] + r.stderr[-2000:])
        row = rows_of(out)["fresh"]
        self.assertIn("the base build (this build AEGAEON_RING_AHEAD=0)", row["baselines"])
        self.assertRegex(row["ratio"], r"\d\.\d{3}x the base build")
        data = row["data"]
        self.assertEqual(data["aegaeon-base"]["module"], data["aegaeon"]["module"])
        for name, ahead in (("aegaeon", True), ("aegaeon-base", False)):
            steps = [[x[0] for x in run] for run in data[name]["spans"]]
            self.assertEqual(len(steps), 2, data[name])
            for st in steps:
                self.assertEqual("pool ahead" in st, ahead, (name, st))

    def test_bad_setting(self):
        r = userpath("--rows", "fresh", "--base-env", "AEGAEON_RING_AHEAD")
        self.assertEqual(r.returncode, 2)
        self.assertIn("--base-env 'AEGAEON_RING_AHEAD': expected VAR=VALUE", r.stderr)


@unittest.skipIf(userpath_child.torch is None, "torch is not importable here (the GPU machine has it)")
class TorchDigest(unittest.TestCase):
    """The digest of the cuda runs, on the CPU: equal bytes, equal digests; any change, another."""

    def setUp(self):
        self.torch = userpath_child.torch
        self.check = userpath_child.Checker("cpu")
        gen = self.torch.Generator().manual_seed(3)
        self.t = self.torch.randint(-2**31, 2**31 - 1, (1001,), dtype=self.torch.int32, generator=gen)

    def digest(self, t):
        return self.check.digests({"t": t})["t"]

    def test_bytes_decide(self):
        torch = self.torch
        d = self.digest(self.t)
        self.assertEqual(d, self.digest(self.t.clone().view(torch.float32)))
        self.assertEqual(d.split(":")[0], str(4 * 1001))
        for change in ("one byte", "two words swapped"):
            u = self.t.clone()
            if change == "one byte":
                u.view(torch.uint8)[1234] ^= 1
            else:
                u[7], u[900] = self.t[900].item(), self.t[7].item()
            other = self.digest(u)
            self.assertNotEqual(other.split(":")[1][:16], d.split(":")[1][:16], change)
            self.assertNotEqual(other.split(":")[1][16:], d.split(":")[1][16:], change)
        # A zero byte more pads to the same words: the length tells them apart.
        longer = self.digest(torch.cat((self.t.view(torch.uint8), torch.zeros(1, dtype=torch.uint8))))
        self.assertEqual(longer, "%d:%s" % (4 * 1001 + 1, d.split(":")[1]))

    def test_odd_views_scalars_and_empty_tensors(self):
        torch = self.torch
        b = self.t.view(torch.uint8)
        self.assertEqual(self.digest(b[3:16]), self.digest(b[3:16].clone()))
        self.assertEqual(self.digest(torch.tensor(2.5)), self.digest(torch.tensor([2.5])))
        self.assertEqual(self.digest(torch.empty(0, 5)), "0:" + "0" * 32)

    def test_the_reference_from_the_file_matches(self):
        path = os.path.join(TMP, "words.bin")
        with open(path, "wb") as f:
            f.write(b"header" + self.t.numpy().tobytes())
        ref = self.check.of_ranges(path, [(6, 4004), (10, 13), (6, 0)])
        self.assertEqual(ref[(6, 4004)], self.digest(self.t))
        self.assertEqual(ref[(10, 13)], self.digest(self.t.view(self.torch.uint8)[4:17]))
        self.assertEqual(ref[(6, 0)], self.digest(self.torch.empty(0, dtype=self.torch.uint8)))


if __name__ == "__main__":
    testmain.run(TMP)
