"""Data for the batch-size study: named sources, file loaders and one preparation pipeline.

>>> from minigd.data import load_dataset, DATASETS
>>> sorted(DATASETS)
['digits', 'linear_regression', 'teacher_student']

:func:`load_dataset` returns a frozen :class:`Dataset` (train/validation arrays, task,
classes, provenance in ``info``).  See :mod:`minigd.data.pipeline` for the pipeline,
:mod:`minigd.data.sources` for the named data sets, :mod:`minigd.data.files` for the file
readers and :mod:`minigd.data.dataset` for the two containers.
"""

from .dataset import TASKS, Dataset, RawData
from .files import read_idx
from .pipeline import from_arrays, load_dataset
from .sources import DATASETS, teacher_forward

__all__ = ["Dataset", "load_dataset", "from_arrays", "DATASETS", "TASKS", "RawData", "read_idx", "teacher_forward"]
