"""The optional C extension smg.wasm._fastcall (everything else is in pyproject.toml).

Optional: where it cannot be built (no compiler, no Python headers) the install goes on and
smg.wasm.runtime calls wasmtime through ctypes instead (the same values, slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "smg.wasm._fastcall",
            ["smg/wasm/_fastcall.c"],
            optional=True,
            extra_compile_args=["-O2", "-std=c11"],
        )
    ]
)
