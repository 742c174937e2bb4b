"""Explain many inputs: one job, local processes or a Ray cluster, resumable and atomic.

A :class:`BatchJob` is plain data (model spec, weights path, targets, layers, methods, options),
so it travels to worker processes and Ray actors. The batch is four rooms:

- :mod:`~segcam.apps.batch.job`: the job and its settings (what a manifest records);
- :mod:`~segcam.apps.batch.inputs`: the kinds of input (plain files here,
  :mod:`~segcam.apps.batch.nnunet_cases` for nnU-Net cases,
  :mod:`~segcam.apps.batch.bundle_inputs` for images through a MONAI bundle): find, name,
  digest, explain;
- :mod:`~segcam.apps.batch.outputs`: an input's files on threads and its manifest last, the
  output folder's lock and settings;
- :mod:`~segcam.apps.batch.backends`: this process, a pool of processes, Ray actors;

and :func:`explain_files` (:mod:`~segcam.apps.batch.run`) ties them together. An input whose
manifest matches the job's settings and the input's digest is skipped; one failing input never
stops the others: it is reported with its error.
"""

# importing the input kinds registers them (plain files, nnU-Net cases, bundle images)
from segcam.apps.batch import bundle_inputs as bundle_inputs
from segcam.apps.batch.inputs import expand_inputs, output_name
from segcam.apps.batch.job import BatchJob
from segcam.apps.batch.nnunet_cases import NnUNetCases
from segcam.apps.batch.outputs import LOCK_FILE, RUN_FILE, OutputFolderError, output_folder
from segcam.apps.batch.run import BACKENDS, BatchResult, explain_files

__all__ = [
    "BACKENDS",
    "LOCK_FILE",
    "RUN_FILE",
    "BatchJob",
    "BatchResult",
    "NnUNetCases",
    "OutputFolderError",
    "expand_inputs",
    "explain_files",
    "output_folder",
    "output_name",
]
