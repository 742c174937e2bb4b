"""Reading and writing images, volumes and arrays; every write is atomic (temporary + rename)."""

from segcam.io.files import atomic_write, read_input, write_nifti
from segcam.io.mrc import read_mrc

__all__ = ["atomic_write", "read_input", "read_mrc", "write_nifti"]
