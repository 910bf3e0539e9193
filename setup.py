"""Ships csrc/ inside the wheel so that an installed (non-editable) package can JIT-compile it.

Nothing is compiled at install time: duo_kernels/_native.py builds csrc/ on first use.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


class BuildPyWithSources(build_py):
    def run(self):
        super().run()
        target = Path(self.build_lib) / "duo_kernels" / "csrc"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(ROOT / "csrc", target)


setup(cmdclass={"build_py": BuildPyWithSources})
