"""Reading tensors without torch or onnx: safetensors files (LoRA), and the initializers of an ONNX graph.

safetensors: 8 bytes of header length, a JSON header (name -> dtype, shape, byte range), then the data.
ONNX: a protobuf ModelProto; `onnx_initializers` walks only the fields on the path to each initializer
(ModelProto.graph = 7, GraphProto.initializer = 5; TensorProto dims = 1, data_type = 2, float_data = 4, name = 8,
raw_data = 9, external_data = 13, data_location = 14) and maps their bytes, in the graph file or its data file.
"""

from __future__ import annotations

import json
import mmap
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import EdgesdError

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bf16", "I64": np.int64,
                       "I32": np.int32}


def read_safetensors(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors as float32 / int arrays, the header's __metadata__)."""
    path = Path(path)
    try:
        data = path.read_bytes()
        length = int.from_bytes(data[:8], "little")
        if not 2 <= length <= len(data) - 8:
            raise ValueError("bad header length")
        header = json.loads(data[8:8 + length])
        body = memoryview(data)[8 + length:]
        tensors = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            start, end = entry["data_offsets"]
            dtype = _SAFETENSORS_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {name} has unsupported dtype {entry['dtype']}")
            if dtype == "bf16":  # the upper half of a float32
                raw = np.frombuffer(body[start:end], np.uint16).astype(np.uint32) << 16
                array = raw.view(np.float32)
            else:
                array = np.frombuffer(body[start:end], dtype)
            tensors[name] = array.reshape(entry["shape"]).astype(np.float32 if array.dtype.kind == "f" else array.dtype)
        return tensors, dict(header.get("__metadata__") or {})
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EdgesdError(f"cannot read '{path}' as safetensors ({str(e)[:100]})",
                          "the file is corrupt or not a .safetensors file") from None


# ONNX TensorProto.DataType -> NumPy
_ONNX_DTYPES = {1: np.float32, 10: np.float16, 11: np.float64, 6: np.int32, 7: np.int64}


def _varint(buf, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf, start: int, end: int):
    """(field number, wire type, value or (start, end) of a length-delimited field) of one message."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
            yield number, wire, value
        elif wire == 2:
            length, pos = _varint(buf, pos)
            yield number, wire, (pos, pos + length)
            pos += length
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            raise ValueError(f"protobuf wire type {wire}")


def _graph_range(buf) -> tuple[int, int] | None:
    """Where ModelProto.graph (field 7) lies in the file, or None."""
    return next((v for n, w, v in _fields(buf, 0, len(buf)) if n == 7 and w == 2), None)


@dataclass(frozen=True)
class Initializer:
    name: str
    dims: tuple[int, ...]
    dtype: np.dtype
    file: Path  # where the bytes are: the graph file or its external data file
    offset: int
    length: int

    def read(self) -> np.ndarray:
        out = np.empty(self.dims, self.dtype)
        if out.nbytes != self.length:
            raise EdgesdError(f"{self.file}: weight {self.name} has {self.length} bytes, its shape needs {out.nbytes}",
                              "re-export the model")
        with open(self.file, "rb") as f:
            f.seek(self.offset)
            f.readinto(memoryview(out.reshape(-1)).cast("B"))  # straight into the array: one copy in memory
        return out


def onnx_initializers(path: Path, names: set[str] | None = None) -> dict[str, Initializer]:
    """Where each initializer's bytes are (only `names`, when given)."""
    path = Path(path)
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            graph = _graph_range(buf)
            if graph is None:
                raise ValueError("no graph")
            found = {}
            for number, wire, value in _fields(buf, *graph):
                if number != 5 or wire != 2:
                    continue
                init = _initializer(buf, *value, path)
                if init is not None and (names is None or init.name in names):
                    found[init.name] = init
            return found
    except (OSError, ValueError, IndexError) as e:
        raise EdgesdError(f"cannot read the weights of {path} ({e})", "re-export the model") from None


def _inside(graph: Path, location: str) -> Path:
    """The external data file `location` names: relative, inside the graph's own folder, no symlink on the way."""
    folder = graph.parent.resolve()
    lexical = Path(os.path.normpath(folder / location))
    if Path(location).is_absolute() or not lexical.is_relative_to(folder) or lexical.resolve() != lexical:
        raise ValueError(f"its weights point outside its folder ({location!r})")
    return lexical


def _initializer(buf, start: int, end: int, path: Path) -> Initializer | None:
    dims, dtype, name, data, external, location = [], None, "", None, {}, 0
    for number, wire, value in _fields(buf, start, end):
        if number == 1 and wire == 0:
            dims.append(value)
        elif number == 1 and wire == 2:  # packed dims
            pos, stop = value
            while pos < stop:
                dim, pos = _varint(buf, pos)
                dims.append(dim)
        elif number == 2:
            dtype = value
        elif number == 8:
            name = bytes(buf[value[0]:value[1]]).decode()
        elif number in (9, 4) and wire == 2:  # raw_data, or packed float_data (little-endian float32 too)
            data = value
        elif number == 13:
            entry = dict((n, bytes(buf[s:e]).decode()) for n, _, (s, e) in _fields(buf, *value))
            external[entry.get(1)] = entry.get(2)
        elif number == 14:
            location = value
    if dtype not in _ONNX_DTYPES:
        return None
    if location == 1:  # external data
        file = _inside(path, external.get("location") or "")
        length = int(external.get("length", 0)) or int(np.prod(dims)) * np.dtype(_ONNX_DTYPES[dtype]).itemsize
        return Initializer(name, tuple(dims), np.dtype(_ONNX_DTYPES[dtype]), file, int(external.get("offset", 0)), length)
    if data is None:
        return None
    return Initializer(name, tuple(dims), np.dtype(_ONNX_DTYPES[dtype]), path, data[0], data[1] - data[0])


def _external_locations(buf, start: int, end: int, found: list[str]) -> None:
    """Every external-data location in a GraphProto: initializers (5), sparse initializers (15), and the
    tensors and subgraphs in node attributes (node 1 -> attribute 5 -> t 5, tensors 10, g 6, graphs 11)."""
    def tensor(s: int, e: int) -> None:
        for number, wire, value in _fields(buf, s, e):
            if number == 13 and wire == 2:
                entry = dict((n, bytes(buf[a:b]).decode(errors="replace")) for n, _, (a, b) in _fields(buf, *value))
                if entry.get(1) == "location":
                    found.append(entry.get(2, ""))

    for number, wire, value in _fields(buf, start, end):
        if wire != 2:
            continue
        if number == 5:
            tensor(*value)
        elif number == 15:  # SparseTensorProto: values 1, indices 2
            for n, w, v in _fields(buf, *value):
                if n in (1, 2) and w == 2:
                    tensor(*v)
        elif number == 1:  # NodeProto
            for n, w, v in _fields(buf, *value):
                if n != 5 or w != 2:
                    continue
                for an, aw, av in _fields(buf, *v):  # AttributeProto
                    if aw == 2 and an in (5, 10):
                        tensor(*av)
                    elif aw == 2 and an in (6, 11):
                        _external_locations(buf, *av, found)


def check_graph_files(path: Path) -> None:
    """Refuse a graph that would make a backend read outside its folder: the graph file (or an IR's .bin) a
    symlink, or an ONNX external-data location absolute, climbing out or through a symlink."""
    path = Path(path)
    companions = [path.with_suffix(".bin")] if path.suffix == ".xml" else []
    for file in (path, *companions):
        if file.is_symlink():
            raise EdgesdError(f"{file} is a symbolic link; edgesd reads no graph through one",
                              "copy the file itself into the model folder")
    if path.suffix != ".onnx":
        return
    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            graph = _graph_range(buf)
            locations: list[str] = []
            if graph is not None:
                _external_locations(buf, *graph, locations)
    except (OSError, ValueError, IndexError):
        return  # not parseable here: the backend reports the broken file
    for location in dict.fromkeys(locations):
        try:
            _inside(path, location)
        except ValueError as e:
            raise EdgesdError(f"{path}: {e}; edgesd reads weights only from the graph's own folder",
                              "use a model folder whose weights are files beside its graphs") from None


# TensorProto.DataType names edgesd prints (edgesd info)
ONNX_TYPE_NAMES = {1: "float", 2: "uint8", 3: "int8", 6: "int32", 7: "int64", 9: "bool", 10: "float16", 11: "double",
                   16: "bfloat16", 21: "uint4", 22: "int4"}


@dataclass(frozen=True)
class GraphSignature:
    inputs: list[dict]  # {"name", "dtype", "shape"}
    outputs: list[dict]
    weight_elements: dict[int, int]  # TensorProto data type -> elements of initializers of that type


def _value_info(buf, start: int, end: int) -> dict:
    """ValueInfoProto: name 1, type 2 -> TypeProto.tensor_type 1 -> elem_type 1, shape 2 -> dim 1 ->
    dim_value 1 / dim_param 2."""
    name, elem, shape = "", 0, []
    for number, wire, value in _fields(buf, start, end):
        if number == 1 and wire == 2:
            name = bytes(buf[value[0]:value[1]]).decode(errors="replace")
        elif number == 2 and wire == 2:
            for n, w, v in _fields(buf, *value):
                if n != 1 or w != 2:
                    continue
                for tn, tw, tv in _fields(buf, *v):
                    if tn == 1 and tw == 0:
                        elem = tv
                    elif tn == 2 and tw == 2:
                        for dn, dw, dv in _fields(buf, *tv):
                            if dn != 1 or dw != 2:
                                continue
                            dim: int | str = "?"
                            for xn, xw, xv in _fields(buf, *dv):
                                dim = xv if xn == 1 and xw == 0 else \
                                    bytes(buf[xv[0]:xv[1]]).decode(errors="replace") if xn == 2 and xw == 2 else dim
                            shape.append(dim)
    return {"name": name, "dtype": ONNX_TYPE_NAMES.get(elem, str(elem)), "shape": shape}


def onnx_signature(path: Path) -> GraphSignature:
    """A graph's inputs, outputs and weight types, read from the file without onnx (edgesd info)."""
    path = Path(path)
    try:
        if path.stat().st_size == 0:
            raise ValueError("the file is empty")
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            graph = _graph_range(buf)
            if graph is None:
                raise ValueError("no graph in the file")
            inputs, outputs, weights = [], [], {}
            for number, wire, value in _fields(buf, *graph):
                if wire != 2:
                    continue
                if number == 11:
                    inputs.append(_value_info(buf, *value))
                elif number == 12:
                    outputs.append(_value_info(buf, *value))
                elif number == 5:
                    dims, dtype = [], 1
                    for n, w, v in _fields(buf, *value):
                        if n == 1 and w == 0:
                            dims.append(v)
                        elif n == 1 and w == 2:
                            pos, stop = v
                            while pos < stop:
                                d, pos = _varint(buf, pos)
                                dims.append(d)
                        elif n == 2 and w == 0:
                            dtype = v
                    weights[dtype] = weights.get(dtype, 0) + int(np.prod(dims))
            return GraphSignature(inputs, outputs, weights)
    except (OSError, ValueError, IndexError) as e:
        raise EdgesdError(f"{path} is not a readable ONNX graph ({e})", "re-export the model") from None
