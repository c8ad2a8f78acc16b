"""Turn pytest-benchmark JSON into this project's results records and tables.

    pytest bench/ --benchmark-only --benchmark-json run.json
    python bench/collect.py run.json [more.json | records.jsonl ...] [--out FILE | --out-dir DIR]
                            [--markdown]

Writes ``bench/results/<date>-<machine>.json`` (or ``--out``): a list of records

    {"op", "backend", "shape", "dtype", "time_ms", "achieved", "unit", "roof",
     "roof_ratio", "gpu", "date"}

plus context fields (``ours``, ``machine``, ``time_ms_min``, ``rounds``, ``peak_mem_bytes``,
``peak_mem_method``, ``bytes``, ``flops``, ``check``, ``note``, ``threads``, ``roofs``).
``time_ms`` is the median over the timed rounds; ``achieved`` is the op's counted work
over that time.
``--markdown`` prints a summary (each peer's time over the fastest of ours, per op, shape
and dtype: above 1 means the peer is slower), then one table per (op, shape, dtype):
every implementation with its time, rate, roof ratio, time relative to the fastest of
ours (``x ours``) and peak memory.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def make_record(info: dict, median_s: float, min_s: float, rounds, date: str,
                test=None) -> dict:
    """One results record from a case's ``extra_info`` and its timing statistics."""
    scale = 1e12 if info["unit"] == "TFLOP/s" else 1e9
    achieved = info["work"] / median_s / scale
    return {
        "op": info["op"], "backend": info["backend"], "shape": info["shape"],
        "dtype": info["dtype"], "time_ms": median_s * 1e3, "achieved": achieved,
        "unit": info["unit"], "roof": info["roof"], "roof_ratio": achieved / info["roof"],
        "gpu": info.get("gpu"), "date": date,
        "ours": info.get("ours", True), "machine": info.get("machine"),
        "time_ms_min": min_s * 1e3, "rounds": rounds,
        "peak_mem_bytes": info.get("peak_mem_bytes"),
        "peak_mem_method": info.get("peak_mem_method"), "bytes": info.get("bytes"),
        "flops": info.get("flops"), "roof_kind": info.get("roof_kind"),
        "check": info.get("check"), "note": info.get("note"), "size": info.get("size"),
        "threads": info.get("threads"), "roofs": info.get("roofs"), "test": test,
        # the exp floor (harness.run_case's exps): floor time and floor / median time
        "exp_floor_ms": info.get("exp_floor_ms"),
        "exp_floor_ratio": (info["exp_floor_ms"] / (median_s * 1e3)
                            if info.get("exp_floor_ms") else None),
    }


def records(data: dict) -> list:
    """The records of one pytest-benchmark JSON document (cases without stats are left out)."""
    date = data.get("datetime", "")[:10]
    out = []
    for bench in data.get("benchmarks", []):
        info = bench.get("extra_info", {})
        stats = bench.get("stats") or {}
        if "op" not in info or "median" not in stats:
            continue
        out.append(make_record(info, stats["median"], stats["min"], stats.get("rounds"),
                               date, bench.get("fullname")))
    return out


def read_records(name: str) -> list:
    """Records from a pytest-benchmark JSON file, or from a ``.jsonl`` file of records
    (one per line, as the harness appends them when ``NCL_BENCH_RECORDS`` is set: these
    survive a suite that was killed before pytest-benchmark wrote its JSON)."""
    with open(name) as fh:
        if name.endswith(".jsonl"):
            return [json.loads(line) for line in fh if line.strip()]
        return records(json.load(fh))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-") or "unknown"


def default_path(recs: list, directory: Path) -> Path:
    """``<dir>/<date>-<machine>.json``; a second run the same day gets ``-2``, ``-3``..."""
    first = recs[0]
    machine = first["gpu"] or ("cpu-" + (first.get("machine") or "unknown"))
    stem = f"{first['date']}-{_slug(machine)}"
    path, n = directory / f"{stem}.json", 2
    while path.exists():
        path, n = directory / f"{stem}-{n}.json", n + 1
    return path


def summary(groups: dict) -> list:
    """One row per (op, shape, dtype): the fastest of ours, then each peer's time over it."""
    peers = sorted({r["backend"] for rows in groups.values() for r in rows if not r["ours"]})
    lines = [("| op | shape | dtype | fastest ours | ms | of roof | "
              + " | ".join(f"{p} (x)" for p in peers) + " |"),
             "|---|---|---|---|---:|---:|" + "---:|" * len(peers)]
    for (op, shape, dtype), rows in groups.items():
        ours = [r for r in rows if r["ours"]]
        if not ours:
            continue
        best = min(ours, key=lambda r: r["time_ms"])
        cells = []
        for p in peers:
            hit = [r for r in rows if r["backend"] == p and not r["ours"]]
            cells.append(f"{hit[0]['time_ms'] / best['time_ms']:.2f}" if hit else "")
        lines.append(f"| `{op}` | {' x '.join(map(str, shape))} | {dtype} | "
                     f"`{best['backend']}` | {best['time_ms']:.2f} | "
                     f"{100 * best['roof_ratio']:.1f}% | " + " | ".join(cells) + " |")
    return lines + [""]


def markdown(recs: list) -> str:
    """A summary (peer time / our time), then one table per (op, shape, dtype)."""
    groups: dict = {}
    for r in recs:
        groups.setdefault((r["op"], tuple(r["shape"]), r["dtype"]), []).append(r)
    lines = summary(groups)
    for (op, shape, dtype), rows in groups.items():
        ours = [r["time_ms"] for r in rows if r["ours"]]
        best = min(ours) if ours else None
        lines += [f"#### `{op}` {' x '.join(map(str, shape))} {dtype}", "",
                  (f"| implementation | time (ms) | {rows[0]['unit']} | of roof | x ours | "
                   "peak mem (MiB) |"),
                  "|---|---:|---:|---:|---:|---:|"]
        for r in sorted(rows, key=lambda r: r["time_ms"]):
            name = f"ncl_kernels `{r['backend']}`" if r["ours"] else r["backend"]
            rel = f"{r['time_ms'] / best:.2f}" if best else "-"
            mem = r.get("peak_mem_bytes")
            mem = f"{mem / 2**20:.0f}" if mem is not None else "-"
            lines.append(f"| {name} | {r['time_ms']:.2f} | {r['achieved']:.3g} | "
                         f"{100 * r['roof_ratio']:.1f}% | {rel} | {mem} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark --benchmark-json files, "
                        "or .jsonl files of records (NCL_BENCH_RECORDS)")
    parser.add_argument("--out", type=Path, help="output file (default: results/<date>-"
                        "<machine>.json in --out-dir)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--markdown", action="store_true", help="also print the tables")
    args = parser.parse_args(argv)
    recs, seen = [], set()
    for name in args.json:
        try:
            found = read_records(name)
        except (OSError, json.JSONDecodeError) as exc:  # a step that died: keep the rest
            print(f"collect: skipping {name}: {exc}", file=sys.stderr)
            continue
        for rec in found:  # a case found in both a JSON and a .jsonl file counts once
            key = rec.get("test") or id(rec)
            if key not in seen:
                seen.add(key)
                recs.append(rec)
    if not recs:
        print("collect: no benchmark records found", file=sys.stderr)
        return 1
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out or default_path(recs, args.out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        json.dump(recs, fh, indent=1)
    print(f"collect: {len(recs)} records -> {path}")
    if args.markdown:
        print(markdown(recs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
