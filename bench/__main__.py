"""``python -m bench run [--zoo FILE] [--quick] --out DIR``: the benchmark (see bench/zoo.yaml)."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="build the zoo, run every defence, write results.json + RESULTS.md + plots")
    build = sub.add_parser("build", help="build (or check) the zoo's foundation and victims only, no defences")
    for p in (run, build):
        p.add_argument("--zoo", type=Path, default=None, help="zoo YAML (default bench/zoo.yaml)")
        p.add_argument("--quick", action="store_true", help="the reduced zoo bench/zoo-quick.yaml (<= 10 min)")
        p.add_argument("--cache", type=Path, default=HERE / "cache", help="models, decoded data and records")
        p.add_argument("--shared", type=Path, default=None, help="the shared data folder (default ../shared/data)")
        p.add_argument("--only", nargs="+", default=None, help="only victims whose name contains one of these")
        p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all cores)")
    run.add_argument("--out", type=Path, required=True)
    run.add_argument("--limit", type=int, default=None, help="run only the first N victims")
    run.add_argument("--defences", nargs="+", default=None, help="a subset of the zoo's defences")
    run.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="worker processes that build and defend the victims (this process trains the foundation "
        "and decodes the data first); each worker uses --threads torch threads (default: cores / jobs)",
    )
    run.add_argument(
        "--from-cache",
        action="store_true",
        help="train and run nothing: write the tables from the cached records, listing what is missing",
    )
    args = parser.parse_args(argv)

    import torch

    from bench import datasets, results, runner

    cores = os.cpu_count() or 1
    torch.set_num_threads(args.threads or cores)
    if args.command == "run" and args.jobs < 1:
        print(f"error: --jobs must be >= 1, got {args.jobs}", file=sys.stderr)
        return 2
    zoo = args.zoo or HERE / ("zoo-quick.yaml" if args.quick else "zoo.yaml")
    shared = args.shared or datasets.DEFAULT_SHARED
    if not shared.is_dir():
        print(f"error: shared data folder {shared} not found (pass --shared)", file=sys.stderr)
        return 2
    t0 = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t0:7.1f}s] {msg}", flush=True)

    if args.command == "build":
        from bench.zoo import Zoo, load_zoo

        spec = load_zoo(zoo)
        models = Zoo(spec, args.cache, shared, log)
        models.foundation()
        for v in spec.victims:
            if args.only is not None and not any(o in v.name for o in args.only):
                continue
            _, meta = models.victim(v)
            asr = meta["attack_success_rate"]
            log(
                f"{v.name}: CA {100 * meta['clean_accuracy']:.1f}%"
                + (f", ASR {100 * asr:.1f}%" if asr is not None else "")
            )
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    res = runner.load_and_run(
        zoo,
        args.out,
        args.cache,
        shared,
        log,
        tuple(args.only) if args.only else None,
        args.limit,
        tuple(args.defences) if args.defences else None,
        args.from_cache,
        args.jobs,
        args.threads or max(1, cores // args.jobs),
    )
    command = "python -m bench " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    res["command"] = command
    (args.out / "results.json").write_text(json.dumps(res, indent=2, default=str), encoding="utf-8")
    results.write_markdown(res, args.out / "RESULTS.md", command)
    for p in results.plot(res, args.out):
        log(f"wrote {p}")
    log(f"wrote {args.out / 'RESULTS.md'} and results.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
