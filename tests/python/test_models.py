#!/usr/bin/env python3
"""Models as users keep them, through aegaeon_native on the host backend (make check).

A directory of shards with model.safetensors.index.json (save_pretrained's
layout), an index file, one file recognised by content whatever its name; the
Model object (tensors, chunks, files, metadata, per-tensor waits, release, the
memory's lifetime), load_model, the chunk dicts' file, file_offset and tensors,
the errors (a missing shard, a bad index, not a model) with nothing left
behind, and models in a job through a real aegaeond. Needs only Debian's
python3. Run against a build tree: PYTHONPATH=<build>/python/.libs
AEGAEON_DEVICE=host AEGAEOND=<build>/aegaeond python3 this. Prints
"N passed, N failed" last.
"""
import gc
import json
import os
import struct
import tempfile
import threading
import unittest

import testmain
from testmain import MiB, AgentCase, make_tensors, pattern, safetensors_bytes, write_file

testmain.preload_sanitizers()

TMP = testmain.host_env("aegaeon-models-")

import aegaeon_native as an  # noqa: E402

SEED_KEYS = {"device_ptr", "size", "event_handle", "slab_id"}
CHUNK_KEYS = SEED_KEYS | {"file", "file_offset", "tensors"}


def write_sharded(directory, shards, metadata=None, index=True):
    """save_pretrained's layout: model-0000i-of-0000n.safetensors and an index.
    shards: a list of {name: (dtype, shape, raw)}. Returns the shard paths."""
    os.makedirs(directory, exist_ok=True)
    n = len(shards)
    paths, weight_map = [], {}
    for i, tensors in enumerate(shards):
        name = "model-%05d-of-%05d.safetensors" % (i + 1, n)
        paths.append(os.path.join(directory, name))
        write_file(paths[-1], safetensors_bytes(tensors, metadata=metadata))
        weight_map.update({t: name for t in tensors})
    if index:
        total = sum(len(raw) for tensors in shards for _, _, raw in tensors.values())
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    return paths


def split(tensors, parts):
    names = list(tensors)
    size = (len(names) + parts - 1) // parts
    return [{k: tensors[k] for k in names[i:i + size]} for i in range(0, len(names), size)]


def header_offsets(path):
    """{name: absolute file offset} from a safetensors file's header."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return {k: 8 + n + v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


def held():
    st = an.stats()
    return st["objects"], st["prefetch"].get(0, {"blocks": 0})["blocks"]


class Base(unittest.TestCase):
    def assertAegaeon(self, ctx, name, *texts):
        self.assertIsInstance(ctx.exception, an.AegaeonError)
        self.assertEqual(ctx.exception.name, name, str(ctx.exception))
        for t in texts:
            self.assertIn(t, str(ctx.exception))

    def assertNothingHeld(self):
        gc.collect()
        self.assertEqual(held(), (0, 0))

    def tearDown(self):
        gc.collect()


class TestModelFiles(Base):
    """A directory, an index or a file: the same model, every tensor from its file."""

    tensors = make_tensors(11)

    def setUp(self):
        self.dir = tempfile.mkdtemp(dir=TMP)
        self.paths = write_sharded(self.dir, split(self.tensors, 3), metadata={"format": "pt", "step": "9"})

    def check_tensors(self, got):
        self.assertEqual(list(got), list(self.tensors))     # file order, the shards' in turn
        for name, (dtype, shape, raw) in self.tensors.items():
            v = got[name]
            self.assertEqual((v.dtype, v.shape, v.tobytes()), (dtype, tuple(shape), raw), name)

    def test_directory_and_index(self):
        for path in (self.dir, os.path.join(self.dir, "model.safetensors.index.json")):
            with an.open_model(path, chunk_bytes=MiB) as m:
                self.assertIsInstance(m, an.Model)
                self.assertEqual(m.path, os.path.realpath(path))
                self.assertEqual(m.files, tuple(self.paths))
                self.assertEqual(dict(m.metadata), {"format": "pt", "step": "9"})
                self.assertEqual((m.gpu_id, m.owned, m.released), (0, True, False))
                self.check_tensors(m.tensors)
                self.assertIn("14 tensors in 3 files on GPU 0", repr(m))
                with self.assertRaises(TypeError):
                    m.tensors["x"] = 1                  # read-only
            self.assertTrue(m.released)
            self.assertIn("released", repr(m))
            self.assertNothingHeld()
        self.check_tensors(an.load_model(self.dir))
        self.check_tensors(an.load_safetensors(self.dir, 0, MiB))
        self.assertNothingHeld()

    def test_directory_without_index(self):
        os.unlink(os.path.join(self.dir, "model.safetensors.index.json"))
        self.assertEqual(an.open_model(self.dir).files, tuple(self.paths))  # every *.safetensors, by name
        single = os.path.join(self.dir, "model.safetensors")
        write_file(single, safetensors_bytes(self.tensors))
        m = an.open_model(self.dir)            # model.safetensors comes first
        self.assertEqual(m.files, (single,))
        self.assertEqual(dict(m.metadata), {})
        self.check_tensors(m.tensors)

    def test_content_not_name(self):
        path = os.path.join(self.dir, "weights.bin")
        write_file(path, safetensors_bytes(self.tensors, metadata={"format": "pt"}))
        self.check_tensors(an.load_model(path))
        self.assertEqual(dict(an.open_model(path).metadata), {"format": "pt"})
        chunks = an.prefetch_file_to_gpu_chunks(path, 0, MiB)
        self.assertGreaterEqual(sum(len(c["tensors"]) for c in chunks), len(self.tensors))
        an.release_all_prefetch_events()

    def test_files_of_one_name_twice(self):
        shards = split(self.tensors, 3)
        shards[2]["layer0.f64"] = shards[0]["layer0.f64"]
        d = tempfile.mkdtemp(dir=TMP)
        paths = write_sharded(d, shards, index=False)
        with self.assertRaises(an.AegaeonError) as c:
            an.load_model(d)
        self.assertAegaeon(c, "AEG_EFORMAT", '"layer0.f64" is in two of its files', paths[2])
        self.assertNothingHeld()


class TestChunkDicts(Base):
    """Each chunk says which file and bytes it holds and which tensors are in it."""

    def check_chunks(self, chunks, files):
        offsets = {f: header_offsets(f) for f in files}
        raw = {f: open(f, "rb").read() for f in files}
        seen = {}
        for c in chunks:
            self.assertEqual(set(c), CHUNK_KEYS)
            self.assertIn(c["file"], files)
            data = an.chunk_view(c).tobytes()
            self.assertEqual(data, raw[c["file"]][c["file_offset"]:c["file_offset"] + c["size"]])
            for name, off in c["tensors"]:
                # The tensor starts at chunk file_offset + off: in this chunk, or (off < 0) before it.
                self.assertEqual(c["file_offset"] + off, offsets[c["file"]][name], name)
                self.assertLess(off, c["size"])
                seen.setdefault((c["file"], name), []).append(off)
        for f in files:
            for name in offsets[f]:
                offs = seen.get((f, name))
                self.assertTrue(offs, name)                     # every tensor is in a chunk
                self.assertGreaterEqual(offs[0], 0)             # first where it starts,
                self.assertTrue(all(o < 0 for o in offs[1:]))   # then where it goes on
        return seen

    def test_prefetch_chunk_dicts(self):
        tensors = make_tensors(12)
        path = os.path.join(TMP, "chunks.safetensors")
        write_file(path, safetensors_bytes(tensors))
        chunks = an.prefetch_file_to_gpu_chunks(path, 0, MiB)
        for c in chunks:
            an.wait_event_handle_bytes(c["event_handle"], timeout=30)
        seen = self.check_chunks(chunks, [path])
        self.assertEqual(len(seen[(path, "big.weight")]), 4)    # 3 MiB + 4 KiB over 1 MiB chunks
        an.release_prefetch_chunks([c["slab_id"] for c in chunks])
        self.assertNothingHeld()

    def test_raw_file(self):
        path = os.path.join(TMP, "raw.bin")
        data = pattern(2 * MiB + 100, 4)
        write_file(path, data)
        chunks = an.prefetch_file_to_gpu_chunks(path, 0, MiB)
        self.assertEqual([(c["file"], c["file_offset"], c["size"], c["tensors"]) for c in chunks],
                         [(path, 0, MiB, []), (path, MiB, MiB, []), (path, 2 * MiB, 100, [])])
        an.release_all_prefetch_events()

    def test_model_chunks(self):
        d = tempfile.mkdtemp(dir=TMP)
        files = write_sharded(d, split(make_tensors(13), 2))
        m = an.open_model(d, chunk_bytes=MiB)
        chunks = m.chunks
        self.assertIsNot(chunks, m.chunks)          # a list of its own each time
        self.assertEqual([c["file"] for c in chunks], sorted(c["file"] for c in chunks))
        self.check_chunks(chunks, files)
        del m, chunks
        self.assertNothingHeld()

    def test_prefetch_of_a_directory(self):
        d = tempfile.mkdtemp(dir=TMP)
        files = write_sharded(d, split(make_tensors(14), 3))
        chunks = an.prefetch_file_to_gpu_chunks(d, 0, MiB)
        for c in chunks:
            an.wait_event_handle_bytes(c["event_handle"], timeout=30)
        self.check_chunks(chunks, files)
        an.release_prefetch_chunks([c["slab_id"] for c in chunks])
        self.assertNothingHeld()


class TestWaits(Base):
    """Per-tensor readiness: a wait covers the chunks of one tensor only."""

    def setUp(self):
        self.tensors = make_tensors(15)
        self.dir = tempfile.mkdtemp(dir=TMP)
        write_sharded(self.dir, split(self.tensors, 2))

    def test_each_tensor(self):
        m = an.open_model(self.dir, chunk_bytes=MiB, wait=False)
        views = m.tensors
        for name, (_, _, raw) in self.tensors.items():
            m.wait(name, timeout=30)
            self.assertEqual(views[name].tobytes(), raw, name)
        m.wait()
        m.wait(None, 0)
        m.wait(timeout=0.5)
        with self.assertRaises(KeyError) as c:
            m.wait("nope")
        self.assertIn("has no tensor of that name", str(c.exception))
        self.assertRaises(TypeError, m.wait, 3)
        self.assertRaises(TypeError, m.wait, None, "1")
        self.assertRaises(ValueError, m.wait, None, -1)

    def test_one_tensor_without_the_others(self):
        """A tensor whose chunks are gone fails its wait; the others still wait fine."""
        m = an.open_model(self.dir, chunk_bytes=MiB)
        chunks = m.chunks
        last = [c for c in chunks if any(n == "big.weight" for n, _ in c["tensors"])]
        an.release_prefetch_chunks(sorted(set(c["slab_id"] for c in last)))
        m.wait("layer0.f64", timeout=30)
        self.assertEqual(m.tensors["layer0.f64"].tobytes(), self.tensors["layer0.f64"][2])
        with self.assertRaises(an.AegaeonError) as c:
            m.wait("big.weight", timeout=30)
        self.assertAegaeon(c, "AEG_ENOENT")
        m.release()
        self.assertNothingHeld()

    def test_wait_while_another_thread_releases(self):
        def waiter(m, errors):
            try:
                m.wait(timeout=30)
            except ValueError:          # released before the wait began
                pass
            except Exception as e:      # noqa: BLE001
                errors.append(e)

        for _ in range(20):
            m = an.open_model(self.dir, chunk_bytes=MiB, wait=False)
            errors = []
            t = threading.Thread(target=waiter, args=(m, errors))
            t.start()
            m.release()
            del m
            t.join(60)
            self.assertFalse(t.is_alive())
            self.assertEqual(errors, [])
        self.assertNothingHeld()


class TestLifetime(Base):
    """The memory stays while the Model or any view of it lives."""

    def setUp(self):
        self.tensors = make_tensors(16)
        self.dir = tempfile.mkdtemp(dir=TMP)
        write_sharded(self.dir, split(self.tensors, 2))

    def test_view_outlives_release(self):
        m = an.open_model(self.dir)
        view = m.tensors["big.weight"]
        m.release()
        m.release()                                 # again: nothing
        self.assertEqual(held()[0], 1)
        self.assertGreater(held()[1], 0)
        self.assertEqual(view.tobytes(), self.tensors["big.weight"][2])
        for attr in ("tensors", "chunks"):
            with self.assertRaises(ValueError) as c:
                getattr(m, attr)
            self.assertIn("was released", str(c.exception))
        self.assertRaises(ValueError, m.wait)
        self.assertEqual(m.files[0], os.path.join(self.dir, "model-00001-of-00002.safetensors"))
        del view
        self.assertNothingHeld()

    def test_model_without_views(self):
        m = an.open_model(self.dir)
        n = len(m.tensors)
        gc.collect()
        self.assertEqual(held()[0], 1)              # the Model holds it: its views are cached
        self.assertEqual(n, len(self.tensors))
        del m
        self.assertNothingHeld()

    def test_dict_views_own_the_memory(self):
        d = an.load_model(self.dir)
        keep = d["layer1.f32"]
        del d
        gc.collect()
        self.assertEqual(held()[0], 1)
        self.assertEqual(keep.tobytes(), self.tensors["layer1.f32"][2])
        del keep
        self.assertNothingHeld()

    def test_release_all(self):
        m = an.open_model(self.dir)
        an.release_all_prefetch_events()
        self.assertEqual(held()[1], 0)              # freed, though the Model lives
        del m
        self.assertNothingHeld()

    def test_interface(self):
        self.assertRaises(TypeError, an.Model)
        self.assertTrue(an.Model.__doc__)
        for name in ("wait", "release", "__enter__", "__exit__"):
            self.assertTrue(getattr(an.Model, name).__doc__, name)


class TestErrors(Base):
    """Every bad model: a clear error naming what is wrong, and nothing left loaded."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(dir=TMP)
        self.paths = write_sharded(self.dir, split(make_tensors(17), 3))
        self.index = os.path.join(self.dir, "model.safetensors.index.json")

    def expect(self, path, name, *texts):
        for fn in (an.open_model, an.load_model, an.load_safetensors):
            with self.assertRaises(an.AegaeonError) as c:
                fn(path)
            self.assertAegaeon(c, name, *texts)
        self.assertNothingHeld()

    def test_missing_shard(self):
        os.unlink(self.paths[2])
        self.expect(self.dir, "AEG_ENOENT", self.paths[2])
        self.expect(self.index, "AEG_ENOENT", self.paths[2])

    def test_bad_index(self):
        cases = [
            (b"{not json", "not a shard index"),
            (b'{"metadata": {}}', 'no "weight_map" object'),
            (b'{"weight_map": {}}', "names no tensor"),
            (b'{"weight_map": {"a": 7}}', "is not a string"),
            (b'{"weight_map": {"a": "../escape.safetensors"}}', "a shard must be a file in the index's directory"),
            (b'{"weight_map": {"a": "/etc/passwd"}}', "a shard must be a file in the index's directory"),
        ]
        for blob, text in cases:
            write_file(self.index, blob)
            self.expect(self.dir, "AEG_EFORMAT", self.index, text)
            self.expect(self.index, "AEG_EFORMAT", text)

    def test_not_a_model(self):
        empty = tempfile.mkdtemp(dir=TMP)
        self.expect(empty, "AEG_ENOENT", "no model in it")
        self.expect(os.path.join(TMP, "nowhere"), "AEG_ENOENT", "nowhere")
        raw = os.path.join(TMP, "notes.bin")
        write_file(raw, pattern(10000, 5))
        self.expect(raw, "AEG_EFORMAT", raw)
        truncated = os.path.join(self.dir, "model-00002-of-00003.safetensors")
        with open(truncated, "r+b") as f:
            f.truncate(os.path.getsize(truncated) - 1)
        self.expect(self.dir, "AEG_EFORMAT", truncated)

    def test_arguments(self):
        self.assertRaises(TypeError, an.open_model, None)
        self.assertRaises(TypeError, an.open_model, self.dir, "0")
        self.assertRaises(ValueError, an.open_model, self.dir, -1)
        self.assertRaises(TypeError, an.open_model, self.dir, 0, MiB, True)     # wait is keyword-only
        with self.assertRaises(an.AegaeonValueError):
            an.open_model(self.dir, chunk_bytes=MiB + 1)
        with self.assertRaises(an.AegaeonError) as c:
            an.open_model(self.dir, gpu_id=3)
        self.assertAegaeon(c, "AEG_ENODEV")
        self.assertNothingHeld()


STEP = r"""
import aegaeon_native as an, json, sys
m = an.open_model(sys.argv[1], chunk_bytes=1 << 20)
out = {"owned": m.owned, "files": len(m.files), "metadata": dict(m.metadata),
       "tensors": {k: v.tobytes().hex() for k, v in m.tensors.items()},
       "chunk_files": sorted(set(c["file"] for c in m.chunks)),
       "held": an.stats()["job"]["blocks"]}
m.release()
out["after"] = an.stats()["job"]["blocks"]
if len(sys.argv) > 2:                       # leave a load of the model to the job
    an.prefetch_file_to_gpu_chunks(sys.argv[1], 0, 1 << 20)
print(json.dumps(out))
"""


class TestJob(AgentCase, Base):
    """Models in a job: the agent loads them; a model the job holds is reused, not reloaded."""

    def test_steps(self):
        tensors = make_tensors(18)
        d = tempfile.mkdtemp(dir=TMP)
        files = write_sharded(d, split(tensors, 2), metadata={"format": "pt"})
        want = {k: v[2].hex() for k, v in tensors.items()}
        first = self.step(STEP, d, "leave")
        self.assertEqual(first["tensors"], want)
        self.assertEqual((first["owned"], first["files"], first["metadata"]), (True, 2, {"format": "pt"}))
        self.assertEqual(first["chunk_files"], files)
        self.assertGreater(first["held"], 0)
        self.assertEqual(first["after"], 0)        # its own load, released
        for _ in range(2):                         # the job's load: found, used, left to the job
            later = self.step(STEP, d)
            self.assertEqual(later["tensors"], want)
            self.assertEqual((later["owned"], later["held"], later["after"]), (False, 0, 0))


if __name__ == "__main__":
    testmain.run(TMP)
