"""The Open Inference Protocol's wire format (KServe v2 / Triton HTTP): its JSON bodies, and tensors as JSON
lists or as raw bytes after the JSON (the binary tensor data extension).

A request body is a JSON object; with the extension, raw tensor bytes follow it, and the
``Inference-Header-Content-Length`` header says where the JSON ends. An input carries either ``data`` (its
elements, flat in row-major order or nested to its shape) or ``parameters.binary_data_size`` (its byte count
in the binary part; inputs take their bytes in the order they are listed). Raw bytes are little-endian and
row-major. An output is sent as raw bytes when its ``parameters.binary_data`` is true, or, when it says
nothing, when the request's ``parameters.binary_data_output`` is; the response then carries the same header.

Everything a client can get wrong raises ``InvalidTensor`` (400) with a message naming the tensor; nothing is
allocated from a client's shape before the bytes or elements that fill it have been counted.
"""

import math
import zlib
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import orjson
from pydantic import BaseModel, ConfigDict, Field

from service.api.inputs import validated
from service.core.errors import InvalidTensor, MalformedBody, RequestTooLarge, UnsupportedMediaType

HEADER_LENGTH = "inference-header-content-length"
BINARY = "application/octet-stream"
# The protocol's datatypes this server reads or writes, as little-endian numpy dtypes (BYTES and BF16 it
# neither takes nor gives).
DTYPES = {
    "BOOL": np.dtype("?"), "UINT8": np.dtype("u1"), "UINT16": np.dtype("<u2"), "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"), "INT8": np.dtype("i1"), "INT16": np.dtype("<i2"), "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"), "FP16": np.dtype("<f2"), "FP32": np.dtype("<f4"), "FP64": np.dtype("<f8"),
}
DATATYPES = {dtype.newbyteorder("="): name for name, dtype in DTYPES.items()}

Parameters = Dict[str, Any]


# -- the JSON bodies (they also define /openapi.json) ---------------------------------------------------------
# Strict: a shape of ["2"] or a name of 5 is refused, not coerced; unknown keys (other servers' extensions) pass.
_REQUEST = ConfigDict(extra="ignore", strict=True)


class TensorIn(BaseModel):
    model_config = _REQUEST
    name: str
    shape: List[int] = Field(description="Dimensions; their product is the element count.")
    datatype: str = Field(description="BOOL, UINT8 ... INT64, FP16, FP32, FP64.")
    parameters: Optional[Parameters] = Field(None, description="binary_data_size: the tensor's bytes after the JSON.")
    data: Optional[List[Any]] = Field(None, description="Elements, flat in row-major order or nested to the shape; "
                                                        "absent when binary_data_size is given.")


class OutputIn(BaseModel):
    model_config = _REQUEST
    name: str
    parameters: Optional[Parameters] = Field(None, description="binary_data: send this output as raw bytes.")


class InferenceRequestIn(BaseModel):
    model_config = _REQUEST
    id: Optional[str] = None
    parameters: Optional[Parameters] = Field(None, description="binary_data_output, and the model's own.")
    inputs: List[TensorIn] = Field(min_length=1)
    outputs: Optional[List[OutputIn]] = Field(None, description="Only these outputs; absent: all of them.")


class TensorOut(BaseModel):
    name: str
    datatype: str
    shape: List[int]
    parameters: Optional[Parameters] = None
    data: Optional[List[Any]] = Field(None, description="Flat, row-major; absent for a binary output.")


class InferenceResponseOut(BaseModel):
    model_name: str
    model_version: Optional[str] = None
    id: Optional[str] = None
    parameters: Optional[Parameters] = None
    outputs: List[TensorOut]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: List[int] = Field(description="-1: any size.")


class ModelMetadataOut(BaseModel):
    name: str
    versions: List[str]
    platform: str
    inputs: List[TensorMetadata]
    outputs: List[TensorMetadata]


class ServerMetadataOut(BaseModel):
    name: str
    version: str
    extensions: List[str]


class LiveOut(BaseModel):
    live: bool


class ReadyOut(BaseModel):
    ready: bool


class ModelReadyOut(BaseModel):
    name: str
    ready: bool


class ProtocolError(BaseModel):
    error: str


# -- tensors ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class InferInput:
    """One input as the request gave it: its elements as JSON values (``data``) or raw bytes (``raw``)."""

    name: str
    datatype: str
    shape: Tuple[int, ...]
    data: Optional[List[Any]] = None
    raw: Optional[memoryview] = None

    @property
    def count(self) -> int:
        return math.prod(self.shape)

    def as_numpy(self) -> np.ndarray:
        """The tensor as an array of its shape and datatype (native byte order)."""
        dtype = DTYPES[self.datatype]
        if self.raw is not None:  # its byte count was checked against the shape when the request was split
            return np.frombuffer(self.raw, dtype=dtype).reshape(self.shape).astype(dtype.newbyteorder("="))
        return _from_json(self, dtype)


@dataclass(frozen=True)
class InferRequest:
    id: Optional[str]
    parameters: Parameters
    inputs: Dict[str, InferInput]
    outputs: Optional[Dict[str, bool]]  # requested output -> binary; None: every output
    binary_output: bool  # parameters.binary_data_output: how outputs that do not say are sent


def decoded_body(body: bytes, encoding: Optional[str], limit: int) -> bytes:
    """The body before its Content-Encoding (gzip or deflate: what tritonclient compresses with), refused once
    it passes ``limit`` bytes: a few KB of gzip can inflate to gigabytes."""
    encoding = (encoding or "identity").strip().lower()
    if encoding == "identity":
        return body
    wbits = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}.get(encoding)
    if wbits is None:
        raise UnsupportedMediaType(f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or none")
    inflater = zlib.decompressobj(wbits)
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error as exc:
        raise MalformedBody(f"the {encoding} body does not decompress: {exc}") from exc
    if len(plain) > limit:
        raise RequestTooLarge(f"the body decompresses to over the limit of {limit} bytes")
    if not inflater.eof or inflater.unused_data:
        raise MalformedBody(f"the {encoding} body is truncated or has bytes after its end")
    return plain


def parse_request(body: bytes, header_length: Optional[str]) -> InferRequest:
    """A request body (and its Inference-Header-Content-Length) -> its inputs, checked for framing: known
    datatypes, either data or binary_data_size, byte counts that match the shapes and add up to the body."""
    json_end = len(body) if header_length is None else _header_length(header_length, len(body))
    request = validated(InferenceRequestIn, memoryview(body)[:json_end], InvalidTensor, "the request's JSON")
    binary = memoryview(body)[json_end:]
    inputs: Dict[str, InferInput] = {}
    offset = 0
    for tensor in request.inputs:
        parsed, size = _input(tensor, binary, offset)
        if parsed.name in inputs:
            raise InvalidTensor(f"input {parsed.name!r} is given twice")
        inputs[parsed.name] = parsed
        offset += size
    if offset != len(binary):
        raise InvalidTensor(f"{len(binary) - offset} bytes after the JSON that no input's binary_data_size claims")
    parameters = dict(request.parameters or {})
    binary_output = _flag(parameters, "binary_data_output", "the request")
    outputs = None
    if request.outputs is not None:
        outputs = {}
        for output in request.outputs:
            if output.name in outputs:
                raise InvalidTensor(f"output {output.name!r} is requested twice")
            flag = (output.parameters or {}).get("binary_data")
            outputs[output.name] = binary_output if flag is None else _flag(output.parameters, "binary_data",
                                                                             f"output {output.name!r}")
    return InferRequest(request.id, parameters, inputs, outputs, binary_output)


def encode_response(model_name: str, model_version: str, request: InferRequest, arrays: Dict[str, np.ndarray],
                    parameters: Parameters) -> Tuple[bytes, Optional[int]]:
    """The response body for ``arrays`` (already only the requested outputs, in order) and the length of its
    JSON part when raw tensor bytes follow it (None: the body is JSON alone)."""
    outputs: List[dict] = []
    chunks: List[bytes] = []
    for name, array in arrays.items():
        binary = request.binary_output if request.outputs is None else request.outputs[name]
        tensor: Dict[str, Any] = {"name": name, "datatype": DATATYPES[array.dtype], "shape": list(array.shape)}
        if binary:
            data = np.ascontiguousarray(array, dtype=array.dtype.newbyteorder("<")).tobytes()
            tensor["parameters"] = {"binary_data_size": len(data)}
            chunks.append(data)
        else:
            tensor["data"] = np.ascontiguousarray(array).ravel()  # orjson writes numpy; NaN becomes null
        outputs.append(tensor)
    body: Dict[str, Any] = {"model_name": model_name, "model_version": model_version, "outputs": outputs}
    if request.id is not None:
        body["id"] = request.id
    if parameters:
        body["parameters"] = parameters
    header = orjson.dumps(body, option=orjson.OPT_SERIALIZE_NUMPY)
    return (header + b"".join(chunks), len(header)) if chunks else (header, None)


def _header_length(value: str, body_size: int) -> int:
    if not value.isdigit() or int(value) > body_size:
        raise InvalidTensor(f"Inference-Header-Content-Length must be a byte count within the body's "
                            f"{body_size} bytes, got {value!r}")
    return int(value)


def _input(tensor: TensorIn, binary: memoryview, offset: int) -> Tuple[InferInput, int]:
    """One input, and the bytes it takes from the binary part."""
    name = tensor.name
    if tensor.datatype not in DTYPES:
        raise InvalidTensor(f"input {name!r}: datatype {tensor.datatype!r} is not supported; "
                            f"use one of {sorted(DTYPES)}")
    if any(d < 0 for d in tensor.shape):
        raise InvalidTensor(f"input {name!r}: shape {tensor.shape} has a negative dimension")
    shape = tuple(tensor.shape)
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is None:
        if tensor.data is None:
            raise InvalidTensor(f"input {name!r} has neither data nor parameters.binary_data_size")
        return InferInput(name, tensor.datatype, shape, data=tensor.data), 0
    if tensor.data is not None:
        raise InvalidTensor(f"input {name!r} has both data and parameters.binary_data_size")
    if type(size) is not int or size < 0:
        raise InvalidTensor(f"input {name!r}: binary_data_size must be a byte count, got {size!r}")
    expected = math.prod(shape) * DTYPES[tensor.datatype].itemsize
    if size != expected:
        raise InvalidTensor(f"input {name!r}: binary_data_size is {size} bytes; shape {list(shape)} of "
                            f"{tensor.datatype} takes {expected}")
    if offset + size > len(binary):
        raise InvalidTensor(f"input {name!r}: {size} bytes claimed, {len(binary) - offset} left after the JSON")
    return InferInput(name, tensor.datatype, shape, raw=binary[offset:offset + size]), size


def _flag(parameters: Optional[Parameters], key: str, where: str) -> bool:
    value = (parameters or {}).get(key, False)
    if type(value) is not bool:
        raise InvalidTensor(f"{where}: parameters.{key} must be true or false, got {value!r}")
    return value


_KINDS = {"b": "a boolean", "u": "an integer", "i": "an integer", "f": "a number"}


def _from_json(tensor: InferInput, dtype: np.dtype) -> np.ndarray:
    """JSON elements -> an array: as many as the shape holds, each a JSON value of the datatype's kind
    (true/false for BOOL, integers in range for integer types, numbers for floats)."""
    data = tensor.data
    nested = bool(data) and isinstance(data[0], list)
    try:
        # No dtype given: numpy infers one from the values, so a string or a bool among numbers shows.
        array = np.array(data) if nested else None
    except ValueError as exc:  # ragged nesting
        raise InvalidTensor(f"input {tensor.name!r}: data is not a rectangular array: {exc}") from exc
    if array is None:
        kinds = {type(v) for v in data}
        allowed = {bool} if dtype.kind == "b" else ({int} if dtype.kind in "iu" else {int, float})
        if not kinds <= allowed:
            found = sorted(k.__name__ for k in kinds - allowed)
            raise InvalidTensor(f"input {tensor.name!r}: {tensor.datatype} data must be {_KINDS[dtype.kind]} "
                                f"per element, found {found}")
        try:
            array = np.array(data, dtype=np.float64 if dtype.kind == "f" else None)
        except (OverflowError, ValueError) as exc:  # an integer beyond float64 or every integer type
            raise InvalidTensor(f"input {tensor.name!r}: {exc}") from exc
        if array.dtype == object:
            raise InvalidTensor(f"input {tensor.name!r}: integers beyond 64 bits")
    elif array.dtype.kind not in ("b" if dtype.kind == "b" else ("iu" if dtype.kind in "iu" else "iuf")):
        raise InvalidTensor(f"input {tensor.name!r}: {tensor.datatype} data must be {_KINDS[dtype.kind]} per "
                            f"element, found values of kind {array.dtype}")
    if array.size != tensor.count or (nested and array.shape != tensor.shape):
        raise InvalidTensor(f"input {tensor.name!r}: data holds {array.size} elements"
                            f"{' in shape ' + str(list(array.shape)) if nested else ''}; shape "
                            f"{list(tensor.shape)} takes {tensor.count}")
    if dtype.kind in "iu" and array.size:
        info = np.iinfo(dtype)
        if array.min() < info.min or array.max() > info.max:
            raise InvalidTensor(f"input {tensor.name!r}: {tensor.datatype} elements must lie in "
                                f"[{info.min}, {info.max}]")
    with np.errstate(over="ignore"):  # FP32 from JSON's float64 may overflow; the model checks finiteness
        return array.reshape(tensor.shape).astype(dtype.newbyteorder("="))


__all__: Sequence[str] = (
    "BINARY", "DTYPES", "HEADER_LENGTH", "InferInput", "InferRequest", "InferenceRequestIn",
    "InferenceResponseOut", "LiveOut", "ModelMetadataOut", "ModelReadyOut", "ProtocolError", "ReadyOut",
    "ServerMetadataOut", "TensorMetadata", "decoded_body", "encode_response", "parse_request",
)
