"""The mathematics and the machinery every part shares: datasets and the stream (``data``, ``stream``), models and
their checkpoints (``models``, ``checkpoint``), parameter gradients and alignment (``grads``), Memorization
Discrepancy (``discrepancy``), AUROC (``metrics``), training, evaluation and the online learner (``train``),
data-parallel helpers (``distributed``)."""
