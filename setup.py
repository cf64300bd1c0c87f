"""Build script: maps kernels/, protocol/, clients/ into the pserver namespace and
compiles the Cython modules. Metadata lives in pyproject.toml."""

from Cython.Build import cythonize
from setuptools import Extension, setup

extensions = [
    Extension(
        "pserver.kernels._hashing",
        ["kernels/_hashing.pyx"],
        extra_compile_args=["-O3"],
    ),
    Extension(
        "pserver.kernels._rowindex",
        ["kernels/_rowindex.pyx"],
        extra_compile_args=["-O3"],
    ),
]

setup(
    packages=["pserver", "pserver.kernels", "pserver.protocol", "pserver.clients"],
    package_dir={
        "pserver": "pserver",
        "pserver.kernels": "kernels",
        "pserver.protocol": "protocol",
        "pserver.clients": "clients",
    },
    package_data={
        "pserver.kernels": ["*.pyi", "*.pyx"],
        "pserver.protocol": ["PROTOCOL.md"],
        "pserver": ["py.typed"],
    },
    ext_modules=cythonize(extensions, compiler_directives={"language_level": "3"}),
    zip_safe=False,
)
