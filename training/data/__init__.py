"""Data by source: local files (:mod:`.files`), embedded classification sets (:mod:`.embedded`), embedded
multiple-choice sets (:mod:`.multiple_choice`), seeded splits (:mod:`.splits`), and the entry points that
pick a source by name (:mod:`.sources`). Modules import downwards only: sources → sets → files → splits →
examples."""

from training.data.embedded import rotten_tomatoes_snippets
from training.data.examples import DataError, Example, TaskData, fingerprint
from training.data.files import Columns
from training.data.sources import SplitNames, load_ood, load_shift, load_task
from training.data.splits import carve, subset

__all__ = [
    "Columns",
    "DataError",
    "Example",
    "SplitNames",
    "TaskData",
    "carve",
    "fingerprint",
    "load_ood",
    "load_shift",
    "load_task",
    "rotten_tomatoes_snippets",
    "subset",
]
