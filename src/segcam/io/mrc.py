"""MRC volumes: a 1024-byte header, optional extended header, then the array in (z, y, x) order.

Only what segcam's demo data needs: modes 0 (int8), 1 (int16), 2 (float32), 6 (uint16), little
or big endian, read from a path or from bytes (e.g. a file inside a wheel).
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Literal

import numpy as np

from segcam.errors import MrcError

__all__ = ["MrcError", "read_mrc"]

_MODES = {0: np.int8, 1: np.int16, 2: np.float32, 6: np.uint16}


def read_mrc(source: bytes | str | Path, name: str = "MRC data") -> np.ndarray:
    """Read an MRC volume as an array of shape (z, y, x)."""
    data = Path(source).read_bytes() if isinstance(source, str | Path) else source
    if len(data) < 1024:
        raise MrcError(f"{name}: {len(data)} bytes, shorter than the 1024-byte MRC header")
    byte_order: Literal["<", ">"] = "<" if data[212] in (0x44, 0) else ">"  # MACHST 0x44: little
    nx, ny, nz, mode = struct.unpack(f"{byte_order}4i", data[:16])
    if mode not in _MODES:
        byte_order = ">" if byte_order == "<" else "<"
        nx, ny, nz, mode = struct.unpack(f"{byte_order}4i", data[:16])
    if mode not in _MODES or min(nx, ny, nz) <= 0:
        raise MrcError(f"{name}: unsupported MRC mode {mode} or shape ({nz}, {ny}, {nx})")
    (extended,) = struct.unpack(f"{byte_order}i", data[92:96])
    dtype = np.dtype(_MODES[mode]).newbyteorder(byte_order)
    start = 1024 + max(extended, 0)
    expected = nx * ny * nz * dtype.itemsize
    if len(data) - start < expected:
        raise MrcError(
            f"{name}: truncated: {len(data) - start} bytes of voxel data, expected {expected}"
        )
    array = np.frombuffer(data, dtype=dtype, count=nx * ny * nz, offset=start)
    native: np.ndarray = array.reshape(nz, ny, nx).astype(dtype.newbyteorder("="))
    return native
