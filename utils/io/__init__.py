"""Files: ``results`` is the one results writer (atomic files, whole JSON lines, the folder lock; no torch). The
one checkpoint format is ``utils.core.checkpoint``."""
