"""Regenerate ``protocols/split_pb2.py`` and ``split_pb2_grpc.py`` from ``split.proto``.

Run ``python -m protocols.gen_split_stubs`` after editing the proto; the stubs are checked in so a
node needs no compiler. grpcio-tools is pinned in pyproject.toml, so the output is reproducible.
The generated gRPC module imports ``split_pb2`` as a top-level module; it is rewritten to a package-
relative import so ``protocols`` works from any working directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    from grpc_tools import protoc

    rc = protoc.main([
        "grpc_tools.protoc", f"-I{HERE}", f"--python_out={HERE}", f"--pyi_out={HERE}",
        f"--grpc_python_out={HERE}", str(HERE / "split.proto"),
    ])
    if rc != 0:
        print(f"protoc failed with exit code {rc}", file=sys.stderr)
        return rc
    grpc_file = HERE / "split_pb2_grpc.py"
    text = grpc_file.read_text()
    grpc_file.write_text(text.replace("import split_pb2 as split__pb2", "from . import split_pb2 as split__pb2"))
    print(f"wrote {HERE / 'split_pb2.py'}, {grpc_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
