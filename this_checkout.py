"""Makes this checkout importable as the `visual_tokenizers` package without installing it.

Scripts inside the checkout (run.py, tests/, benchmarks/) call `use()` before importing the
package. The checkout's folders (core/, tokenizers/, ...) are then reached only as
`visual_tokenizers.<folder>`: the checkout itself is taken off `sys.path`, so none of its
folders shadows an installed package of the same name (Hugging Face's `tokenizers`).
"""

from __future__ import annotations

import importlib.util
import os
import sys

ROOT = os.path.dirname(os.path.abspath(__file__))
NAME = "visual_tokenizers"


def use() -> None:
    """Imports this checkout as `visual_tokenizers` (once) and drops it from sys.path."""
    module = sys.modules.get(NAME)
    if module is None:
        spec = importlib.util.spec_from_file_location(
            NAME, os.path.join(ROOT, "__init__.py"), submodule_search_locations=[ROOT]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[NAME] = module
        spec.loader.exec_module(module)
    elif os.path.realpath(list(module.__path__)[0]) != os.path.realpath(ROOT):
        raise ImportError(
            f"{NAME} is already imported from {list(module.__path__)[0]}, not from this "
            f"checkout ({ROOT}); run this checkout's scripts in a fresh process"
        )
    here = os.path.realpath(ROOT)
    sys.path[:] = [p for p in sys.path if os.path.realpath(p or os.getcwd()) != here]
