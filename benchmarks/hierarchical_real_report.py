"""Tables of :mod:`benchmarks.hierarchical_real`: rows of every seed summarised per posterior
and guide (median, and min-max where the spread matters), as Markdown, and the JSON of every
row."""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any


def one_line(row: dict) -> str:
    """A progress line for one fit."""
    head = f"{row['posterior']} {row['guide']} seed {row['seed']}:"
    if "failed" in row:
        return f"{head} failed ({row['failed']})"
    return (
        f"{head} ELBO {row['elbo']:.2f} k-hat {row['khat']:.2f} globals "
        f"{row['glob_mean_max']:.3f} / {row['glob_log_sd_max']:.3f} locals "
        f"{row['loc_mean_max']:.3f} / {row['loc_log_sd_max']:.3f} "
        f"{row['ms_per_step']:.1f} ms/step"
    )


def _fmt(x: float, digits: int) -> str:
    """``x`` with ``digits`` decimals, or in scientific notation where it is huge (an ELBO
    estimate of a degenerate guide)."""
    return f"{x:.{digits}f}" if abs(x) < 1e6 else f"{x:.2e}"


def _spread(values: list[float], digits: int) -> str:
    med = _fmt(statistics.median(values), digits)
    if len(values) == 1:
        return med
    return f"{med} ({_fmt(min(values), digits)} to {_fmt(max(values), digits)})"


def _median(values: list[float], digits: int) -> str:
    return _fmt(statistics.median(values), digits)


def cells(rows: list[dict], global_names: list[str]) -> list[str]:
    """The cells of one guide on one posterior from the rows of its seeds."""
    ok = [r for r in rows if "failed" not in r]
    failed = [r for r in rows if "failed" in r]
    seeds = f"{len(ok)}/{len(rows)}" + (f": {failed[0]['failed']}" if failed else "")
    if not ok:
        return ["failed"] + [""] * (8 + len(global_names)) + [seeds]

    def col(key: str) -> list[float]:
        return [r[key] for r in ok]

    per_global = [
        f"{_median([r['globals'][g]['mean_err'] for r in ok], 2)} / "
        f"{_median([r['globals'][g]['log_sd'] for r in ok], 2)}"
        for g in global_names
    ]
    return [
        _spread(col("elbo"), 1),
        _spread(col("khat"), 2),
        _spread(col("glob_mean_max"), 2),
        _spread(col("glob_log_sd_max"), 2),
        *per_global,
        f"{_median(col('loc_mean_max'), 2)} / {_median(col('loc_mean_median'), 2)}",
        f"{_median(col('loc_log_sd_max'), 2)} / {_median(col('loc_log_sd_median'), 2)}",
        _median(col("ms_per_step"), 1),
        _median(col("conv_cpu_s"), 1),
        str(ok[0]["steps"]),
        seeds,
    ]


def table(posterior: str, rows: list[dict]) -> str:
    """The Markdown table of one posterior."""
    done = [r for r in rows if "globals" in r]
    global_names = list(done[0]["globals"]) if done else []
    head = [
        "guide",
        "ELBO",
        "k-hat",
        "globals: max mean err",
        "globals: max log sd",
        *[f"{g}: mean err / log sd" for g in global_names],
        "locals mean err: max / median",
        "locals log sd: max / median",
        "ms/step",
        "CPU s to conv.",
        "steps",
        "seeds ok",
    ]
    lines = [f"### {posterior}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    guides = list(dict.fromkeys(r["guide"] for r in rows))
    for guide in guides:
        mine = [r for r in rows if r["guide"] == guide]
        lines.append("| " + " | ".join([guide, *cells(mine, global_names)]) + " |")
    return "\n".join(lines) + "\n"


def summary(rows: list[dict]) -> str:
    """One table, guides by posteriors: median ELBO and the median of the largest |mean
    error| / sd and |log sd ratio| over the globals (``failed`` where every seed failed,
    ``not run`` where the guide was not run on that posterior)."""
    posteriors = list(dict.fromkeys(r["posterior"] for r in rows))
    guides = list(dict.fromkeys(r["guide"] for r in rows))
    lines = [
        "| guide | " + " | ".join(posteriors) + " |",
        "|" + " --- |" * (len(posteriors) + 1),
    ]
    for guide in guides:
        row = [guide]
        for name in posteriors:
            mine = [r for r in rows if (r["guide"], r["posterior"]) == (guide, name)]
            ok = [r for r in mine if "failed" not in r]
            if not ok:
                row.append("failed" if mine else "not run")
                continue
            row.append(
                f"{_median([r['elbo'] for r in ok], 1)}; "
                f"{_median([r['glob_mean_max'] for r in ok], 2)} / "
                f"{_median([r['glob_log_sd_max'] for r in ok], 2)}"
            )
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def protocol(settings: dict[str, Any]) -> str:
    """The protocol of one run, in words, from its settings."""
    s = settings
    return (
        f"Protocol: `fit_guide`, {s['steps']} steps (unless the steps column says otherwise) "
        f"of ClippedAdam, lr {s['lr0']:g} -> {s['lr1']:g} (exponential), Trace_ELBO with "
        f"{s['particles']} vectorised particles, {s['dtype']}, one thread, seeds {s['seeds']}, "
        f"each fit limited to {s['time_limit']:g} s wall-clock. Scores from {s['draws']} guide "
        "draws: ELBO = mean(log p - log q) over them and PSIS k-hat of the same weights; "
        "errors on the unconstrained scale against the reference (mean error in reference "
        "sds, |log sd ratio|). Cells: median over the seeds (min to max). CPU s to conv.: "
        f"the steps after which the smoothed ELBO stays within {s['tol']:g} nat of its final "
        "value."
    )


def render(payloads: list[dict[str, Any]]) -> str:
    """The commands, their protocols and one table per posterior over every row."""
    rows = [r for p in payloads for r in p["rows"]]
    lines = ["Commands:", ""] + [f"- `{p['command']}`" for p in payloads] + [""]
    lines += [*dict.fromkeys(protocol(p["settings"]) for p in payloads), ""]
    posteriors = list(dict.fromkeys(r["posterior"] for r in rows))
    lines += [
        "Summary, each cell: median ELBO; median largest |mean error| / sd and |log sd ratio| "
        "over the globals.",
        "",
        summary(rows),
    ]
    lines += [table(name, [r for r in rows if r["posterior"] == name]) for name in posteriors]
    return "\n".join(lines)


TITLE = "# Guides on real hierarchical posteriors against gold references\n\n"


def write(opts: argparse.Namespace, command: str, rows: list[dict[str, Any]]) -> None:
    """Print the tables and write every row (JSON, ``opts.out``) and the tables (Markdown,
    beside it)."""
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(opts).items() if isinstance(v, int | float | str)}
    payload = {"command": command, "settings": settings, "rows": rows}
    opts.out.with_suffix(".json").write_text(json.dumps(payload, indent=1) + "\n")
    text = render([payload])
    print(text)
    opts.out.with_suffix(".md").write_text(TITLE + text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Merge results of benchmarks.hierarchical_real.")
    p.add_argument("results", nargs="+", type=Path, help="JSON files it wrote")
    p.add_argument("--out", type=Path, required=True, help="the Markdown file to write")
    opts = p.parse_args(argv)
    payloads = [json.loads(path.read_text()) for path in opts.results]
    merge = "python -m benchmarks.hierarchical_real_report " + " ".join(
        [*map(str, opts.results), "--out", str(opts.out)]
    )
    text = f"Merged by `{merge}`.\n\n" + render(payloads)
    print(text)
    opts.out.write_text(TITLE + text)


if __name__ == "__main__":
    main()
