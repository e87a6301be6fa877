"""People as the oracle: the acquisition callback's side of the query files (``saal_lightning.labeling``).

A round's chosen items become a query for people (:func:`write_query`) instead of labels; the next fit imports the
answers (:func:`import_answers`): validated as a whole, labeled in the data module, appended to the ledger. Every
rank runs these (the answers are read on every rank, so a refused file stops all of them); files are written on
rank 0 only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from saal_lightning.labeling.label_studio import local_files_url
from saal_lightning.labeling.query_files import append_to_ledger, read_answers, write_queries

if TYPE_CHECKING:
    import lightning.pytorch as pl

log = logging.getLogger(__name__)


def asks_people(datamodule: Any) -> bool:
    """Whether the data module's labels come from people (``oracle="human"``) rather than its targets."""
    return getattr(datamodule, "oracle", "simulated") == "human"


def write_query(trainer: pl.Trainer, datamodule: Any, queries_dir: Path, round_index: int, selection: torch.Tensor,
                scores: torch.Tensor | None, predicted: torch.Tensor | None) -> dict[str, Any]:
    """Write the query for round ``round_index``'s labels (rank 0); return it as the callback keeps it."""
    names = datamodule.item_names(selection)
    classes = datamodule.class_names
    rows = [{"index": int(index), "path": name,
             "pseudo_label": classes[int(predicted[n])] if predicted is not None else "",
             "score": round(float(scores[n]), 6) if scores is not None else ""}
            for n, (index, name) in enumerate(zip(selection, names, strict=True))]
    if trainer.is_global_zero:
        image_files = [datamodule.image_path(int(i)) for i in selection] if hasattr(datamodule, "image_path") else None
        write_queries(queries_dir, round_index, rows, classes, image_files, local_files_url)
    return {"round": round_index, "indices": selection.clone(), "paths": names}


def save_resumable_checkpoint(trainer: pl.Trainer) -> None:
    """Write ``<checkpoint dir>/last.ckpt`` now (a fit that stops before any epoch ends has no other)."""
    checkpoint = trainer.checkpoint_callback
    if not isinstance(checkpoint, ModelCheckpoint) or not checkpoint.dirpath:
        return
    path = str(Path(checkpoint.dirpath) / "last.ckpt")
    # Recorded as the checkpoint callback's own "last", so that its next save replaces the file (and
    # --ckpt_path last keeps finding the newest state) instead of writing last-v1.ckpt beside it.
    checkpoint.last_model_path = path
    trainer.save_checkpoint(path)


def import_answers(trainer: pl.Trainer, datamodule: Any, query: dict[str, Any], queries_dir: Path, ledger: Path,
                   partial: bool) -> int:
    """Label ``query``'s answered items and append them to ``ledger``; return how many are labeled.

    Items already labeled through the Python API (``datamodule.label(indices, labels)``) are taken as they are;
    otherwise the queries file (or its Label Studio export) is read and validated.

    Raises:
        LabelImportError: for answers that cannot be imported; nothing is labeled then.
    """
    indices, paths, round_index = query["indices"], list(query["paths"]), int(query["round"])
    labeled = set(datamodule.labeled_indices.tolist())
    answered = [int(i) for i in indices if int(i) in labeled]
    if answered:  # labeled with label()'s default round: they belong to this query's round
        datamodule.labeled_round[torch.tensor(answered)] = round_index
    else:
        source, answers = read_answers(queries_dir, round_index, dict(zip(indices.tolist(), paths, strict=True)),
                                       datamodule.class_names, partial=partial)
        if answers:
            datamodule.label(torch.tensor(list(answers)), torch.tensor(list(answers.values())), round=round_index)
        log.info("Imported %d labels from %s.", len(answers), source)
    now_labeled = [(int(i), path) for i, path in zip(indices, paths, strict=True)
                   if int(datamodule.labeled_round[int(i)]) >= 0]
    if trainer.is_global_zero:
        classes = datamodule.class_names
        entries = [(path, classes[int(datamodule.labels[index])], round_index) for index, path in now_labeled]
        added = append_to_ledger(ledger, entries)
        if added < len(entries):
            log.warning("%d of round %d's %d labels were already in %s: not added again.",
                        len(entries) - added, round_index, len(entries), ledger)
    return len(now_labeled)


def instructions(query: dict[str, Any], queries_dir: Path) -> str:
    """The one message a run that stopped for labels ends with: the file to fill and the command that continues."""
    round_index = query["round"]
    return (f"saal: {len(query['indices'])} items to label for round {round_index}: fill the label column of "
            f"{queries_dir / f'round_{round_index}.csv'} with class names (or label round_{round_index}.tasks.json "
            f"in Label Studio and save its JSON export as round_{round_index}.export.json there), then rerun the "
            "same command with --ckpt_path last.")
