"""Type stubs of aegaeon_native.torch: models as torch tensors (docs/python.md)."""
import os
from typing import Dict, Optional, TypeVar, Union

import torch

_Path = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]
_Device = Union[None, int, str, torch.device]
_Module = TypeVar("_Module", bound=torch.nn.Module)


def load_state_dict(path: _Path, device: _Device = ..., *, chunk_bytes: Optional[int] = ...) -> Dict[str, torch.Tensor]: ...
def load_into(model: _Module, path: _Path, *, device: _Device = ..., chunk_bytes: Optional[int] = ...,
              strict: bool = ...) -> _Module: ...
