"""The run report: one self-contained HTML file (``RUN/report.html``) built from the run folder.

It reads only what the run wrote (pipeline.json, each result.json, each metrics.jsonl), so
every number in it was measured by the run. Sections: the run (id, seed, versions), the
phases (state, timings), each phase's metrics, lineage (input hashes -> output hashes), and
plots of every step metric (matplotlib, inlined as SVG).
"""

from __future__ import annotations

import html
import io
import json
from collections import defaultdict
from pathlib import Path
from typing import Any

from coordinator.runfolder import PhaseResult, RunFolder
from serialization.checkpoint import atomic_write_text

__all__ = ["build_report", "collect_status"]


def collect_status(run: RunFolder) -> dict[str, Any]:
    """The run's state as plain data (used by ``agentforge status --json`` and the report)."""
    state = run.read_state()
    phases = []
    for name in state["plan"]:
        entry = dict(state["phases"].get(name, {}))
        number = _number_of(run, name)
        result = run.read_result(number, name) if number is not None else None
        phases.append({
            "phase": name,
            "number": number,
            "state": entry.get("state", "pending"),
            "duration_s": result.duration_s if result else None,
            "started": result.started if result else entry.get("started"),
            "ended": result.ended if result else None,
            "error": result.error if result else entry.get("error"),
            "degraded": result.degraded if result else None,
            "model": result.model.to_json() if result and result.model else None,
            "metrics": result.metrics if result else {},
        })
    return {"run_dir": str(run.root), "run_id": state["run_id"], "seed": state["seed"],
            "created": state["created"], "versions": state["versions"], "phases": phases,
            "events": state.get("events", [])}


def _number_of(run: RunFolder, name: str) -> int | None:
    for d in run.root.glob(f"[0-9][0-9]_{name}"):
        return int(d.name[:2])
    from coordinator.pipeline import PHASES, ordered_phases

    ordered_phases()
    return PHASES[name].number if name in PHASES else None


def _table(rows: list[list[Any]], header: list[str]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return "" if value is None else str(value)


def _plots(history: Path) -> str:
    """One SVG per metric name (the last two path parts), one line per full key."""
    if not history.exists():
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[str, dict[str, tuple[list, list]]] = defaultdict(dict)
    for line in history.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        for key, value in row.items():
            if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            group = "/".join(key.split("/")[-2:])
            xs, ys = series[group].setdefault(key, ([], []))
            xs.append(row["step"])
            ys.append(value)
    out = []
    for group, lines in sorted(series.items()):
        if all(len(xs) < 2 for xs, _ in lines.values()):
            continue
        fig, ax = plt.subplots(figsize=(6, 3.2))
        for key, (xs, ys) in sorted(lines.items()):
            ax.plot(xs, ys, label=key, linewidth=1.2)
        ax.set_title(group)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if len(lines) > 1:
            ax.legend(fontsize=7)
        buf = io.StringIO()
        fig.savefig(buf, format="svg", bbox_inches="tight")
        plt.close(fig)
        svg = buf.getvalue()
        out.append(svg[svg.index("<svg"):])
    return "".join(f'<div class="plot">{s}</div>' for s in out)


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    svg = buf.getvalue()
    return f'<div class="plot">{svg[svg.index("<svg"):]}</div>'


def _pareto_plot(path: Path) -> str:
    """A phase's ``pareto.json`` as a scatter plot: every candidate (``points``, grey), the
    ``front``, named single points (``uniform``: phase 8's codecs alone, phase 7's input) and the
    ``chosen`` one. ``x``/``y`` name the axes (phase 8: ``compression``/``retention`` on a log x;
    phase 7: ``call_p95_ms``/``accuracy``); ``title``, ``xlabel`` and ``xscale`` are optional."""
    if not path.exists():
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    x, y = data.get("x", "compression"), data.get("y", "retention")
    fig, ax = plt.subplots(figsize=(6, 3.6))
    if data.get("points"):
        ax.scatter([p[x] for p in data["points"]], [p[y] for p in data["points"]], s=12, color="0.6",
                   label="candidates")
    front = sorted(data.get("front", []), key=lambda p: p[x])
    ax.plot([p[x] for p in front], [p[y] for p in front], "o-", label="Pareto front", linewidth=1.2)
    for name, p in sorted(data.get("uniform", {}).items()):
        ax.scatter([p[x]], [p[y]], marker="s", s=28)
        ax.annotate(name, (p[x], p[y]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if data.get("chosen"):
        ax.scatter([data["chosen"][x]], [data["chosen"][y]], marker="*", s=140, color="red", label="chosen", zorder=3)
    ax.set_xscale(data.get("xscale", "log"))
    ax.set_xlabel(data.get("xlabel", f"{x} (x vs fp32)"))
    ax.set_ylabel(y)
    ax.set_title(data.get("title", "compression: Pareto front"))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _svg(fig)


def _latency_plot(path: Path) -> str:
    """A phase's ``latency.json`` (``samples``: name -> timed latencies in ms) as box plots of the
    distributions (phase 7: the input and each Pareto-front candidate)."""
    if not path.exists():
        return ""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    data = json.loads(path.read_text())
    samples = {k: v for k, v in data.get("samples", {}).items() if v}
    if not samples:
        return ""
    fig, ax = plt.subplots(figsize=(6, 0.5 + 0.35 * len(samples)))
    ax.boxplot(list(samples.values()), vert=False, whis=(1, 99))
    ax.set_yticks(range(1, len(samples) + 1), list(samples), fontsize=7)
    ax.set_xlabel(f"latency of {data.get('what', 'one call')} ({data.get('unit', 'ms')}); whiskers p1-p99")
    ax.set_title("latency distributions (measured in this run)")
    ax.grid(alpha=0.3)
    return _svg(fig)


def _profile_table(path: Path) -> str:
    """A phase's measured ``timings.json`` ``profile`` (phase 8: the input, each codec alone, each
    Pareto-front candidate and the final model, profiled in one process) as a table."""
    if not path.exists():
        return ""
    profile = json.loads(path.read_text()).get("profile") or {}
    cols = ["latency_ms_p50", "latency_ms_p95", "tokens_per_s", "peak_memory_bytes", "bytes_on_disk",
            "latency_ratio", "throughput_ratio"]
    rows = [[name, *(p.get(c) for c in cols)] for name, p in profile.items()]
    if not rows:
        return ""
    return ("<h3>compression: profile (measured in this run, on this machine)</h3>"
            + _table(rows, ["model", "p50 ms", "p95 ms", "tokens/s", "peak memory B", "bytes on disk",
                            "latency vs input", "throughput vs input"]))


def _tables(path: Path) -> str:
    """A phase's ``tables.json`` (name -> rows of dicts, e.g. phase 3's sample thoughts) as tables."""
    if not path.exists():
        return ""
    parts = []
    for name, rows in json.loads(path.read_text()).items():
        if rows:
            columns = list(rows[0])
            parts.append(f"<h3>{html.escape(name)}</h3>" + _table([[r.get(c) for c in columns] for r in rows], columns))
    return "".join(parts)


def build_report(run: RunFolder, out: Path | None = None) -> Path:
    """Write ``RUN/report.html`` (or ``out``) and return its path."""
    status = collect_status(run)
    parts = [f"<h1>Agent Forge run {html.escape(status['run_id'])}</h1>",
             _table([[status["run_dir"], status["seed"], status["created"]]], ["run folder", "seed", "created"]),
             "<h2>Versions</h2>", _table([[k, v] for k, v in status["versions"].items()], ["package", "version"]),
             "<h2>Phases</h2>",
             _table([[p["number"], p["phase"], p["state"], p["duration_s"], p["started"], p["ended"],
                      p["error"] or p["degraded"]] for p in status["phases"]],
                    ["#", "phase", "state", "duration (s)", "started", "ended", "error / degraded"])]
    for p in status["phases"]:
        if p["number"] is None:
            continue
        result = run.read_result(p["number"], p["phase"])
        parts.append(f"<h2>{p['number']:02d} {html.escape(p['phase'])}</h2>")
        if result is None:
            parts.append("<p>No result yet.</p>")
            continue
        parts.append(_table([[k, v] for k, v in sorted(result.metrics.items())], ["metric", "value"]))
        parts.append("<h3>Lineage</h3>" + _lineage(result))
        parts.append(_plots(run.phase_dir(p["number"], p["phase"]) / "metrics.jsonl"))
        parts.append(_pareto_plot(run.phase_dir(p["number"], p["phase"]) / "pareto.json"))
        parts.append(_latency_plot(run.phase_dir(p["number"], p["phase"]) / "latency.json"))
        parts.append(_profile_table(run.phase_dir(p["number"], p["phase"]) / "timings.json"))
        parts.append(_tables(run.phase_dir(p["number"], p["phase"]) / "tables.json"))
    if status["events"]:
        parts.append("<h2>Events</h2>")
        parts.append(_table([[e.get("at"), e.get("phase"), e.get("state"), e.get("reason") or e.get("error")]
                             for e in status["events"]], ["at", "phase", "state", "detail"]))
    style = ("body{font-family:system-ui,sans-serif;margin:2em;max-width:1100px}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
             "font-size:13px;text-align:left}.plot{display:inline-block;margin:4px}")
    doc = (f"<!doctype html><html><head><meta charset='utf-8'><title>Agent Forge {html.escape(status['run_id'])}"
           f"</title><style>{style}</style></head><body>{''.join(parts)}</body></html>")
    out = out or run.root / "report.html"
    atomic_write_text(out, doc)
    return out


def _lineage(result: PhaseResult) -> str:
    rows = [["input", r.path, r.sha256[:16]] for r in result.inputs]
    rows += [["output model", r.path, r.sha256[:16]] for r in result.models]
    rows += [[f"artifact {k}", r.path, r.sha256[:16]] for k, r in result.artifacts.items()]
    return _table(rows, ["role", "path", "sha256 (first 16)"])
