"""The seed's two result CSVs (append-only, byte-preserving) and the HTML run report."""

from __future__ import annotations

import base64
import csv
import fcntl
import html
import io
import logging
import math
import numbers
import os
import random
import time
from collections.abc import Mapping

from neumo import storage

log = logging.getLogger(__name__)

TRAIN_CSV = "train_max_unsupervised.csv"
EVAL_CSV = "image_class_evaluation_unsupervised.csv"

TRAIN_COLUMNS = [
    "run_id", "round", "trial", "status", "error", "pixels", "mask", "model", "frozen_layers",
    "learning_rate", "loss", "augmentation", "class_weight", "clahe_clip", "epochs", "best_epoch",
    "train_loss", "val_loss", "val_accuracy", "val_auc", "threshold", "score", "duration_s",
    "model_uri", "data_version", "git_revision", "image", "seed", "finished_at",
]
EVAL_COLUMNS = [
    "run_id", "round", "trial", "model_uri", "split", "n", "loss", "accuracy", "accuracy_low", "accuracy_high",
    "auc", "auc_low", "auc_high", "sensitivity", "sensitivity_low", "sensitivity_high", "specificity",
    "specificity_low", "specificity_high", "precision", "precision_low", "precision_high", "f1", "f1_low",
    "f1_high", "tn", "fp", "fn", "tp", "threshold", "finished_at",
]
HYPERPARAMETERS = ["pixels", "mask", "model", "frozen_layers", "learning_rate", "loss", "augmentation",
                   "class_weight"]
EVAL_SHOWN = ["n", "auc", "auc_low", "auc_high", "accuracy", "sensitivity", "specificity", "precision", "f1",
              "loss"]
LEADERBOARD_SIZE = 10


def _cell(value) -> str:
    """One CSV cell: empty for None, True/False for booleans, shortest round-trip repr for floats."""
    if value is None:
        return ""
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return str(bool(value))
    if isinstance(value, numbers.Integral):
        return str(int(value))
    if isinstance(value, numbers.Real):
        return repr(float(value))
    return str(value)


def append_rows(uri: str, rows: list[dict], columns: list[str]) -> None:
    """Append `rows` to the CSV at `uri`, creating it with `columns` as header when absent.

    The existing bytes are kept exactly; the result is written back atomically. An existing file
    keeps its own header: values are mapped by column name, those it has no column for are dropped.
    Safe with concurrent writers (parallel trials): a local file is read-modified-written under an
    exclusive `fcntl.flock` on `.<name>.lock` beside it; a gs:// object is replaced only if its
    generation is unchanged since it was read, retried on conflict, so no row is ever lost."""
    if storage.is_gcs(uri):
        _append_gcs(uri, rows, columns)
    else:
        _append_local(uri, rows, columns)
    log.info("appended %d row(s) to %s", len(rows), uri)


def _append_local(uri: str, rows: list[dict], columns: list[str]) -> None:
    path = os.path.abspath(storage.local_path(uri))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.lock")  # hidden: never listed
    with open(lock, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)  # released when fh closes, also if this process dies
        try:
            old = storage.read_bytes(uri) if storage.exists(uri) else b""
            storage.write_bytes(uri, _appended(uri, old, rows, columns))
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


APPEND_TIMEOUT_S = 120.0


def _append_gcs(uri: str, rows: list[dict], columns: list[str]) -> None:
    deadline = time.monotonic() + APPEND_TIMEOUT_S
    attempt, tried = 0, None
    while True:
        old, generation = storage.read_with_generation(uri)
        if tried is not None and old is not None and old.startswith(tried):
            return  # our last write landed although its reply was lost (the retry then got 412): not twice
        tried = _appended(uri, old or b"", rows, columns)
        if storage.write_if_generation(uri, tried, generation):
            return
        attempt += 1
        if time.monotonic() > deadline:
            raise TimeoutError(f"could not append to {uri}: {attempt} conflicting writes in {APPEND_TIMEOUT_S:.0f} s")
        log.debug("%s changed while appending (attempt %d); retrying", uri, attempt)
        time.sleep(random.uniform(0, min(1.0, 0.02 * 2 ** min(attempt, 6))))  # jittered backoff


def _appended(uri: str, old: bytes, rows: list[dict], columns: list[str]) -> bytes:
    """`old` (a CSV's bytes, possibly empty) with `rows` appended, as the new bytes of the file."""
    header, newline = list(columns), "\n"
    if old.strip():
        text = old.decode("utf-8-sig")
        header = next(csv.reader(io.StringIO(text, newline="")))
        end = text.find("\n")
        newline = "\r\n" if end > 0 and text[end - 1] == "\r" else "\n"  # follow the file's line endings
        if header != list(columns):
            lost = [c for c in columns if c not in header]
            log.warning("%s has a different header; mapping by name%s", uri,
                        f", dropping columns it lacks: {lost}" if lost else "")
    known = set(columns)
    unknown = sorted({k for row in rows for k in row if k not in known}, key=str)
    if unknown:
        log.warning("dropping unknown keys %s when writing %s", unknown, uri)
    out = io.StringIO(newline="")
    writer = csv.writer(out, lineterminator=newline)
    if not old.strip():
        old = b""
        writer.writerow(header)
    elif not old.endswith(b"\n"):
        out.write(newline)  # the last line had no terminator: finish it, do not join onto it
    for row in rows:
        writer.writerow([_cell(row.get(c)) if c in known else "" for c in header])
    return old + out.getvalue().encode("utf-8")


def read_rows(uri: str) -> list[dict]:
    """The rows of the CSV at `uri` as dicts of strings; [] when the file does not exist."""
    if not storage.exists(uri):
        return []
    text = storage.read_bytes(uri).decode("utf-8-sig")
    return [dict(row) for row in csv.DictReader(io.StringIO(text, newline=""))]


def _num(value) -> float | None:
    if value is None or value == "" or isinstance(value, bool):
        return None
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def _fmt(value) -> str:
    x = _num(value)
    if x is None:
        return html.escape("" if value is None else str(value))
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else f"{x:.4g}"


def _table(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


def _plots(rows: list[dict]) -> str:
    """Best score so far against trial number, then score against each hyperparameter."""
    import numpy as np
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    scores = [_num(r.get("score")) for r in rows]
    fig = Figure(figsize=(7, 3.2), layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(1, len(rows) + 1)
    y = np.array([np.nan if s is None else s for s in scores])
    best = np.fmax.accumulate(y)
    ax.plot(x, y, "o", color="0.6", label="trial score")
    ax.step(x, best, where="post", color="C0", label="best so far")
    ax.set(xlabel="trial (in finishing order)", ylabel="score", title="Best score so far")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="lower right")
    parts = [_png(fig)]

    fig = Figure(figsize=(12, 5.5), layout="constrained")
    rng = np.random.default_rng(0)  # strip-plot jitter, fixed so reports are reproducible
    finished = [(r, s) for r, s in zip(rows, scores) if s is not None]
    for i, name in enumerate(HYPERPARAMETERS):
        ax = fig.add_subplot(2, 4, i + 1)
        ax.set(title=name, ylabel="score" if i % 4 == 0 else None)
        if name == "learning_rate":
            pts = [(_num(r.get(name)), s) for r, s in finished if (_num(r.get(name)) or 0) > 0]
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=18, alpha=0.8)
            ax.set_xscale("log")
            continue
        values = [str(r.get(name, "")) for r, _ in finished]
        cats = sorted(set(values), key=lambda v: (_num(v) is None, _num(v) or 0, v))
        pos = {c: k for k, c in enumerate(cats)}
        ax.scatter([pos[v] + rng.uniform(-0.15, 0.15) for v in values], [s for _, s in finished], s=18, alpha=0.8)
        ax.set_xticks(range(len(cats)), cats)
        ax.set_xlim(-0.5, max(len(cats), 1) - 0.5)
    parts.append(_png(fig))
    return "\n".join(parts)


def _eval_key(row: Mapping) -> tuple:
    return tuple(str(row.get(k, "")) for k in ("run_id", "round", "trial"))


def write_report(path: str, train_rows: list[dict], eval_rows: list[dict], figures: dict[str, bytes] | None = None) -> None:
    """A self-contained HTML report (plots embedded as PNG) of every trial and its evaluations;
    `figures` ({caption: PNG bytes}, e.g. the best model's ROC and Grad-CAM) are shown too."""
    rows = list(train_rows)
    finished = [r for r in rows if _num(r.get("score")) is not None]
    failed = [r for r in rows if _num(r.get("score")) is None]
    ranked = sorted(finished, key=lambda r: -_num(r["score"]))[:LEADERBOARD_SIZE]
    by_uri, by_key = {}, {}
    for e in eval_rows:
        if e.get("model_uri"):
            by_uri.setdefault(str(e["model_uri"]), []).append(e)
        by_key.setdefault(_eval_key(e), []).append(e)

    out = ["<h1>neumo run report</h1>",
           f"<p>{len(rows)} trial(s): {len(finished)} finished, {len(failed)} failed or without a score."]
    if finished:
        out[-1] += f" Best score {_fmt(ranked[0]['score'])}.</p>"
        ident = ["round", "trial", "score", "val_auc"]
        lead = [[str(k + 1)] + [_fmt(r.get(c)) for c in ident + HYPERPARAMETERS] for k, r in enumerate(ranked)]
        out += ["<h2>Leaderboard</h2>", _table(["rank"] + ident + HYPERPARAMETERS, lead)]
        evals = []
        for k, r in enumerate(ranked):
            found = by_uri.get(str(r.get("model_uri") or "")) or by_key.get(_eval_key(r), [])
            evals += [[str(k + 1), _fmt(r.get("trial")), html.escape(str(e.get("split", "")))]
                      + [_fmt(e.get(c)) for c in EVAL_SHOWN] for e in sorted(found, key=lambda e: str(e.get("split")))]
        out.append("<h3>Evaluation of the leaderboard models, by split</h3>")
        out.append(_table(["rank", "trial", "split"] + EVAL_SHOWN, evals) if evals else "<p>No evaluations.</p>")
        if figures:
            out.append("<h2>The best model</h2>")
            for caption, png in figures.items():
                data = base64.b64encode(png).decode("ascii")
                out.append(f'<h3>{html.escape(caption)}</h3><img alt="{html.escape(caption)}" '
                           f'src="data:image/png;base64,{data}">')
        out += ["<h2>Progress and hyperparameters</h2>", _plots(rows)]
    else:
        out[-1] += "</p><p><strong>No finished trials.</strong></p>"
    if failed:
        fail = [[_fmt(r.get("round")), _fmt(r.get("trial")), html.escape(str(r.get("status") or "")),
                 f"<pre>{html.escape(str(r.get('error') or ''))}</pre>"] for r in failed]
        out += ["<h2>Failed trials</h2>", _table(["round", "trial", "status", "error"], fail)]
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}pre{margin:0;white-space:pre-wrap}")
    doc = (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>neumo run report</title>'
           f"<style>{style}</style></head><body>\n" + "\n".join(out) + "\n</body></html>\n")
    storage.write_text(path, doc)
    log.info("report with %d trial(s) written to %s", len(rows), path)
