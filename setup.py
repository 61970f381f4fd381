"""Ships csrc/ inside the wheel (as kdloss/_csrc) so the JIT build works from an installed package.

Everything else is in pyproject.toml; nothing is compiled at install time.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithSources(build_py):
    def run(self):
        super().run()
        src = Path(__file__).parent / "csrc"
        if src.is_dir() and not self.editable_mode:
            shutil.copytree(src, Path(self.build_lib) / "kdloss" / "_csrc", dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithSources})
