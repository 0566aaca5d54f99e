"""Build step that pyproject.toml cannot express: ship ``ghostsys-torchvision.pth`` into site-packages.

The .pth installs ghostsys' torchvision import hook (ghostsys/_compat.py) in every interpreter of the
environment, so programs ghostsys does not control (the ``accelerate`` CLI imports timm, which imports
torchvision) can import a CUDA-built torchvision on a CPU torch. A file at the root of a wheel lands in
site-packages, and pip/uv record it, so uninstalling removes it.

* Regular wheels (``pip install .``, sdists): build_py writes the .pth at the root of build_lib.
* Editable installs (``pip install -e .``, ``make setup``; PEP 660): setuptools builds the editable
  wheel from its own .pth or finder plus whatever is in the unpacked wheel directory -- the install
  command's install_lib -- and ignores build_lib, so the .pth goes there too.
"""

from __future__ import annotations

import os

from setuptools import setup
from setuptools.command.build_py import build_py

PTH_NAME = "ghostsys-torchvision.pth"
# One line: `import ...` lines of a .pth are executed at start-up. Quiet when it cannot act: find_spec
# covers a ghostsys removed by hand, getattr(..., int) an older ghostsys first on PYTHONPATH (int() is
# a no-op). The name sorts after setuptools' "__editable__.*.pth", which makes an editable ghostsys importable.
PTH_LINE = ('import importlib.util as _u; _u.find_spec("ghostsys") is None or '
            'getattr(__import__("ghostsys._compat")._compat, "install_import_hook", int)()\n')


class build_py_with_pth(build_py):
    """build_py that also writes the torchvision import-hook .pth where the wheel root is assembled."""

    def run(self) -> None:
        super().run()
        targets = [self.build_lib]
        if self.editable_mode:
            targets.append(self.get_finalized_command("install").install_lib)
        for folder in targets:
            os.makedirs(folder, exist_ok=True)
            with open(os.path.join(folder, PTH_NAME), "w", encoding="utf-8") as f:
                f.write(PTH_LINE)

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        return [*super().get_outputs(include_bytecode), os.path.join(self.build_lib, PTH_NAME)]


setup(cmdclass={"build_py": build_py_with_pth})
