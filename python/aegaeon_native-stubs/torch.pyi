"""Type stubs of aegaeon_native.torch: models as torch tensors (docs/python.md)."""
import os
from typing import Any, Dict, Literal, Mapping, Optional, Sequence, Tuple, TypeVar, Union

import torch

from . import Model

_Path = Union[str, bytes, "os.PathLike[str]", "os.PathLike[bytes]"]
_Device = Union[None, int, str, torch.device]
_Module = TypeVar("_Module", bound=torch.nn.Module)
_Dim = Union[int, None, Literal["whole"]]
_Rules = Union[Sequence[Tuple[str, _Dim]], Mapping[str, _Dim]]


def load_state_dict(path: _Path, device: _Device = ..., *, chunk_bytes: Optional[int] = ...,
                    tp_rank: Optional[int] = ..., tp_world: Optional[int] = ..., tp_preset: Optional[str] = ...,
                    tp_rules: Optional[_Rules] = ..., tp_uneven: bool = ...) -> Dict[str, torch.Tensor]: ...
def load_into(model: _Module, path: Union[_Path, Model], *, device: _Device = ...,
              chunk_bytes: Optional[int] = ..., strict: bool = ...) -> _Module: ...
def from_pretrained(path: _Path, *, device: _Device = ..., model_class: Any = ..., config: Any = ...,
                    chunk_bytes: Optional[int] = ..., strict: bool = ..., **model_kwargs: Any) -> torch.nn.Module: ...
