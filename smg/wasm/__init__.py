"""WASM middleware (issue 16): the smg:gateway WIT world, the wasmtime runtime, the pure types."""
