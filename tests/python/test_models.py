#!/usr/bin/env python3
"""Models as users keep them, through aegaeon_native on the host backend (make check).

A directory of shards with model.safetensors.index.json (save_pretrained's
layout), an index file, one file recognised by content whatever its name; the
Model object (tensors, chunks, files, metadata, per-tensor waits, release, the
memory's lifetime), load_model, the chunk dicts' file, file_offset and tensors,
the errors (a missing shard, a bad index, not a model) with nothing left
behind, tensor-parallel slices (tp_*: each rank's parts against numpy's slices
of the file, for 1, 2, 4 and uneven 3 ranks; every bad value, leaving no Python
memory or descriptor), and models and slices in a job through a real aegaeond
(a refused split leaves the agent empty). Needs only Debian's python3. Run against a build tree: PYTHONPATH=<build>/python/.libs
AEGAEON_DEVICE=host AEGAEOND=<build>/aegaeond python3 this. Prints
"N passed, N failed" last.
"""
import gc
import json
import os
import struct
import subprocess
import tempfile
import threading
import tracemalloc
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

    def test_brace_first_is_not_an_index(self):
        # A safetensors file whose header length starts with the byte '{' (a header of
        # 256k + 123 bytes) loads as the model it is; raw bytes over the 64 MiB an index
        # may have, starting with '{', load as they are (they were refused as an index).
        blob = safetensors_bytes(self.tensors)
        n = struct.unpack("<Q", blob[:8])[0]
        pad = (0x7B - n) % 256
        header = blob[8:8 + n] + b" " * pad
        path = os.path.join(self.dir, "brace.bin")
        write_file(path, struct.pack("<Q", n + pad) + header + blob[8 + n:])
        self.assertEqual(open(path, "rb").read(1), b"{")
        self.check_tensors(an.load_model(path))
        raw = os.path.join(self.dir, "brace-raw.bin")
        data = b"{" + pattern(64 * MiB, 6)
        write_file(raw, data)
        chunks = an.prefetch_file_to_gpu_chunks(raw, 0, 16 * MiB)
        for c in chunks:
            an.wait_event_handle_bytes(c["event_handle"], timeout=30)
        self.assertEqual([(c["file_offset"], c["size"]) for c in chunks],
                         [(i * 16 * MiB, 16 * MiB) for i in range(4)] + [(64 * MiB, 1)])
        self.assertEqual(an.chunk_view(chunks[0]).tobytes()[:4096], data[:4096])
        self.assertEqual(an.chunk_view(chunks[-1]).tobytes(), data[-1:])
        an.release_all_prefetch_events()
        self.assertNothingHeld()

    def test_files_of_one_name_twice(self):
        shards = split(self.tensors, 3)
        shards[2]["layer0.f64"] = shards[0]["layer0.f64"]
        d = tempfile.mkdtemp(dir=TMP)
        paths = write_sharded(d, shards, index=False)
        with self.assertRaises(an.AegaeonError) as c:
            an.load_model(d)
        self.assertAegaeon(c, "AEG_EFORMAT", '"layer0.f64" is in two of its files', paths[2])
        self.assertNothingHeld()

    def test_control_bytes_in_names(self):
        """A model's names and files with escape sequences reach the message as '?'."""
        shards = split(self.tensors, 2)
        name = "w\x1b[2J\x07"
        shards[0][name] = shards[1][name] = shards[0]["layer0.f64"]
        d = tempfile.mkdtemp(dir=TMP)
        for i, shard in enumerate(shards):
            write_file(os.path.join(d, "s%d\x1b]0;t.safetensors" % i), safetensors_bytes(shard))
        with self.assertRaises(an.AegaeonError) as c:
            an.load_model(d)
        self.assertAegaeon(c, "AEG_EFORMAT", '"w?[2J?" is in two of its files', "s1?]0;t.safetensors")
        self.assertFalse([ch for ch in str(c.exception) if ord(ch) < 0x20 or ord(ch) == 0x7f])
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


try:
    import numpy as np
except ImportError:
    np = None
NEEDS_NUMPY = unittest.skipIf(np is None, "no numpy (python3-numpy)")
NP_DTYPES = {"F32": "<f4", "F16": "<f2", "I32": "<i4", "I64": "<i8", "U8": "u1"}


def tp_tensors(seed):
    """A model for tensor-parallel slices: the megatron preset's names (column- and
    row-parallel projections, the embedding), a 3-D tensor, one no world divides,
    a norm; extents of 8, 12 and 16 split evenly over 1, 2 and 4 ranks."""
    shapes = {"model.embed_tokens.weight": ("F32", (16, 4)),
              "model.layers.0.self_attn.q_proj.weight": ("F32", (8, 12)),
              "model.layers.0.self_attn.o_proj.weight": ("F16", (12, 8)),
              "model.layers.0.mlp.experts.weight": ("I32", (2, 3, 8)),
              "model.layers.0.input_layernorm.weight": ("F32", (12,)),
              "model.layers.0.odd.weight": ("I64", (7, 5)),
              "lm_head.weight": ("U8", (16, 12))}
    out = {}
    for i, (name, (dtype, shape)) in enumerate(shapes.items()):
        n = int(np.prod(shape)) * np.dtype(NP_DTYPES[dtype]).itemsize
        out[name] = (dtype, shape, pattern(n, seed * 100 + i))
    return out


def expected_part(tensors, name, rank, world, dim):
    """(the file's part of a tensor as numpy, (dim, start, extent) or None), split as
    the library does: ceil(extent / world) a rank, the last ranks less."""
    dtype, shape, raw = tensors[name]
    full = np.frombuffer(raw, NP_DTYPES[dtype]).reshape(shape)
    if dim is None:
        return full, None
    per = -(-shape[dim] // world)
    start = min(rank * per, shape[dim])
    index = [slice(None)] * len(shape)
    index[dim] = slice(start, start + per)
    return full[tuple(index)], (dim, start, shape[dim])


MEGATRON = {"model.embed_tokens.weight": 0, "model.layers.0.self_attn.q_proj.weight": 0,
            "model.layers.0.self_attn.o_proj.weight": 1, "lm_head.weight": 0}


@NEEDS_NUMPY
class TestSlices(Base):
    """Each rank's part of each tensor, against the file's slice of it (numpy)."""

    def setUp(self):
        self.tensors = tp_tensors(31)
        self.dir = tempfile.mkdtemp(dir=TMP)
        self.files = write_sharded(self.dir, split(self.tensors, 2))

    def check(self, got, parts, rank, world, dims):
        """got: {name: DeviceArray}; parts: the Model's, or None (a load_model dict)."""
        self.assertEqual(list(got), list(self.tensors))
        for name in self.tensors:
            want, part = expected_part(self.tensors, name, rank, world, dims.get(name))
            have = np.asarray(got[name])
            self.assertEqual((have.dtype, have.shape), (want.dtype, want.shape), name)
            # As bytes: random bytes make NaNs, which no float equals.
            self.assertEqual(have.tobytes(), np.ascontiguousarray(want).tobytes(), name)
            if parts is not None:
                self.assertEqual(parts.get(name), part, name)

    def test_worlds(self):
        for world in (1, 2, 4):
            for rank in range(world):
                with an.open_model(self.dir, chunk_bytes=4096, tp_rank=rank, tp_world=world) as m:
                    self.assertEqual(m.slice, {"rank": rank, "world": world, "preset": "megatron", "rules": [],
                                               "uneven": False})
                    self.assertEqual(m.files, tuple(self.files))
                    self.assertIn("tensor-parallel rank %d of %d" % (rank, world), repr(m))
                    self.check(m.tensors, m.parts, rank, world, MEGATRON)
                self.assertNothingHeld()
        d = an.load_model(self.dir, tp_rank=1, tp_world=2)
        self.check(d, None, 1, 2, MEGATRON)
        del d
        d = an.load_safetensors(self.files[0], 0, MiB, tp_rank=3, tp_world=4)
        self.assertEqual(d["model.embed_tokens.weight"].shape, (4, 4))
        del d
        self.assertNothingHeld()

    def test_rules_preset_and_uneven(self):
        rules = [("*.q_proj.weight", None), ("*.experts.weight", 2), ("*.odd.weight", 1), ("*layernorm*", 0)]
        given = [["*.q_proj.weight", "whole"]] + [list(r) for r in rules[1:]]     # "whole" as the CLI's =whole
        dims = dict(MEGATRON, **{"model.layers.0.self_attn.q_proj.weight": None,
                                 "model.layers.0.mlp.experts.weight": 2, "model.layers.0.odd.weight": 1,
                                 "model.layers.0.input_layernorm.weight": 0})
        for rank in range(3):      # 5 columns over 3 ranks: 2, 2, 1; 16 rows: 6, 6, 4; 8: 3, 3, 2
            m = an.open_model(self.dir, tp_rank=rank, tp_world=3, tp_rules=rules if rank else given, tp_uneven=True)
            self.assertEqual(m.slice["rules"], rules)
            self.check(m.tensors, m.parts, rank, 3, dims)
            m.release()
        only = {"model.layers.0.odd.weight": 0}         # a dict, and no preset: the rules alone
        m = an.open_model(self.dir, tp_rank=1, tp_world=4, tp_preset="none", tp_rules=only, tp_uneven=True)
        self.assertEqual((m.slice["preset"], m.slice["uneven"]), ("none", True))
        self.check(m.tensors, m.parts, 1, 4, only)
        m.release()
        m = an.open_model(self.dir, tp_rank=0, tp_world=2, tp_preset="vllm")     # megatron's other name
        self.assertEqual(m.slice["preset"], "megatron")
        self.check(m.tensors, m.parts, 0, 2, MEGATRON)
        m.release()
        self.assertNothingHeld()

    def test_chunk_dicts(self):
        """A sliced load's chunks hold the parts packed: each part is at chunk device_ptr + offset."""
        m = an.open_model(self.dir, chunk_bytes=4096, tp_rank=1, tp_world=2)
        seen = set()
        for c in m.chunks:
            for name, off in c["tensors"]:
                if off >= 0:
                    self.assertEqual(m.tensors[name].device_ptr, c["device_ptr"] + off, name)
                    seen.add(name)
                view = an.chunk_view(c).tobytes()
                part = m.tensors[name].tobytes()
                if off >= 0:
                    self.assertEqual(view[off:off + len(part)], part[:c["size"] - off], name)
                else:
                    self.assertEqual(view[:len(part) + off], part[-off:-off + c["size"]], name)
        self.assertEqual(seen, set(self.tensors))
        m.release()
        self.assertNothingHeld()

    def errors(self):
        """Each bad value through open_model, load_model and load_safetensors: its exception and text."""
        for exc, text, kw in SLICE_ERRORS:
            for fn in (an.open_model, an.load_model, an.load_safetensors):
                with self.assertRaises(exc, msg=(fn.__name__, kw)) as c:
                    fn(self.dir, **kw)
                self.assertIn(text, str(c.exception), (fn.__name__, kw))

    def test_errors(self):
        fds = open_fds()
        self.errors()
        raw = os.path.join(TMP, "raw-tp.bin")
        write_file(raw, pattern(5000, 3))
        with self.assertRaises(an.AegaeonError) as c:
            an.open_model(raw, tp_rank=0, tp_world=2)
        self.assertAegaeon(c, "AEG_EFORMAT", raw)
        self.assertRaises(TypeError, an.open_model, self.dir, 0, MiB, True, 0, 2)    # keyword-only
        self.assertNothingHeld()
        self.assertEqual(open_fds(), fds)

    def test_errors_leak_nothing(self):
        """The checks and the refused loads free what they took: Python memory (the spec, the
        rules' copies, the lists made of them) and descriptors, over many rounds."""
        self.errors()                           # the first round's caches (interned names, the engine)
        fds = open_fds()
        tracemalloc.start()
        try:
            gc.collect()
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(10):
                self.errors()
            gc.collect()
            grown = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        # 10 rounds of over 90 calls: one leaked small object a call would be 30 KiB
        self.assertLess(grown, 16 * 1024, "Python memory grew by %d bytes" % grown)
        self.assertEqual(open_fds(), fds)
        self.assertNothingHeld()


def open_fds():
    return len(os.listdir("/proc/self/fd"))


def tp(**kw):
    """Rank 0 of 2 and @kw."""
    return dict(tp_rank=0, tp_world=2, **kw)


# (exception, text it must contain, the tp_* arguments) for TestSlices' model
SLICE_ERRORS = [
    (ValueError, "tp_rank=1 needs tp_world", dict(tp_rank=1)),
    (ValueError, "tp_world=2 needs tp_rank", dict(tp_world=2)),
    (ValueError, "tp_preset needs tp_rank and tp_world", dict(tp_preset="megatron")),
    (ValueError, "tp_rules needs tp_rank and tp_world", dict(tp_rules=[("a", 0)])),
    (ValueError, "tp_uneven needs tp_rank and tp_world", dict(tp_uneven=True)),
    (ValueError, "tp_rank 2 is out of range (0..1 for tp_world 2)", dict(tp_rank=2, tp_world=2)),
    (ValueError, "tp_world 0 is out of range (1..4096)", dict(tp_rank=0, tp_world=0)),
    (ValueError, "tp_world 5000 is out of range (1..4096)", dict(tp_rank=0, tp_world=5000)),
    (ValueError, "tp_world %d does not fit in 64 bits" % 2 ** 70, dict(tp_rank=0, tp_world=2 ** 70)),
    (ValueError, "tp_rank must not be negative (got -1)", dict(tp_rank=-1, tp_world=2)),
    (TypeError, "tp_rank must be an int, not str", dict(tp_rank="0", tp_world=2)),
    (TypeError, "tp_world must be an int, not bool", dict(tp_rank=0, tp_world=True)),
    (TypeError, "tp_rank must be an int, not float", dict(tp_rank=0.0, tp_world=2)),
    (ValueError, "tp_preset 'tp': expected 'megatron', 'vllm' or 'none'", tp(tp_preset="tp")),
    (TypeError, "tp_preset must be a str or None, not int", tp(tp_preset=1)),
    (TypeError, "tp_rules must be a sequence of (pattern, dim) pairs or a dict, not str", tp(tp_rules="*.w=0")),
    (TypeError, "tp_rules must be a sequence of (pattern, dim) pairs or a dict, not int", tp(tp_rules=3)),
    (TypeError, "tp_rules[1] must be a (pattern, dim) pair, not int", tp(tp_rules=[("a", 0), 3])),
    (TypeError, "tp_rules[0] must be a (pattern, dim) pair, not tuple", tp(tp_rules=[("a", 0, 1)])),
    (TypeError, "tp_rules[0]: the pattern must be a str, not bytes", tp(tp_rules=[(b"a", 0)])),
    (TypeError, "tp_rules[0]: the pattern must be a str, not int", tp(tp_rules={1: 0})),
    (ValueError, "tp_rules[0]: pattern '' is empty", tp(tp_rules=[("", 0)])),
    (ValueError, "tp_rules[0]: pattern 'a\\x00b' is cut by a NUL character", tp(tp_rules=[("a\0b", 0)])),
    (ValueError, "tp_rules[0]: pattern \"%s...\" of 300 bytes, at most 255" % ("p" * 32),
     tp(tp_rules=[("p" * 300, 0)])),
    (ValueError, "tp_rules[0] dim must not be negative (got -1)", tp(tp_rules=[("a", -1)])),
    (TypeError, "tp_rules[0] dim must be an int, not float", tp(tp_rules=[("a", 1.0)])),
    (ValueError, "tp_rules[1] dim 'all': expected an int from 0, or None or 'whole' for the tensor whole",
     tp(tp_rules=[("a", "whole"), ("b", "all")])),
    (ValueError, "tp_rules: 65 rules, at most 64", tp(tp_rules=[("r%d" % i, 0) for i in range(65)])),
    (an.AegaeonValueError, 'slice rule 0 ("a"): dim 40: must be 0..31', tp(tp_rules=[("a", 40)])),
    (an.AegaeonValueError, 'tensor "model.layers.0.odd.weight" of shape [7, 5] has 5 along dim 1, not a multiple of '
     'the 2 ranks (rule "*.odd.weight"); with AEG_SLICE_UNEVEN each rank takes 3 and the last ones less '
     '(tp_uneven=True sets AEG_SLICE_UNEVEN)',
     tp(tp_rules=[("*.odd.weight", 1)])),
    (an.AegaeonValueError, 'tensor "model.layers.0.input_layernorm.weight" of shape [12] has no dim 1',
     tp(tp_rules=[("*layernorm*", 1)])),
]


STEP_TP = r"""
import aegaeon_native as an, json, os, sys
rank, world = int(sys.argv[2]), int(sys.argv[3])
m = an.open_model(sys.argv[1], chunk_bytes=1 << 20, tp_rank=rank, tp_world=world)
print(json.dumps({"owned": m.owned, "slice": m.slice, "parts": m.parts,
                  "tensors": {k: [list(v.shape), v.tobytes().hex()] for k, v in m.tensors.items()}}))
if len(sys.argv) > 4:                       # leave the load to the job: exit without releasing it
    sys.stdout.flush()
    os._exit(0)
"""

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


STEP_TP_BAD = r"""
import aegaeon_native as an, json, sys
try:
    an.open_model(sys.argv[1], tp_rank=0, tp_world=2, tp_rules=[("*.odd.weight", 1)])
    print(json.dumps({"error": None}))
except an.AegaeonError as e:
    print(json.dumps({"error": [e.name, str(e)], "held": an.stats()["job"]["blocks"]}))
"""


class TestJobSlices(AgentCase, Base):
    """Slices in a job: the agent loads each rank's parts; an equal slice is reused, another rank's never."""

    @NEEDS_NUMPY
    def test_ranks(self):
        tensors = tp_tensors(32)
        d = tempfile.mkdtemp(dir=TMP)
        write_sharded(d, split(tensors, 2))
        # Rank 0's load left to the job; rank 1 loads its own; rank 0 again finds the job's.
        for rank, owned, leave in ((0, True, ["leave"]), (1, True, []), (0, False, [])):
            got = self.step(STEP_TP, d, str(rank), "2", *leave)
            self.assertEqual((got["owned"], got["slice"]["rank"], got["slice"]["world"]), (owned, rank, 2))
            for name in tensors:
                want, part = expected_part(tensors, name, rank, 2, MEGATRON.get(name))
                self.assertEqual(got["tensors"][name], [list(want.shape), want.tobytes().hex()], name)
                self.assertEqual(got["parts"].get(name), list(part) if part else None, name)


    @NEEDS_NUMPY
    def test_refused(self):
        """A split the agent refuses: the library's message with the keyword that allows it; nothing
        stays in the job (the agent's status lists no load, its slab holds nothing)."""
        d = tempfile.mkdtemp(dir=TMP)
        write_sharded(d, split(tp_tensors(33), 2))
        got = self.step(STEP_TP_BAD, d)
        self.assertEqual(got["error"][0], "AEG_EINVAL")
        self.assertIn('tensor "model.layers.0.odd.weight" of shape [7, 5] has 5 along dim 1', got["error"][1])
        self.assertIn("(tp_uneven=True sets AEG_SLICE_UNEVEN)", got["error"][1])
        self.assertEqual(got["held"], 0)
        cli = os.path.join(os.path.dirname(os.environ["AEGAEOND"]), "aegaeon-cli")
        r = subprocess.run([cli, "status", "--json"], env=self.env, capture_output=True, text=True, timeout=60)
        self.assertEqual(r.returncode, 0, r.stderr)
        status = json.loads(r.stdout)
        self.assertEqual(status["loads"], [])
        self.assertEqual([(sl["used_bytes"], sl["blocks"]) for sl in status["slabs"]], [(0, 0)])


if __name__ == "__main__":
    testmain.run(TMP)
