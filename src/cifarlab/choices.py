"""The vocabularies cifarlab's functions accept, in one light module (no torch): the library
validates against them and the CLI offers them as choices, so neither re-declares a list."""

OPTIMIZERS = ("sgd", "muon", "adam")
SCHEDULES = ("triangle", "linear", "onecycle", "cosine", "constant")
AMP_MODES = ("auto", "on", "off")  # bf16 autocast: auto = on where fast (CUDA, CPUs with native bf16)
SPLITS = ("val", "test")
TTA_MODES = ("flip", "flip+translate")
CM_SCALES = ("linear", "log")
BAD_IMAGE_POLICIES = ("refuse", "skip")
FILLS = ("reflect", "edge")  # how shifted images are padded
