"""Data for the batch-size study: named sources, file loaders and one preparation pipeline.

>>> from minigd.data import load_dataset, DATASETS
>>> sorted(DATASETS)
['digits', 'linear_regression', 'teacher_student']

:func:`load_dataset` returns a frozen :class:`Dataset` (train/validation arrays, task,
classes, provenance in ``info``).  See :mod:`minigd.data.pipeline` for the pipeline.
"""
from .pipeline import (DATASETS, TASKS, Dataset, RawData, from_arrays, load_dataset, read_idx,
                       teacher_forward)

__all__ = ["Dataset", "load_dataset", "from_arrays", "DATASETS", "TASKS", "RawData", "read_idx",
           "teacher_forward"]
