"""The tensors of a TorchScript archive (OpenAI's `.pt` files), read without running any TorchScript.

`torch.jit.load` compiles the archive's code and, while unpickling, runs the `__setstate__` method of every
scripted class that defines one: a crafted archive can write any file the user can write (through
`torch.from_file(path, shared=True)`), among other things. This reader executes nothing from the archive:

- `data.pkl` (the module tree) is unpickled by a restricted unpickler that builds tensors from the archive's
  `data/` records and turns every scripted object into an inert record of its pickled attributes; any other
  global it names is refused.
- The `code/` file of each class met is parsed (`ast.parse`, never compiled or run) for its `__parameters__`
  and `__buffers__`, which say which attributes `module.state_dict()` holds; tensors in other attributes
  (OpenAI's `attn_mask`) are not part of it.
- A scripted class that defines `__setstate__` is refused: its pickled state is whatever its own
  `__getstate__` returned, which only its code could interpret.

The result has the keys and tensors that `torch.jit.load(path).state_dict()` gives for the same archive.
"""

from __future__ import annotations

import ast
import io
import math
import pickle
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clipforge.model.convert import CheckpointError

StateDict = dict[str, torch.Tensor]

_MAX_DEPTH = 100  # module nesting; OpenAI's models are under 10 deep
_MAX_DIMS = 64
# Storage classes named in data.pkl, and the element types they hold.
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
# Helpers that TorchScript's pickler wraps typed lists and dicts in: here they return their argument.
_PASS_THROUGH = {
    "build_intlist",
    "build_doublelist",
    "build_boollist",
    "build_tensorlist",
    "restore_type_tag",
}


def is_torchscript(path: Path) -> bool:
    """A zip archive with TorchScript code or constants (torch.save's zip archives have neither)."""
    try:
        with zipfile.ZipFile(path) as z:
            return any("/code/" in n or n.endswith("/constants.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError, ValueError):
        return False


def read_torchscript(path: str | Path) -> StateDict:
    """`module.state_dict()` of the TorchScript archive at `path`, CPU tensors in their stored dtypes."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as z:
            archive = _Archive(path, z)
            return archive.state_dict(archive.unpickle("data.pkl"))
    except CheckpointError:
        raise
    except Exception as e:  # zipfile, zlib and pickle raise many types on corrupt input
        raise CheckpointError(
            f"{path}: not a readable TorchScript archive ({type(e).__name__}: {e})"
        ) from None


@dataclass(frozen=True)
class _ClassInfo:
    is_module: bool
    parameters: tuple[str, ...]
    buffers: tuple[str, ...]
    has_setstate: bool


class _ScriptObject:
    """An object of a scripted class reduced to its pickled state; nothing of its class is run."""

    qualname = ""

    def __setstate__(self, state: Any) -> None:  # pickle's BUILD: keep the state, interpret nothing
        self.state = state


class _Storage:
    def __init__(self, flat: torch.Tensor) -> None:
        self.flat = flat  # (numel,) of the storage's dtype


class _Archive:
    def __init__(self, path: Path, z: zipfile.ZipFile) -> None:
        self.path, self.zip, self.size = path, z, path.stat().st_size
        prefixes = {n.split("/", 1)[0] for n in z.namelist() if n.count("/") == 1 and n.endswith("/data.pkl")}
        if len(prefixes) != 1:
            raise CheckpointError(
                f"{path}: a TorchScript archive holds one <name>/data.pkl, found {len(prefixes)}"
            )
        self.prefix = prefixes.pop()
        self.classes: dict[str, type[_ScriptObject]] = {}
        self.infos: dict[str, _ClassInfo] = {}
        self.sources: dict[str, ast.Module] = {}
        self.storages: dict[str, _Storage] = {}

    def read(self, name: str) -> bytes:
        try:
            info = self.zip.getinfo(f"{self.prefix}/{name}")
        except KeyError:
            raise CheckpointError(f"{self.path}: the TorchScript archive lacks {name}") from None
        if info.file_size > self.size:  # stored records never exceed the archive: this one would inflate
            raise CheckpointError(f"{self.path}: record {name} inflates beyond the archive's own size")
        return self.zip.read(info)

    def unpickle(self, name: str) -> Any:
        return _Unpickler(io.BytesIO(self.read(name)), self).load()

    # --- what data.pkl may name --------------------------------------------------------------------------

    def script_class(self, qualname: str) -> type[_ScriptObject]:
        if qualname not in self.classes:
            self.classes[qualname] = type("ScriptObject", (_ScriptObject,), {"qualname": qualname})
        return self.classes[qualname]

    def storage(self, pid: Any) -> _Storage:
        ok = isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
        if (
            not ok
            or not isinstance(pid[1], torch.dtype)
            or not isinstance(pid[2], str)
            or not _is_count(pid[4])
        ):
            raise CheckpointError(f"{self.path}: data.pkl refers to an unknown persistent object {pid!r:.80}")
        _, dtype, key, _location, numel = pid  # the location is ignored: everything is read onto the CPU
        if key not in self.storages:
            data = self.read(f"data/{key}")
            nbytes = numel * dtype.itemsize
            if len(data) < nbytes:
                raise CheckpointError(
                    f"{self.path}: record data/{key} holds {len(data)} bytes, {numel} {dtype} need {nbytes}"
                )
            flat = (
                torch.frombuffer(bytearray(data[:nbytes]), dtype=dtype)
                if nbytes
                else torch.empty(0, dtype=dtype)
            )
            self.storages[key] = _Storage(flat)
        storage = self.storages[key]
        if storage.flat.dtype != dtype or storage.flat.numel() < numel:
            raise CheckpointError(f"{self.path}: record data/{key} is read as two different storages")
        return storage

    def rebuild_tensor(
        self, storage: Any, offset: Any, size: Any, stride: Any, _grad: Any, _hooks: Any, _meta: Any = None
    ) -> torch.Tensor:
        """torch._utils._rebuild_tensor_v2 with every number checked against the storage it views."""
        dims_ok = (
            isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride) <= _MAX_DIMS
        )
        if not (isinstance(storage, _Storage) and _is_count(offset) and dims_ok):
            raise CheckpointError(f"{self.path}: malformed tensor record in data.pkl")
        if not all(_is_count(n) for n in (*size, *stride)):
            raise CheckpointError(
                f"{self.path}: tensor with a negative or non-integer size {size} / stride {stride}"
            )
        numel, capacity = math.prod(size), storage.flat.numel()
        end = offset + sum((n - 1) * s for n, s in zip(size, stride)) + 1 if numel else offset
        if end > capacity or numel > capacity:  # out of bounds, or overlapping views that inflate when copied
            raise CheckpointError(
                f"{self.path}: tensor of size {size}, stride {stride}, offset {offset} does not fit its "
                f"storage of {capacity} elements"
            )
        return storage.flat.as_strided(size, stride, offset)

    # --- the module tree ---------------------------------------------------------------------------------

    def class_info(self, qualname: str) -> _ClassInfo:
        if qualname not in self.infos:
            module, _, name = qualname.rpartition(".")
            source = self.source(module.replace(".", "/") + ".py")
            found = [n for n in source.body if isinstance(n, ast.ClassDef) and n.name == name]
            if not found:
                raise CheckpointError(f"{self.path}: the archive's code does not define {qualname}")
            self.infos[qualname] = _class_info(found[0])
        return self.infos[qualname]

    def source(self, file: str) -> ast.Module:
        if file not in self.sources:
            try:
                self.sources[file] = ast.parse(self.read(f"code/{file}").decode("utf-8"), filename=file)
            except (SyntaxError, ValueError, UnicodeDecodeError) as e:
                raise CheckpointError(
                    f"{self.path}: unreadable TorchScript code in code/{file} ({e})"
                ) from None
        return self.sources[file]

    def state_dict(self, root: Any) -> StateDict:
        out: StateDict = {}
        self._collect(root, "", 0, out, set())
        return out

    def _collect(self, obj: Any, prefix: str, depth: int, out: StateDict, seen: set[int]) -> None:
        """Parameters, then buffers, then submodules, in attribute order: the order of state_dict()."""
        if depth > _MAX_DEPTH:
            raise CheckpointError(f"{self.path}: modules nested more than {_MAX_DEPTH} deep")
        name = prefix.rstrip(".") or "the root object"
        info = self.class_info(obj.qualname) if isinstance(obj, _ScriptObject) else None
        if info is None or not info.is_module:
            raise CheckpointError(f"{self.path}: {name} is not a scripted module")
        if info.has_setstate:
            raise CheckpointError(
                f"{self.path}: {name} ({obj.qualname}) defines __setstate__, code that torch.jit.load would "
                "run while loading; clipforge runs no code from checkpoints, so it cannot read this archive"
            )
        state = getattr(obj, "state", None)
        if not isinstance(state, dict):
            raise CheckpointError(f"{self.path}: {name} ({obj.qualname}) has no attribute table")
        seen.add(id(obj))
        for attr in (*info.parameters, *info.buffers):
            value = state.get(attr)
            if value is not None and not isinstance(value, torch.Tensor):
                raise CheckpointError(
                    f"{self.path}: {prefix}{attr} is declared a tensor but holds {type(value).__name__}"
                )
            if value is not None:
                out[prefix + attr] = value.detach()  # a fresh tensor: no hooks or flags the pickle set
        for attr, value in state.items():
            if (
                isinstance(value, _ScriptObject)
                and id(value) not in seen
                and self.class_info(value.qualname).is_module
            ):
                self._collect(value, f"{prefix}{attr}.", depth + 1, out, seen)


class _Unpickler(pickle.Unpickler):
    """Builds tensors, storages and inert scripted objects; refuses every other global."""

    def __init__(self, file: io.BytesIO, archive: _Archive) -> None:
        super().__init__(file)
        self.archive = archive

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            return self.archive.script_class(f"{module}.{name}")
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return self.archive.rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) == ("collections", "OrderedDict"):  # a tensor's (empty) backward hooks
            return OrderedDict
        if module == "torch.jit._pickle" and name in _PASS_THROUGH:
            return self.pass_through
        raise CheckpointError(
            f"{self.archive.path}: data.pkl names {module}.{name}, which a module's tensors never need; refusing it"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        return self.archive.storage(pid)

    # Bound methods, like every callable handed to the pickle: BUILD cannot set attributes on them.
    def pass_through(self, value: Any, *_type: Any) -> Any:
        return value


def _class_info(node: ast.ClassDef) -> _ClassInfo:
    lists: dict[str, tuple[str, ...]] = {}
    for stmt in node.body:
        if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
            value = stmt.value
            if isinstance(value, (ast.List, ast.Tuple)) and all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in value.elts
            ):
                lists[stmt.targets[0].id] = tuple(e.value for e in value.elts)
    return _ClassInfo(
        is_module=any(isinstance(b, ast.Name) and b.id == "Module" for b in node.bases),
        parameters=lists.get("__parameters__", ()),
        buffers=lists.get("__buffers__", ()),
        has_setstate=any(isinstance(s, ast.FunctionDef) and s.name == "__setstate__" for s in node.body),
    )


def _is_count(n: Any) -> bool:
    return type(n) is int and n >= 0
