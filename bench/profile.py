"""Where the time goes, for a benchmark that misses its target.

    python -m bench.profile inference --model gpt2 --shape 8x256   # torch.profiler: mptc beside transformers eager
    python -m bench.profile pass --model llama --call "grow_width(width = 1024)"   # cProfile of one verified pass
    python -m bench.profile lower --layers 48                        # cProfile of parse + lower on meta
    python -m bench.profile extract --level s --shape 4x128           # torch.profiler: sub-model beside the full one

Models are built as in the benchmark (same specs, same weights on both sides), in this process.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import tempfile
from pathlib import Path


def _ops_table(fn, rows: int, reps: int = 2) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile

    fn()  # warm
    with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
        for _ in range(reps):
            fn()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows, max_name_column_width=48) + \
        f"(totals over {reps} runs; torch threads {torch.get_num_threads()})\n"


def _cprofile(fn, rows: int, sort: str = "cumulative") -> str:
    fn()  # warm
    pr = cProfile.Profile()
    pr.enable()
    fn()
    pr.disable()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats(sort).print_stats(rows)
    return out.getvalue()


def _shape(s: str) -> tuple[int, int]:
    b, t = s.lower().split("x")
    return int(b), int(t)


def inference(args) -> None:
    import torch

    import mptc

    from .models import load_hf, prepare

    b, t = _shape(args.shape)
    with tempfile.TemporaryDirectory() as d:
        prep = prepare(args.model, Path(d), layers=args.layers)
        model = mptc.load_model(prep.mptc_dir).eval()
        hf = load_hf(prep.hf_dir, args.attn)
    ids = torch.randint(0, mptc.spec_of(model).vocab, (b, t), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)

    def mine():
        with torch.inference_mode():
            model(input_ids=ids, attention_mask=mask if not args.no_mask else None)

    def theirs():
        with torch.inference_mode():
            hf(input_ids=ids, attention_mask=mask, use_cache=False)

    print(f"== mptc {prep.title} {b}×{t}" + (" (no attention_mask)" if args.no_mask else ""))
    print(_ops_table(mine, args.rows))
    print(f"== transformers {prep.title} {b}×{t}, attn {args.attn}")
    print(_ops_table(theirs, args.rows))


def one_pass(args) -> None:
    import mptc
    from mptc import passes as P
    from mptc.passes.parse import parse_passes

    from .models import spec_text

    model = mptc.build(mptc.parse(spec_text(args.model, layers=args.layers)), seed=0).eval()
    passes = parse_passes(args.call)
    print(f"== {args.call} on {args.model}, verified")
    print(_cprofile(lambda: P.Pipeline(passes)(model), args.rows, args.sort))


def lower(args) -> None:
    import mptc

    from .models import spec_text

    text = spec_text("gpt2", layers=args.layers)
    print(f"== parse + lower, GPT-2 small with {args.layers} layers, meta device")
    print(_cprofile(lambda: mptc.build(mptc.parse(text), device="meta"), args.rows, args.sort))


def extract(args) -> None:
    import torch

    import mptc
    from mptc import passes as P

    from .models import spec_text

    b, t = _shape(args.shape)
    full = mptc.build(mptc.parse(spec_text("gpt2", layers=args.layers, nested=True)), seed=0).eval()
    sub, _ = P.Pipeline([P.extract(mlp=args.level)])(full)
    sub.eval()
    ids = torch.randint(0, mptc.spec_of(full).vocab, (b, t), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    for name, m in (("full", full), (f"extract(mlp = {args.level})", sub)):
        def fwd(m=m):
            with torch.inference_mode():
                m(input_ids=ids, attention_mask=mask)
        print(f"== {name} {b}×{t}")
        print(_ops_table(fwd, args.rows))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["inference", "pass", "lower", "extract"])
    ap.add_argument("--model", choices=["gpt2", "llama"], default="gpt2")
    ap.add_argument("--layers", type=int, default=None, help="depth (default: as shipped; lower: 48)")
    ap.add_argument("--shape", default="1x128", help="batch x sequence")
    ap.add_argument("--attn", default="eager", help="transformers attention implementation")
    ap.add_argument("--no-mask", action="store_true", help="call mptc without attention_mask")
    ap.add_argument("--call", default="grow_mlp(hidden = 4096)", help="the pass, as `mptc grow -p` takes it")
    ap.add_argument("--level", default="s", help="extract: the MLP granularity")
    ap.add_argument("--rows", type=int, default=20)
    ap.add_argument("--sort", default="cumulative", help="cProfile sort key (cumulative, tottime)")
    args = ap.parse_args(argv)
    if args.what == "lower" and args.layers is None:
        args.layers = 48
    {"inference": inference, "pass": one_pass, "lower": lower, "extract": extract}[args.what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
