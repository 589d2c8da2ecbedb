"""Only computes the package list; everything else is in pyproject.toml.

The import package `trtkit` lives in core/ and `trtkit.plugins` in plugins/. An explicit list would silently
drop new subpackages from the wheel, so the list is computed from the tree (CI checks the built wheel too).
"""

from setuptools import find_packages, setup

packages = (
    ["trtkit"]
    + [f"trtkit.{name}" for name in find_packages("core")]
    + ["trtkit.plugins"]
    + [f"trtkit.plugins.{name}" for name in find_packages("plugins")]
)
setup(packages=packages)
