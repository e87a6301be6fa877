"""The files between the tool and the people who label: a round's queries, their answers, the label ledger.

For the labels of round ``r`` the acquisition callback writes, into ``<run dir>/queries/``:

* ``round_<r>.csv``: ``index,path,pseudo_label,score,label``, one row per queried item in selection order, with
  ``label`` empty for the person to fill with class names;
* ``round_<r>.png``: a contact sheet of the queried images (row number, pseudo label, score under each);
* ``round_<r>.tasks.json``: the same queries as Label Studio tasks (``labeling_config.xml`` is the project's
  labeling interface); Label Studio's JSON export of them, saved as ``round_<r>.export.json``, is read instead of
  the CSV when it exists.

:func:`read_answers` validates a whole file before anything is imported; every label imported is appended to the
ledger ``<run dir>/labels.csv`` (``path,label,round``, the format the image-folder data module reads back).
"""

from __future__ import annotations

import csv
import io
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from saal_lightning.labeling.contact_sheet import write_contact_sheet
from saal_lightning.labeling.label_studio import labeling_config, read_export, tasks_for_queries, write_tasks
from saal_lightning.reporting.atomic_file import atomic_write_text

QUERY_COLUMNS = ("index", "path", "pseudo_label", "score", "label")
LEDGER_COLUMNS = ("path", "label", "round")


class LabelImportError(ValueError):
    """A file of answers that cannot be imported as it is; nothing of it was imported."""


def query_files(folder: str | os.PathLike, round_index: int) -> dict[str, Path]:
    """The paths of round ``round_index``'s query files: ``csv``, ``sheet``, ``tasks`` and ``export``."""
    base = Path(folder) / f"round_{round_index}"
    return {"csv": base.with_suffix(".csv"), "sheet": base.with_suffix(".png"),
            "tasks": Path(f"{base}.tasks.json"), "export": Path(f"{base}.export.json")}


def write_queries(
    folder: str | os.PathLike,
    round_index: int,
    rows: Sequence[Mapping[str, Any]],
    classes: Sequence[str],
    image_files: Sequence[Path] | None,
    image_url: Callable[[str], str],
) -> Path:
    """Write round ``round_index``'s queries (CSV, contact sheet, Label Studio tasks); return the CSV's path.

    Args:
        folder: the run's ``queries`` folder.
        round_index: the round the answers will be labeled in.
        rows: ``index``, ``path``, ``pseudo_label`` and ``score`` of every queried item, in selection order
            (pseudo label and score are empty for a query drawn without a model).
        classes: the class names (for Label Studio's labeling interface).
        image_files: the image file of every row, for the contact sheet; ``None`` when the items are no files.
        image_url: how Label Studio reaches an item's image, from its path.
    """
    paths = query_files(folder, round_index)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=QUERY_COLUMNS)
    writer.writeheader()
    for row in rows:
        writer.writerow({column: row.get(column, "") for column in QUERY_COLUMNS} | {"label": ""})
    atomic_write_text(paths["csv"], buffer.getvalue())
    if image_files is not None:
        captions = [f"#{n} {row['pseudo_label']} {_short_score(row['score'])}".strip()
                    for n, row in enumerate(rows, start=1)]
        write_contact_sheet(paths["sheet"], list(image_files), captions)
    scored = [{**row, "pseudo_label": row["pseudo_label"] or classes[0], "score": row["score"] or 0.0}
              for row in rows]
    tasks = tasks_for_queries(scored, image_url, model_version=f"round_{round_index}")
    if not rows[0]["pseudo_label"]:
        for task in tasks:  # a query drawn without a model has no prediction to start from
            task.pop("predictions", None)
    write_tasks(paths["tasks"], tasks)
    atomic_write_text(Path(folder) / "labeling_config.xml", labeling_config(classes) + "\n")
    return paths["csv"]


def read_answers(
    folder: str | os.PathLike,
    round_index: int,
    queried: Mapping[int, str],
    classes: Sequence[str],
    partial: bool = False,
) -> tuple[Path, dict[int, int]]:
    """The validated answers to round ``round_index``'s queries: the file read and ``index -> class index``.

    Reads ``round_<r>.export.json`` (Label Studio's JSON export) when it exists, else ``round_<r>.csv``.

    Args:
        queried: the queried items, ``index -> path``.
        partial: accept unanswered items (empty label or missing row); they stay unlabeled.

    Raises:
        LabelImportError: naming the file, the row and the problem, for an index that was not queried, a changed
            path, a class that is not one of ``classes``, a duplicate row, and (unless ``partial``) an empty label
            or a missing row. Nothing is imported from a file with any such row.
    """
    paths = query_files(folder, round_index)
    source = paths["export"] if paths["export"].exists() else paths["csv"]
    if not source.exists():
        raise LabelImportError(f"{paths['csv']} is missing: it holds round {round_index}'s queries to label")
    if source == paths["export"]:
        try:
            entries = [(f"task {e.task_id}", e.index, e.path, e.label) for e in read_export(source)]
        except ValueError as err:
            raise LabelImportError(str(err)) from None
    else:
        entries = _csv_entries(source)
    class_index = {name: i for i, name in enumerate(classes)}
    answers: dict[int, int] = {}
    seen: set[int] = set()
    for where, index, path, label in entries:
        at = f"{source}, {where}"
        if index not in queried:
            raise LabelImportError(f"{at}: index {index} was not queried in round {round_index}")
        if path != queried[index]:
            raise LabelImportError(f"{at}: the path of index {index} changed: {path!r}, queried as "
                                   f"{queried[index]!r}")
        if index in seen:
            raise LabelImportError(f"{at}: index {index} appears twice")
        seen.add(index)
        if not label:
            if partial:
                continue
            raise LabelImportError(f"{at}: the label of {path!r} is empty; fill it with one of {list(classes)} "
                                   "(or pass --acquisition.partial_labels true to leave it unlabeled)")
        if label not in class_index:
            raise LabelImportError(f"{at}: label {label!r} of {path!r} is not one of the classes {list(classes)}")
        answers[index] = class_index[label]
    missing = [index for index in queried if index not in seen]
    if missing and not partial:
        raise LabelImportError(f"{source}: {len(missing)} queried row(s) are missing, e.g. index {missing[0]} "
                               f"({queried[missing[0]]!r}); restore them (or pass --acquisition.partial_labels true)")
    return source, answers


def _csv_entries(path: Path) -> list[tuple[str, int, str, str | None]]:
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        missing = {"index", "path", "label"} - set(reader.fieldnames or [])
        if missing:
            raise LabelImportError(f"{path}: missing column(s) {sorted(missing)}; expected {','.join(QUERY_COLUMNS)}")
        entries = []
        for row_number, row in enumerate(reader, start=2):
            try:
                index = int(row["index"])
            except (TypeError, ValueError):
                raise LabelImportError(f"{path}, row {row_number}: index {row['index']!r} is not an integer") from None
            entries.append((f"row {row_number}", index, row["path"], (row["label"] or "").strip()))
        return entries


def append_to_ledger(path: str | os.PathLike, entries: Sequence[tuple[str, str, int]]) -> int:
    """Append ``(path, label, round)`` entries to the ledger atomically; return how many were new.

    Entries already in the ledger are skipped, so importing the same answers twice adds nothing.
    """
    ledger = Path(path)
    existing = read_ledger(ledger)
    known = {(row["path"], row["label"], int(row["round"])) for row in existing}
    new = [entry for entry in entries if (entry[0], entry[1], int(entry[2])) not in known]
    if not new:
        return 0
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(LEDGER_COLUMNS)
    for row in existing:
        writer.writerow([row[column] for column in LEDGER_COLUMNS])
    writer.writerows(new)
    atomic_write_text(ledger, buffer.getvalue())
    return len(new)


def read_ledger(path: str | os.PathLike) -> list[dict[str, str]]:
    """The ledger's rows (``path``, ``label``, ``round``); none when it does not exist yet."""
    if not Path(path).exists():
        return []
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def _short_score(score: Any) -> str:
    return f"{float(score):.3f}" if score not in ("", None) else ""
