"""A source checkout used without installing it (``PYTHONPATH=<checkout>``, as on the lent GPU machine): maps
``momentum_fused.triton_kernels`` to the checkout's top-level ``triton_kernels/`` folder, as setup.py's
``package_dir`` does for an install. Without it the Triton backend of such a checkout reports itself unavailable
(the H200 run of 2026-12-04 lost its Triton phases to that).

Where the package itself is imported from a checkout (the folder above it holds setup.py and triton_kernels/;
never site-packages, where a top-level ``triton_kernels`` may be another distribution's), this finder goes first
in ``sys.meta_path``: the subpackage is then always the same tree's as the package. An editable install of that
checkout maps it to the same folder; one of another tree (a second clone run with the first clone's venv) mapped
it to that tree's kernels, silently mixing two trees, until 2026-12-06 (a review: a kernel edit in the clone
was never loaded). A regular install is not a checkout and imports its own copy."""
from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

NAME = "momentum_fused.triton_kernels"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER = os.path.join(ROOT, "triton_kernels")


class CheckoutFinder(importlib.abc.MetaPathFinder):
    """Finds ``momentum_fused.triton_kernels`` (and only it) in the checkout's ``triton_kernels/``; its submodules
    are then found by the ordinary path finder on the package's ``__path__``."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname != NAME:
            return None
        return importlib.util.spec_from_file_location(fullname, os.path.join(FOLDER, "__init__.py"),
                                                      submodule_search_locations=[FOLDER])


def is_checkout() -> bool:
    return os.path.isfile(os.path.join(ROOT, "setup.py")) and os.path.isfile(os.path.join(FOLDER, "launcher.py"))


def install() -> None:
    if is_checkout() and not any(isinstance(f, CheckoutFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, CheckoutFinder())
