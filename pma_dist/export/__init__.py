"""Materialize a model on demand: streaming, atomic exports to Hugging Face safetensors or DCP.

:func:`export_model` writes whatever weights a live model holds now (``Merger.export`` calls it
inside ``swapped()``, so they are the merged ones); it is collective over the model's ranks.
:func:`convert_to_hf` turns a DCP export, or a training checkpoint holding a Merger's state,
into a Hugging Face directory offline, in one process. Modules: ``_pipeline`` (both of those),
``_hf_plan`` and ``_hf_writer`` (planning and writing safetensors), ``_atomic`` (local and
collective commits), ``_manifest`` and ``_verify``, ``_sources`` and ``_offline`` (reading
checkpoints back), ``_progress``.
"""

from ._atomic import ExportError, commit_collectively
from ._manifest import MANIFEST
from ._pipeline import convert_to_hf, export_model
from ._verify import verify_export

__all__ = [
    "ExportError",
    "MANIFEST",
    "commit_collectively",
    "convert_to_hf",
    "export_model",
    "verify_export",
]
