"""Package layout: ``passes/`` installs as ``qcompiler.passes`` and ``models/`` as ``qcompiler.models``.

Everything else is declared in pyproject.toml.
"""

from setuptools import find_packages, setup

_MAPPED = {"qcompiler": "qcompiler", "qcompiler.passes": "passes", "qcompiler.models": "models"}


def _packages() -> list[str]:
    packages = []
    for name, folder in _MAPPED.items():
        packages.append(name)
        packages += [f"{name}.{sub}" for sub in find_packages(folder)]
    return packages


setup(packages=_packages(), package_dir=_MAPPED)
