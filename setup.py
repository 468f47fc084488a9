"""Four top-level folders, one import namespace: ``dwm.preprocess`` is served from
``preprocess/``, ``dwm.datasets`` from ``datasets/`` (a top-level ``datasets`` package would
shadow Hugging Face ``datasets``), and so on. Works for editable installs and built wheels."""

import os

from setuptools import setup

ROOTS = {
    "shared": "dwm.shared",
    "preprocess": "dwm.preprocess",
    "datasets": "dwm.datasets",
    "training": "dwm.training",
    "generate": "dwm.generate",
    "bench": "dwm.bench",
}

packages, package_dir = [], {}
for folder, name in ROOTS.items():
    package_dir[name] = folder
    for dirpath, _dirs, files in os.walk(folder):
        if "__init__.py" in files:
            rel = os.path.relpath(dirpath, folder)
            packages.append(name if rel == "." else f"{name}.{rel.replace(os.sep, '.')}")

setup(packages=packages, package_dir=package_dir)
