"""The optional C extensions (everything else is in pyproject.toml): smg.wasm._fastcall,
smg.tokenizer._bpe and smg.tokenizer._pieces.

Optional: where they cannot be built (no compiler, no Python headers) the install goes on;
smg.wasm.runtime then calls wasmtime through ctypes, and smg.tokenizer.fastpath merges a
piece that is no vocabulary entry with the tokenizers library and splits with the `regex`
module (the same values, slower).
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "smg.wasm._fastcall",
            ["smg/wasm/_fastcall.c"],
            optional=True,
            extra_compile_args=["-O2", "-std=c11"],
        ),
        Extension(
            "smg.tokenizer._bpe",
            ["smg/tokenizer/_bpe.c"],
            optional=True,
            extra_compile_args=["-O2", "-std=c11"],
        ),
        Extension(
            "smg.tokenizer._pieces",
            ["smg/tokenizer/_pieces.c"],
            optional=True,
            extra_compile_args=["-O2", "-std=c11"],
        ),
    ]
)
