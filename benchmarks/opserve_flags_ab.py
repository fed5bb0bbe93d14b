"""Two opserve configurations side by side on the identity `model.py`: what a flag, or a commit,
changes.

Both servers run at once on the same model folder (../shared/peers/identity, as in
`python_identity_vs_triton.py`), one with the flags of `--a`, the other with those of `--b`
(and, with `--a-source` or `--b-source`, the code of another checkout: `git worktree add
/tmp/base <commit>`, then `--a-source=/tmp/base` measures that commit against this one);
perf_analyzer loads one, then the other, cell by cell, A B in one round and B A in the next, so
that the machine's slow and fast spells fall on both alike. Per cell it prints each
configuration's median throughput and CPU per inference, and the ratio B / A of every round:
on these shared machines a round's ratio moves far less than either server's throughput.

    python benchmarks/opserve_flags_ab.py --a=--busy-poll-us=0 [--b=...] [--rounds 4]
        [--a-source DIR] [--b-source DIR]
        [--concurrency 1,4,8] [--transport http,grpc] [--measurement-interval 2000]

perf_analyzer and Triton's installer come from ../shared/peers/ (see
`python_identity_vs_triton.py`); only perf_analyzer is used here.
"""

from __future__ import annotations

import argparse
import shlex
import statistics
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import python_identity_vs_triton as side


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--a", default="", help="configuration A's flags, as one string")
    parser.add_argument("--b", default="", help="configuration B's flags, as one string")
    parser.add_argument(
        "--a-source", type=Path, help="a checkout of opserve whose code configuration A runs"
    )
    parser.add_argument(
        "--b-source", type=Path, help="a checkout of opserve whose code configuration B runs"
    )
    parser.add_argument("--rounds", type=int, default=4, help="rounds (default 4)")
    parser.add_argument(
        "--concurrency",
        type=lambda text: tuple(int(c) for c in text.split(",")),
        default=side.CONCURRENCIES,
        help="the concurrencies measured, comma-separated (default 1,4,8)",
    )
    parser.add_argument(
        "--transport",
        type=lambda text: tuple(text.split(",")),
        default=side.TRANSPORTS,
        help="http, grpc or both (default http,grpc)",
    )
    parser.add_argument("--measurement-interval", type=int, default=2000, help="ms per window")
    parser.add_argument("--max-trials", type=int, default=3, help="windows per cell at most")
    parser.add_argument("--peers", type=Path, default=Path("/tmp/peers"))
    parser.add_argument("--startup-timeout", type=float, default=120.0)
    args = parser.parse_args()
    args.shape, args.shared_memory, args.stability_percentage = side.SHAPE, "none", 999.0
    side.ensure_triton(args.peers)  # installs perf_analyzer beside Triton when missing
    workdir = Path(tempfile.mkdtemp(prefix="opserve-ab-"))
    repository = workdir / "repository"
    side.prepare_repository(repository)
    configurations = {"A": shlex.split(args.a), "B": shlex.split(args.b)}
    sources = {"A": args.a_source, "B": args.b_source}
    for source in sources.values():
        if source is not None and not (source / "opserve" / "__init__.py").is_file():
            parser.error(f"{source} is not a checkout of opserve (no opserve/__init__.py)")
    results: dict[tuple[str, int, str], list[side.Measurement]] = {}
    with ExitStack() as stack:
        endpoints = {
            name: stack.enter_context(
                side.running_opserve(
                    repository,
                    workdir / f"{name}.log",
                    args.startup_timeout,
                    flags=flags,
                    source=sources[name],
                )
            )
            for name, flags in configurations.items()
        }
        cells = [(t, c) for t in args.transport for c in args.concurrency]
        for transport, concurrency in cells:  # warm both up
            for name in configurations:
                side.perf_analyzer(
                    args.peers, endpoints[name], transport, concurrency, args, workdir
                )
        for round_index in range(args.rounds):
            order = ("A", "B") if round_index % 2 == 0 else ("B", "A")
            for transport, concurrency in cells:
                for name in order:
                    measured = side.perf_analyzer(
                        args.peers, endpoints[name], transport, concurrency, args, workdir
                    )
                    results.setdefault((transport, concurrency, name), []).append(measured)
            print(f"round {round_index + 1}/{args.rounds} done", file=sys.stderr)
    described = {
        name: f"opserve{f' from {sources[name]}' if sources[name] else ''} "
        f"{' '.join(flags) or '(defaults)'}"
        for name, flags in configurations.items()
    }
    print(f"A: {described['A']}; B: {described['B']}")
    print(
        "| transport | concurrency | A infer/s | B infer/s | B / A (median) | B / A by round "
        "| A CPU µs/inf | B CPU µs/inf |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for transport, concurrency in cells:
        a, b = results[(transport, concurrency, "A")], results[(transport, concurrency, "B")]
        by_round = [y.infer_per_s / x.infer_per_s for x, y in zip(a, b, strict=True)]
        a_median = statistics.median(m.infer_per_s for m in a)
        b_median = statistics.median(m.infer_per_s for m in b)
        print(
            f"| {transport} | {concurrency} | {a_median:,.0f} | {b_median:,.0f} | "
            f"{statistics.median(by_round):.2f}× | "
            + " ".join(f"{r:.2f}" for r in by_round)
            + f" | {statistics.median(m.cpu_us for m in a):,.0f} | "
            f"{statistics.median(m.cpu_us for m in b):,.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
