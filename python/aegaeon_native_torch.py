"""aegaeon_native.torch: models as torch tensors without a copy, and
transformers models filled in place.

load_state_dict(path) loads a model (a safetensors file, a directory of shards
as save_pretrained writes it, or a shard index) with aegaeon_native.load_model
and gives {name: torch.Tensor}, each a view of the loaded memory (DLPack, no
copy): CUDA tensors on the cuda backend, CPU tensors on the host backend.
load_into(model, path) fills a model built on the meta device with them and
rebuilds what from_pretrained would (buffers computed at construction, tied
weights), so the model runs as from_pretrained's does. from_pretrained(path)
starts the load, builds the transformers model on the meta device while it
runs, then fills it.

Part of the aegaeon_native extension; torch is imported at the first call,
not by `import aegaeon_native` (docs/python.md, "Loading models")."""

import contextlib as _contextlib
import os as _os
import sys as _sys
import threading as _threading
import time as _time
import warnings as _warnings

__all__ = ["load_state_dict", "load_into", "from_pretrained"]


class _Loader:
    """Gives tracebacks and inspect this module's lines: it is built into the
    extension, so its __file__ names no file (the extension sets _SOURCE)."""

    @staticmethod
    def get_source(name):
        return globals()["_SOURCE"]


__loader__ = _Loader

# Safetensors dtypes and torch's names of them (torch has the unsigned and
# float8 ones since 2.1-2.3; F4 and F6 pack several values a byte: none).
_DTYPES = {
    "BOOL": "bool", "U8": "uint8", "I8": "int8", "I16": "int16", "U16": "uint16",
    "F16": "float16", "BF16": "bfloat16", "I32": "int32", "U32": "uint32", "F32": "float32",
    "I64": "int64", "U64": "uint64", "F64": "float64", "C64": "complex64",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
}
# Those every torch with DLPack takes as they are; the others go as bytes.
_DLPACK = {"U8", "I8", "I16", "F16", "BF16", "I32", "F32", "I64", "F64"}


def _torch():
    import torch
    return torch


def _native():
    import aegaeon_native
    return aegaeon_native


def _device(torch, native, device):
    """(gpu_id, torch.device) of a load: device None, "cuda", "cuda:N", "cpu",
    a torch.device or an int, checked against the module's backend."""
    host = native.device() == "host"
    kind = "cpu" if host else "cuda"
    if isinstance(device, bool) or not (device is None or isinstance(device, (int, str, torch.device))):
        raise TypeError("device must be None, an int, a str or a torch.device, not %s" % type(device).__name__)
    if isinstance(device, int):
        gpu = device
    else:
        dev = torch.device(device if device is not None else kind)
        if dev.type != kind:
            raise ValueError("device %r: aegaeon_native uses the %s backend, whose memory torch sees as %r"
                             % (str(device), "host" if host else "cuda", kind))
        gpu = dev.index if dev.index is not None else (0 if host else torch.cuda.current_device())
    if gpu < 0:
        raise ValueError("device %r: a GPU number is not negative" % (device,))
    return gpu, torch.device("cpu") if host else torch.device("cuda", gpu)


def _tensor(torch, name, arr):
    """A torch tensor viewing a DeviceArray (no copy); it keeps the memory alive."""
    if arr.dtype in _DLPACK:
        return torch.from_dlpack(arr)
    dtype = getattr(torch, _DTYPES.get(arr.dtype, "?"), None)
    if dtype is None:
        raise TypeError("tensor %r is %s, which this torch (%s) has no dtype for"
                        % (name, arr.dtype, torch.__version__))
    return torch.from_dlpack(arr.view("U8")).view(dtype).view(arr.shape)


def load_state_dict(path, device=None, *, chunk_bytes=None, tp_rank=None, tp_world=None, tp_preset=None,
                    tp_rules=None, tp_uneven=False):
    """{name: torch.Tensor} of a model, in file order, without a copy.

    path is what aegaeon_native.load_model takes: a safetensors file, a
    directory of shards (save_pretrained's) or a shard index. device: None
    (torch's current CUDA device; the CPU on the host backend), "cuda",
    "cuda:N", a torch.device or a GPU number; the host backend gives CPU
    tensors. Each tensor views the loaded memory through DLPack: the memory
    stays while any of them lives, and is released when the last goes.
    tp_rank, tp_world, tp_preset, tp_rules and tp_uneven load only a
    tensor-parallel rank's part of each tensor, as load_model takes them:
    the tensors have the parts' shapes. Returns once every byte is loaded.
    Errors: those of load_model (AegaeonError; TypeError and ValueError for
    bad tp_* values), TypeError for a dtype this torch lacks, ValueError for
    a device of the other backend."""
    torch, native = _torch(), _native()
    gpu, _ = _device(torch, native, device)
    arrays = native.load_model(path, gpu, chunk_bytes if chunk_bytes is not None else native.DEFAULT_CHUNK_BYTES,
                               tp_rank=tp_rank, tp_world=tp_world, tp_preset=tp_preset, tp_rules=tp_rules,
                               tp_uneven=tp_uneven)
    return _tensors(torch, arrays)


def _tensors(torch, arrays):
    """{name: torch.Tensor} viewing {name: DeviceArray}, in their order."""
    return {name: _tensor(torch, name, arr) for name, arr in arrays.items()}


def _slots(model):
    """{state_dict name: (module, attribute, is parameter)} of the model's
    parameters and persistent buffers, under every name a shared module has."""
    slots = {}
    for mname, mod in model.named_modules(remove_duplicate=False):
        prefix = mname + "." if mname else ""
        for n, p in mod._parameters.items():
            if p is not None:
                slots[prefix + n] = (mod, n, True)
        for n, b in mod._buffers.items():
            if b is not None and n not in mod._non_persistent_buffers_set:
                slots[prefix + n] = (mod, n, False)
    return slots


def _align_prefix(model, state, slots):
    """The file's names as the model's: a base model's file into a model with
    a head gets the base prefix ("model."), a file with a head into the base
    model loses it, as from_pretrained does."""
    prefix = getattr(model, "base_model_prefix", "")
    if not prefix:
        return state
    p = prefix + "."
    in_file = any(k.startswith(p) for k in state)
    in_model = any(k.startswith(p) for k in slots)
    if in_model and not in_file:
        return {p + k: v for k, v in state.items()}
    if in_file and not in_model:
        return {(k[len(p):] if k.startswith(p) else k): v for k, v in state.items()}
    return state


def _ignorable(model, name):
    """Names from_pretrained leaves out quietly: the model's own patterns, and
    buffers that are computed, not stored (old files hold rotary inv_freq)."""
    import re
    patterns = getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
    if any(re.search(pat, name) for pat in patterns):
        return True
    mname, _, leaf = name.rpartition(".")
    try:
        mod = model.get_submodule(mname)
    except AttributeError:
        return False
    return leaf in getattr(mod, "_non_persistent_buffers_set", ())


def _names(names, limit=8):
    names = sorted(names)
    more = " and %d more" % (len(names) - limit) if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def _assign(torch, slot, name, tensor):
    """load_state_dict(assign=True) for one tensor: the model takes the file's
    tensor itself (its dtype too), not a copy."""
    mod, attr, is_param = slot
    old = getattr(mod, attr)
    if tuple(old.shape) != tuple(tensor.shape):
        raise ValueError("size mismatch for %s: the file has %s, the model %s"
                         % (name, tuple(tensor.shape), tuple(old.shape)))
    if is_param:
        grad = old.requires_grad and (tensor.is_floating_point() or tensor.is_complex())
        tensor = torch.nn.Parameter(tensor, requires_grad=grad)
    setattr(mod, attr, tensor)


def _skip_on_meta(init):
    """torch.nn.init's @init, doing nothing to a tensor on the meta device."""
    def skip(tensor, *args, **kwargs):
        return tensor if getattr(tensor, "is_meta", False) else init(tensor, *args, **kwargs)
    return skip


def _transformers_no_init():
    """transformers' no_init_weights where it is imported: transformers 5's
    (transformers.initialization: its models initialise through its own
    wrappers of torch's initialisers, which it took before anything could
    patch them, so only its no_init_weights, which makes
    PreTrainedModel.init_weights do nothing, skips them), else 4's
    (modeling_utils); None without transformers."""
    for name in ("transformers.initialization", "transformers.modeling_utils"):
        no_init = getattr(_sys.modules.get(name), "no_init_weights", None)
        if no_init is not None:
            return no_init
    return None


class _ParamsOnMeta:
    """Modules made inside get their parameters on the meta device (no memory,
    no initialisation) and their buffers where torch computes them, under a
    default dtype, as from_pretrained makes them. The initialisers of
    torch.nn.init do nothing to tensors on the meta device meanwhile, and
    transformers' models skip their weight initialisation as its
    from_pretrained has them do (its no_init_weights, _transformers_no_init;
    transformers must be imported before, modeling_utils included): on meta
    it only costs time (torch runs it through Python
    decompositions). It patches torch.nn.Module and torch.nn.init for the
    while: modules made meanwhile in other threads are made so too. One
    thread at a time is inside, so each puts back what it found."""

    _lock = _threading.RLock()

    def __init__(self, torch, dtype):
        self.torch, self.dtype = torch, dtype

    def __enter__(self):
        torch = self.torch
        self._lock.acquire()
        self.register = torch.nn.Module.register_parameter
        self.old_dtype = torch.get_default_dtype()
        self.inits, self.no_init = {}, None
        try:
            return self._patch()
        except BaseException:
            self.__exit__(None, None, None)     # what was patched put back
            raise

    def _patch(self):
        torch, register = self.torch, self.register
        self.inits = {n: f for n, f in vars(torch.nn.init).items()
                      if n.endswith("_") and not n.startswith("_") and callable(f)}
        for n, f in self.inits.items():
            setattr(torch.nn.init, n, _skip_on_meta(f))
        no_init = _transformers_no_init()
        if no_init is not None:
            cm = no_init()
            cm.__enter__()
            self.no_init = cm

        def on_meta(module, name, param):
            register(module, name, param)
            if param is not None:
                p = module._parameters[name]
                module._parameters[name] = type(p)(p.to("meta"), requires_grad=p.requires_grad)

        torch.nn.Module.register_parameter = on_meta
        if self.dtype is not None:
            torch.set_default_dtype(self.dtype)
        return self

    def __exit__(self, *exc_info):
        try:
            if self.no_init is not None:
                self.no_init.__exit__(*exc_info)
        finally:
            for n, f in self.inits.items():
                setattr(self.torch.nn.init, n, f)
            self.torch.nn.Module.register_parameter = self.register
            self.torch.set_default_dtype(self.old_dtype)
            self._lock.release()


def _meta_state(torch, model):
    """(module name, module, attribute) of buffers and plain tensor attributes
    (a rotary module's original_inv_freq) on the meta device."""
    found = []
    for mname, mod in model.named_modules():
        for n, b in mod._buffers.items():
            if b is not None and b.is_meta:
                found.append((mname, mod, n))
        for n, v in vars(mod).items():
            if isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter) and v.is_meta:
                found.append((mname, mod, n))
    return found


def _rebuild_buffers(torch, model, target, dtype):
    """What construction computes and no file holds (rotary frequencies): a
    model made on the meta device has it on meta; a twin of the model, its
    parameters on meta, computes it as from_pretrained's construction does.
    Then every buffer goes to the target device."""
    meta = _meta_state(torch, model)
    if meta:
        config = getattr(model, "config", None)
        if config is None:
            raise ValueError("%s on the meta device: load_into rebuilds them for models made from a config "
                             "(transformers); make this model with its buffers on a real device"
                             % _names("%s.%s" % (m, n) if m else n for m, _, n in meta))
        import copy
        with _ParamsOnMeta(torch, dtype):
            twin = type(model)(copy.deepcopy(config))
        twins = dict(twin.named_modules())
        for mname, mod, n in meta:
            value = getattr(twins.get(mname), n, None)
            if not isinstance(value, torch.Tensor) or value.is_meta:
                raise ValueError("%s.%s is on the meta device and a new %s does not compute it"
                                 % (mname, n, type(model).__name__))
            if n in mod._buffers:
                mod._buffers[n] = value.to(target)
            else:
                setattr(mod, n, value.to(target))
    for mod in model.modules():
        for n, b in mod._buffers.items():
            if b is not None and b.device != target:
                mod._buffers[n] = b.to(target)


def _generation_config(model, path):
    """The checkpoint's generation_config.json, as from_pretrained reads it."""
    directory = path if _os.path.isdir(path) else _os.path.dirname(path) if path.endswith(".json") else None
    config = getattr(model, "generation_config", None)
    can_generate = getattr(model, "can_generate", None)
    if directory is None or config is None or not callable(can_generate) or not can_generate():
        return
    if _os.path.isfile(_os.path.join(directory, "generation_config.json")):
        model.generation_config = type(config).from_pretrained(directory)


def _opened_target(torch, native, loaded, device, chunk_bytes):
    """The torch.device of a Model open_model() gave (device, where given,
    must be its GPU)."""
    if chunk_bytes is not None:
        raise ValueError("chunk_bytes: the Model was opened with its own; give chunk_bytes to open_model()")
    gpu, target = _device(torch, native, loaded.gpu_id if device is None else device)
    if gpu != loaded.gpu_id:
        raise ValueError("device %r: the Model %s is on GPU %d" % (device, loaded.path, loaded.gpu_id))
    return target


@_contextlib.contextmanager
def _loading(native, path, gpu, chunk_bytes):
    """The Model of open_model(path, wait=False) for the block, released after
    it: the tensors a model took keep the memory; nothing else does."""
    loaded = native.open_model(path, gpu, chunk_bytes if chunk_bytes is not None else native.DEFAULT_CHUNK_BYTES,
                               wait=False)
    try:
        yield loaded
    finally:
        loaded.release()


def load_into(model, path, *, device=None, chunk_bytes=None, strict=True):
    """Fill a model built on the meta device with a checkpoint, without a copy.

    model: a torch.nn.Module (a transformers model made with
    `with torch.device("meta"): Model(config)` or from_config), its
    parameters on the meta device (or anywhere: they are replaced). path,
    device and chunk_bytes as load_state_dict; or path a Model that
    open_model(..., wait=False) gave, so the load runs while the model is
    built: waited for here, on its own GPU. Every parameter and persistent
    buffer the file holds becomes the file's tensor itself
    (load_state_dict(assign=True): the file's dtypes, zero-copy views of the
    loaded memory), then what from_pretrained also does: a base model's names
    and a model with a head's are matched (base_model_prefix), tied weights
    are tied (model.tie_weights()), buffers construction computes (rotary
    inv_freq) are rebuilt where they are on the meta device and every buffer
    moved to the device, the directory's generation_config.json read, and
    the model put in eval mode. All of this runs while the checkpoint loads;
    the call returns once every byte of it is loaded. Returns the model.

    Errors (the model may be part filled then, or filled with memory a
    failed load left unfinished: do not use it): KeyError for tensors the
    model needs that the file lacks, and with strict=True for tensors of the
    file the model has no place for (strict=False warns and leaves them);
    ValueError for a shape that differs; those of load_state_dict (a load
    that fails after it started is raised by the wait, last)."""
    torch, native = _torch(), _native()
    if isinstance(path, native.Model):
        target = _opened_target(torch, native, path, device, chunk_bytes)
        return _fill(torch, native, model, path, path.path, target, strict)
    path = _os.fsdecode(_os.fspath(path))
    gpu, target = _device(torch, native, device)
    with _loading(native, path, gpu, chunk_bytes) as loaded:
        return _fill(torch, native, model, loaded, path, target, strict)


def _fill(torch, native, model, loaded, path, target, strict):
    """load_into of a Model open_model() gave, loading still: the model takes
    views of its memory and is made ready while the bytes come, then the
    load is waited for. The views are valid memory whatever the load does;
    the model is returned only once they hold the file's bytes."""
    t = _time.monotonic()
    slots = _slots(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    state = _align_prefix(model, _tensors(torch, loaded.tensors), slots)
    unexpected = [k for k in state if k not in slots and not _ignorable(model, k)]
    if unexpected and strict:
        raise KeyError("%s holds %s, which %s has no place for (strict=False leaves them out)"
                       % (path, _names(unexpected), type(model).__name__))
    if unexpected:
        _warnings.warn("%s: left out %s, which %s has no place for" % (path, _names(unexpected), type(model).__name__))
    for name, tensor in state.items():
        if name in slots:
            _assign(torch, slots[name], name, tensor)
    del state
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()
    missing = [n for n, (mod, attr, is_param) in _slots(model).items() if is_param and getattr(mod, attr).is_meta]
    if missing:
        raise KeyError("%s lacks %s, which %s needs" % (path, _names(missing), type(model).__name__))
    _rebuild_buffers(torch, model, target, dtype)
    _generation_config(model, path)
    model.eval()
    native._span("model fill", t)
    t = _time.monotonic()
    loaded.wait()
    native._span("load wait", t)
    return model


def from_pretrained(path, *, device=None, model_class=None, config=None, chunk_bytes=None, strict=True,
                    **model_kwargs):
    """A transformers model from a checkpoint save_pretrained wrote, as
    AutoModelForCausalLM.from_pretrained(path, device_map=device) gives it,
    its parameters zero-copy views of the loaded memory. The load starts
    first (open_model(wait=False)) and runs while the model is built on the
    meta device, then load_into fills it.

    path: a directory (its config.json and shards) or, with config given, a
    file or an index too. device as load_state_dict. model_class: the class
    to build (transformers.AutoModelForCausalLM by default; an Auto class or
    a model class such as LlamaForCausalLM). config: a PretrainedConfig
    (default: AutoConfig.from_pretrained(path)). model_kwargs go to the
    model's construction (from_config): attn_implementation, dtype (the
    default dtype while it is built; the parameters keep the file's dtypes,
    as load_into says). Returns the model in eval mode.

    Errors: those of open_model and load_into, and of transformers for a
    config or class it does not know; the load is released on any of them."""
    torch, native = _torch(), _native()
    gpu, _ = _device(torch, native, device)
    with _loading(native, path, gpu, chunk_bytes) as loaded:
        t = _time.monotonic()
        import transformers
        import transformers.modeling_utils      # for _ParamsOnMeta: the no_init_weights of its models
        if config is None:
            config = transformers.AutoConfig.from_pretrained(_os.fspath(path))
        cls = model_class if model_class is not None else transformers.AutoModelForCausalLM
        dtype = model_kwargs.get("dtype", model_kwargs.get("torch_dtype"))
        with _ParamsOnMeta(torch, dtype if isinstance(dtype, torch.dtype) else None):
            if hasattr(cls, "from_config"):
                model = cls.from_config(config, **model_kwargs)
            else:
                model = cls._from_config(config, **model_kwargs)
        native._span("model build", t)
        return load_into(model, loaded, strict=strict)
