"""Label Studio formats: labeling config, tasks to import, the JSON export read back, local-file URLs."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest

from saal_lightning.labeling.label_studio import (
    ExportedLabel,
    labeling_config,
    local_files_url,
    read_export,
    tasks_for_queries,
    write_tasks,
)

QUERY_ROWS = [
    {"index": 40, "path": "train/Ankle boot/0040.png", "pseudo_label": "Ankle boot", "score": 0.91, "label": ""},
    {"index": 7, "path": "train/T-shirt_top/0007.png", "pseudo_label": "T-shirt/top", "score": 0.875, "label": ""},
    {"index": 1203, "path": "train/Pullover/été 1203.png", "pseudo_label": "Pullover", "score": 0.42, "label": ""},
]


def _fashion_url(path: str) -> str:
    # The image folder is fashion/ below LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT; query paths are below the folder.
    return local_files_url("fashion/" + path)


# --- labeling_config -----------------------------------------------------------------------------------------------


def test_labeling_config_parses_and_lists_the_classes_in_order() -> None:
    classes = ["T-shirt/top", "Trouser", "Salt & pepper", 'Say "cheese"', "<none>", "Ankle boot"]

    text = labeling_config(classes)
    root = ET.fromstring(text)

    assert root.tag == "View"
    assert [child.tag for child in root] == ["Image", "Choices"]
    image, choices = root
    assert image.attrib == {"name": "image", "value": "$image"}
    assert choices.attrib == {"name": "label", "toName": "image", "choice": "single", "required": "true"}
    assert [choice.tag for choice in choices] == ["Choice"] * 6
    assert [choice.get("value") for choice in choices] == classes
    assert '<Choice value="Salt &amp; pepper"/>' in text
    assert '<Choice value="Say &quot;cheese&quot;"/>' in text
    assert '<Choice value="&lt;none&gt;"/>' in text
    assert '<Choice value="T-shirt/top"/>' in text


@pytest.mark.parametrize(
    ("classes", "message"),
    [([], "at least one"), (["cat", "cat"], "'cat' appears twice"), (["cat", " "], "empty"), (["a\nb"], "control")],
)
def test_labeling_config_refuses_unusable_class_lists(classes: list[str], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        labeling_config(classes)


# --- tasks_for_queries / write_tasks -------------------------------------------------------------------------------


def test_tasks_for_queries_makes_one_pre_annotated_task_per_row_in_order() -> None:
    tasks = tasks_for_queries(QUERY_ROWS, image_url=_fashion_url, model_version="round-2")

    assert len(tasks) == 3
    assert [task["data"]["index"] for task in tasks] == [40, 7, 1203]
    assert tasks[0] == {
        "data": {
            "image": "/data/local-files/?d=fashion/train/Ankle%20boot/0040.png",
            "index": 40,
            "path": "train/Ankle boot/0040.png",
        },
        "predictions": [
            {
                "model_version": "round-2",
                "score": 0.91,
                "result": [
                    {
                        "id": "query-40",
                        "type": "choices",
                        "from_name": "label",
                        "to_name": "image",
                        "value": {"choices": ["Ankle boot"]},
                    }
                ],
            }
        ],
    }
    assert tasks[1]["predictions"][0]["result"][0]["value"] == {"choices": ["T-shirt/top"]}
    assert tasks[2]["data"]["image"] == "/data/local-files/?d=fashion/train/Pullover/%C3%A9t%C3%A9%201203.png"
    assert tasks[2]["predictions"][0]["score"] == 0.42


def test_tasks_for_queries_converts_the_strings_a_csv_reader_gives() -> None:
    row = {"index": "12", "path": "x/12.png", "pseudo_label": "Bag", "score": "0.5", "label": ""}

    (task,) = tasks_for_queries([row], image_url=lambda path: "http://host/" + path, model_version="r1")

    assert task["data"] == {"image": "http://host/x/12.png", "index": 12, "path": "x/12.png"}
    assert task["predictions"][0]["score"] == 0.5
    assert type(task["predictions"][0]["score"]) is float


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"score": float("nan")}, r"query row 1 \(index 5\) has score nan; it must be a finite number"),
        ({"score": "high"}, "not a number"),
        ({"index": -1}, "query row 1 has index -1"),
        ({"index": "3.0"}, "query row 1 has index '3.0'"),
        ({"index": 40}, "query row 1 repeats index 40 of query row 0"),
        ({"pseudo_label": ""}, r"query row 1 \(index 5\) has no pseudo_label"),
        ({"path": ""}, r"query row 1 \(index 5\) has no path"),
    ],
)
def test_tasks_for_queries_refuses_bad_rows(change: dict, message: str) -> None:
    rows = [QUERY_ROWS[0], {"index": 5, "path": "a.png", "pseudo_label": "Bag", "score": 0.3} | change]
    with pytest.raises(ValueError, match=message):
        tasks_for_queries(rows, image_url=_fashion_url, model_version="r")


def test_tasks_for_queries_names_a_missing_column() -> None:
    with pytest.raises(ValueError, match="query row 0 has no 'score' column"):
        tasks_for_queries([{"index": 1, "path": "a.png", "pseudo_label": "Bag"}], _fashion_url, "r")


def test_write_tasks_writes_utf8_json_with_indent_1(tmp_path: Path) -> None:
    tasks = tasks_for_queries(QUERY_ROWS, image_url=_fashion_url, model_version="round-2")
    target = tmp_path / "round_02" / "label_studio_tasks.json"

    write_tasks(target, tasks)

    raw = target.read_bytes()
    assert json.loads(raw.decode("utf-8")) == tasks
    assert raw.startswith(b'[\n {\n  "data": {\n   "image": "/data/local-files/?d=fashion/train/Ankle%20boot/0040.png"')
    assert '"path": "train/Pullover/été 1203.png"'.encode() in raw
    assert raw.endswith(b"]\n")


def test_write_tasks_refuses_nan_and_leaves_no_file(tmp_path: Path) -> None:
    target = tmp_path / "tasks.json"
    with pytest.raises(ValueError):
        write_tasks(target, [{"data": {"index": 1}, "predictions": [{"score": float("nan")}]}])
    assert list(tmp_path.iterdir()) == []


# --- read_export: a realistic full JSON export ---------------------------------------------------------------------

# Written by hand after the documented example (docs/source/includes/task_format.md) and what Label Studio's
# JSON export holds today: the data and predictions we imported, plus Label Studio's own fields. Person 1 corrected
# task 101's pseudo label, accepted task 102's, and has not opened task 103 (exported with download_all_tasks=true).
_PREDICTION_FIELDS = {
    "model_version": "round-2",
    "created_ago": "2\u00a0hours",
    "cluster": None,
    "neighbors": None,
    "mislabeling": 0.0,
    "created_at": "2024-05-02T09:14:03.611245Z",
    "updated_at": "2024-05-02T09:14:03.611260Z",
    "model": None,
    "model_run": None,
    "project": 4,
}
FULL_EXPORT = [
    {
        "id": 101,
        "annotations": [
            {
                "id": 11,
                "completed_by": 1,
                "result": [
                    {
                        "value": {"choices": ["Sneaker"]},
                        "id": "query-40",
                        "from_name": "label",
                        "to_name": "image",
                        "type": "choices",
                        "origin": "prediction-changed",
                    }
                ],
                "was_cancelled": False,
                "ground_truth": False,
                "created_at": "2024-05-02T11:02:41.120331Z",
                "updated_at": "2024-05-02T11:02:41.120359Z",
                "draft_created_at": "2024-05-02T11:02:37.004512Z",
                "lead_time": 6.482,
                "prediction": {
                    "result": [
                        {
                            "id": "query-40",
                            "type": "choices",
                            "from_name": "label",
                            "to_name": "image",
                            "value": {"choices": ["Ankle boot"]},
                        }
                    ],
                    "score": 0.91,
                },
                "result_count": 0,
                "unique_id": "5b0a3c8e-6f4e-4f43-9d0b-8a1b1f3e2c11",
                "import_id": None,
                "last_action": None,
                "task": 101,
                "project": 4,
                "updated_by": 1,
                "parent_prediction": 201,
                "parent_annotation": None,
                "last_created_by": None,
            }
        ],
        "file_upload": "3f2a9c1e-label_studio_tasks.json",
        "drafts": [],
        "predictions": [
            {
                "id": 201,
                "result": [
                    {
                        "id": "query-40",
                        "type": "choices",
                        "from_name": "label",
                        "to_name": "image",
                        "value": {"choices": ["Ankle boot"]},
                    }
                ],
                "score": 0.91,
                **_PREDICTION_FIELDS,
                "task": 101,
            }
        ],
        "data": {
            "image": "/data/local-files/?d=fashion/train/Ankle%20boot/0040.png",
            "index": 40,
            "path": "train/Ankle boot/0040.png",
        },
        "meta": {},
        "created_at": "2024-05-02T09:14:03.598812Z",
        "updated_at": "2024-05-02T11:02:41.154670Z",
        "inner_id": 1,
        "total_annotations": 1,
        "cancelled_annotations": 0,
        "total_predictions": 1,
        "comment_count": 0,
        "unresolved_comment_count": 0,
        "last_comment_updated_at": None,
        "project": 4,
        "updated_by": 1,
        "comment_authors": [],
    },
    {
        "id": 102,
        "annotations": [
            {
                "id": 12,
                "completed_by": 1,
                "result": [
                    {
                        "value": {"choices": ["T-shirt/top"]},
                        "id": "query-7",
                        "from_name": "label",
                        "to_name": "image",
                        "type": "choices",
                        "origin": "prediction",
                    }
                ],
                "was_cancelled": False,
                "ground_truth": False,
                "created_at": "2024-05-02T11:02:49.870014Z",
                "updated_at": "2024-05-02T11:02:49.870040Z",
                "draft_created_at": None,
                "lead_time": 2.915,
                "prediction": {
                    "result": [
                        {
                            "id": "query-7",
                            "type": "choices",
                            "from_name": "label",
                            "to_name": "image",
                            "value": {"choices": ["T-shirt/top"]},
                        }
                    ],
                    "score": 0.875,
                },
                "result_count": 0,
                "unique_id": "c7d41e02-93b5-4e7a-a2f4-0e6d5b7a9f30",
                "import_id": None,
                "last_action": None,
                "task": 102,
                "project": 4,
                "updated_by": 1,
                "parent_prediction": 202,
                "parent_annotation": None,
                "last_created_by": None,
            }
        ],
        "file_upload": "3f2a9c1e-label_studio_tasks.json",
        "drafts": [],
        "predictions": [
            {
                "id": 202,
                "result": [
                    {
                        "id": "query-7",
                        "type": "choices",
                        "from_name": "label",
                        "to_name": "image",
                        "value": {"choices": ["T-shirt/top"]},
                    }
                ],
                "score": 0.875,
                **_PREDICTION_FIELDS,
                "task": 102,
            }
        ],
        "data": {
            "image": "/data/local-files/?d=fashion/train/T-shirt_top/0007.png",
            "index": 7,
            "path": "train/T-shirt_top/0007.png",
        },
        "meta": {},
        "created_at": "2024-05-02T09:14:03.598840Z",
        "updated_at": "2024-05-02T11:02:49.901377Z",
        "inner_id": 2,
        "total_annotations": 1,
        "cancelled_annotations": 0,
        "total_predictions": 1,
        "comment_count": 0,
        "unresolved_comment_count": 0,
        "last_comment_updated_at": None,
        "project": 4,
        "updated_by": 1,
        "comment_authors": [],
    },
    {
        "id": 103,
        "annotations": [],
        "file_upload": "3f2a9c1e-label_studio_tasks.json",
        "drafts": [],
        "predictions": [
            {
                "id": 203,
                "result": [
                    {
                        "id": "query-1203",
                        "type": "choices",
                        "from_name": "label",
                        "to_name": "image",
                        "value": {"choices": ["Pullover"]},
                    }
                ],
                "score": 0.42,
                **_PREDICTION_FIELDS,
                "task": 103,
            }
        ],
        "data": {
            "image": "/data/local-files/?d=fashion/train/Pullover/%C3%A9t%C3%A9%201203.png",
            "index": 1203,
            "path": "train/Pullover/été 1203.png",
        },
        "meta": {},
        "created_at": "2024-05-02T09:14:03.598861Z",
        "updated_at": "2024-05-02T09:14:03.598861Z",
        "inner_id": 3,
        "total_annotations": 0,
        "cancelled_annotations": 0,
        "total_predictions": 1,
        "comment_count": 0,
        "unresolved_comment_count": 0,
        "last_comment_updated_at": None,
        "project": 4,
        "updated_by": None,
        "comment_authors": [],
    },
]


def test_tasks_round_trip_through_a_full_json_export(tmp_path: Path) -> None:
    tasks = tasks_for_queries(QUERY_ROWS, image_url=_fashion_url, model_version="round-2")
    # Label Studio copies the imported data and predictions into the export unchanged.
    assert [task["data"] for task in FULL_EXPORT] == [task["data"] for task in tasks]
    for exported, imported in zip(FULL_EXPORT, tasks, strict=True):
        (prediction,) = exported["predictions"]
        assert {key: prediction[key] for key in imported["predictions"][0]} == imported["predictions"][0]
    export_file = tmp_path / "project-4-at-2024-05-02-11-05-1a2b3c4d.json"
    export_file.write_text(json.dumps(FULL_EXPORT, ensure_ascii=False), encoding="utf-8")

    labels = read_export(export_file)

    assert labels == [
        ExportedLabel(index=40, path="train/Ankle boot/0040.png", label="Sneaker", task_id=101),
        ExportedLabel(index=7, path="train/T-shirt_top/0007.png", label="T-shirt/top", task_id=102),
        ExportedLabel(index=1203, path="train/Pullover/été 1203.png", label=None, task_id=103),
    ]


def test_read_export_accepts_the_text_and_a_str_path(tmp_path: Path) -> None:
    text = json.dumps(FULL_EXPORT[:1], indent=2)
    export_file = tmp_path / "export.json"
    export_file.write_text(text, encoding="utf-8-sig")  # with a byte-order mark, as Windows editors save

    expected = [ExportedLabel(index=40, path="train/Ankle boot/0040.png", label="Sneaker", task_id=101)]
    assert read_export(text) == expected
    assert read_export(str(export_file)) == expected


# --- read_export: which annotation counts ---------------------------------------------------------------------------


def _annotation(annotation_id: int, choices: list | None, updated_at: str | None, *, cancelled: bool = False) -> dict:
    result = []
    if choices is not None:
        result = [
            {
                "value": {"choices": choices},
                "id": f"r{annotation_id}",
                "from_name": "label",
                "to_name": "image",
                "type": "choices",
                "origin": "manual",
            }
        ]
    annotation = {
        "id": annotation_id,
        "completed_by": 1,
        "result": result,
        "was_cancelled": cancelled,
        "ground_truth": False,
        "lead_time": 4.288,
        "prediction": {},
        "result_count": 0,
        "task": 9,
        "project": 4,
    }
    if updated_at is not None:
        annotation["created_at"] = updated_at
        annotation["updated_at"] = updated_at
    return annotation


def _export_task(task_id: int | None, annotations: list[dict], index: int = 3, path: str = "a/3.png") -> dict:
    task = {
        "annotations": annotations,
        "predictions": [],
        "data": {"image": local_files_url(path), "index": index, "path": path},
        "meta": {},
        "created_at": "2024-05-02T09:14:03.598812Z",
        "updated_at": "2024-05-02T11:02:41.154670Z",
        "inner_id": 1,
        "total_annotations": len(annotations),
        "cancelled_annotations": sum(annotation["was_cancelled"] for annotation in annotations),
        "total_predictions": 0,
        "project": 4,
        "updated_by": 1,
    }
    if task_id is not None:
        task["id"] = task_id
    return task


def _labels(*tasks: dict) -> list[str | None]:
    return [exported.label for exported in read_export(json.dumps(list(tasks)))]


def test_the_latest_annotation_wins_by_updated_at_not_list_order() -> None:
    later_first = [
        _annotation(2, ["Coat"], "2024-05-02T12:00:00.000001Z"),
        _annotation(1, ["Shirt"], "2024-05-02T12:00:00.000000Z"),
    ]
    earlier_first = list(reversed(later_first))

    assert _labels(_export_task(9, later_first), _export_task(9, earlier_first)) == ["Coat", "Coat"]


def test_updated_at_counts_before_created_at() -> None:
    edited = _annotation(1, ["Shirt"], "2024-05-02T10:00:00.000000Z")
    edited["updated_at"] = "2024-05-03T08:00:00.000000Z"  # created first, changed last
    newer = _annotation(2, ["Coat"], "2024-05-02T11:00:00.000000Z")

    assert _labels(_export_task(9, [edited, newer])) == ["Shirt"]


def test_without_times_the_last_annotation_in_the_list_wins() -> None:
    assert _labels(_export_task(9, [_annotation(1, ["Shirt"], None), _annotation(2, ["Coat"], None)])) == ["Coat"]


def test_cancelled_annotations_are_ignored_even_when_latest() -> None:
    labeled = _annotation(1, ["Bag"], "2024-05-02T10:00:00.000000Z")
    skipped_empty = _annotation(2, None, "2024-05-02T11:00:00.000000Z", cancelled=True)
    skipped_with_choice = _annotation(3, ["Coat"], "2024-05-02T12:00:00.000000Z", cancelled=True)

    assert _labels(_export_task(9, [labeled, skipped_empty, skipped_with_choice])) == ["Bag"]
    assert _labels(_export_task(9, [skipped_empty, skipped_with_choice])) == [None]


def test_tasks_without_a_label_annotation_give_none() -> None:
    other_tag = _annotation(1, ["Blurry"], "2024-05-02T10:00:00.000000Z")
    other_tag["result"][0]["from_name"] = "quality"
    empty_submit = _annotation(2, None, "2024-05-02T11:00:00.000000Z")
    no_annotations_key = _export_task(5, [])
    del no_annotations_key["annotations"]

    labels = read_export(
        json.dumps([_export_task(4, []), _export_task(6, [other_tag, empty_submit]), no_annotations_key])
    )

    assert labels == [
        ExportedLabel(index=3, path="a/3.png", label=None, task_id=4),
        ExportedLabel(index=3, path="a/3.png", label=None, task_id=6),
        ExportedLabel(index=3, path="a/3.png", label=None, task_id=5),
    ]


# --- read_export: refusals ------------------------------------------------------------------------------------------


def _refusal(tmp_path: Path, content: object) -> str:
    export_file = tmp_path / "export.json"
    export_file.write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(ValueError) as caught:
        read_export(export_file)
    message = str(caught.value)
    assert str(export_file) in message
    return message


def test_refuses_a_json_object_instead_of_a_list(tmp_path: Path) -> None:
    message = _refusal(tmp_path, _export_task(9, []))
    assert "holds a JSON object, but a Label Studio JSON export is a list of tasks" in message


def test_refuses_text_that_is_not_json(tmp_path: Path) -> None:
    export_file = tmp_path / "export.json"
    export_file.write_text("index,path,label\n3,a/3.png,Bag\n", encoding="utf-8")
    with pytest.raises(ValueError, match="is not JSON"):
        read_export(export_file)


@pytest.mark.parametrize("missing", ["index", "path"])
def test_refuses_a_task_without_data_index_or_path(tmp_path: Path, missing: str) -> None:
    bad = _export_task(17, [_annotation(1, ["Bag"], None)])
    del bad["data"][missing]

    message = _refusal(tmp_path, [_export_task(16, []), bad])

    assert f"task id 17 at position 1 has data.{missing} None" in message


def test_refuses_a_task_without_data_and_names_a_task_without_id(tmp_path: Path) -> None:
    bad = _export_task(None, [])
    del bad["data"]

    assert "task without id at position 0 has no 'data' object" in _refusal(tmp_path, [bad])


def test_refuses_more_than_one_choice(tmp_path: Path) -> None:
    bad = _export_task(23, [_annotation(8, ["Bag", "Coat"], None)])

    message = _refusal(tmp_path, [bad])

    assert "task id 23 at position 0, annotation id 8 has 2 choices ['Bag', 'Coat']" in message


def test_refuses_a_non_string_choice(tmp_path: Path) -> None:
    nested = _export_task(31, [_annotation(4, [["Tops", "Coat"]], None)])  # what allowNested choices export
    numeric = _export_task(32, [_annotation(5, [3], None)])

    assert "task id 31 at position 1, annotation id 4 has the non-string choice ['Tops', 'Coat']" in _refusal(
        tmp_path, [_export_task(30, []), nested]
    )
    assert "task id 32 at position 0, annotation id 5 has the non-string choice 3" in _refusal(tmp_path, [numeric])


def test_refuses_a_json_min_export_and_names_the_export_to_use(tmp_path: Path) -> None:
    # One record of Label Studio's JSON_MIN export (label_studio_sdk converter.convert_to_json_min): the task's
    # data keys, the id, the chosen class under the tag name, then annotation fields.
    json_min = [
        {
            "image": "/data/local-files/?d=fashion/train/Ankle%20boot/0040.png",
            "index": 40,
            "path": "train/Ankle boot/0040.png",
            "id": 101,
            "label": "Sneaker",
            "annotator": 1,
            "annotation_id": 11,
            "created_at": "2024-05-02T11:02:41.120331Z",
            "updated_at": "2024-05-02T11:02:41.120359Z",
            "lead_time": 6.482,
        }
    ]

    message = _refusal(tmp_path, json_min)

    assert "task id 101 at position 0" in message
    assert "JSON_MIN" in message
    assert "export the project as 'JSON' instead" in message


# --- local_files_url ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "url"),
    [
        ("fashion/round 1/Ankle boot.png", "/data/local-files/?d=fashion/round%201/Ankle%20boot.png"),
        ("données/été/ß.png", "/data/local-files/?d=donn%C3%A9es/%C3%A9t%C3%A9/%C3%9F.png"),
        ("a+b/c&d#e?.png", "/data/local-files/?d=a%2Bb/c%26d%23e%3F.png"),
        ("x.png", "/data/local-files/?d=x.png"),
    ],
)
def test_local_files_url_quotes_but_keeps_slashes(path: str, url: str) -> None:
    assert local_files_url(path) == url
    # The server reads d from the query string the way parse_qs does ('+' would be a space), and gets the path back.
    assert parse_qs(urlsplit(local_files_url(path)).query) == {"d": [path]}


@pytest.mark.parametrize(("path", "message"), [("", "needs a path"), ("/home/u/x.png", "absolute"), ("a/../b", "'..'")])
def test_local_files_url_refuses_paths_outside_the_document_root(path: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        local_files_url(path)
