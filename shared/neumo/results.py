"""The seed's two result CSVs (append-only, byte-preserving) and the HTML report of the whole
search history they hold (pandas reads, joins and summarises them; this run's rows marked)."""

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
from collections.abc import Collection
from typing import TYPE_CHECKING

import numpy as np

from neumo import cells, storage

if TYPE_CHECKING:
    import pandas as pd

log = logging.getLogger(__name__)

TRAIN_CSV = "train_max_unsupervised.csv"
EVAL_CSV = "image_class_evaluation_unsupervised.csv"

TRAIN_COLUMNS = [
    "run_id", "round", "trial", "status", "error", "pixels", "mask", "model", "frozen_layers",
    "learning_rate", "loss", "augmentation", "class_weight", "clahe_clip", "acquisition_copies", "acquisition",
    "mask_model", "mask_model_dice", "pretrain_task", "pretrain_data", "pretrain_epochs", "pretrain_images",
    "pretrain_data_version", "frozen_layers_count", "threshold_policy", "selection", "epochs", "best_epoch",
    "train_loss", "val_loss", "val_accuracy", "val_auc", "threshold", "shift_score", "worst_shift", "score", "duration_s",
    "model_uri", "data_version", "git_revision", "image", "seed", "finished_at",
]
EVAL_COLUMNS = [
    "run_id", "round", "trial", "model_uri", "split", "n", "loss", "loss_function", "bce", "accuracy", "accuracy_low",
    "accuracy_high", "auc", "auc_low", "auc_high", "sensitivity", "sensitivity_low", "sensitivity_high", "specificity",
    "specificity_low", "specificity_high", "precision", "precision_low", "precision_high", "f1", "f1_low",
    "f1_high", "tn", "fp", "fn", "tp", "threshold", "threshold_policy", "accuracy_at_0.5", "sensitivity_at_0.5",
    "specificity_at_0.5", "ece", "temperature", "ece_calibrated", "finished_at",
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
    return cells.escape(str(value))


def append_rows(uri: str, rows: list[dict], columns: list[str]) -> None:
    """Append `rows` to the CSV at `uri`, creating it with `columns` as header when absent.

    The existing bytes are kept exactly; the result is written back atomically. Values are mapped
    to an existing file's header by column name. When that header lacks some of `columns` (a file
    from an older neumo), the file is migrated first: its bytes are kept, unchanged, in a dated
    copy beside it (`NAME.before-YYYYMMDDTHHMMSSZ.csv`), and the new file has the union of the
    columns (the old ones first, in their order; old rows blank in the new ones): no value is dropped.
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
            new, backup = _appended(uri, old, rows, columns)
            if backup:
                storage.write_bytes(backup, old)
            storage.write_bytes(uri, new)
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
        tried, backup = _appended(uri, old or b"", rows, columns)
        if backup:
            storage.write_bytes(backup, old)
        if storage.write_if_generation(uri, tried, generation):
            return
        attempt += 1
        if time.monotonic() > deadline:
            raise TimeoutError(f"could not append to {uri}: {attempt} conflicting writes in {APPEND_TIMEOUT_S:.0f} s")
        log.debug("%s changed while appending (attempt %d); retrying", uri, attempt)
        time.sleep(random.uniform(0, min(1.0, 0.02 * 2 ** min(attempt, 6))))  # jittered backoff


def backup_uri(uri: str) -> str:
    """Where a migrated CSV's old bytes are kept: NAME.before-YYYYMMDDTHHMMSSZ.csv beside it (now)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    base, ext = os.path.splitext(uri)
    return f"{base}.before-{stamp}{ext or '.csv'}"


def _appended(uri: str, old: bytes, rows: list[dict], columns: list[str]) -> tuple[bytes, str]:
    """`old` (a CSV's bytes, possibly empty) with `rows` appended, as the new bytes of the file,
    and where to keep the old bytes first when the header had to be widened ("" when not)."""
    header, newline, backup = list(columns), "\n", ""
    if old.strip():
        text = old.decode("utf-8-sig")
        records = list(csv.reader(io.StringIO(text, newline="")))
        header = records[0]
        end = text.find("\n")
        newline = "\r\n" if end > 0 and text[end - 1] == "\r" else "\n"  # follow the file's line endings
        lacking = [c for c in columns if c not in header]
        if lacking:
            backup = backup_uri(uri)
            log.warning("%s lacks the column(s) %s: migrating it to the union of the columns; its old bytes are "
                        "kept in %s", uri, lacking, backup)
            header = header + lacking
            out = io.StringIO(newline="")
            writer = csv.writer(out, lineterminator=newline)
            writer.writerow(header)
            for record in records[1:]:
                writer.writerow(record + [""] * max(0, len(header) - len(record)) if record else record)
            old = out.getvalue().encode("utf-8")
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
    return old + out.getvalue().encode("utf-8"), backup


def read_rows(uri: str) -> list[dict]:
    """The rows of the CSV at `uri` as dicts of strings; [] when the file does not exist."""
    if not storage.exists(uri):
        return []
    text = storage.read_bytes(uri).decode("utf-8-sig")
    return [cells.unescape_row(row) for row in csv.DictReader(io.StringIO(text, newline=""))]


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


def _table(headers: list[str], rows: list[list], marked: list[bool] | None = None) -> str:
    """An HTML table of already-escaped cells; rows whose `marked` flag is set get class="current"."""
    head = "".join(f"<th>{html.escape(h)}</th>" for h in headers)
    marked = marked or [False] * len(rows)
    body = "".join(('<tr class="current">' if m else "<tr>") + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
                   for row, m in zip(rows, marked))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _fields(pairs: list[tuple[str, str]]) -> str:
    """A two-column table of (name, escaped value) pairs."""
    body = "".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in pairs)
    return f'<table class="fields"><tbody>{body}</tbody></table>'


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    data = base64.b64encode(buf.getvalue()).decode("ascii")
    return f'<img alt="plot" src="data:image/png;base64,{data}">'


# --- the history as tables ------------------------------------------------------------------

#: What each evaluated split is, in the order the report lists them (the names `evaluation.EVAL_SPLITS`
#: evaluates; `{share}` is the held-out share of the train split's patients).
SPLIT_MEANING = {
    "test": "the dataset's official test folder",
    "val": "the dataset's own val folder (16 images in Kermany)",
    "test+val": "test and val pooled (the seed's third figure); only when both exist",
    "valid": "the {share:.0%} patient-level fold carved from the train split and never fitted on: "
             "what tuning selects on (the score)",
}
#: The columns that name one trained model in both CSVs.
KEY = ["run_id", "round", "trial", "model_uri"]
RUNS_SHOWN = 30
FAILED_SHOWN = 50
CURRENT = "#fff3c4"  # background of this run's rows
CURRENT_PLOT = "C1"  # colour of this run's points


def read_table(uri: str) -> pd.DataFrame:
    """The CSV at `uri` as a DataFrame of strings ('' for an empty cell; the report converts the
    numbers it needs); an empty frame when the file does not exist or is empty."""
    import pandas as pd

    data = storage.read_bytes(uri) if storage.exists(uri) else b""
    if not data.strip():
        return pd.DataFrame()
    table = pd.read_csv(io.BytesIO(data), dtype=str, keep_default_na=False, encoding="utf-8-sig")
    return table.apply(lambda column: column.map(cells.unescape))


def _text(value) -> str:
    """A value as the CSV would hold it; '' for None and NaN."""
    if isinstance(value, float) and math.isnan(value):
        return ""
    return _cell(value)


def _frame(rows, columns: list[str]) -> pd.DataFrame:
    """Rows (dicts, or a DataFrame from `read_table`) as a DataFrame of strings with at least
    `columns` (those missing are empty), in the rows' order."""
    import pandas as pd

    records = rows.to_dict("records") if isinstance(rows, pd.DataFrame) else list(rows)
    names = list(dict.fromkeys([*columns, *(k for r in records for k in r if isinstance(k, str))]))
    return pd.DataFrame([[_text(r.get(c)) for c in names] for r in records], columns=names, dtype=str)


def _numbers(column: pd.Series) -> pd.Series:
    """A column of strings as floats; NaN where empty, not a number or not finite."""
    import pandas as pd

    x = pd.to_numeric(column, errors="coerce").astype(float)
    return x.where(np.isfinite(x))


def _evaluations(evals: pd.DataFrame) -> tuple[pd.DataFrame, int]:
    """The last evaluation of each (model, split), without pooled rows one of whose parts is
    absent (written before evaluate stopped pooling an empty split: they only repeat the other
    part); and how many of those were left out."""
    import pandas as pd

    evals = evals.drop_duplicates(KEY + ["split"], keep="last")
    have = {tuple(k): set(g) for k, g in evals.groupby(KEY, sort=False)["split"]}
    keep = pd.Series([all(p in have[tuple(k)] for p in s.split("+"))
                      for k, s in zip(evals[KEY].itertuples(index=False), evals["split"])], index=evals.index, dtype=bool)
    return evals[keep], int((~keep).sum())


def _run_name(run_id: str) -> str:
    return html.escape(run_id) if run_id else "<em>(no run id)</em>"


def _mark(current: bool) -> str:
    return "&#9679; this run" if current else ""


def _absence(split: str, present: set[str]) -> str:
    """Why `split` has no evaluation although the trials were evaluated."""
    parts = split.split("+")
    missing = [p for p in parts if p not in present]
    if len(parts) > 1 and missing:
        others = [p for p in parts if p in present]
        return (f"not pooled: no {' and no '.join(missing)} split in this dataset"
                + (f" (it would only repeat {', '.join(others)})" if others else ""))
    if split == "valid":
        return "no valid fold (no training patients held out)"
    return f"no {split} split in this dataset"


# --- plots ----------------------------------------------------------------------------------

def _earlier_label(has_current: bool) -> str:
    return "earlier runs' trials" if has_current else "trial score"


def _score_plot(train: pd.DataFrame, has_current: bool) -> str:
    """Score of every trial of the history in the order its rows were appended (failed ones as
    crosses, dotted lines between runs), with the best so far; this run's trials in colour."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    y = train["_score"].to_numpy(dtype=float)
    cur = train["_current"].to_numpy(dtype=bool)
    x = np.arange(1, len(y) + 1)
    fig = Figure(figsize=(10, 3.6), layout="constrained")
    ax = fig.add_subplot()
    runs = train["run_id"].to_numpy()
    for b in np.flatnonzero(runs[1:] != runs[:-1]):  # a new run starts after row b
        ax.axvline(b + 1.5, color="0.8", lw=0.8, ls=":")
    if cur.any():
        ax.axvspan(x[cur].min() - 0.5, x[cur].max() + 0.5, color=CURRENT_PLOT, alpha=0.1, lw=0)
    ax.plot(x[~cur], y[~cur], "o", ms=4, color="0.6", label=_earlier_label(has_current))
    if cur.any():
        ax.plot(x[cur], y[cur], "o", ms=5, color=CURRENT_PLOT, label="this run's trials")
    failed = np.isnan(y)
    if failed.any():
        ax.plot(x[failed], np.zeros(failed.sum()), "x", ms=5, color="C3", label="failed (no score)",
                transform=ax.get_xaxis_transform(), clip_on=False)
    ax.step(x, np.fmax.accumulate(y), where="post", color="C0", label="best so far")
    ax.set(xlabel="trial, in the order its row was appended (dotted lines: a new run)", ylabel="score (valid AUC)",
           title="Best score so far, over the whole search history")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize="small")  # outside: never over a point
    return _png(fig)


def _hyperparameter_plot(train: pd.DataFrame, has_current: bool) -> str:
    """Score of every finished trial against each hyperparameter (a log axis for the learning
    rate, a jittered strip per value for the others); this run's trials in colour."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 5.5), layout="constrained")
    rng = np.random.default_rng(0)  # strip-plot jitter, fixed so reports are reproducible
    done = train[train["_score"].notna()]
    scores, mine = done["_score"].to_numpy(), done["_current"].to_numpy(dtype=bool)
    for i, name in enumerate(HYPERPARAMETERS):
        ax = fig.add_subplot(2, 4, i + 1)
        ax.set(title=name, ylabel="score" if i % 4 == 0 else None)
        if name == "learning_rate":
            xs = _numbers(done[name]).to_numpy()
            ok = xs > 0
            ax.set_xscale("log")
        else:
            values = done[name].astype(str).tolist()
            cats = sorted(set(values), key=lambda v: (_num(v) is None, _num(v) or 0, v))
            pos = {c: k for k, c in enumerate(cats)}
            xs = np.array([pos[v] + rng.uniform(-0.15, 0.15) for v in values])
            ok = np.ones(len(xs), bool)
            ax.set_xticks(range(len(cats)), cats)
            ax.set_xlim(-0.5, max(len(cats), 1) - 0.5)
        ax.scatter(xs[ok & ~mine], scores[ok & ~mine], s=16, alpha=0.7, color="0.55", label=_earlier_label(has_current))
        if mine.any():
            ax.scatter(xs[ok & mine], scores[ok & mine], s=22, alpha=0.9, color=CURRENT_PLOT, label="this run's trials")
    if mine.any():
        fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside upper center", ncols=2, fontsize="small")
    return _png(fig)


def _plots(train: pd.DataFrame, has_current: bool) -> str:
    """The score-history plot, then the score against each hyperparameter."""
    return "\n".join([_score_plot(train, has_current), _hyperparameter_plot(train, has_current)])


# --- the report's sections ------------------------------------------------------------------

def _history(train_rows, eval_rows, current: set[str]) -> tuple[pd.DataFrame, pd.DataFrame, int]:
    """The trials (with their score as `_score`) and the kept evaluations, both with `_current`
    marking this run's rows; and how many evaluation rows were left out (see `_evaluations`)."""
    train = _frame(train_rows, TRAIN_COLUMNS)
    train["_score"] = _numbers(train["score"])
    train["_current"] = train["run_id"].isin(current)
    evals, dropped = _evaluations(_frame(eval_rows, EVAL_COLUMNS))
    evals["_current"] = evals["run_id"].isin(current)
    return train, evals, dropped


def _ranked(train: pd.DataFrame) -> pd.DataFrame:
    """The finished trials, best score first (ties in row order), numbered from 1 in `_rank`."""
    ranked = train[train["_score"].notna()].sort_values("_score", ascending=False, kind="stable")
    return ranked.assign(_rank=range(1, len(ranked) + 1))


def _current_line(train: pd.DataFrame, ranked: pd.DataFrame, current: set[str]) -> str:
    """This run's trials, how many finished, and its best score's rank in the history."""
    mine = train[train["_current"]]
    names = ", ".join(_run_name(r) for r in sorted(current))
    line = (f"<p>This run ({names}; its rows are highlighted): {len(mine)} trial(s), "
            f"{int(mine['_score'].count())} finished")
    own = ranked[ranked["_current"]]
    if len(own):
        line += (f"; its best score {_fmt(own['score'].iloc[0])}, rank {own['_rank'].iloc[0]} "
                 f"of {len(ranked)} in the history")
    return line + ".</p>"


def _summary_section(train: pd.DataFrame, ranked: pd.DataFrame, current: set[str], history_uri: str,
                     share: float) -> list[str]:
    """The title, what the history holds, this run's part of it, and what the score is."""
    where = (f" at <code>{html.escape(history_uri)}</code> ({TRAIN_CSV}, {EVAL_CSV})" if history_uri else "")
    failed = int(train["_score"].isna().sum())
    line = (f"<p>Every trial{where}: {len(train)} trial(s) in {train['run_id'].nunique()} run(s), "
            f"{len(ranked)} finished, {failed} failed or without a score.")
    if len(ranked):
        line += f" Best score {_fmt(ranked['score'].iloc[0])}."
    out = ["<h1>neumo search report</h1>", line + "</p>"]
    if current:
        out.append(_current_line(train, ranked, current))
    out.append(f"<p><strong>score</strong> = the selection score each trial was chosen by (its <code>selection</code>): "
               "<em>shift</em>, the shift score (the worst balanced accuracy at the model's own threshold over the "
               f"valid fold as acquired and under each acquisition shift of the suite; the worst shift beside it), or "
               f"<em>auc</em>, the seed's, the AUC on the valid fold (val_auc). The valid fold is the {share:.0%} of the "
               "train split's patients held out from fitting (patient-level, seeded). The model's own threshold "
               "(chosen on that fold by its threshold policy, stored with the model) is the one accuracy, "
               "sensitivity, specificity, precision and F1 use below.</p>")
    return out


def _best_section(ranked: pd.DataFrame, has_current: bool) -> list[str]:
    """The best finished trial: where its model is, which run made it, and its hyperparameters."""
    if not len(ranked):
        return ["<p><strong>No finished trials.</strong></p>"]
    best = ranked.iloc[0]
    run_note = " (this run)" if best["_current"] else (" (an earlier run)" if has_current else "")
    return ["<h2>The best model so far</h2>",
            f"<p>Score {_fmt(best['score'])}, at <code>{html.escape(best['model_uri']) or '(no model_uri)'}</code>"
            f" (run {_run_name(best['run_id'])}{run_note}, round {_fmt(best['round'])}, "
            f"trial {_fmt(best['trial'])}).</p>",
            _fields([("model_uri", f"<code>{html.escape(best['model_uri'])}</code>"),
                     ("run", _run_name(best["run_id"]) + run_note), ("round", _fmt(best["round"])),
                     ("trial", _fmt(best["trial"])), ("score", _fmt(best["score"])),
                     ("finished at", html.escape(best["finished_at"]))]
                    + [(h, _fmt(best[h])) for h in HYPERPARAMETERS])]


def _leaderboard_section(ranked: pd.DataFrame, evals: pd.DataFrame, has_current: bool) -> list[str]:
    """The top finished trials of all runs (and this run's best when outside them), then their
    evaluations by split; nothing when no trial finished."""
    import pandas as pd

    if not len(ranked):
        return []
    leaders = ranked.head(LEADERBOARD_SIZE)
    own = ranked[ranked["_current"]].head(1)
    extra = bool(len(own)) and own["_rank"].iloc[0] > LEADERBOARD_SIZE
    if extra:
        leaders = pd.concat([leaders, own])
    mark = ["this run"] if has_current else []
    ident = ["round", "trial", "score", "val_auc", "shift_score", "worst_shift"]
    lead = [[str(r["_rank"])] + ([_mark(r["_current"])] if has_current else []) + [_run_name(r["run_id"])]
            + [_fmt(r[c]) for c in ident + HYPERPARAMETERS] for _, r in leaders.iterrows()]
    out = [f"<h2>Leaderboard (top {LEADERBOARD_SIZE} of {len(ranked)} finished, all runs)</h2>",
           _table(["rank"] + mark + ["run"] + ident + HYPERPARAMETERS, lead, leaders["_current"].tolist())]
    if extra:
        out.append("<p>The last line is this run's best, outside the top.</p>")
    return out + _leader_evaluations_section(leaders, evals, has_current)


def _leader_evaluations_section(leaders: pd.DataFrame, evals: pd.DataFrame, has_current: bool) -> list[str]:
    """The evaluations of the leaderboard's models, by rank, then split in `SPLIT_MEANING`'s order."""
    order = {s: k for k, s in enumerate(SPLIT_MEANING)}
    shown = leaders[KEY + ["_rank"]].merge(evals, on=KEY, how="inner")
    shown = shown.assign(_split=shown["split"].map(lambda s: order.get(s, len(order))))
    shown = shown.sort_values(["_rank", "_split", "split"], kind="stable")
    mark = ["this run"] if has_current else []
    rows = [[str(e["_rank"])] + ([_mark(e["_current"])] if has_current else []) + [_run_name(e["run_id"])]
            + [_fmt(e["trial"]), html.escape(e["split"])] + [_fmt(e[c]) for c in EVAL_SHOWN]
            for _, e in shown.iterrows()]
    return ["<h3>Evaluation of the leaderboard models, by split</h3>",
            _table(["rank"] + mark + ["run", "trial", "split"] + EVAL_SHOWN, rows, shown["_current"].tolist())
            if rows else "<p>No evaluations.</p>"]


def _splits_section(evals: pd.DataFrame, has_current: bool, dropped: int, share: float) -> list[str]:
    """'What the splits mean': each split's definition, its size, and which are absent."""
    mine = evals[evals["_current"]]
    scope, where = (mine, "this run") if has_current and len(mine) else (evals, "the history")
    sizes = scope.assign(_n=_numbers(scope["n"])).groupby("split")["_n"].max()
    present = set(sizes.index)
    rows, absent = [], []
    for split, meaning in SPLIT_MEANING.items():
        if not len(scope):
            status = ""
        elif split in present:
            status = f"evaluated, {_fmt(sizes[split])} images" if not math.isnan(sizes[split]) else "evaluated"
        else:
            status = f"<strong>absent</strong>: {html.escape(_absence(split, present))}"
            absent.append(split)
        rows.append([f"<code>{html.escape(split)}</code>", html.escape(meaning.format(share=share)), status])
    out = ["<h2>What the splits mean</h2>", _table(["split", "what it is", f"in {where}"], rows)]
    if not len(scope):
        out.append("<p>No evaluation rows yet: which splits this dataset has is not known.</p>")
    elif absent:
        out.append(f"<p>Absent in {where}: " + ", ".join(f"<code>{html.escape(s)}</code>" for s in absent)
                   + ". An absent split is never shown as a copy of another.</p>")
    else:
        out.append(f"<p>Every split was evaluated in {where}.</p>")
    if dropped:
        out.append(f"<p>{dropped} earlier pooled evaluation row(s) whose parts were not all present (they only "
                   "repeated one split) are left out.</p>")
    return out


def _runs_section(train: pd.DataFrame, evals: pd.DataFrame, has_current: bool) -> list[str]:
    """One line per run, most recent first: trials, finished, best score, when, splits evaluated;
    nothing when there are no trials."""
    import pandas as pd

    if not len(train):
        return []
    at = train["finished_at"].where(train["finished_at"] != "")
    g = train.assign(_at=at).groupby("run_id", sort=False)
    runs = pd.DataFrame({"trials": g.size(), "finished": g["_score"].count(), "best": g["_score"].max(),
                         "first": g["_at"].min(), "last": g["_at"].max(), "current": g["_current"].any()})
    order = list(SPLIT_MEANING)
    splits = evals.groupby("run_id")["split"].agg(lambda s: ", ".join(x for x in order if x in set(s)))
    runs["splits"] = splits.reindex(runs.index).fillna("")
    shown = runs.iloc[::-1].head(RUNS_SHOWN)
    headers = (["this run"] if has_current else []) + ["run", "trials", "finished", "best score", "first finished",
                                                       "last finished", "splits evaluated"]
    rows = [([_mark(r.current)] if has_current else [])
            + [_run_name(str(run)), str(r.trials), str(r.finished), _fmt(r.best), html.escape(str(r.first or "")),
               html.escape(str(r.last or "")), html.escape(r.splits)] for run, r in shown.iterrows()]
    out = [f"<h2>Runs ({len(runs)})</h2>", _table(headers, rows, [bool(r.current) for r in shown.itertuples()])]
    if len(runs) > RUNS_SHOWN:
        out.append(f"<p>The {RUNS_SHOWN} most recent of {len(runs)} runs.</p>")
    return out


def _figures_section(ranked: pd.DataFrame, figures: dict[str, bytes] | None, has_current: bool) -> list[str]:
    """`figures` (caption: PNG bytes) of the best trial, said to be an earlier run's when it is;
    nothing without figures or without a finished trial."""
    if not (len(ranked) and figures):
        return []
    best = ranked.iloc[0]
    out = ["<h2>Figures of this run's best trial</h2>" if has_current else "<h2>Figures of the best trial</h2>"]
    if has_current and not best["_current"]:
        out.append(f"<p>The best model overall comes from an earlier run ({_run_name(best['run_id'])}); "
                   "its figures are in that run's report.</p>")
    for caption, png in figures.items():
        data = base64.b64encode(png).decode("ascii")
        out.append(f'<h3>{html.escape(caption)}</h3><img alt="{html.escape(caption)}" '
                   f'src="data:image/png;base64,{data}">')
    return out


def _progress_section(train: pd.DataFrame, has_current: bool) -> list[str]:
    """The plots (`_plots`); nothing when no trial finished."""
    if not train["_score"].notna().any():
        return []
    return ["<h2>Progress and hyperparameters</h2>", _plots(train, has_current)]


def _failed_section(train: pd.DataFrame, has_current: bool) -> list[str]:
    """The trials without a score, most recent first, with their errors; nothing when there are none."""
    failed = train[train["_score"].isna()]
    if not len(failed):
        return []
    recent = failed.iloc[::-1].head(FAILED_SHOWN)
    rows = [([_mark(r["_current"])] if has_current else [])
            + [_run_name(r["run_id"]), _fmt(r["round"]), _fmt(r["trial"]), html.escape(r["status"]),
               f"<pre>{html.escape(r['error'])}</pre>"] for _, r in recent.iterrows()]
    out = [f"<h2>Failed trials ({len(failed)}, most recent first)</h2>",
           _table((["this run"] if has_current else []) + ["run", "round", "trial", "status", "error"], rows,
                  recent["_current"].tolist())]
    if len(failed) > FAILED_SHOWN:
        out.append(f"<p>The {FAILED_SHOWN} most recent of {len(failed)} failed trials.</p>")
    return out


def _page(body: list[str]) -> str:
    """The whole HTML document around `body` (its parts, one a line), with the report's style."""
    style = ("body{font-family:sans-serif;margin:2em;max-width:1250px}table{border-collapse:collapse;margin:1em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}"
             f"tr.current td{{background:{CURRENT}}}table.fields th{{background:#f4f4f4}}"
             "pre{margin:0;white-space:pre-wrap}code{font-size:13px}img{max-width:100%}")
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>neumo search report</title>'
            f"<style>{style}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# --- the report -----------------------------------------------------------------------------

def write_report(path: str, train_rows, eval_rows, figures: dict[str, bytes] | None = None,
                 current_run: str | Collection[str] | None = None, history_uri: str = "",
                 model_card_html: str = "") -> None:
    """A self-contained HTML report (plots embedded as PNG) of every trial in `train_rows` and its
    evaluations in `eval_rows` (lists of dicts, or DataFrames from `read_table`): the whole search
    history when they were read back from the results URI (`history_uri`, named in the report).
    Rows whose run_id is `current_run` (one id or several) are marked as this run's. `figures`
    ({caption: PNG bytes}: this run's best model's ROC and Grad-CAM) are shown too; so is
    `model_card_html` (an HTML fragment: the published best model's card, neumo.modelcard)."""
    from neumo.ingest import VALID_FRACTION

    current = {current_run} if isinstance(current_run, str) else set(current_run or ())
    has_current = bool(current)
    train, evals, dropped = _history(train_rows, eval_rows, current)
    ranked = _ranked(train)
    body = (_summary_section(train, ranked, current, history_uri, VALID_FRACTION)
            + _best_section(ranked, has_current)
            + _leaderboard_section(ranked, evals, has_current)
            + _splits_section(evals, has_current, dropped, VALID_FRACTION)
            + _runs_section(train, evals, has_current)
            + _figures_section(ranked, figures, has_current)
            + ([f"<h2>Model card of the published best model</h2>\n{model_card_html}"] if model_card_html else [])
            + _progress_section(train, has_current)
            + _failed_section(train, has_current))
    storage.write_text(path, _page(body))
    log.info("report with %d trial(s) in %d run(s) written to %s", len(train), train["run_id"].nunique(), path)
