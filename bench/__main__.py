"""`python -m bench [--quick] [--threads N] [--only SUITE ...] [--out DIR]`; `--render JSON` rewrites the
Markdown report from a JSON file without measuring anything."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .config import MODES


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="2-layer models and small shapes: under 3 minutes")
    ap.add_argument("--mode", choices=sorted(MODES), help="full (default), quick, or toy (the smoke test's sizes)")
    ap.add_argument("--threads", type=int, help="threads for torch and ONNX Runtime in every worker (default: one per "
                    "core). On a machine other jobs keep busy, 1 gives stable ratios: torch's threads stall "
                    "waiting for each other when another process holds a core")
    ap.add_argument("--only", nargs="+", help="run only these suites: lowering export inference growth extraction, "
                    "or deploy (run only when named; the other suites' sections of an earlier report are kept)")
    ap.add_argument("--out", default="docs", help="where benchmarks.md and benchmarks.json go (default: docs)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch dir (checkpoints, ONNX files, worker log)")
    ap.add_argument("--render", metavar="JSON", help="only rewrite benchmarks.md (beside JSON) from JSON")
    args = ap.parse_args(argv)
    if args.render:
        from .report import markdown

        res = json.loads(Path(args.render).read_text())
        md = Path(args.render).with_name("benchmarks.md")
        md.write_text(markdown(res))
        print(f"wrote {md}")
        return 0
    from .runner import SUITES, run

    if args.only and not set(args.only) <= set(SUITES):
        ap.error(f"--only takes {', '.join(SUITES)}")
    name = args.mode or ("quick" if args.quick else "full")
    mode = MODES[name]
    if args.threads:
        mode = dataclasses.replace(mode, threads=args.threads)
    command = "python -m bench" + (f" --mode {name}" if args.mode else " --quick" if args.quick else "")
    command += f" --threads {args.threads}" if args.threads else ""
    command += f" --only {' '.join(args.only)}" if args.only else ""
    res = run(mode, out=args.out, only=args.only, keep=args.keep, command=command)
    missed = [t for t in res["targets"] if t["met"] is False]
    print(f"{len(res['targets']) - len(missed)} of {len(res['targets'])} targets met; wrote {res['md_path']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
