"""Read PyTorch checkpoint archives (torch.save and TorchScript) without torch.

PyTorch's zip archives hold one pickle (`<name>/data.pkl`) plus one raw little-endian
record per tensor storage (`<name>/data/<key>`). Unpickling them with `pickle` or
`torch.load` runs whatever callables the file names, so a downloaded checkpoint could
run arbitrary code. This module instead uses an unpickler whose `find_class` knows an
explicit whitelist:

- `collections.OrderedDict` (state dicts, tensor hooks),
- `torch._utils._rebuild_tensor_v2` / `_rebuild_parameter[_with_state]`, mapped to numpy
  builders here,
- `torch.<Dtype>Storage` names, mapped to dtype markers,
- `torch.jit._pickle.build_*list` / `restore_type_tag` (TorchScript containers),
- for TorchScript archives only, `__torch__.*` module classes, mapped to an
  attribute-holding stub (`ScriptObject`) that runs none of the module's code.

Anything else raises `UnsafePickleError` naming the refused global.

Public API:
  load_state_dict(path)         -> {name: np.ndarray}  (a torch.save'd state dict)
  load_torchscript_params(path) -> {dotted.name: np.ndarray}, as `module.state_dict()`
  load_archive(path)            -> the unpickled object tree (tensors as np.ndarray)
"""

from __future__ import annotations

import ast
import collections
import io
import pickle
import re
import zipfile
from typing import Any

import ml_dtypes
import numpy as np
from etils import epath

__all__ = [
    "ScriptObject",
    "UnsafePickleError",
    "load_archive",
    "load_state_dict",
    "load_torchscript_params",
]


class UnsafePickleError(pickle.UnpicklingError):
    """The archive's pickle names a global outside the whitelist."""


# torch storage class name -> numpy dtype (byte order applied per archive).
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16),
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64),
    "ComplexDoubleStorage": np.dtype(np.complex128),
}


class _StorageType:
    """Stands in for `torch.FloatStorage` etc.: only carries the element dtype."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]

    def __repr__(self):
        return f"torch.{self.name}"


class ScriptObject:
    """Stub for a TorchScript class instance: holds the pickled attributes, runs nothing.

    `torch_type` is the qualified TorchScript class name, e.g.
    `__torch__.torch.nn.modules.linear.Linear`; `attributes` maps attribute names to
    values (numpy arrays, nested ScriptObjects, ints, lists, ...).
    """

    torch_type = "__torch__"

    def __new__(cls, *args):
        # TorchScript pickles create modules with NEWOBJ (cls.__new__ only), then BUILD.
        obj = super().__new__(cls)
        obj.attributes = {}
        obj.init_args = args
        return obj

    def __setstate__(self, state):
        # TorchScript modules pickle their attributes as one dict; custom classes with a
        # __getstate__ pickle anything, which is kept as-is.
        if isinstance(state, dict):
            self.attributes = dict(state)
        else:
            self.attributes = {"__state__": state}

    def __repr__(self):
        return f"ScriptObject({self.torch_type}, attributes={sorted(self.attributes)})"


def _rebuild_tensor(storage, storage_offset, size, stride, *unused_args):
    """Numpy version of torch._utils._rebuild_tensor_v2: a strided view, copied."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in rank")
    if any(s < 0 for s in size) or any(s < 0 for s in stride) or storage_offset < 0:
        raise pickle.UnpicklingError(f"negative tensor size/stride/offset: {size} {stride}")
    if 0 in size:
        return np.zeros(size, storage.dtype)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True))
    if last >= storage.size:
        raise pickle.UnpicklingError(
            f"tensor view (offset {storage_offset}, size {size}, stride {stride}) "
            f"reads past its storage of {storage.size} elements"
        )
    item = storage.itemsize
    view = np.lib.stride_tricks.as_strided(
        storage[storage_offset:], shape=size, strides=tuple(s * item for s in stride)
    )
    # Native byte order, own memory: views of one storage must not alias each other.
    return np.array(view, dtype=storage.dtype.newbyteorder("="), order="C", copy=True)


def _rebuild_parameter(data, *unused_args):
    return data


def _identity(value, *unused_args):
    return value


def _build_list(items):
    return list(items)


_TORCH_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.jit._pickle", "build_intlist"): _build_list,
    ("torch.jit._pickle", "build_doublelist"): _build_list,
    ("torch.jit._pickle", "build_boollist"): _build_list,
    ("torch.jit._pickle", "build_tensorlist"): _build_list,
    ("torch.jit._pickle", "build_genericlist"): _build_list,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler resolving only whitelisted globals and storages from the archive."""

    def __init__(
        self,
        file,
        archive: zipfile.ZipFile,
        prefix: str,
        byteorder: str,
        allow_script_classes: bool,
    ):
        super().__init__(file)
        self._archive = archive
        self._prefix = prefix
        self._byteorder = byteorder
        self._allow_script_classes = allow_script_classes
        self._storages: dict[str, np.ndarray] = {}
        self._script_classes: dict[str, type] = {}

    def find_class(self, module, name):
        if (module, name) in _TORCH_GLOBALS:
            return _TORCH_GLOBALS[(module, name)]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if self._allow_script_classes and (
            module == "__torch__" or module.startswith("__torch__.")
        ):
            qualname = f"{module}.{name}"
            if qualname not in self._script_classes:
                self._script_classes[qualname] = type(
                    name, (ScriptObject,), {"torch_type": qualname}
                )
            return self._script_classes[qualname]
        raise UnsafePickleError(
            f"refusing to load global '{module}.{name}': only tensors, storages, OrderedDict "
            "and TorchScript module attributes are allowed (this file may contain code, "
            "or a whole pickled nn.Module; save model.state_dict() instead)"
        )

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        key = str(key)
        if key not in self._storages:
            dtype = storage_type.dtype.newbyteorder("<" if self._byteorder == "little" else ">")
            try:
                raw = self._archive.read(f"{self._prefix}/data/{key}")
            except KeyError as e:
                raise pickle.UnpicklingError(f"storage record data/{key} missing") from e
            if len(raw) < numel * dtype.itemsize:
                raise pickle.UnpicklingError(
                    f"storage data/{key} holds {len(raw)} bytes, needs {numel} x {dtype}"
                )
            self._storages[key] = np.frombuffer(raw, dtype=dtype, count=numel)
        return self._storages[key]


def _open_archive(path: epath.PathLike) -> tuple[zipfile.ZipFile, str]:
    """Opens a PyTorch zip archive; returns it and its record prefix (`<name>`).

    The file is read whole, through epath (a local path or gs://): zipfile needs a file
    it can seek, and the tensors are copied out of it anyway.
    """
    path = epath.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such PyTorch archive: {path}")
    data = io.BytesIO(path.read_bytes())
    if not zipfile.is_zipfile(data):
        raise ValueError(
            f"{path} is not a zip archive: only the torch.save format of PyTorch >= 1.6 "
            "and TorchScript files are supported (re-save with a recent torch.save)"
        )
    archive = zipfile.ZipFile(data)
    prefixes = [n[: -len("/data.pkl")] for n in archive.namelist() if n.endswith("/data.pkl")]
    prefixes = [p for p in prefixes if "/" not in p]
    if len(prefixes) != 1:
        archive.close()
        raise ValueError(f"{path}: expected one '<name>/data.pkl' record, found {prefixes}")
    return archive, prefixes[0]


def _load(path, allow_script_classes: bool) -> tuple[Any, zipfile.ZipFile, str]:
    archive, prefix = _open_archive(path)
    names = set(archive.namelist())
    byteorder = "little"
    if f"{prefix}/byteorder" in names:
        byteorder = archive.read(f"{prefix}/byteorder").decode().strip()
        if byteorder not in ("little", "big"):
            raise ValueError(f"{path}: unknown byteorder record {byteorder!r}")
    with archive.open(f"{prefix}/data.pkl") as f:
        obj = _RestrictedUnpickler(f, archive, prefix, byteorder, allow_script_classes).load()
    return obj, archive, prefix


def load_archive(path: epath.PathLike, allow_script_classes: bool = True) -> Any:
    """Unpickles the archive's data.pkl; tensors become numpy arrays, modules ScriptObjects."""
    obj, archive, _ = _load(path, allow_script_classes)
    archive.close()
    return obj


def _flatten(tree: Any, prefix: str, out: dict[str, np.ndarray]) -> None:
    if isinstance(tree, dict):
        for key, value in tree.items():
            _flatten(value, f"{prefix}{key}.", out)
    elif isinstance(tree, np.ndarray):
        out[prefix[:-1]] = tree
    else:
        raise TypeError(
            f"state dict entry '{prefix[:-1]}' is a {type(tree).__name__}, not a tensor"
        )


def load_state_dict(path: epath.PathLike) -> dict[str, np.ndarray]:
    """Reads a torch.save'd state dict (.bin/.pt/.pth) without torch.

    Returns {name: array} with arrays in the saved shape and dtype (bfloat16 via
    ml_dtypes). Nested dicts are flattened with dotted names; non-tensor leaves raise.
    """
    obj = load_archive(path, allow_script_classes=False)
    if not isinstance(obj, dict):
        raise TypeError(f"{path} holds a {type(obj).__name__}, not a state dict")
    out: dict[str, np.ndarray] = {}
    _flatten(obj, "", out)
    return out


_CLASS_RE = re.compile(r"^class (\w+)\(Module\):\n((?:  .*\n)*)", re.MULTILINE)
_DECL_RE = re.compile(r"^  (__parameters__|__buffers__) = (\[.*\])$", re.MULTILINE)


def _state_names(archive: zipfile.ZipFile, prefix: str, qualname: str) -> list[str] | None:
    """Parameter + buffer names that the archive's TorchScript source declares for a class.

    Class `__torch__.a.b.C` is defined in `code/__torch__/a/b.py` (the top-level package
    in `code/__torch__.py`). The source is only read as text, never executed.
    """
    module, _, cls = qualname.rpartition(".")
    try:
        source = archive.read(f"{prefix}/code/{module.replace('.', '/')}.py").decode()
    except KeyError:
        return None
    for match in _CLASS_RE.finditer(source):
        if match.group(1) == cls:
            decls = dict(_DECL_RE.findall(match.group(2)))
            return [
                *ast.literal_eval(decls.get("__parameters__", "[]")),
                *ast.literal_eval(decls.get("__buffers__", "[]")),
            ]
    return None


def load_torchscript_params(path: epath.PathLike) -> dict[str, np.ndarray]:
    """Reads a TorchScript module's parameters and buffers without torch.

    Returns {dotted.name: array}, the same names as `torch.jit.load(path).state_dict()`.
    Tensors that are plain attributes (neither parameter nor buffer) are left out, as in
    state_dict(); if a class's source is missing from the archive, all of its tensor
    attributes are kept.
    """
    root, archive, prefix = _load(path, allow_script_classes=True)
    if not isinstance(root, ScriptObject):
        archive.close()
        raise TypeError(f"{path} is not a TorchScript module archive (root: {type(root)})")
    names_cache: dict[str, list[str] | None] = {}
    out: dict[str, np.ndarray] = {}

    def visit(obj: ScriptObject, prefix_name: str) -> None:
        if obj.torch_type not in names_cache:
            names_cache[obj.torch_type] = _state_names(archive, prefix, obj.torch_type)
        declared = names_cache[obj.torch_type]
        for attr, value in obj.attributes.items():
            if isinstance(value, ScriptObject):
                visit(value, f"{prefix_name}{attr}.")
            elif isinstance(value, np.ndarray) and (declared is None or attr in declared):
                out[f"{prefix_name}{attr}"] = value

    visit(root, "")
    archive.close()
    return out
