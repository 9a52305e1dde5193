"""deepdem: refine satellite-stereo DSMs into accurate DSMs or DTMs with deep learning.

The pipeline, one module per stage, around the :class:`~deepdem.scene.Scene` contract::

    synth / lidar / prepare  ->  Scene  ->  train  ->  refine  ->  evaluate

Library entry points (what the command line calls)::

    from deepdem import synth_scene, prepare_scene, Scene, train, refine, evaluate
"""

__version__ = "0.1.0"

import sys  # noqa: E402
import types  # noqa: E402

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


class _Package(types.ModuleType):
    """The package, whose ``train``, ``refine`` and ``evaluate`` are the functions.

    Those are also the names of their modules, and importing a submodule binds it to the
    package's attribute of that name: ``from deepdem import train`` then returned the module.
    Such bindings are ignored here, so the attribute stays the lazily imported function; the
    modules are reached by their full name (``from deepdem.refine import sigma_path``,
    ``importlib.import_module("deepdem.refine")``).
    """

    def __setattr__(self, name, value):
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = ["DeepDEMError", "InputError", *_LAZY]
