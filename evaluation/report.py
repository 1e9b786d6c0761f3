"""Reports of a run (summary.json, report.md, report.html) and the side-by-side comparison of two runs.

The HTML report is one static file with inline CSS and relative image paths: the run folder can be
zipped, moved or served as it is. Each subject gets a grid: its reference images, then one row per
prompt with the generations of every seed and their scores.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import LookalikeError
from .metrics import LABELS, Stat, mean_ci
from .store import Key, read_records, read_settings, write_text
from .summary import OVERALL, SUMMARY_FILE, Summary, summarize, summarize_records

__all__ = ["Summary", "compare", "render_html", "render_markdown", "summarize", "write_reports"]
_CSS = """body{font-family:system-ui,sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin:.5em 0}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right}th:first-child,td:first-child{text-align:left}
.grid td{text-align:center;vertical-align:top;font-size:.8em}.grid td.prompt{text-align:left;max-width:16em}
.grid img{width:128px;height:128px;object-fit:contain;image-rendering:auto;background:#eee}
figure{margin:0}figcaption{color:#555}.note{color:#666}"""


def _fmt(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _stat_cell(stat: Stat | None) -> str:
    """``mean ± half-width`` of a 95% interval (the mean alone for one item, a dash for none)."""
    if stat is None:
        return "–"
    half = stat.half_width
    return _fmt(stat.mean) if half is None else f"{stat.mean:.3f} ± {half:.3f}"


def _title(summary: Summary) -> str:
    s = summary.settings
    return f"{s.get('model', '?')} + {s.get('adapter', '?')}, scale {s.get('scale', '?')}"


def _settings_lines(summary: Summary) -> list[str]:
    s = summary.settings
    models = s.get("metric_models", {})
    done = f"{summary.items} of {summary.expected}" if summary.expected is not None else str(summary.items)
    lines = [f"subjects: {s.get('subjects', '?')} ({s.get('layout', '?')} layout)",
             f"items scored: {done} (seeds {s.get('seeds', '?')})",
             f"generation: {s.get('steps')} steps, guidance {s.get('guidance')}, {s.get('size')} px, "
             f"references {s.get('references') or 'all'} ({s.get('combine')}), "
             f"negative prompt {s.get('negative_prompt') or 'none'}",
             "metric models: " + (_models_text(models) or "given in code")]
    if s.get("model") == "demo" or "demo" in models.values():
        lines.append("demo models have random weights: these figures only show that the run works")
    if summary.seconds_per_image is not None:
        lines.append(f"generation time: {summary.seconds_per_image:.2f} s per image")
    lines.append("intervals: 95% Student-t over items; CLIP-I/DINO/face: mean cosine to every reference image")
    return lines


def _models_text(models: Mapping[str, str]) -> str:
    """``model (metric, metric)`` per distinct metric model."""
    by_model: dict[str, list[str]] = {}
    for metric, model in models.items():
        by_model.setdefault(model, []).append(LABELS.get(metric, metric))
    return "; ".join(f"{model} ({', '.join(metrics)})" for model, metrics in by_model.items())


def _table_rows(summary: Summary) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the per-subject table (overall last)."""
    header = ["subject", *[LABELS.get(m, m) for m in summary.metrics], "n"]
    rows = []
    for name, stats in [*summary.subjects.items(), (OVERALL, summary.overall)]:
        n = max((s.n for m, s in stats.items() if m != "face_found"), default=0)
        rows.append([name, *[_stat_cell(stats.get(m)) for m in summary.metrics], str(n)])
    return header, rows


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _grid(out: Path, records: Mapping[Key, Mapping[str, Any]], subject: str) -> tuple[list[str], list[tuple]]:
    """A subject's reference thumbnails and rows of (prompt index, prompt, [(seed, image, scores)])."""
    refs = sorted((out / "references" / subject).glob("*.jpg"), key=lambda p: int(p.stem) if p.stem.isdigit() else 0)
    prompts: dict[int, tuple[str, list]] = {}
    for key in sorted(k for k in records if k[0] == subject):
        r = records[key]
        row = prompts.setdefault(key[1], (str(r.get("prompt", "")), []))
        row[1].append((key[2], r.get("image"), r.get("scores", {})))
    return [p.relative_to(out).as_posix() for p in refs], [(i, *prompts[i]) for i in sorted(prompts)]


def _scores_text(scores: Mapping[str, Any]) -> str:
    return " ".join(f"{LABELS.get(m, m)} {_fmt(v, 2)}" for m, v in scores.items())


def render_markdown(summary: Summary, out: Path, records: Mapping[Key, Mapping[str, Any]]) -> str:
    """report.md: settings, the per-subject table, and image grids as HTML-in-Markdown tables."""
    parts = [f"# lookalike eval: {_title(summary)}", "", *[f"- {line}" for line in _settings_lines(summary)], "",
             "## Scores (mean ± 95% CI)", "", _markdown_table(*_table_rows(summary)), "", "## Images", ""]
    for subject in summary.subjects:
        refs, rows = _grid(out, records, subject)
        parts += [f"### {subject}", "", "references: " + " ".join(f'<img src="{r}" width="96">' for r in refs), "",
                  "| # | prompt | images |", "|---|---|---|"]
        for index, prompt, gens in rows:
            cells = " ".join(f'<img src="{img}" width="128" title="seed {seed}: {_scores_text(sc)}">'
                             for seed, img, sc in gens)
            parts.append(f"| {index} | {prompt.replace('|', '/')} | {cells} |")
        parts.append("")
    return "\n".join(parts)


def _html_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _html_subject(out: Path, records: Mapping[Key, Mapping[str, Any]], subject: str, summary: Summary) -> str:
    refs, rows = _grid(out, records, subject)
    esc = html.escape
    stats = ", ".join(f"{LABELS.get(m, m)} {_stat_cell(s)}" for m, s in summary.subjects[subject].items())
    ref_cells = "".join(f'<td><img src="{esc(r)}" alt="reference {i}" loading="lazy"></td>' for i, r in enumerate(refs))
    lines = [f'<section id="{esc(subject)}"><h3>{esc(subject)}</h3><p class="note">{esc(stats)}</p>',
             f'<table class="grid"><tr><td class="prompt">references</td>{ref_cells}</tr>']
    for index, prompt, gens in rows:
        figures = "".join(
            f'<td><figure><img src="{esc(str(img))}" alt="{esc(prompt)}, seed {seed}" loading="lazy">'
            f"<figcaption>seed {seed}<br>{esc(_scores_text(sc))}</figcaption></figure></td>" for seed, img, sc in gens)
        lines.append(f'<tr><td class="prompt">{index}. {esc(prompt)}</td>{figures}</tr>')
    lines.append("</table></section>")
    return "\n".join(lines)


def render_html(summary: Summary, out: Path, records: Mapping[Key, Mapping[str, Any]]) -> str:
    """report.html: one static page, inline CSS, relative image paths, no scripts or external assets."""
    esc = html.escape
    index = " · ".join(f'<a href="#{esc(s)}">{esc(s)}</a>' for s in summary.subjects)
    body = [f"<h1>lookalike eval: {esc(_title(summary))}</h1>",
            "<ul>" + "".join(f"<li>{esc(line)}</li>" for line in _settings_lines(summary)) + "</ul>",
            "<h2>Scores (mean ± 95% CI)</h2>", _html_table(*_table_rows(summary)),
            f"<h2>Images</h2><p>{index}</p>",
            *[_html_subject(out, records, s, summary) for s in summary.subjects]]
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>lookalike eval: {esc(_title(summary))}</title><style>{_CSS}</style></head>\n<body>\n"
            + "\n".join(body) + "\n</body></html>\n")


def write_reports(out_dir: str | os.PathLike[str], expected: Collection[Key] | None = None) -> Summary:
    """Summarise a run folder and write summary.json, report.md and report.html into it."""
    out = Path(out_dir).expanduser()
    summary = summarize(out, expected)
    records = read_records(out)
    if expected is not None:
        wanted = set(expected)
        records = {k: v for k, v in records.items() if k in wanted}
    write_text(out / SUMMARY_FILE, json.dumps(summary.to_dict(), indent=2) + "\n")
    write_text(out / "report.md", render_markdown(summary, out, records))
    write_text(out / "report.html", render_html(summary, out, records))
    return summary


# -- comparison -----------------------------------------------------------------------------------------


def _run(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[Key, dict[str, Any]]]:
    out = Path(path).expanduser()
    if not out.is_dir():
        raise LookalikeError(f"{path} is not a folder; pass two --out folders of lookalike eval runs")
    records = read_records(out)
    if not records:
        raise LookalikeError(f"{path} holds no scored items; pass the --out folder of a lookalike eval run")
    return read_settings(out), records


def _paired(a: Mapping[Key, Mapping], b: Mapping[Key, Mapping], metric: str, subject: str | None) -> Stat | None:
    """Mean and 95% interval of B - A over the items both runs scored (same subject, prompt, seed)."""
    diffs = [b[k]["scores"][metric] - a[k]["scores"][metric] for k in sorted(set(a) & set(b))
             if (subject is None or k[0] == subject) and a[k].get("scores", {}).get(metric) is not None
             and b[k].get("scores", {}).get(metric) is not None]
    return mean_ci(diffs) if diffs else None


def _label(settings: Mapping[str, Any], path: str | os.PathLike[str]) -> str:
    return (f"{path} ({settings.get('model', '?')} + {settings.get('adapter', '?')}, "
            f"scale {settings.get('scale', '?')})")


def compare(run_a_dir: str | os.PathLike[str], run_b_dir: str | os.PathLike[str]) -> str:
    """A Markdown table of two runs side by side: per subject and overall, A's and B's means and B − A.

    Means are over each run's own items; the interval of B − A is paired, over the items both scored.
    """
    (set_a, rec_a), (set_b, rec_b) = _run(run_a_dir), _run(run_b_dir)
    sum_a, sum_b = summarize_records(rec_a, set_a), summarize_records(rec_b, set_b)
    metrics = [m for m in sum_a.metrics if m in sum_b.metrics and m != "face_found"]
    if not metrics:
        raise LookalikeError(f"{run_a_dir} and {run_b_dir} share no metric; compare runs scored with the same metrics")
    rows = []
    subjects = [s for s in sum_a.subjects if s in sum_b.subjects]
    for subject in [*subjects, OVERALL]:
        stats_a = sum_a.overall if subject == OVERALL else sum_a.subjects[subject]
        stats_b = sum_b.overall if subject == OVERALL else sum_b.subjects[subject]
        for metric in metrics:
            a, b = stats_a.get(metric), stats_b.get(metric)
            if a is None or b is None:
                continue
            paired = _paired(rec_a, rec_b, metric, None if subject == OVERALL else subject)
            ci = "–" if paired is None or paired.low is None else f"[{paired.low:+.3f}, {paired.high:+.3f}]"
            rows.append([subject, LABELS.get(metric, metric), _fmt(a.mean), _fmt(b.mean), f"{b.mean - a.mean:+.3f}",
                         ci, str(paired.n if paired else 0)])
    head = [f"A: {_label(set_a, run_a_dir)}", f"B: {_label(set_b, run_b_dir)}", ""]
    table = _markdown_table(["subject", "metric", "A", "B", "B − A", "95% CI of B − A (paired)", "paired n"], rows)
    return "\n".join(head) + table + "\n"
