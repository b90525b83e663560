"""Builds the compiled codec and relay; everything else is in pyproject.toml."""
from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension("ksw1fast._codec", ["ksw1fast/_codec.pyx"]),
    Extension("ksw1fast.server._relay", ["ksw1fast/server/_relay.pyx"]),
]

setup(
    ext_modules=cythonize(
        extensions,
        compiler_directives={
            "language_level": "3",
            "boundscheck": False,
            "wraparound": False,
            "cdivision": True,
        },
    ),
)
