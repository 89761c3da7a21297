"""Regenerate this package's gRPC stubs from the .proto files in proto/.

    python -m router_service.api.regenerate              # rewrite router_service/api/
    python -m router_service.api.regenerate --out DIR    # write elsewhere (to compare)

protoc names a generated module after its .proto path, so
proto/moeserve/v1/generation.proto becomes the module `moeserve.v1.generation_pb2`,
and the stubs refer to each other that way. Here they live in `router_service.api`
instead (the wire names, package `moeserve.v1`, stay as they are), so two rewrites
follow protoc:
  - `from moeserve.v1 import x_pb2` becomes `from . import x_pb2`, so the stubs
    import with only `router_service` on the path;
  - the module name protoc hands to protobuf's class builder becomes the real one;
    it ends up as each message class's `__module__`, which pickle (and so Ray)
    uses to find the class again.

The output depends on the grpcio-tools version (its protoc stamps the gencode
version into the files), so regenerate with the version pinned for tests.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

API_DIR = Path(__file__).resolve().parent
API_PACKAGE = "router_service.api"
# proto/ sits next to the packages in a source checkout; an installed wheel has
# no proto/, and nothing there needs to regenerate.
PROTO_ROOT = API_DIR.parents[1] / "proto"
# The proto package's directory under PROTO_ROOT; every .proto in it gets stubs here.
PROTO_PACKAGE_DIR = "moeserve/v1"
PROTO_MODULE_PREFIX = PROTO_PACKAGE_DIR.replace("/", ".")

# What protoc writes per .proto file: messages, their type stubs, services.
GENERATED_SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def proto_files() -> list[str]:
    """The .proto files to compile, relative to PROTO_ROOT, in a stable order."""
    package_dir = PROTO_ROOT / PROTO_PACKAGE_DIR
    files = sorted(p.relative_to(PROTO_ROOT).as_posix() for p in package_dir.glob("*.proto"))
    if not files:
        raise FileNotFoundError(f"No .proto files in {package_dir}; regenerate needs a source checkout")
    return files


def run_protoc(*output_flags: str) -> None:
    """Run grpcio-tools' bundled protoc on every proto file with the given output flags."""
    # grpcio-tools ships the well-known types (google/protobuf/*.proto); `python -m
    # grpc_tools.protoc` adds this include path itself, protoc.main does not.
    well_known = resources.files("grpc_tools") / "_proto"
    args = ["protoc", f"-I{PROTO_ROOT}", f"-I{well_known}", *output_flags, *proto_files()]
    if protoc.main(args) != 0:
        # protoc has already printed the reason (file:line: message) to stderr.
        raise RuntimeError(f"protoc failed: {' '.join(args)}")


def fix_imports(source: str) -> str:
    """Make one generated file's references to its own proto package package-relative."""
    source = re.sub(
        rf"^from {re.escape(PROTO_MODULE_PREFIX)} import ", "from . import ", source, flags=re.MULTILINE
    )
    return re.sub(
        rf"'{re.escape(PROTO_MODULE_PREFIX)}\.(\w+_pb2)'", rf"'{API_PACKAGE}.\1'", source
    )


def generate(out_dir: Path) -> list[Path]:
    """Write the stubs for every proto file into out_dir; returns the files written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        run_protoc(f"--python_out={tmp}", f"--pyi_out={tmp}", f"--grpc_python_out={tmp}")
        written = []
        for generated in sorted((Path(tmp) / PROTO_PACKAGE_DIR).iterdir()):
            proto = f"proto/{PROTO_PACKAGE_DIR}/{generated.name.split('_pb2')[0]}.proto"
            header = f"# Generated from {proto} by `python -m {API_PACKAGE}.regenerate`. Do not edit.\n"
            target = out_dir / generated.name
            target.write_text(header + fix_imports(generated.read_text()))
            written.append(target)
    # Stubs of a deleted .proto would otherwise linger and still import.
    for stale in generated_files(out_dir):
        if stale not in written:
            stale.unlink()
    return written


def generated_files(directory: Path) -> list[Path]:
    """The generated stub files in directory (not __init__.py or this module)."""
    return sorted(p for p in directory.iterdir() if p.name.endswith(GENERATED_SUFFIXES))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=API_DIR, help="directory to write into (default: %(default)s)")
    args = parser.parse_args(argv)
    for path in generate(args.out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
