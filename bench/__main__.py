"""`python -m bench [--quick] [--only SUITE ...] [--out DIR]`."""

from __future__ import annotations

import argparse
import sys

from .config import MODES
from .run import SUITES, run


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="4-layer models and small shapes: under 3 minutes")
    ap.add_argument("--mode", choices=sorted(MODES), help="full (default), quick, or toy (the smoke test's sizes)")
    ap.add_argument("--only", nargs="+", choices=list(SUITES), help="run only these suites")
    ap.add_argument("--out", default="docs", help="where benchmarks.md and benchmarks.json go (default: docs)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir (checkpoints, ONNX files, worker log)")
    args = ap.parse_args(argv)
    mode = args.mode or ("quick" if args.quick else "full")
    res = run(MODES[mode], out=args.out, only=args.only, keep=args.keep,
              command="python -m bench" + (f" --mode {mode}" if args.mode else " --quick" if args.quick else ""))
    missed = [t for t in res["targets"] if t["met"] is False]
    print(f"{len(res['targets']) - len(missed)} of {len(res['targets'])} targets met; wrote {res['md_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
