"""Reading and writing images, volumes and arrays; every write is atomic (temporary + rename)."""

from segcam.io.files import read_input, write_nifti
from segcam.io.mrc import read_mrc
from segcam.io.writing import atomic_path, atomic_write

__all__ = ["atomic_path", "atomic_write", "read_input", "read_mrc", "write_nifti"]
