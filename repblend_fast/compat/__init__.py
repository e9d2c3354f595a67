"""Compatibility with the research code of RepBlend, LoRS and MTT-VL (VL-distill).

Their expert buffers, distilled checkpoints and distillation command lines work here unchanged:

- :func:`import_authors_buffers` turns a folder of ``img_replay_buffer_<n>.pt`` /
  ``txt_replay_buffer_<n>.pt`` into an expert store (:func:`load_authors_buffers` streams the
  experts instead; :func:`buffer_layout` declares the architecture they are checked against);
- :func:`export_authors_checkpoint` writes a :class:`~repblend_fast.engine.distill.DistilledSet` as
  their ``distilled_<it>.pt``, :func:`import_distilled` reads one back;
- :func:`parse_authors_flags` maps their distillation flags onto a
  :class:`~repblend_fast.config.DistillConfig` and run settings (table: :func:`flag_table`).

Foreign files are read with ``torch.load(weights_only=True)`` only. docs/migrating.md walks
through a migration flag by flag.

Modules: :mod:`.buffers` (reading and checking their buffer files), :mod:`.import_store` (writing
them into an expert store), :mod:`.checkpoints` (``distilled_<it>.pt`` both ways), :mod:`.flags`
(parsing their command lines), :mod:`.flag_specs` (their parsers' flags and defaults),
:mod:`.flag_rules` (how each flag maps) and :mod:`.encoder_names` (their encoder names and local
files).
"""

from repblend_fast.compat.buffers import (
    AUTHORS_FORMATS,
    HEAD_PARAM_NAMES,
    AuthorsBufferError,
    AuthorsExpert,
    BufferLayout,
    BufferPair,
    ImportReport,
    buffer_layout,
    find_buffer_pairs,
    head_from_authors,
    head_to_authors,
    load_authors_buffers,
    safe_torch_load,
    scan_authors_buffers,
)
from repblend_fast.compat.checkpoints import (
    AUTHORS_CHECKPOINT_KEYS,
    authors_checkpoint_dict,
    export_authors_checkpoint,
    import_distilled,
)
from repblend_fast.compat.flag_rules import FLAG_KINDS, RULES, flag_table
from repblend_fast.compat.flag_specs import SCRIPTS, script_flags
from repblend_fast.compat.flags import AuthorsFlagError, AuthorsRun, parse_authors_flags
from repblend_fast.compat.import_store import import_authors_buffers

__all__ = [
    "AUTHORS_CHECKPOINT_KEYS",
    "AUTHORS_FORMATS",
    "FLAG_KINDS",
    "HEAD_PARAM_NAMES",
    "RULES",
    "SCRIPTS",
    "AuthorsBufferError",
    "AuthorsExpert",
    "AuthorsFlagError",
    "AuthorsRun",
    "BufferLayout",
    "BufferPair",
    "ImportReport",
    "authors_checkpoint_dict",
    "buffer_layout",
    "export_authors_checkpoint",
    "find_buffer_pairs",
    "flag_table",
    "head_from_authors",
    "head_to_authors",
    "import_authors_buffers",
    "import_distilled",
    "load_authors_buffers",
    "parse_authors_flags",
    "safe_torch_load",
    "scan_authors_buffers",
    "script_flags",
]
