"""Reading and writing idx files (the MNIST format), plain or gzip-compressed.

Format (http://yann.lecun.com/exdb/mnist/): two zero bytes, a type code (0x08 uint8,
0x09 int8, 0x0B int16, 0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions,
then one big-endian uint32 per dimension, then the data in C order, big-endian.
A file whose name ends in ``.gz`` is gzip-compressed.
"""

from __future__ import annotations

import gzip
import io
import struct
import zlib
from pathlib import Path
from typing import Protocol

import numpy as np

from ..errors import DataError

__all__ = ["parse_idx", "read_idx", "write_idx", "encode_idx", "find_idx_file", "IDX_TYPES"]

IDX_TYPES: dict[int, np.dtype] = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES = {dt.newbyteorder("="): code for code, dt in IDX_TYPES.items()}
_GZIP_MAGIC = b"\x1f\x8b"


class _Readable(Protocol):  # a pathlib.Path or an importlib.resources Traversable
    name: str

    def read_bytes(self) -> bytes: ...

    def is_file(self) -> bool: ...


def parse_idx(raw: bytes, name: str = "<idx>") -> np.ndarray:
    """Decode the bytes of an (uncompressed) idx file into a native-endian numpy array.

    Raises DataError naming ``name`` if the magic number, type code, or size is wrong.
    """
    fix = "replace it with a complete, unmodified copy"
    if len(raw) < 4:
        raise DataError(f"{name} is truncated: {len(raw)} bytes, too short for an idx header; {fix}")
    if raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_TYPES or raw[3] == 0:
        raise DataError(
            f"{name} is not an idx file: bad magic number 0x{raw[:4].hex()} "
            f"(expected 0x0000TTDD, type TT in 08/09/0b/0c/0d/0e, DD dimensions >= 1); {fix}"
        )
    dtype = IDX_TYPES[raw[2]]
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{name} is truncated inside its header ({len(raw)} of {header} bytes); {fix}")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    count = 1
    for d in dims:
        count *= d
    expected = count * dtype.itemsize
    found = len(raw) - header
    shape = "x".join(str(d) for d in dims)
    if found < expected:
        raise DataError(
            f"{name} is truncated: its header announces {shape} {dtype.name} values ({expected} bytes) "
            f"but only {found} bytes follow; {fix}"
        )
    if found > expected:
        raise DataError(
            f"{name} is malformed: {found - expected} bytes follow the {shape} {dtype.name} values "
            f"its header announces; {fix}"
        )
    data = np.frombuffer(raw, dtype=dtype, count=count, offset=header)
    return data.astype(dtype.newbyteorder("="), copy=True).reshape(dims)


def read_idx(path: Path | _Readable) -> np.ndarray:
    """Read an idx file (gzip-compressed if its name ends in ``.gz``) into a numpy array."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"cannot read {path}: {e.strerror or e}; check that the file exists and is readable") from e
    if path.name.endswith(".gz"):
        if raw[:2] != _GZIP_MAGIC:
            raise DataError(
                f"{path} is not gzip-compressed although its name ends in .gz; "
                "rename it without .gz if it is a plain idx file, or replace it"
            )
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(f"{path} is a damaged gzip file ({e}); replace it with a complete copy") from e
    return parse_idx(raw, str(path))


def encode_idx(array: np.ndarray) -> bytes:
    """The idx bytes (uncompressed) of ``array``; its dtype must be one idx supports."""
    array = np.asarray(array)
    native = array.dtype.newbyteorder("=")
    if native not in _CODES:
        raise ValueError(f"idx cannot store dtype {array.dtype}")
    code = _CODES[native]
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + np.ascontiguousarray(array, dtype=IDX_TYPES[code]).tobytes()


def write_idx(path: str | Path, array: np.ndarray) -> Path:
    """Write ``array`` as an idx file; gzip it (deterministically: mtime 0, level 9) if the
    name ends in ``.gz``."""
    path = Path(path)
    raw = encode_idx(array)
    if path.name.endswith(".gz"):
        buf = io.BytesIO()
        with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=9, mtime=0) as gz:
            gz.write(raw)
        raw = buf.getvalue()
    path.write_bytes(raw)
    return path


def find_idx_file(folder, base: str):
    """``folder/base`` if it is a file, else ``folder/base.gz`` if that is, else None."""
    for candidate in (folder / base, folder / f"{base}.gz"):
        if candidate.is_file():
            return candidate
    return None
