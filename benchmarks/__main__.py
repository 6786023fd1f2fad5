"""`python -m benchmarks [--quick] [--only AREA ...] [--json FILE]`: every area, ours vs each peer in
the same run, with the ratio (peer median / our median: > 1 means Quark is faster)."""
import argparse
import importlib
import pkgutil
import sys

import benchmarks
from benchmarks.harness import machine_info, print_table, write_json


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("--quick", action="store_true", help="small sizes and few repeats (a smoke run)")
    p.add_argument("--only", nargs="*", default=None, help="areas to run (file names bench_<area>.py)")
    p.add_argument("--json", default=None, help="also write all results to this JSON file")
    args = p.parse_args(argv)
    areas = sorted(m.name[len("bench_"):] for m in pkgutil.iter_modules(benchmarks.__path__) if m.name.startswith("bench_"))
    if args.only:
        unknown = set(args.only) - set(areas)
        if unknown:
            p.error(f"unknown areas {sorted(unknown)}; available: {areas}")
        areas = [a for a in areas if a in args.only]
    print("machine:", machine_info())
    rows = []
    for area in areas:
        mod = importlib.import_module(f"benchmarks.bench_{area}")
        print(f"\n== {area} ==", flush=True)
        area_rows = mod.compare(quick=args.quick)
        print_table(area_rows)
        rows += area_rows
    if args.json:
        write_json(rows, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
