"""Discovery (SPEC "Memorization Discrepancy", "Detectors"): ``detectors`` holds the per-sample detectors with one
call shape and their registry ``DETECTORS``; ``measure`` holds the measurements of an online run (MD of poisoned,
clean and noise samples, the detectors' scores, MD by the memorized epoch, the alignment) and their registry
``MEASUREMENTS``. A new detector is one class in ``detectors``; a new per-step figure is one ``Measurement``."""
