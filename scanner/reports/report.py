"""`scanner report`: one self-contained HTML file about a scan's results (and optionally an evaluation).

Self-contained: every figure is an inline base64 PNG, the CSS is inline, there are no scripts, fonts
or links to fetch, so the file can be mailed or archived and opened offline. Every id and message from
the results is HTML-escaped (and control characters shown as escapes); the page is well-formed XML
apart from its doctype.

Sections:
- counts: records, scored, synthetic/real by label, errors, downscaled, models seen;
- score histogram (50 bins, stacked by label; optional log-scaled count axis) with the threshold
  line. The bins are equal in logit, log(s / (1 - s)), from 0.0001 to 0.9999 (the outer two take the
  rest): a calibrated detector puts most images near 0 or 1, and equal-width bins would show two
  spikes; these spread 0.99, 0.999 and 0.9999 apart: `--threshold`, else inferred from the labels (the lowest synthetic score, when every
  real score is below it);
- errors by kind: table (count, first message) and bar chart;
- the top-N most synthetic images as thumbnails (at most THUMB_PX on a side, 256-colour PNGs of about
  25-50 KB) drawn on the fly from the files the ids name (local files, or members of local tar/zip
  archives, one pass per archive), with their six patches, score and id; an image that cannot be read
  or decoded gets a placeholder tile with the reason, never a crash;
- with `--eval-report DIR` (written by `scanner eval`): the summary, per-source AP table, PR curves
  per source (sklearn precision_recall_curve, from DIR/scores.csv; fake-only sources paired with the
  real-only sources as the evaluation does) and the robustness plots found in DIR.

The results file is streamed: only the histogram counts, the error counts (and a few messages) and a
heap of the top N records are held, whatever the file's length. It is read as its final view
(scanner.scan.final_view): an id with several records (a transient error, then the rerun's record) counts
once, by its last record; a first pass over the ids finds the records superseded.
"""

from __future__ import annotations

import base64
import csv
import datetime
import heapq
import html
import io
import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from scanner.errors import ItemError, ScannerError, is_transient
from scanner.reports.explain import GROUP_COLOURS, read_many_ids, shorten
from scanner.scan.final_view import FinalFilter

BINS = 50
LOGIT_SPAN = 9.21  # bins cover logits -9.21..9.21, scores 0.0001..0.9999; beyond, the outer bins


def score_bin(score: float) -> int:
    """The histogram bin of a score: equal steps in logit over [-LOGIT_SPAN, LOGIT_SPAN]."""
    s = min(max(score, 1e-12), 1 - 1e-12)
    z = np.log(s / (1 - s))
    return min(max(int((z + LOGIT_SPAN) / (2 * LOGIT_SPAN) * BINS), 0), BINS - 1)

THUMB_PX = 256
PLOT_DPI = 100
EXAMPLES_PER_KIND = 3
MAX_MODELS = 10
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ROBUSTNESS_PLOTS = (("robustness_blur.png", "Robustness to Gaussian blur"),
                    ("robustness_jpeg.png", "Robustness to JPEG compression"))


# ------------------------------------------------------------------------------------- streaming


@dataclass
class TopRecord:
    """The few fields of a record that a thumbnail needs."""

    id: str
    score: float
    label: str | None
    patches: list | None
    width: int | None
    height: int | None
    sha256: str | None
    line: int


@dataclass
class Stats:
    """Everything the report shows about the results file, accumulated one record at a time."""

    top_n: int
    records: int = 0
    scored: int = 0
    synthetic: int = 0
    real: int = 0
    errors: int = 0
    downscaled: int = 0
    errors_by_kind: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # kind -> [(id, message)], at most EXAMPLES_PER_KIND
    models: Counter = field(default_factory=Counter)
    hist_synthetic: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))
    hist_real: np.ndarray = field(default_factory=lambda: np.zeros(BINS, np.int64))
    max_real: float | None = None
    min_synthetic: float | None = None
    torn_last_line: bool = False
    superseded: int = 0  # records not counted: a later record of the same id supersedes them
    _heap: list = field(default_factory=list)

    def add(self, rec: dict, line: int) -> None:
        self.records += 1
        model = rec.get("model")
        if model is not None and (model in self.models or len(self.models) < MAX_MODELS):
            self.models[str(model)] += 1
        if rec.get("downscaled"):
            self.downscaled += 1
        error = rec.get("error")
        if error:
            self.errors += 1
            kind = str(error.get("kind", "unknown")) if isinstance(error, dict) else "unknown"
            self.errors_by_kind[kind] += 1
            shown = self.examples.setdefault(kind, [])
            if len(shown) < EXAMPLES_PER_KIND:
                message = error.get("message", "") if isinstance(error, dict) else error
                shown.append((str(rec.get("id")), str(message)[:300]))
            return
        score = rec.get("score")
        if not isinstance(score, (int, float)) or isinstance(score, bool):
            return
        score = float(score)
        self.scored += 1
        b = score_bin(score)
        if rec.get("label") == "synthetic":
            self.synthetic += 1
            self.hist_synthetic[b] += 1
            self.min_synthetic = score if self.min_synthetic is None else min(self.min_synthetic, score)
        else:
            self.real += 1
            self.hist_real[b] += 1
            self.max_real = score if self.max_real is None else max(self.max_real, score)
        if self.top_n > 0:
            # Min-heap of the N best; among equal scores the earlier record wins (larger -line).
            key = (score, -line)
            if len(self._heap) < self.top_n or key > self._heap[0][:2]:
                top = TopRecord(str(rec.get("id")), score, rec.get("label"), rec.get("patches"), rec.get("width"),
                                rec.get("height"), rec.get("sha256"), line)
                entry = (score, -line, top)
                if len(self._heap) < self.top_n:
                    heapq.heappush(self._heap, entry)
                else:
                    heapq.heapreplace(self._heap, entry)

    def top(self) -> list[TopRecord]:
        """The top-N records, most synthetic first."""
        return [t for _, _, t in sorted(self._heap, key=lambda e: (-e[0], -e[1]))]

    def threshold(self) -> float | None:
        """The labels' threshold when they agree on one: the lowest synthetic score, if above every real one."""
        if self.min_synthetic is None:
            return None
        if self.max_real is not None and self.max_real >= self.min_synthetic:
            return None  # several thresholds (or models) in one file: no single line to draw
        return self.min_synthetic


def read_stats(path, top_n: int = 50) -> Stats:
    """Stream a JSONL results file into Stats. A bad line is a ScannerError naming it; a torn last line
    (a scan killed mid-write) is skipped and noted, as resume does."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        what = "does not exist" if not os.path.exists(path) else "is not a file"
        raise ScannerError(f"results file {path!r} {what}; pass the JSONL file written by `scanner run --out`")
    if top_n < 0:
        raise ScannerError(f"--top is {top_n}; expected 0 or more images")
    stats = Stats(top_n=top_n)
    kept = FinalFilter(_ids(path))
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if not line.endswith(b"\n"):
                stats.torn_last_line = True
                break
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                raise ScannerError(f"{path!r} line {number} is not JSON; pass a JSONL results file from "
                                   "`scanner run` (Parquet outputs: use the journal or convert to JSONL)") from None
            if not isinstance(rec, dict) or "id" not in rec:
                raise ScannerError(f"{path!r} line {number} is not a scanner record (no 'id'); pass a JSONL "
                                   "results file from `scanner run`")
            if kept.keep(str(rec["id"])):
                stats.add(rec, number)
    stats.superseded = kept.superseded
    return stats


def _ids(path: str):
    """Pass 1: the ids of the whole lines, in order (lines that are not records are left to pass 2,
    which refuses them)."""
    with open(path, "rb") as fh:
        for line in fh:
            if not line.endswith(b"\n"):
                return
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                return
            if not isinstance(rec, dict) or "id" not in rec:
                return
            yield str(rec["id"])


# ------------------------------------------------------------------------------------- figures


def _figure(width_in: float, height_in: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # headless; no pyplot global state
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=PLOT_DPI)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI)
    return buf.getvalue()


def histogram_png(stats: Stats, threshold: float | None, log_counts: bool = False) -> bytes:
    """Stacked score histogram (real, synthetic) with the threshold line."""
    fig = _figure(7.5, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    edges = np.linspace(-LOGIT_SPAN, LOGIT_SPAN, BINS + 1)  # in logit: the x axis is logit, labelled as scores
    width = edges[1] - edges[0]
    ax.bar(edges[:-1], stats.hist_real, width=width, align="edge", color="#2e86c1", label=f"real ({stats.real})")
    ax.bar(edges[:-1], stats.hist_synthetic, width=width, align="edge", bottom=stats.hist_real, color="#e67e22",
           label=f"synthetic ({stats.synthetic})")
    if threshold is not None:
        t = min(max(threshold, 1e-9), 1 - 1e-9)
        ax.axvline(np.clip(np.log(t / (1 - t)), -LOGIT_SPAN, LOGIT_SPAN), color="#c0392b", linestyle="--",
                   linewidth=1.2, label=f"threshold {threshold:.4g}")
    if log_counts:
        ax.set_yscale("symlog", linthresh=1)  # log scale that still shows bins of 0 and 1
    ticks = (0.0001, 0.001, 0.01, 0.1, 0.5, 0.9, 0.99, 0.999, 0.9999)
    ax.set_xticks([np.log(p / (1 - p)) for p in ticks], [f"{p:g}" for p in ticks])
    ax.set_xlim(-LOGIT_SPAN, LOGIT_SPAN)
    ax.set_xlabel("score (probability synthetic; bins equal in logit, outer bins take the rest)")
    ax.set_ylabel("images" + (" (log scale)" if log_counts else ""))
    ax.grid(True, axis="y", alpha=0.3)
    ax.legend(loc="upper center", fontsize=8)
    fig.tight_layout()
    return _png(fig)


def errors_png(counts: Counter) -> bytes:
    kinds = sorted(counts, key=lambda k: (-counts[k], k))
    fig = _figure(6, 0.6 + 0.35 * len(kinds))
    ax = fig.add_subplot(1, 1, 1)
    ax.barh(range(len(kinds)), [counts[k] for k in kinds], color="#c0392b")
    ax.set_yticks(range(len(kinds)), [shorten(k, 30) for k in kinds])
    ax.invert_yaxis()
    ax.set_xlabel("error records")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    return _png(fig)


def placeholder_png(reason: str, size: int = THUMB_PX) -> bytes:
    """A grey tile saying why there is no thumbnail."""
    from PIL import Image, ImageDraw, ImageFont

    tile = Image.new("RGB", (size, size * 3 // 4), (225, 225, 225))
    draw = ImageDraw.Draw(tile)
    draw.rectangle((0, 0, tile.width - 1, tile.height - 1), outline=(150, 150, 150))
    font = ImageFont.load_default(size=13)  # Pillow's bundled font: no system font needed
    text = shorten(reason, 120)
    lines = ["no thumbnail:"] + [text[i : i + 32] for i in range(0, len(text), 32)][:6]
    for n, line in enumerate(lines):
        draw.text((8, 8 + 18 * n), line, fill=(60, 60, 60), font=font)
    return _encode_png(tile)


def _encode_png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def thumbnail_png(data: bytes, top: TopRecord) -> tuple[bytes, str | None]:
    """Thumbnail of an image with its patches drawn; (PNG bytes, a note or None). Raises ItemError."""
    import hashlib

    from PIL import Image, ImageDraw

    from scanner.decoding.decode import DEFAULT_MAX_PIXELS, DecodeError, decode

    try:
        # A small budget first: big JPEGs then decode at 1/2..1/8 scale (draft mode), much faster.
        decoded = decode(data, 4_000_000, downscale_large=True)
    except DecodeError as exc:
        if exc.kind != "too_large":
            raise
        decoded = decode(data, DEFAULT_MAX_PIXELS, downscale_large=True)
    img = Image.fromarray(decoded.image.permute(1, 2, 0).contiguous().numpy())
    img.thumbnail((THUMB_PX, THUMB_PX), Image.Resampling.LANCZOS)
    note = None
    if top.sha256 and hashlib.sha256(data).hexdigest() != top.sha256:
        note = "file changed since the scan"
    # Boxes are in original pixels of the record's width x height.
    ref_w, ref_h = top.width or decoded.width, top.height or decoded.height
    sx, sy = img.width / max(1, ref_w), img.height / max(1, ref_h)
    draw = ImageDraw.Draw(img)
    boxes = top.patches or []
    groups = _groups_of(boxes)
    for i in sorted(range(len(boxes)), key=lambda j: -groups[j]):  # smaller boxes first, 224s on top
        x0, y0, x1, y1 = boxes[i]
        colour = GROUP_COLOURS[groups[i] % len(GROUP_COLOURS)]
        rect = (round(x0 * sx), round(y0 * sy), max(round(x0 * sx), round(x1 * sx) - 1),
                max(round(y0 * sy), round(y1 * sy) - 1))
        draw.rectangle(rect, outline=colour, width=2)
        draw.text((rect[0] + 3, rect[1] + 2), str(i + 1), fill=colour)
    # 256 colours: about a third of the bytes of an RGB PNG, no visible loss at this size (top-50 ~ 2 MB).
    return _encode_png(img.quantize(256, method=Image.Quantize.FASTOCTREE)), note


def _groups_of(boxes: list) -> list[int]:
    """Colour group per box: the PSM's layout (three 3x3-window picks, then three 2x2-window picks) when
    there are six boxes, else by box size (largest first)."""
    if len(boxes) == 6:
        return [0, 0, 0, 1, 1, 1]
    sizes = sorted({max(b[2] - b[0], b[3] - b[1]) for b in boxes}, reverse=True)
    return [sizes.index(max(b[2] - b[0], b[3] - b[1])) for b in boxes]


def thumbnails(top: list[TopRecord]) -> list[tuple[TopRecord, bytes, str | None]]:
    """(record, PNG, note) for each top record; unreadable ones get a placeholder and the reason."""
    datas = read_many_ids([t.id for t in top]) if top else {}
    out = []
    for t in top:
        data = datas.get(t.id)
        try:
            if isinstance(data, ItemError):
                raise data
            png, note = thumbnail_png(data, t)
        except ItemError as exc:
            reason = f"{exc.kind}: {exc}"
            png, note = placeholder_png(reason), reason
        except Exception as exc:  # a thumbnail must never stop the report (odd files, Pillow internals)
            reason = f"{type(exc).__name__}: {exc}"
            png, note = placeholder_png(reason), reason
        out.append((t, png, note))
    return out


# ------------------------------------------------------------------------------------ evaluation


def read_scores_csv(path) -> list[tuple[str, str, int, float]]:
    """(path, source, label, score) rows of an eval report's scores.csv."""
    rows = []
    with open(path, newline="", encoding="utf-8") as fh:
        for number, row in enumerate(csv.DictReader(fh), 2):
            try:
                rows.append((row["path"], row["source"], int(row["label"]), float(row["score"])))
            except (KeyError, TypeError, ValueError):
                raise ScannerError(f"{str(path)!r} line {number} is not a (path, source, label, score) row; "
                                   "rerun `scanner eval` to rewrite it") from None
    return rows


def pr_curves_png(rows: list[tuple[str, str, int, float]]) -> bytes:
    """Precision-recall curve per source (pairing as in scanner.training.evaluate), plus all images together."""
    from sklearn.metrics import average_precision_score, precision_recall_curve

    from scanner.training.data import Sample
    from scanner.training.evaluate import _ap_index_sets

    samples = [Sample(Path(p), label, source) for p, source, label, _ in rows]
    labels = np.asarray([r[2] for r in rows])
    scores = np.asarray([r[3] for r in rows], dtype=np.float64)
    sets, _ = _ap_index_sets(samples)
    from matplotlib import colormaps

    curves = [(src, idx) for src, idx in sets.items() if idx is not None]
    if len(set(labels.tolist())) == 2:
        curves.append(("all images", np.arange(len(rows))))
    fig = _figure(9.5, max(4.2, 1.0 + 0.16 * len(curves)))
    fig.subplots_adjust(left=0.07, right=0.62, bottom=0.12, top=0.95)  # the legend goes to the right
    ax = fig.add_subplot(1, 1, 1)
    palette = colormaps["tab20"]
    for n, (src, idx) in enumerate(curves):
        precision, recall, _ = precision_recall_curve(labels[idx], scores[idx])
        ap = average_precision_score(labels[idx], scores[idx])
        style = ({"color": "black", "linewidth": 2.2} if src == "all images" else
                 {"color": palette(n % 20), "linewidth": 1.3, "linestyle": ("-", "--", ":")[n // 20 % 3]})
        ax.step(recall, precision, where="post", label=f"{shorten(src, 32)} (AP {ap:.3f})", **style)
    ax.set_xlim(0, 1.0)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.grid(True, alpha=0.3)
    if curves:
        ax.legend(loc="center left", bbox_to_anchor=(1.02, 0.5), fontsize=7.5, frameon=False)
    return _png(fig)


# ------------------------------------------------------------------------------------------ HTML


def esc(value) -> str:
    """HTML-escaped text; control characters and lone surrogates (non-UTF-8 file names) as escapes."""
    text = "" if value is None else str(value)
    text = "".join(ch if ch.isprintable() and not 0xD800 <= ord(ch) <= 0xDFFF else ascii(ch)[1:-1]
                   for ch in text)
    return html.escape(text, quote=True)


def img_tag(png: bytes, alt: str, css: str = "") -> str:
    data = base64.b64encode(png).decode("ascii")
    cls = f' class="{css}"' if css else ""
    return f'<img{cls} src="data:image/png;base64,{data}" alt="{esc(alt)}"/>'


def _fmt(value, digits: int = 4) -> str:
    return "–" if value is None else (f"{value:.{digits}f}" if isinstance(value, float) else esc(value))


CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1300px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:4px}
p.meta{color:#666;font-size:12px;margin:0 0 12px;word-break:break-all}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.grid{display:flex;flex-wrap:wrap;gap:10px}
figure{margin:0;width:260px;font-size:11px;border:1px solid #ddd;padding:4px;background:#fafafa}
figure img{display:block;max-width:256px;max-height:256px;margin:0 auto}
figcaption{word-break:break-all;margin-top:3px}
.score{font-weight:bold}.synthetic{color:#c0392b}.real{color:#1e8449}.note{color:#a04000}
.muted{color:#777;font-size:12px}
"""


def _counts_html(stats: Stats) -> str:
    rows = [("records", stats.records), ("scored", stats.scored), ("synthetic (by label)", stats.synthetic),
            ("real (by label)", stats.real), ("errors", stats.errors), ("downscaled", stats.downscaled)]
    body = "".join(f"<tr><th>{esc(k)}</th><td class=\"n\">{v}</td></tr>" for k, v in rows)
    models = ", ".join(f"{esc(m)} ({n})" for m, n in stats.models.most_common())
    out = f"<table>{body}</table>"
    if models:
        out += f'<p class="muted">model{"s" if len(stats.models) > 1 else ""}: {models}</p>'
    if stats.superseded:
        out += (f'<p class="muted">Counted once per id, by its last record: {stats.superseded} earlier records '
                'superseded by a later one of the same id (a transient error scanned again) are left out.</p>')
    if stats.torn_last_line:
        out += '<p class="note">The last line of the file is incomplete (a scan still running or killed); it is skipped.</p>'
    return out


def _errors_html(stats: Stats) -> str:
    if not stats.errors:
        return '<p class="muted">No error records.</p>'
    rows = []
    for kind, n in sorted(stats.errors_by_kind.items(), key=lambda kv: (-kv[1], kv[0])):
        examples = "<br/>".join(f"<code>{esc(shorten(i, 80))}</code>: {esc(m)}" for i, m in stats.examples.get(kind, []))
        rows.append(f'<tr><td>{esc(kind)}</td><td class="n">{n}</td><td>{examples}</td></tr>')
    table = "<table><tr><th>kind</th><th>records</th><th>examples</th></tr>" + "".join(rows) + "</table>"
    transient = sorted(kind for kind in stats.errors_by_kind if is_transient(kind))
    if transient:
        table += (f'<p class="muted">{esc(", ".join(transient))}: transient (a read that failed after its retries); '
                  'the next scan into the same output tries these files again.</p>')
    return table + img_tag(errors_png(stats.errors_by_kind), "error records by kind")


def _top_html(tiles: list[tuple[TopRecord, bytes, str | None]]) -> str:
    if not tiles:
        return '<p class="muted">No scored images.</p>'
    figs = []
    for rank, (t, png, note) in enumerate(tiles, 1):
        label = t.label if t.label in ("synthetic", "real") else ""
        note_html = f'<br/><span class="note">{esc(note)}</span>' if note else ""
        figs.append(
            f"<figure>{img_tag(png, f'#{rank} {shorten(t.id, 80)}')}<figcaption>#{rank} "
            f'<span class="score {label}">{t.score:.4f}</span> {esc(t.label)}<br/><code>{esc(t.id)}</code>'
            f"{note_html}</figcaption></figure>"
        )
    legend = ('<p class="muted">Patches: cyan = the three 224 px boxes (3x3 windows), magenta = the three 112 px boxes '
              "(2x2 windows), numbered in pick order.</p>")
    return legend + f'<div class="grid">{"".join(figs)}</div>'


def _eval_html(eval_dir: Path) -> str:
    report_path = eval_dir / "report.json"
    if not report_path.is_file():
        raise ScannerError(f"--eval-report {str(eval_dir)!r} has no report.json; pass the --out folder of `scanner eval`")
    try:
        report = json.loads(report_path.read_text(encoding="utf-8"))
    except ValueError:
        raise ScannerError(f"{str(report_path)!r} is not JSON; rerun `scanner eval`") from None
    parts = ["<table>"]
    for key, name in (("model", "model"), ("data", "data"), ("images", "images"), ("real", "real"), ("fake", "fake"),
                      ("threshold", "threshold"), ("global_ap", "global AP"), ("total_map", "total mAP"),
                      ("accuracy", "accuracy")):
        if key in report:
            parts.append(f"<tr><th>{esc(name)}</th><td>{_fmt(report[key])}</td></tr>")
    parts.append("</table>")
    per = report.get("per_source") or {}
    if per:
        parts.append("<table><tr><th>source</th><th>family</th><th>real</th><th>fake</th><th>AP</th><th>acc</th></tr>")
        for src, e in per.items():
            parts.append(f'<tr><td>{esc(src)}</td><td>{esc(e.get("family"))}</td><td class="n">{_fmt(e.get("real"))}</td>'
                         f'<td class="n">{_fmt(e.get("fake"))}</td><td class="n">{_fmt(e.get("ap"))}</td>'
                         f'<td class="n">{_fmt(e.get("acc"))}</td></tr>')
        parts.append("</table>")
    scores_path = eval_dir / "scores.csv"
    if scores_path.is_file():
        rows = read_scores_csv(scores_path)
        if rows:
            parts.append("<h3>Precision-recall per source</h3>")
            parts.append(img_tag(pr_curves_png(rows), "precision-recall curves per source"))
    else:
        parts.append('<p class="note">No scores.csv in the eval report (written by newer `scanner eval`): '
                     "rerun it for PR curves.</p>")
    plots = []
    for name, title in ROBUSTNESS_PLOTS:
        path = eval_dir / name
        if path.is_file():
            data = path.read_bytes()
            if data.startswith(PNG_SIGNATURE):  # only what `scanner eval` wrote: a PNG
                plots.append(img_tag(data, title))
    if plots:
        parts.append(f'<h3>Robustness (AP under blur and JPEG)</h3><div class="grid">{"".join(plots)}</div>')
    for note in report.get("notes") or []:
        parts.append(f'<p class="muted">{esc(note)}</p>')
    return "".join(parts)


def build_report(results, *, top_n: int = 50, eval_report=None, title: str | None = None,
                 threshold: float | None = None, log_counts: bool = False) -> str:
    """The report's HTML text (see the module docstring)."""
    results = os.fspath(results)
    if eval_report is not None and not Path(eval_report).is_dir():
        raise ScannerError(f"--eval-report {str(eval_report)!r} is not a folder; pass the --out folder of `scanner eval`")
    stats = read_stats(results, top_n)
    line = threshold if threshold is not None else stats.threshold()
    if threshold is not None:
        how = "given"
    elif stats.max_real is not None:
        how = f"inferred from the labels: above the highest real score {stats.max_real:.4g}, at most the lowest synthetic score; drawn at the latter"
    else:
        how = "inferred from the labels: at most the lowest synthetic score; drawn there"
    title = title or f"Scan report: {Path(results).name}"
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"/>',
        f"<title>{esc(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        f'<p class="meta">results: <code>{esc(os.path.abspath(results))}</code> · generated {now} by scanner report</p>',
        '<section id="counts"><h2>Counts</h2>', _counts_html(stats), "</section>",
        '<section id="scores"><h2>Scores</h2>',
    ]
    if stats.scored:
        parts.append(img_tag(histogram_png(stats, line, log_counts), "score histogram"))
        parts.append(f'<p class="muted">Threshold: {_fmt(line) if line is not None else "not drawn (labels do not agree on one)"}'
                     f'{f" ({how})" if line is not None else ""}.</p>')
    else:
        parts.append('<p class="muted">No scored records.</p>')
    parts += ["</section>", '<section id="errors"><h2>Errors by kind</h2>', _errors_html(stats), "</section>"]
    if top_n > 0:
        top = stats.top()
        parts += [f'<section id="top"><h2>Top {len(top)} most synthetic (of {stats.scored} scored)</h2>',
                  _top_html(thumbnails(top)), "</section>"]
    if eval_report is not None:
        parts += ['<section id="eval"><h2>Evaluation</h2>', _eval_html(Path(eval_report)), "</section>"]
    parts.append("</body></html>\n")
    return "".join(parts)


def write_report(results, out, **kwargs) -> Path:
    """Build the report and write it to `out` (atomically). Returns the path."""
    text = build_report(results, **kwargs)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(out)
    return out
