"""deepdem: refine satellite-stereo DSMs into accurate DSMs or DTMs with deep learning.

The pipeline, one module per stage, around the :class:`~deepdem.scene.Scene` contract::

    synth / lidar / prepare  ->  Scene  ->  train  ->  refine  ->  evaluate

Library entry points (what the command line calls)::

    from deepdem import synth_scene, prepare_scene, Scene, train, refine, evaluate
"""

__version__ = "0.1.0"

from .errors import DeepDEMError, InputError  # noqa: E402

_LAZY = {
    "Scene": ("deepdem.scene", "Scene"),
    "synth_scene": ("deepdem.synth", "synth_scene"),
    "prepare_scene": ("deepdem.prepare", "prepare_scene"),
    "train": ("deepdem.train", "train"),
    "refine": ("deepdem.refine", "refine"),
    "evaluate": ("deepdem.evaluate", "evaluate"),
    "run_demo": ("deepdem.demo", "run_demo"),
}


def __getattr__(name):
    # Lazy so that `import deepdem` (and the CLI's --help) does not pay for torch.
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'deepdem' has no attribute {name!r}")


__all__ = ["DeepDEMError", "InputError", *_LAZY]
