"""Label Studio's JSON formats for a round's queries: the labeling config, the tasks to import, the export to read.

A person can label a round's queries in Label Studio instead of filling in the queries CSV: create a project with
:func:`labeling_config`, import the file :func:`write_tasks` wrote from :func:`tasks_for_queries`, label, export the
project as **JSON**, and read the export back with :func:`read_export`.

Where each format comes from (HumanSignal/label-studio, files under ``docs/source/``, published on labelstud.io):

* Labeling config: ``templates/image_classification.md`` (an ``<Image>`` object tag and a ``<Choices>`` control tag
  with ``toName`` pointing at it) and ``tags/choices.md`` (``name``, ``toName``, ``choice="single"``,
  ``required``). Unlike the template we name the tags ``image`` and ``label``; results carry those names as
  ``to_name`` and ``from_name``.
* Tasks to import: ``guide/predictions.md`` ("Import pre-annotated data", https://labelstud.io/guide/predictions):
  a list of tasks, each a ``data`` object whose keys match the config's ``$variables`` and a ``predictions`` list
  of ``{"model_version", "score", "result": [{"id", "type": "choices", "from_name", "to_name",
  "value": {"choices": [...]}}]}``. Keys we add to ``data`` are kept and come back in the export.
* Export: ``includes/task_format.md`` ("Label Studio JSON format of annotated tasks",
  https://labelstud.io/guide/task_format) and ``guide/export.md`` (the ``JSON`` export is a list of such tasks):
  ``id``, ``data``, ``annotations`` each with ``id``, ``result``, ``was_cancelled`` ("the annotation was skipped,
  or cancelled"), ``ground_truth``, ``created_at``, ``updated_at``, ``lead_time``, ``completed_by``, ``task``;
  plus ``predictions``. Real exports also carry ``origin`` on results and ``inner_id``, ``total_annotations``,
  ``cancelled_annotations``, ``meta`` ... on tasks, which we ignore.
* Local files: ``guide/storage_local.md``: with ``LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED=true`` and
  ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT`` set, a task refers to a file as ``/data/local-files/?d=<path relative
  to the document root>``. The server (``label_studio/io_storages/localfiles/views.py``, ``localfiles_data``) reads
  ``d`` with Django's ``request.GET`` (so it is percent-decoded, and a raw ``+`` would become a space) and serves
  the file only if a Local Files *source storage* of the project covers its folder, so the user must add one (it
  need not be synced).

Only the full ``JSON`` export is accepted. ``JSON_MIN`` flattens each annotation into the task's data (its shape
is set by ``label_studio_sdk/converter/converter.py``, ``convert_to_json_min``, more than by the docs' one
example), drops cancelled annotations and makes one row per annotation, so we refuse it and name the export to use.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import quote
from xml.sax.saxutils import escape

from saal_lightning.reporting.atomic_file import atomic_write_text

#: ``name`` of the ``<Image>`` tag: the tasks' ``data`` key (``$image``) and the results' ``to_name``.
IMAGE_NAME = "image"
#: ``name`` of the ``<Choices>`` tag: the results' ``from_name``.
CHOICES_NAME = "label"
#: The URL prefix Label Studio serves local files under (``guide/storage_local.md``).
LOCAL_FILES_PREFIX = "/data/local-files/?d="


@dataclass(frozen=True)
class ExportedLabel:
    """One task of a Label Studio export, matched back to a query row.

    Attributes:
        index: The query's dataset index (the task's ``data.index``).
        path: The query's image path (the task's ``data.path``), as the queries file wrote it.
        label: The class name a person chose, or ``None`` if the task has no usable annotation (not labeled yet,
            or only skipped); the caller decides whether that is allowed.
        task_id: Label Studio's task ``id``, or ``None`` if the export did not give an integer one.
    """

    index: int
    path: str
    label: str | None
    task_id: int | None


def labeling_config(classes: Sequence[str]) -> str:
    """The labeling config (XML) for single-choice image classification among ``classes``, in their order.

    ``required="true"`` makes Label Studio refuse to submit an annotation without a choice, so a submitted
    annotation always has a label; a person who cannot tell uses Skip, which exports as ``was_cancelled``.

    Args:
        classes: The class names, exactly as the queries file's ``pseudo_label`` and the CSV ``label`` use them.

    Returns:
        The config, to paste into the project's Settings > Labeling Interface > Code.

    Raises:
        ValueError: If there are no classes, or a name is empty, repeated, or holds a control character.

    >>> print(labeling_config(["cat", "R&D"]))
    <View>
      <Image name="image" value="$image"/>
      <Choices name="label" toName="image" choice="single" required="true">
        <Choice value="cat"/>
        <Choice value="R&amp;D"/>
      </Choices>
    </View>
    """
    names = list(classes)
    if not names:
        raise ValueError("labeling_config needs at least one class name")
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise ValueError(f"class name {name!r} is empty or not a string")
        # XML parsers turn tabs and newlines in attribute values into spaces, so the choice Label Studio exports
        # would not be the class name we wrote.
        if any(ord(char) < 32 for char in name):
            raise ValueError(f"class name {name!r} holds a control character, which an XML attribute cannot keep")
        if name in seen:
            raise ValueError(f"class name {name!r} appears twice")
        seen.add(name)
    lines = [
        "<View>",
        f'  <Image name="{IMAGE_NAME}" value="${IMAGE_NAME}"/>',
        f'  <Choices name="{CHOICES_NAME}" toName="{IMAGE_NAME}" choice="single" required="true">',
        *(f'    <Choice value="{_xml_attribute(name)}"/>' for name in names),
        "  </Choices>",
        "</View>",
    ]
    return "\n".join(lines)


def tasks_for_queries(
    rows: Sequence[Mapping[str, Any]], image_url: Callable[[str], str], model_version: str
) -> list[dict]:
    """Label Studio tasks for a round's query rows, one per row, in row order, each pre-annotated with its pseudo label.

    ``data`` holds ``image`` (what Label Studio shows), and ``index`` and ``path`` so that :func:`read_export` can
    match each exported task back to its query; nothing round-specific, so a task means the same in any round.
    The prediction's ``score`` lets people sort tasks by it in Label Studio's Data Manager.

    Args:
        rows: Query rows with ``index``, ``path``, ``pseudo_label`` and ``score``, as ints/floats or as the strings
            a CSV reader gives. ``label`` is not used.
        image_url: Maps a row's ``path`` to the URL Label Studio loads, e.g. with :func:`local_files_url`.
        model_version: Shown by Label Studio for each prediction, e.g. ``"round-3"``.

    Returns:
        The tasks, ready for :func:`write_tasks`.

    Raises:
        ValueError: If a row lacks a column, has a non-integer or negative index, an empty path or pseudo label, a
            score that is not a finite number (JSON cannot carry NaN), or repeats an earlier row's index.

    >>> task = tasks_for_queries([{"index": "7", "path": "a/7.png", "pseudo_label": "cat", "score": "0.25"}],
    ...                          image_url=lambda path: "/img/" + path, model_version="round-1")[0]
    >>> task["data"]
    {'image': '/img/a/7.png', 'index': 7, 'path': 'a/7.png'}
    >>> task["predictions"][0]["score"], task["predictions"][0]["result"][0]["value"]
    (0.25, {'choices': ['cat']})
    """
    tasks: list[dict] = []
    seen: dict[int, int] = {}
    for position, row in enumerate(rows):
        where = f"query row {position}"
        index = _query_index(_column(row, "index", where), where)
        if index in seen:
            raise ValueError(f"{where} repeats index {index} of query row {seen[index]}; exports match tasks by index")
        seen[index] = position
        path = _column(row, "path", where)
        if not isinstance(path, str) or not path:
            raise ValueError(f"{where} (index {index}) has no path")
        pseudo_label = _column(row, "pseudo_label", where)
        if not isinstance(pseudo_label, str) or not pseudo_label:
            raise ValueError(f"{where} (index {index}) has no pseudo_label")
        score = _query_score(_column(row, "score", where), f"{where} (index {index})")
        tasks.append(
            {
                "data": {IMAGE_NAME: image_url(path), "index": index, "path": path},
                "predictions": [
                    {
                        "model_version": model_version,
                        "score": score,
                        "result": [
                            {
                                # predictions.md: result ids are arbitrary strings that must differ between
                                # items; one item per task, so the index makes it unique.
                                "id": f"query-{index}",
                                "type": "choices",
                                "from_name": CHOICES_NAME,
                                "to_name": IMAGE_NAME,
                                "value": {"choices": [pseudo_label]},
                            }
                        ],
                    }
                ],
            }
        )
    return tasks


def local_files_url(document_root_relative_path: str) -> str:
    """The URL under which Label Studio serves a local file, given its path below the document root.

    The path is percent-encoded (UTF-8) except for ``/``, so spaces, non-ASCII names and characters that mean
    something in a query string (``+ & # ?``) reach the server intact.

    Args:
        document_root_relative_path: A POSIX-style path relative to ``LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT``.

    Returns:
        ``/data/local-files/?d=<quoted path>``, relative to the Label Studio host, as the docs write it.

    Raises:
        ValueError: If the path is empty, absolute, or has a ``..`` part.

    >>> local_files_url("fashion/round 1/Ankle boot.png")
    '/data/local-files/?d=fashion/round%201/Ankle%20boot.png'
    """
    path = document_root_relative_path
    if not path:
        raise ValueError("local_files_url needs a path below LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT, got ''")
    # The server strips a leading '/' and joins the rest to the document root, so an absolute path would point
    # somewhere else rather than fail; '..' could only leave the root, which the server refuses.
    if path.startswith("/"):
        raise ValueError(f"{path!r} is absolute; give it relative to LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")
    if ".." in path.split("/"):
        raise ValueError(f"{path!r} has a '..' part; give it relative to LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT")
    return LOCAL_FILES_PREFIX + quote(path, safe="/")


def read_export(path_or_text: str | os.PathLike[str]) -> list[ExportedLabel]:
    """Read a Label Studio JSON export into one :class:`ExportedLabel` per task, in the export's order.

    A task's label is the single choice of its latest annotation (by ``updated_at``, else ``created_at``; by list
    order if any candidate lacks a readable time) among those that are not ``was_cancelled`` and have a
    ``choices`` result from the ``label`` tag. A task with no such annotation gets ``label=None``.

    Args:
        path_or_text: The export file, or its text (a string starting with ``[`` or ``{``).

    Returns:
        The tasks' labels. Duplicate indexes (the same queries imported twice) are kept for the caller to judge.

    Raises:
        ValueError: Naming the file and the task (``id`` and position) if the text is not a JSON list of tasks, a
            task has no ``data.index`` (an integer) or ``data.path``, an annotation's ``label`` result does not
            hold exactly one choice or holds a non-string one, or the file is a ``JSON_MIN`` export.
        OSError: If the file cannot be read.
    """
    source, text = _export_text(path_or_text)
    try:
        tasks = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{source} is not JSON ({error}); export the Label Studio project as JSON") from error
    if not isinstance(tasks, list):
        raise ValueError(
            f"{source} holds a JSON {_json_kind(tasks)}, but a Label Studio JSON export is a list of tasks"
        )
    return [_read_task(task, position, source) for position, task in enumerate(tasks)]


def write_tasks(path: str | os.PathLike[str], tasks: Sequence[Mapping[str, Any]]) -> None:
    """Write ``tasks`` as a UTF-8 JSON list (indent 1) that Label Studio's Import accepts, atomically.

    Args:
        path: Where to write, e.g. ``<run>/round_03/label_studio_tasks.json``.
        tasks: Tasks from :func:`tasks_for_queries`.

    Raises:
        ValueError: If a task holds NaN or infinity, which JSON cannot carry.
    """
    text = json.dumps([dict(task) for task in tasks], indent=1, ensure_ascii=False, allow_nan=False)
    atomic_write_text(path, text + "\n")


# --- helpers -------------------------------------------------------------------------------------------------------


def _xml_attribute(value: str) -> str:
    # escape() handles & < >; attribute values are double-quoted, so '"' must be escaped too.
    return escape(value, {'"': "&quot;"})


def _column(row: Mapping[str, Any], name: str, where: str) -> Any:
    try:
        return row[name]
    except KeyError:
        raise ValueError(f"{where} has no {name!r} column") from None


def _query_index(value: Any, where: str) -> int:
    index = _as_index(value)
    if index is None:
        raise ValueError(f"{where} has index {value!r}; it must be a non-negative integer")
    return index


def _as_index(value: Any) -> int | None:
    # bool is an int subclass, but True is no dataset index. Strings come from CSV files (ours, or Label Studio's
    # CSV import), so digits are accepted.
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if isinstance(value, str) and value.strip().isdecimal():
        return int(value.strip())
    return None


def _query_score(value: Any, where: str) -> float:
    try:
        score = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where} has score {value!r}, which is not a number") from None
    if isinstance(value, bool) or not math.isfinite(score):
        raise ValueError(f"{where} has score {value!r}; it must be a finite number")
    return score


def _export_text(path_or_text: str | os.PathLike[str]) -> tuple[str, str]:
    if isinstance(path_or_text, str) and path_or_text.lstrip()[:1] in ("[", "{"):
        return "the Label Studio export text", path_or_text
    path = Path(path_or_text)
    # utf-8-sig: an export re-saved by an editor on Windows may start with a byte-order mark.
    return f"Label Studio export {str(path)!r}", path.read_text(encoding="utf-8-sig")


def _json_kind(value: Any) -> str:
    kinds = {dict: "object", list: "list", str: "string", bool: "boolean", int: "number", float: "number"}
    return "null" if value is None else kinds.get(type(value), type(value).__name__)


def _read_task(task: Any, position: int, source: str) -> ExportedLabel:
    if not isinstance(task, dict):
        raise ValueError(f"{source}: task at position {position} is a JSON {_json_kind(task)}, not an object")
    raw_id = task.get("id")
    task_id = raw_id if isinstance(raw_id, int) and not isinstance(raw_id, bool) else None
    named = f"task id {raw_id!r}" if raw_id is not None else "task without id"
    where = f"{source}: {named} at position {position}"
    data = task.get("data")
    if data is None:
        # JSON_MIN records carry the task's data keys, the tag names and these at the top level
        # (converter.py, convert_to_json_min), and never 'data' or 'annotations'.
        if "annotations" not in task and ({"annotation_id", "annotator"} & task.keys() or "index" in task):
            raise ValueError(
                f"{where} has no 'data' object and looks like a JSON_MIN export, which drops skipped annotations; "
                "export the project as 'JSON' instead"
            )
        raise ValueError(f"{where} has no 'data' object; is this a Label Studio JSON export?")
    if not isinstance(data, dict):
        raise ValueError(f"{where} has a 'data' {_json_kind(data)}, not an object")
    index = _as_index(data.get("index"))
    if index is None:
        raise ValueError(
            f"{where} has data.index {data.get('index')!r}, not a non-negative integer; "
            "were its tasks made by tasks_for_queries?"
        )
    path = data.get("path")
    if not isinstance(path, str) or not path:
        raise ValueError(f"{where} has data.path {path!r}, not a path; were its tasks made by tasks_for_queries?")
    annotations = task.get("annotations")
    if annotations is None:
        annotations = []
    if not isinstance(annotations, list):
        raise ValueError(f"{where} has 'annotations' as a JSON {_json_kind(annotations)}, not a list")
    return ExportedLabel(index=index, path=path, label=_latest_label(annotations, where), task_id=task_id)


def _latest_label(annotations: list[Any], where: str) -> str | None:
    candidates: list[tuple[datetime | None, int, str]] = []
    for position, annotation in enumerate(annotations):
        if not isinstance(annotation, dict):
            raise ValueError(f"{where}: annotation at position {position} is not an object")
        # was_cancelled marks a skipped annotation (task_format.md); 'skipped' is the pre-1.0 name, which the
        # SDK's converter still honours.
        if annotation.get("was_cancelled") or annotation.get("skipped"):
            continue
        label = _annotation_label(annotation, f"{where}, annotation id {annotation.get('id')!r}")
        if label is not None:
            candidates.append((_annotation_time(annotation), position, label))
    if not candidates:
        return None
    if all(time is not None for time, _, _ in candidates):
        # Ties on time go to the later one in the list.
        return max(candidates, key=lambda candidate: (candidate[0], candidate[1]))[2]
    return candidates[-1][2]


def _annotation_label(annotation: dict, where: str) -> str | None:
    result = annotation.get("result")
    if result is None:
        return None
    if not isinstance(result, list):
        raise ValueError(f"{where} has 'result' as a JSON {_json_kind(result)}, not a list")
    labels: list[str] = []
    for item in result:
        # Results of other tags (or a config someone extended) are not ours to read.
        if not isinstance(item, dict) or item.get("from_name") != CHOICES_NAME or item.get("type") != "choices":
            continue
        value = item.get("value")
        choices = value.get("choices") if isinstance(value, dict) else None
        if not isinstance(choices, list):
            raise ValueError(f"{where} has a {CHOICES_NAME!r} result without a value.choices list")
        if len(choices) != 1:
            raise ValueError(
                f"{where} has {len(choices)} choices {choices!r} in its {CHOICES_NAME!r} result, but one image takes "
                'exactly one class; use the labeling config from labeling_config() (choice="single")'
            )
        if not isinstance(choices[0], str):
            raise ValueError(f"{where} has the non-string choice {choices[0]!r}; a class name is a string")
        labels.append(choices[0])
    if len(labels) > 1:
        raise ValueError(f"{where} has {len(labels)} {CHOICES_NAME!r} results {labels!r}; expected one")
    return labels[0] if labels else None


def _annotation_time(annotation: dict) -> datetime | None:
    stamp = annotation.get("updated_at") or annotation.get("created_at")
    if not isinstance(stamp, str):
        return None
    try:
        # Label Studio writes e.g. "2021-03-09T22:16:08.728378Z"; fromisoformat accepts 'Z' only from Python 3.11.
        moment = datetime.fromisoformat(stamp.strip().replace("Z", "+00:00"))
    except ValueError:
        return None
    # Naive and aware times cannot be compared; Label Studio's are UTC.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=timezone.utc)
