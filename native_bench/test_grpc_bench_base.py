"""grpc_bench's smg-base gateway imports --smg-base's smg (not this repo's): the A/B of
two revisions (grpc_bench --smg-base, grpc_ttft_ab.py) compares two trees."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc_bench


def test_each_smg_gateway_imports_its_own_tree(tmp_path: Path) -> None:
    base = tmp_path / "base"
    (base / "smg").mkdir(parents=True)
    (base / "smg" / "__init__.py").write_text("")
    (base / "smg" / "__main__.py").write_text("import smg\nprint(smg.__file__)\n")
    args = grpc_bench.parse_args(["--gateways", "smg-p2,smg-base", "--smg-base", str(base)])
    seen = {}
    for name in ("smg-base", "smg-p2"):
        cwd, env = grpc_bench.gateway_place(name, args, tmp_path)
        probe = "import smg, sys; print(smg.__file__)"
        if name == "smg-base":  # the gateway's own command line: `python -m smg`
            argv = [sys.executable, "-m", "smg"]
        else:
            argv = [sys.executable, "-c", probe]
        out = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
        seen[name] = Path(out.stdout.strip().splitlines()[-1]).resolve()
    assert seen["smg-base"] == (base / "smg" / "__init__.py").resolve()
    assert seen["smg-p2"] == (grpc_bench.REPO / "smg" / "__init__.py").resolve()
