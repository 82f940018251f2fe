#!/usr/bin/env python3
"""What a user waits for: a model ready in a fresh process, at job start and in
a new step, each beside baselines measured in the same run (docs/benchmarks.md).

One command prints the whole table. Each figure is a median of --repeat fresh
processes (or Slurm jobs); every tensor is checked bit for bit against the file
(bench/userpath_child.py says how). Rows (--rows picks some):

  pinned  pinned pool provisioning, 4 KiB and 2 MiB pages, vs cudaHostAlloc
          (aegaeon-cli bench pinned; 2 MiB pages reserved for it as root)
  engine  page cache -> GPU with the engine warm (bench/prefetch_bench.py's auto row)
  seed    the seed API in one process: prefetch_file_to_gpu_chunks of model B
          (4 GiB), wait on every chunk, release_all_prefetch_events(), 3 rounds
  fresh   model A (8 GiB, torch-written safetensors), fresh process, warm page
          cache -> every tensor a torch tensor on the GPU: aegaeon_native vs
          safetensors' load_file, fastsafetensors (nogds) and instanttensor
  hf      a transformers checkpoint (about 4.45 GiB, 5 shards + index), fresh
          process: aegaeon_native.torch.from_pretrained (the load started, the
          model built on meta meanwhile, then filled) vs transformers'
          from_pretrained(device_map="cuda"); the model's code is imported
          before the clock for both, as torch is
  slurm   real Slurm jobs (tests/gpu/slurm_e2e.sh --userpath; root): submit ->
          model A ready in the first step with and without huge pages, job start
          overhead, a new step's first use, a load through the job's agent

--base DIR compares two builds of aegaeon_native in one run: DIR holds
another build's module (a wheel installed with pip --target: gpu-run.sh
userpath does this with the bundle's base-wheel/, scripts/gpu-bundle.sh
BASE=REV), and the seed, fresh and hf rows run it as well, in fresh processes
alternating with this build's, which of the two goes first changing each
round; each row gives both medians and this build's speed against the base's.
--base-env VAR=VALUE (repeatable) runs the base with that environment too;
without --base the base is this build with it, so one switch is measured
alone (--base-env AEGAEON_RING_AHEAD=0: the staging ring not made ahead).

--device host --quick runs it all on the host backend with small files and
skips, with the reason, what the machine lacks (a smoke test for CI). Progress
lines come as the rows run, the table last; --out writes it as JSON after each
row. Exit status 1 when a check of aegaeon's results failed or it crashed.
"""
import argparse
import array
import glob
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from types import SimpleNamespace

HERE = os.path.dirname(os.path.abspath(__file__))
CHILD = os.path.join(HERE, "userpath_child.py")
SLURM_E2E = os.path.join(HERE, "..", "tests", "gpu", "slurm_e2e.sh")
sys.path.insert(0, HERE)
import prefetch_bench  # noqa: E402  (the engine row and warm_cache)

GiB = 1 << 30
MiB = 1 << 20
SIZES = {   # model A, model B, the transformers preset and its shard size, chunk, pinned pool
    "full": SimpleNamespace(a=8 * GiB, b=4 * GiB, hf="full", shard="1GB", chunk="64MiB", pool="4GiB",
                            pool_bytes=4 * GiB),
    "quick": SimpleNamespace(a=24 * MiB, b=12 * MiB, hf="quick", shard="100KB", chunk="4MiB", pool="64MiB",
                             pool_bytes=64 * MiB),
}
ROWS = ["pinned", "engine", "seed", "fresh", "hf", "slurm"]
# About how long each row takes on the GPU machine (s): a row that would not fit
# what is left of --budget is skipped, so one bounded call returns a table. The
# Slurm jobs (about 200 s) get all that is left and, stopped at its end, report
# the figures they have.
ESTIMATE = {"pinned": 30, "engine": 15, "seed": 30, "fresh": 110, "hf": 70, "slurm": 150}
# Labels: {v} becomes the package's version as the child found it.
FRESH_LOADERS = [("aegaeon", "aegaeon_native{v}: load_safetensors + torch.from_dlpack"),
                 ("safetensors", "safetensors{v} load_file"),
                 ("fastsafetensors", "fastsafetensors{v} (nogds)"),
                 ("instanttensor", "instanttensor{v}"),
                 ("instanttensor-buffered", "instanttensor{v}, buffered I/O")]
HF_LOADERS = [("aegaeon", "aegaeon_native{v}"), ("from_pretrained", "from_pretrained(device_map=cuda){v}")]
BASE = "aegaeon-base"   # the series of --base's build


class ChildError(Exception):
    pass


class Run:
    """The run's settings, clock, children and results."""

    def __init__(self, args):
        self.args = args
        self.size = SIZES["quick" if args.quick else "full"]
        self.t0 = time.monotonic()
        self.rows = []
        self.env = dict(os.environ, AEGAEON_DEVICE=args.device, PYTHONDONTWRITEBYTECODE="1")
        self.base_env = None
        if has_base(args):
            path = self.env.get("PYTHONPATH")
            self.base_env = dict(self.env, **dict(v.split("=", 1) for v in args.base_env))
            if args.base:
                self.base_env["PYTHONPATH"] = args.base + (":" + path if path else "")
        self.device = device_name(args.device)

    def elapsed(self):
        return time.monotonic() - self.t0

    def say(self, msg):
        print("[%6.1f s] %s" % (self.elapsed(), msg), flush=True)

    def child(self, task):
        """A task of userpath_child.py in a fresh process: its result (with "skip"
        when it could not run). A task with "build": "base" imports --base's module."""
        timeout = 900 if not self.args.budget else max(30, min(900, self.args.budget - self.elapsed()))
        env = self.base_env if task.get("build") == "base" else self.env
        try:
            r = subprocess.run([sys.executable, CHILD, json.dumps(task)], capture_output=True, text=True,
                               env=env, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ChildError("%s did not end within %d s" % (task["task"], timeout))
        result = None
        for line in r.stdout.splitlines():
            if line.startswith("RESULT "):
                result = json.loads(line[len("RESULT "):])
        if r.returncode != 0 or result is None:
            msg = " | ".join(r.stderr.strip().splitlines()[-3:]) or "no output"
            raise ChildError("%s %s: exit %d: %s" % (task["task"], task.get("loader", ""), r.returncode, msg))
        if task.get("profile"):
            result["profile"] = r.stderr
        return result

    def cli(self):
        return self.args.cli or shutil.which("aegaeon-cli") or "aegaeon-cli"

    def add(self, row):
        self.rows.append(row)
        self.save()

    def save(self):
        if not self.args.out:
            return
        doc = {"date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "device": self.device,
               "command": " ".join(sys.argv), "repeat": self.args.repeat, "seconds": round(self.elapsed(), 1),
               "models": {"dir": self.args.dir, "file_system": file_system(self.args.dir)}, "rows": self.rows}
        tmp = self.args.out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, self.args.out)


def file_system(path):
    """The type of the file system holding path (tmpfs, ext4...): loaders pick their I/O by it."""
    r = subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True)
    return r.stdout.strip() or "?"


def device_name(device):
    if device != "cuda":
        return "host backend"
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader", "-i", "0"],
                              capture_output=True, text=True, timeout=30).stdout.strip()
    except (OSError, subprocess.TimeoutExpired):
        return "cuda"


def row(rid, what, **kw):
    """A table row: status ok, failed or skipped; met True, False or None (no target or not measured)."""
    r = {"id": rid, "what": what, "ours": "", "baselines": "", "ratio": "", "target": "", "met": None,
         "status": "ok", "checked": "", "data": {}}
    r.update(kw)
    return r


def skipped(rid, what, reason):
    return row(rid, what, status="skipped", checked=reason)


def median(v):
    return statistics.median(v) if v else None


def load_text(seconds, nbytes):
    return "%.3f s, %.1f GB/s" % (seconds, nbytes / seconds / 1e9)


def size_text(nbytes):
    return "%.2f GiB" % (nbytes / GiB) if nbytes >= GiB else "%.1f MiB" % (nbytes / MiB)


# ------------------------------------------------------------------ models

def prepare_models(run):
    """Model A, model B and the transformers checkpoint in --dir, written once and
    kept; each only where a row of --rows reads it (the writes count against
    --budget)."""
    d = run.args.dir
    os.makedirs(d, exist_ok=True)
    os.chmod(d, 0o755)          # the Slurm jobs' user reads model A
    m = SimpleNamespace(a=os.path.join(d, "model-a-%d.safetensors" % run.size.a),
                        b=os.path.join(d, "model-b-%d.safetensors" % run.size.b),
                        hf=os.path.join(d, "llama-%s" % run.size.hf), hf_skip=None, hf_error=None)
    rows = set(run.args.rows)
    for path, nbytes, seed, readers in ((m.a, run.size.a, 11, {"fresh", "slurm"}),
                                        (m.b, run.size.b, 12, {"engine", "seed"})):
        if not os.path.exists(path) and rows & readers:
            t0 = time.monotonic()
            r = run.child({"task": "write", "path": path + ".tmp", "bytes": nbytes, "seed": seed})
            os.rename(path + ".tmp", path)
            run.say("wrote %s: %s with %s in %.1f s" % (path, size_text(r["bytes"]), r["with"], time.monotonic() - t0))
    if not os.path.exists(os.path.join(m.hf, "model.safetensors.index.json")) and "hf" in run.args.rows:
        t0 = time.monotonic()
        tmp = m.hf + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            r = run.child({"task": "write-hf", "dir": tmp, "preset": run.size.hf, "shard": run.size.shard,
                           "device": run.args.device})
        except ChildError as e:
            r = {"error": "writing the checkpoint failed: %s" % e}
        if "skip" in r or "error" in r:
            m.hf_skip, m.hf_error = r.get("skip"), r.get("error")
        else:
            os.rename(tmp, m.hf)
            run.say("wrote %s: %d parameters in %.1f s" % (m.hf, r["params"], time.monotonic() - t0))
    return m


def reference(run, paths):
    """{name: {dtype, shape, digest}} of the files' tensors, computed once (in one
    process) and kept beside each file."""
    out, todo = {}, []
    for path in paths:
        st = os.stat(path)
        key = [st.st_size, st.st_mtime_ns]
        try:
            with open("%s.%s-digests.json" % (path, run.args.device)) as f:
                doc = json.load(f)
            if doc["key"] == key:
                out.update(doc["tensors"])
                continue
        except (OSError, ValueError, KeyError):
            pass
        todo.append((path, key))
    if todo:
        r = run.child({"task": "reference", "paths": [p for p, _ in todo], "device": run.args.device})
        if "skip" in r:
            raise ChildError("reference digests: %s" % r["skip"])
        for path, key in todo:
            with open("%s.%s-digests.json" % (path, run.args.device), "w") as f:
                json.dump({"key": key, "tensors": r["files"][path]}, f)
            out.update(r["files"][path])
    return out


def compare(ref, got):
    """What differs between a load's tensors and the file's: [] when every one is bit for bit the same."""
    bad = []
    for name, m in ref.items():
        g = got.get(name)
        if g is None:
            bad.append("%s missing" % name)
        elif (g["dtype"], list(g["shape"])) != (m["dtype"], list(m["shape"])):
            bad.append("%s: %s %s, the file %s %s" % (name, g["dtype"], g["shape"], m["dtype"], m["shape"]))
        elif g["digest"] != m["digest"]:
            bad.append("%s: bytes differ" % name)
    return bad + ["%s: not in the file" % n for n in got if n not in ref]


# ------------------------------------------------------------------ loaders in fresh processes

def series(label):
    return {"label": label, "seconds": [], "skip": None, "error": None, "bad": [], "version": None, "spans": [],
            "module": None}


def base_series(run):
    return series("aegaeon_native{v}, the base build (%s)" % run.args.base_label)


def has_base(args):
    """Whether a base runs beside this build: another build (--base), or an environment (--base-env)."""
    return bool(args.base or args.base_env)


def builds(run, i):
    """aegaeon's series in round i: this build's, and with a base the base's,
    the two taking turns at going first, so the machine's drift over the
    rounds falls on both alike."""
    if not has_base(run.args):
        return ["aegaeon"]
    return ["aegaeon", BASE] if i % 2 == 0 else [BASE, "aegaeon"]


def task_of(name, task):
    """The child's task for series name: the base build's runs aegaeon's loader with --base's module."""
    return dict(task, loader="aegaeon", build="base") if name == BASE else dict(task, loader=name)


def wrong_build(run, task, r):
    """Why the child did not run the build the task asked for, or None."""
    if not run.args.base or task.get("loader") != "aegaeon":
        return None
    module = r.get("module") or "?"
    inside = os.path.realpath(module).startswith(os.path.realpath(run.args.base) + os.sep)
    if task.get("build") == "base" and not inside:
        return "imported aegaeon_native from %s, not from the base build in %s" % (module, run.args.base)
    if task.get("build") != "base" and inside:
        return "imported the base build's aegaeon_native (%s) for this build's run" % module
    return None


def against_base(run, ours, base, nbytes):
    """The base build's median beside this build's: (text for the baselines, text for the ratio)."""
    if base is None:
        return None, None
    if not usable(base) or not usable(ours):
        return series_text(base, nbytes), None
    return series_text(base, nbytes), "%.3fx the base build" % (median(base["seconds"]) / median(ours["seconds"]))


def breakdown(runs):
    """Where aegaeon's time went: each span's median over the runs that timed it
    (a step timed twice in a run counts as its sum), in the order first seen."""
    per = {}
    for timed in runs:
        total = {}
        for name, sec, *_ in timed or []:
            total[name] = total.get(name, 0) + sec
        for name, sec in total.items():
            per.setdefault(name, []).append(sec)
    return ", ".join("%s %.1f ms" % (name, 1e3 * statistics.median(v)) for name, v in per.items())


def timeline(s):
    """The steps of the median run of series s laid out in time, those whose
    start the module gave ([name, seconds, start]), by start: "name
    +START..+END ms" from the clock's start; "" without."""
    runs = [(sec, t) for sec, t in zip(s["seconds"], s["spans"]) if t and any(len(x) == 3 for x in t)]
    if not runs:
        return ""
    runs.sort(key=lambda x: x[0])
    sec, timed = runs[(len(runs) - 1) // 2]
    steps = sorted((x for x in timed if len(x) == 3), key=lambda x: x[2])
    return "run of %.3f s: " % sec + ", ".join("%s +%.1f..+%.1f" % (n, 1e3 * st, 1e3 * (st + d)) for n, d, st in steps)


def run_series(run, name, s, task, check):
    """One fresh process of a loader; its time and check go into s. Returns the result or None."""
    if s["skip"] or s["error"]:
        return None
    try:
        r = run.child(task)
    except ChildError as e:
        s["error"] = str(e)
        run.say("  %s: FAILED: %s" % (name, e))
        return None
    if "skip" in r:
        s["skip"] = r["skip"]
        run.say("  %s: skipped: %s" % (name, r["skip"]))
        return None
    wrong = wrong_build(run, task, r)
    if wrong:
        s["error"] = wrong
        run.say("  %s: FAILED: %s" % (name, wrong))
        return None
    s["module"] = r.get("module")
    bad = check(r)
    s["seconds"].append(r["seconds"])
    s["bad"] += bad
    s["spans"].append(r.get("spans"))
    s["version"] = r.get("version", s["version"])
    run.say("  %s run %d: %.3f s%s" % (name, len(s["seconds"]), r["seconds"],
                                       "; %d differ from the file: %s" % (len(bad), bad[0]) if bad else ""))
    return r


def series_text(s, nbytes):
    label = s["label"].replace("{v}", " " + s["version"] if s["version"] and s["version"] != "?" else "")
    if s["skip"]:
        return "%s: skipped (%s)" % (label, s["skip"])
    if s["error"]:
        return "%s: FAILED (%s)" % (label, s["error"])
    if s["bad"]:
        return "%s: WRONG BYTES (%s)" % (label, s["bad"][0])
    return "%s %s" % (label, load_text(median(s["seconds"]), nbytes))


def usable(s):
    return s["seconds"] and not s["bad"] and not s["error"]


def best_of(baselines, nbytes):
    """(label, GB/s) of the fastest baseline with every tensor right, or None."""
    good = [(nbytes / median(s["seconds"]) / 1e9, s["label"].replace("{v}", "")) for s in baselines if usable(s)]
    return max(good) if good else None


def ours_failed(s):
    return bool(s["bad"] or s["error"] or (not s["seconds"] and not s["skip"]))


def row_fresh(run, m):
    nbytes = os.path.getsize(m.a)
    what = "%s torch-written safetensors, fresh process, warm page cache -> every tensor a torch tensor on the GPU" \
        % size_text(nbytes)
    ref = reference(run, [m.a])
    prefetch_bench.warm_cache(m.a)
    all_s = {name: series(label) for name, label in FRESH_LOADERS}
    if has_base(run.args):
        all_s[BASE] = base_series(run)
    peers = [n for n, _ in FRESH_LOADERS if n != "aegaeon"]
    for i in range(run.args.repeat):
        run.say("fresh: round %d of %d" % (i + 1, run.args.repeat))
        for name in builds(run, i) + peers:
            run_series(run, name, all_s[name], task_of(name, {"task": "load", "path": m.a, "device": run.args.device}),
                       lambda r: compare(ref, r["tensors"]))
    if run.args.profile:
        profile_run(run, "fresh", {"task": "load", "loader": "aegaeon", "path": m.a, "device": run.args.device})
    ours, base = all_s["aegaeon"], [all_s[n] for n in peers]
    vs_base, vs_base_ratio = against_base(run, ours, all_s.get(BASE), nbytes)
    r = row("fresh", what, ours=series_text(ours, nbytes),
            baselines="; ".join(([vs_base] if vs_base else []) + [series_text(s, nbytes) for s in base]),
            target=">= 48 GB/s, >= 1.9x the best peer", status="failed" if ours_failed(ours) else "ok",
            checked="every tensor (%d) against the file in each run" % len(ref),
            breakdown=breakdown(ours["spans"]), timeline=timeline(ours),
            data={n: {k: s[k] for k in ("seconds", "skip", "error", "version", "spans", "module")}
                  | {"bad": s["bad"][:5]} for n, s in all_s.items()})
    best = best_of(base, nbytes)
    if usable(ours) and best:
        gbps = nbytes / median(ours["seconds"]) / 1e9
        r["ratio"] = "%.2fx %s" % (gbps / best[0], best[1])
        r["met"] = gbps >= 48 and gbps / best[0] >= 1.9
    r["ratio"] = "; ".join(x for x in (r["ratio"], vs_base_ratio) if x)
    if ours_failed(all_s.get(BASE, ours)):
        r["status"] = "failed"
    return r


def row_seed(run, m):
    nbytes = os.path.getsize(m.b)
    what = "the seed API in one process: prefetch_file_to_gpu_chunks of %s, wait on every chunk, " \
           "release_all_prefetch_events(), again (3 rounds)" % size_text(nbytes)
    procs, errors = {"aegaeon": [], BASE: []}, []
    for i in range(run.args.repeat):
        for name in builds(run, i):
            which = " (base build)" if name == BASE else ""
            task = {"task": "seed", "path": m.b, "rounds": 3, "device": run.args.device, "loader": "aegaeon"}
            if name == BASE:
                task["build"] = "base"
            try:
                r = run.child(task)
            except ChildError as e:
                errors.append(str(e))
                run.say("seed: process %d%s FAILED: %s" % (i + 1, which, e))
                continue
            wrong = wrong_build(run, task, r)
            if wrong:
                errors.append(wrong)
                run.say("seed: process %d%s FAILED: %s" % (i + 1, which, wrong))
                continue
            procs[name].append(r["rounds"])
            run.say("seed: process %d%s: %s" % (i + 1, which, "; ".join(
                "list %.1f ms, %.1f GB/s" % (x["list_ms"], x["gbps"]) for x in r["rounds"])))
    if not procs["aegaeon"]:
        return row("seed", what, status="failed", checked=errors[0] if errors else "no process ran")

    def medians(ps):
        return [{k: median([p[i][k] for p in ps]) for k in ("list_ms", "gbps", "release_ms")}
                for i in range(len(ps[0]))]

    def rounds_text(rs):
        return "rounds 1/2/3: list returned after %s ms; %s GB/s" % (
            "/".join("%.1f" % x["list_ms"] for x in rs), "/".join("%.1f" % x["gbps"] for x in rs))

    rounds = medians(procs["aegaeon"])
    base = medians(procs[BASE]) if procs[BASE] else None
    bad = sum(x["bad_chunks"] for ps in procs.values() for p in ps for x in p)
    worst_list, worst_gbps = max(x["list_ms"] for x in rounds), min(x["gbps"] for x in rounds)
    baselines, ratio = "first round %.1f GB/s" % rounds[0]["gbps"], "%.2fx (worst round / first)" % (
        worst_gbps / rounds[0]["gbps"])
    if has_base(run.args):
        baselines = "the base build (%s): %s; %s" % (
            run.args.base_label, rounds_text(base) if base else "no process ran", baselines)
        if base:
            ratio += "; rounds 1/2/3 at %s the base build's GB/s" % "/".join(
                "%.3fx" % (x["gbps"] / y["gbps"]) for x, y in zip(rounds, base))
    ps = procs["aegaeon"]
    return row("seed", what, ours=rounds_text(rounds), baselines=baselines, ratio=ratio,
               target="list returned <= 5 ms; every round >= 48 GB/s", met=worst_list <= 5 and worst_gbps >= 48,
               status="failed" if bad or errors else "ok",
               checked="every chunk of every round against the file: %s" % (
                   "%d chunks differ" % bad if bad else "identical"),
               breakdown="; ".join("round %d: %s; its release: %s" % (
                   i + 1, breakdown([p[i]["spans"] for p in ps]) or "-",
                   breakdown([p[i]["release_spans"] for p in ps]) or "-") for i in range(len(rounds))),
               data={"rounds": rounds, "processes": ps, "errors": errors, "base_rounds": base,
                     "base_processes": procs[BASE]})


def logits_differ(a, b):
    """The largest absolute difference of two files of float32 logits."""
    x, y = array.array("f"), array.array("f")
    with open(a, "rb") as f:
        x.frombytes(f.read())
    with open(b, "rb") as f:
        y.frombytes(f.read())
    if len(x) != len(y):
        return "%d logits against %d" % (len(x), len(y))
    return "largest difference %.3g" % max(abs(p - q) for p, q in zip(x, y))


def profile_run(run, row_name, task):
    """One more fresh process of aegaeon's loader under cProfile (not in the
    figures: the profiler slows Python down): its top --profile calls by
    cumulative time to userpath-profile-ROW.txt beside --out, else to stderr."""
    try:
        r = run.child(dict(task, profile=run.args.profile))
    except ChildError as e:
        run.say("  %s: the profiled run FAILED: %s" % (row_name, e))
        return
    text = "%s, %.3f s under the profiler\n%s" % (row_name, r.get("seconds", 0), r.get("profile", ""))
    if run.args.out:
        path = os.path.join(os.path.dirname(os.path.abspath(run.args.out)), "userpath-profile-%s.txt" % row_name)
        with open(path, "w") as f:
            f.write(text)
        run.say("  %s: profile written to %s" % (row_name, path))
    else:
        sys.stderr.write(text)


def row_hf(run, m):
    what = "a transformers checkpoint saved by save_pretrained (shards + index), fresh process -> the model ready"
    if m.hf_skip or m.hf_error:
        return skipped("hf", what, m.hf_skip) if m.hf_skip else row("hf", what, status="failed", checked=m.hf_error)
    shards = sorted(n for n in os.listdir(m.hf) if n.endswith(".safetensors"))
    nbytes = sum(os.path.getsize(os.path.join(m.hf, n)) for n in shards)
    what = "a transformers checkpoint saved by save_pretrained (%s, %d shards + index), fresh process " \
           "-> the model ready" % (size_text(nbytes), len(shards))
    ref = reference(run, [os.path.join(m.hf, n) for n in shards])
    for n in shards:
        prefetch_bench.warm_cache(os.path.join(m.hf, n))
    all_s = {name: series(label) for name, label in HF_LOADERS}
    if has_base(run.args):
        all_s[BASE] = base_series(run)
    logits = []
    tmp = tempfile.mkdtemp(prefix="aegaeon-userpath-")
    try:
        for i in range(run.args.repeat):
            run.say("hf: round %d of %d" % (i + 1, run.args.repeat))
            for name in builds(run, i) + ["from_pretrained"]:
                s = all_s[name]
                path = os.path.join(tmp, "logits-%s-%d" % (name, i))
                r = run_series(run, name, s, task_of(name, {"task": "hf", "dir": m.hf, "logits": path,
                                                             "device": run.args.device}),
                               lambda r: compare(ref, r["params"]))
                if r is not None:
                    s["how"] = r["how"]
                    logits.append((r["logits_digest"], path, name))
        if run.args.profile:
            profile_run(run, "hf", {"task": "hf", "loader": "aegaeon", "dir": m.hf,
                                    "logits": os.path.join(tmp, "logits-profile"), "device": run.args.device})
        diff = [x for x in logits if x[0] != logits[0][0]]
        if diff:
            logits_note = "LOGITS DIFFER: a run of %s against the first of %s: %s" % (
                diff[0][2], logits[0][2], logits_differ(logits[0][1], diff[0][1]))
        else:
            logits_note = "the logits of one input equal to the bit in all %d runs" % len(logits)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    ours, base = all_s["aegaeon"], all_s["from_pretrained"]
    if ours.get("how"):
        ours["label"] += ": " + ours["how"]
    vs_base, vs_base_ratio = against_base(run, ours, all_s.get(BASE), nbytes)
    failed = ours_failed(ours) or ours_failed(all_s.get(BASE, ours)) or diff
    r = row("hf", what, ours=series_text(ours, nbytes),
            baselines="; ".join(([vs_base] if vs_base else []) + [series_text(base, nbytes)]),
            target=">= 45 GB/s for the whole model", status="failed" if failed else "ok",
            checked="every parameter (%d) against the file in each run; %s" % (len(ref), logits_note),
            breakdown=breakdown(ours["spans"]), timeline=timeline(ours),
            data={n: {k: s[k] for k in ("seconds", "skip", "error", "spans", "module")} | {"bad": s["bad"][:5]}
                  for n, s in all_s.items()})
    if usable(ours) and usable(base):
        r["ratio"] = "%.2fx from_pretrained" % (median(base["seconds"]) / median(ours["seconds"]))
    r["ratio"] = "; ".join(x for x in (r["ratio"], vs_base_ratio) if x)
    if usable(ours):
        r["met"] = nbytes / median(ours["seconds"]) / 1e9 >= 45
    return r


# ------------------------------------------------------------------ through the CLI

def row_engine(run, m):
    what = "page cache -> GPU, engine warm (bench/prefetch_bench.py's auto row, aegaeon-cli prefetch --local)"
    ns = SimpleNamespace(cli=run.cli(), gpu=0, chunk=run.size.chunk, repeat=run.args.repeat, device=run.args.device)
    prefetch_bench.warm_cache(m.b)
    try:
        r = prefetch_bench.ours(ns, m.b, "auto")
    except (RuntimeError, OSError, ValueError) as e:
        return row("engine", what, status="failed", checked=str(e))
    run.say("engine: %s GB/s (%s feed)" % (" ".join("%.1f" % x for x in r["runs"]), r["feed"]))
    return row("engine", what, ours="%.1f GB/s (%s, %s feed, first chunk %.1f ms)" % (
        r["gbps"], size_text(os.path.getsize(m.b)), r["feed"], r["first_chunk_ms"]),
        target=">= 50 GB/s", met=r["gbps"] >= 50,
        checked="not checked by this path (the same engine's bytes are checked in the seed and fresh rows)", data=r)


def hugepages(n=None):
    """vm.nr_hugepages, after setting it to n when given (as root)."""
    if n is not None:
        with open("/proc/sys/vm/nr_hugepages", "w") as f:
            f.write("%d\n" % n)
    with open("/proc/sys/vm/nr_hugepages") as f:
        return int(f.read())


def bench_pinned(run, pages):
    """aegaeon-cli bench pinned --json with 4 KiB (never) or 2 MiB (always) pages."""
    out = subprocess.run([run.cli(), "bench", "pinned", "--device", run.args.device, "--size", run.size.pool,
                          "--repeat", str(run.args.repeat), "--hugepages", pages, "--json"],
                         capture_output=True, text=True, env=run.env, timeout=600)
    try:
        doc = json.loads(out.stdout)
        r = next(x for x in doc["rows"] if x["what"] == "provisioning per GiB")
    except (ValueError, KeyError, StopIteration):
        r = None
    if out.returncode != 0 or r is None:
        raise ChildError("aegaeon-cli bench pinned --hugepages %s: exit %d: %s" % (
            pages, out.returncode, (out.stderr or out.stdout).strip()[-300:]))
    return {"ms_per_gib": r["aegaeon"], "baseline_ms_per_gib": r["baseline"], "page_bytes": doc["page_bytes"],
            "steps_ms_per_gib": doc["steps_ms_per_gib"]}


def row_pinned(run, m):
    base = "cudaHostAlloc" if run.args.device == "cuda" else "mmap+MAP_POPULATE"
    what = "pinned pool provisioning (%s pool)" % run.size.pool
    res, notes = {}, []
    try:
        res["4 KiB"] = bench_pinned(run, "never")
    except ChildError as e:
        return row("pinned", what, status="failed", checked=str(e))
    if run.args.quick:
        notes.append("2 MiB pages: not with --quick (it reserves no huge pages)")
    elif os.geteuid() != 0:
        notes.append("2 MiB pages: not measured (reserving huge pages needs root)")
    else:
        old = hugepages()
        want = run.size.pool_bytes // (2 * MiB) + 2      # the pool's pages and its header page
        got = old
        try:
            got = hugepages(max(old, want))
            run.say("pinned: vm.nr_hugepages %d -> %d (%d wanted)" % (old, got, want))
            res["2 MiB"] = bench_pinned(run, "always")
        except (ChildError, OSError) as e:
            notes.append("2 MiB pages: %s (vm.nr_hugepages %d of %d wanted)" % (e, got, want))
        finally:
            hugepages(old)
    for k, v in res.items():
        run.say("pinned, %s pages: %.1f ms/GiB, %s %.1f ms/GiB" % (k, v["ms_per_gib"], base, v["baseline_ms_per_gib"]))
    return row("pinned", what, ours="; ".join("%s pages %.1f ms/GiB" % (k, v["ms_per_gib"]) for k, v in res.items()),
               baselines="; ".join("%s %.1f ms/GiB (beside %s)" % (base, v["baseline_ms_per_gib"], k)
                                   for k, v in res.items()),
               ratio="; ".join("%.1fx (%s)" % (v["baseline_ms_per_gib"] / v["ms_per_gib"], k) for k, v in res.items()),
               target="<= 60 ms/GiB, never on a job-start load's path",
               met=all(v["ms_per_gib"] <= 60 for v in res.values()),
               checked="; ".join(notes) or "no bytes to check", data=res)


# ------------------------------------------------------------------ Slurm

def slurm_e2e(run, m, timeout):
    """slurm_e2e.sh --userpath: (its e2e.json, or None, and a reason when it did not run)."""
    if os.geteuid() != 0:
        return None, "needs root (it starts munged, slurmctld and slurmd)"
    if run.env.get("AEGAEON_PY_PRELOAD"):
        return None, "a sanitizer build: the jobs' Python would need the ASan runtime preloaded for the module"
    tmp = tempfile.mkdtemp(prefix="aegaeon-userpath-slurm-")
    cmd = ["bash", SLURM_E2E, "--userpath", "--model-a", m.a, "--repeat", str(run.args.slurm_repeat)]
    if run.args.slurm_hugepages_only:
        cmd.append("--hugepages-only")
    cmd += ["--host", "--small"] if run.args.device == "host" else ["--python", sys.executable]
    env = dict(run.env, OUT=tmp)
    if run.args.builddir:
        env["AEG_BUILDDIR"] = run.args.builddir
    log = []
    try:
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        # At the deadline TERM goes to the test's shell alone: its EXIT trap stops the
        # cluster and writes the figures it has (the daemons and steps are its to stop).
        stop = threading.Timer(max(timeout, 1), p.terminate)
        stop.start()
        try:
            for line in p.stdout:
                log.append(line)
                if re.match(r"(ok|not ok|skip|# figure:|slurm_e2e)", line):
                    run.say("  slurm: " + line.rstrip())
            rc = p.wait()
        finally:
            stop.cancel()
        if run.args.out:
            out_dir = os.path.dirname(os.path.abspath(run.args.out))
            with open(os.path.join(out_dir, "userpath-slurm.log"), "w") as f:
                f.writelines(log)
            # The agents' log lines (their level: $AEGAEON_E2E_AGENT_LOG, slurm_e2e.sh --help).
            # The cluster's slurmd.log and slurmctld.log come with them.
            for name in ("agent-syslog.log", "slurmd.log", "slurmctld.log"):
                if os.path.exists(os.path.join(tmp, name)):
                    shutil.copy(os.path.join(tmp, name), os.path.join(out_dir, "userpath-" + name))
        try:
            with open(os.path.join(tmp, "e2e.json")) as f:
                doc = json.load(f)
        except (OSError, ValueError):
            text = "".join(log)
            if "Slurm unavailable" in text or "Slurm is not installed" in text:
                return None, "Slurm is not installed here and no packages to unpack (scripts/fetch-slurm-debs.sh)"
            raise ChildError("slurm_e2e.sh --userpath: exit %d, no figures: %s" % (rc, " | ".join(log[-3:]).strip()))
        doc["rc"] = rc
        doc["not_ok"] = [line.strip() for line in log if line.startswith("not ok")]
        return doc, None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def slurm_rows(run, m, engine_gbps, timeout):
    small = " [--quick: the small slab and pool of slurm_e2e.sh --small]" if run.args.device == "host" else ""
    whats = {"slurm-ready": "real Slurm job, submit -> every tensor of model A a torch tensor in the first step "
                            "(--aegaeon-slab=60GiB --aegaeon-pinned=16GiB --aegaeon-prefetch), no huge pages reserved",
             "slurm-ready-hp": "the same with huge pages reserved for the pool",
             "slurm-overhead": "job start overhead (--aegaeon-slab=40GiB --aegaeon-pinned=8GiB, srun true)",
             "slurm-new-step": "a new step's first use: attach, open the slab, a torch view of every tensor "
                               "of the resident model",
             "slurm-agent": "a step loads model A through the job's agent from the page cache"}
    whats = {k: w + small for k, w in whats.items()}
    try:
        doc, why = slurm_e2e(run, m, timeout)
    except ChildError as e:
        return [row(k, w, status="failed", checked=str(e)) for k, w in whats.items()]
    if doc is None:
        return [skipped(k, w, why) for k, w in whats.items()]
    fig = {k: v["value"] for k, v in doc["figures"].items()}
    checked = "%d checks passed, %d failed (every tensor of A bit for bit in each step)" % (
        doc["passed"], doc["failed"])
    status = "failed" if doc["failed"] or (doc["rc"] and not doc["stopped"]) else "ok"
    if doc["not_ok"]:
        checked += "; the first: %s" % doc["not_ok"][0]
    if doc["stopped"]:
        checked += "; stopped at the end of the budget: the figures of the jobs done by then"
    out = []
    for rid, sfx in (("slurm-ready", ""), ("slurm-ready-hp", "_hp")):
        ready, plain = fig.get("up_submit_to_ready%s_s" % sfx), fig.get("plain_submit_to_ready_s")
        if ready is None:
            why = "not measured (--no-hugepages, --slurm-hugepages-only, the host backend, the budget, or a failed job)"
            out.append(skipped(rid, whats[rid], why))
            continue
        r = row(rid, whats[rid], ours="%.2f s; the first step starts after %.2f s, then ready in %.2f s" % (
            ready, fig["up_step_start%s_s" % sfx], fig["up_step_load%s_s" % sfx]), status=status, checked=checked,
            target="<= plain - 1.5 s; first step starts <= 0.3 s later than in a plain job")
        if plain is not None:
            r["baselines"] = "the same job without aegaeon, step doing load_file: %.2f s (step starts after %.2f s, " \
                             "loads in %.2f s)" % (plain, fig["plain_step_start_s"], fig["plain_step_load_s"])
            r["ratio"] = "%.2fx" % (plain / ready)
            r["met"] = ready <= plain - 1.5 and fig["up_step_start%s_s" % sfx] <= fig["plain_step_start_s"] + 0.3
        out.append(r)
    over = [(s, fig.get("job_start_overhead%s_s" % s), fig.get("job_plain_srun%s_s" % s)) for s in ("", "_hp")]
    over = [o for o in over if o[1] is not None]
    out.append(row("slurm-overhead", whats["slurm-overhead"], status=status, checked=checked,
                   ours="; ".join("%+.2f s%s" % (o, " (huge pages reserved)" if s else "") for s, o, _ in over),
                   baselines="; ".join("plain srun true %.2f s" % p for _, _, p in over), target="<= +0.3 s",
                   met=all(o <= 0.3 for _, o, _ in over) if over else None))
    if "new_step_views_s" in fig:
        out.append(row("slurm-new-step", whats["slurm-new-step"], status=status, checked=checked,
                       ours="%.3f s beyond the CUDA context (%.3f s); %.2f s from Python start, torch import excluded"
                            % (fig["new_step_views_s"], fig["new_step_context_s"], fig["new_step_from_start_s"]),
                       baselines="load_file step %.2f s from Python start, torch import excluded" %
                                 fig["plain_step_from_start_s"] if "plain_step_from_start_s" in fig else "",
                       target="<= 50 ms beyond the CUDA context", met=fig["new_step_views_s"] <= 0.05))
    if "prefetch_agent_page_cache_GBps" in fig:
        gbps = fig["prefetch_agent_page_cache_GBps"]
        out.append(row("slurm-agent", whats["slurm-agent"], status=status, checked=checked + "; --verify",
                       ours="%.1f GB/s" % gbps, target=">= 50 GB/s", met=gbps >= 50,
                       baselines="same engine in-process (engine row) %.1f GB/s" % engine_gbps if engine_gbps else "",
                       ratio="%.2fx in-process" % (gbps / engine_gbps) if engine_gbps else ""))
    for r in out:
        r["data"] = fig
    return out


# ------------------------------------------------------------------ the table

def verdict(r):
    if r["status"] == "skipped":
        return "skipped"
    if r["status"] == "failed":
        return "FAILED"
    return {True: "met", False: "NOT met", None: "n/a"}[r["met"]]


def print_table(run):
    sizes = "quick (small files)" if run.args.quick else "full size"
    print("\n%s; medians of %d; %s\n" % (run.device, run.args.repeat, sizes))
    print("| # | what the user waits for | aegaeon | same-run baselines | ratio | target | | checked |")
    print("|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(run.rows, 1):
        cells = [str(i), r["what"], r["ours"] or "-", r["baselines"] or "-", r["ratio"] or "-", r["target"] or "-",
                 verdict(r), r["checked"] or "-"]
        print("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    spans = [r for r in run.rows if r.get("breakdown")]
    if spans:
        print("\nWhere aegaeon's time went (the spans of aegaeon_native.timings(), medians):")
        for r in spans:
            print("- %s: %s" % (r["id"], r["breakdown"]))
    lines = [r for r in run.rows if r.get("timeline")]
    if lines:
        print("\nThe steps in time (ms after the clock started; aegaeon_native.timings(starts=True)):")
        for r in lines:
            print("- %s, %s" % (r["id"], r["timeline"]))
    counts = {}
    for r in run.rows:
        counts[verdict(r)] = counts.get(verdict(r), 0) + 1
    print("\n%s in %.0f s" % (", ".join("%d %s" % (n, k) for k, n in sorted(counts.items())), run.elapsed()))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=["cuda", "host"], default="cuda")
    p.add_argument("--quick", action="store_true", help="small files (a smoke test)")
    p.add_argument("--repeat", type=int, default=3, help="fresh processes (jobs) per figure [3]")
    p.add_argument("--slurm-repeat", type=int, help="jobs per Slurm figure [--repeat]")
    p.add_argument("--slurm-hugepages-only", action="store_true",
                   help="Slurm rows with huge pages reserved alone (the plain job's baseline with them too)")
    p.add_argument("--rows", default=",".join(ROWS), help="rows to run, of %s" % ",".join(ROWS))
    p.add_argument("--dir", default="/tmp/aegaeon-userpath",
                   help="where the models are written and kept [/tmp/aegaeon-userpath]")
    p.add_argument("--cli", help="aegaeon-cli [the one on PATH]")
    p.add_argument("--builddir", help="the build tree for the Slurm rows outside a GPU bundle")
    p.add_argument("--budget", type=float, default=0, help="seconds: rows that would not fit are skipped [no limit]")
    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="one more run of aegaeon's hf and fresh loaders under cProfile, its top N calls "
                        "written beside --out (not in the figures) [0: none]")
    p.add_argument("--out", help="the table as JSON, rewritten after each row")
    p.add_argument("--base", metavar="DIR",
                   help="another build's aegaeon_native (a directory on PYTHONPATH's terms) to run beside this "
                        "one in the seed, fresh and hf rows, alternating")
    p.add_argument("--base-env", metavar="VAR=VALUE", action="append", default=[],
                   help="the base's environment (repeatable); without --base, the base is this build with it")
    p.add_argument("--base-label", metavar="TEXT",
                   help="what the base build is, for the table [DIR's name, else the --base-env settings]")
    args = p.parse_args()
    for v in args.base_env:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", v):
            p.error("--base-env %r: expected VAR=VALUE" % v)
    if args.base:
        args.base = os.path.abspath(args.base)
        if not glob.glob(os.path.join(args.base, "aegaeon_native*.so")):
            p.error("--base %s: no aegaeon_native*.so there (pip install --target DIR the other build's wheel)"
                    % args.base)
    if has_base(args):
        args.base_label = args.base_label or " ".join(
            ([os.path.basename(args.base)] if args.base else ["this build"]) + args.base_env)
    args.rows = [r for r in args.rows.split(",") if r]
    unknown = [r for r in args.rows if r not in ROWS]
    if unknown or args.repeat < 1:
        p.error("unknown rows %s (of %s)" % (unknown, ROWS) if unknown else "--repeat must be at least 1")
    args.slurm_repeat = args.slurm_repeat or args.repeat
    run = Run(args)
    run.say("%s, %s sizes, medians of %d, rows %s" % (
        run.device, "quick" if args.quick else "full", args.repeat, ",".join(args.rows)))
    try:
        m = prepare_models(run)
    except ChildError as e:
        run.say("writing the models failed: %s" % e)
        return 1
    fns = {"pinned": row_pinned, "engine": row_engine, "seed": row_seed, "fresh": row_fresh, "hf": row_hf}
    for rid in [r for r in ROWS if r in args.rows]:
        left = args.budget - run.elapsed() if args.budget else None
        need = ESTIMATE[rid] * (0.2 if args.quick else 1)
        if left is not None and left < need:
            why = "not run: %.0f s of the budget left, it takes about %.0f s" % (left, need)
            run.say("%s: %s" % (rid, why))
            run.add(skipped(rid, rid, why))
            continue
        run.say("%s: starting" % rid)
        if rid == "slurm":
            engine = [r for r in run.rows if r["id"] == "engine" and r["status"] == "ok"]
            timeout = 3600 if left is None else left - 10
            for r in slurm_rows(run, m, engine[0]["data"]["gbps"] if engine else None, timeout):
                run.add(r)
            continue
        try:
            run.add(fns[rid](run, m))
        except ChildError as e:
            run.say("%s: FAILED: %s" % (rid, e))
            run.add(row(rid, rid, status="failed", checked=str(e)))
    print_table(run)
    return 1 if any(r["status"] == "failed" for r in run.rows) else 0


if __name__ == "__main__":
    sys.exit(main())
