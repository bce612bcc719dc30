"""Regenerate the *_pb2.py modules from the .proto schemas.

    python nbcheckpoint/engine/images/regen.py [OUTDIR]

tests/test_images.py runs this into a temporary dir and checks that the
checked-in modules are current.
"""
import glob
import os
import sys


def main(outdir: str | None = None) -> None:
    from grpc_tools import protoc
    here = os.path.dirname(os.path.abspath(__file__))
    root = os.path.dirname(os.path.dirname(os.path.dirname(here)))
    protos = sorted(os.path.relpath(p, root) for p in glob.glob(os.path.join(here, "*.proto")))
    rc = protoc.main(["protoc", f"-I{root}", f"--python_out={outdir or root}", *protos])
    if rc:
        raise SystemExit(f"protoc failed ({rc})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
