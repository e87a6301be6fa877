"""Make the README's worked example data: a folder of unlabeled PNGs and a labeled test set, from Fashion-MNIST.

    .venv/bin/python scripts/make_image_folder.py data/fashion_folder --train 300 --test 100 [--seed 0]

The source is the four Fashion-MNIST IDX files, gzip-compressed (``*-ubyte.gz``) or plain, in ``--source``
(default: Debian's ``dataset-fashion-mnist`` package, ``/usr/share/datasets/fashion-mnist``). It writes:

* ``OUT/images/batch_XX/img_NNNNN.png``: ``--train`` grey-scale PNGs drawn at random from the training split,
  without labels. The nesting shows that the tool finds images at any depth; ``NNNNN`` is the item's index in
  Fashion-MNIST's training split, so names never reveal the class.
* ``OUT/test/<class>/img_NNNNN.png``: ``--test`` labeled PNGs from the test split, in torchvision's
  ``ImageFolder`` layout, the same number from each class (give or take one). Every class has a folder.
* ``OUT/classes.txt``: the class names, one a line, in Fashion-MNIST's label order. ``T-shirt/top`` holds a
  slash, which cannot be in a folder name, so it is called ``T-shirt_top`` here, in the folder and in this file
  alike. Read the label order from this file: ``ImageFolder`` would sort the folders alphabetically instead.
* ``OUT/answers.csv``: ``path,label`` for every training PNG (``path`` relative to ``OUT/images``, ``label`` a
  line of ``classes.txt``): what the person labeling would answer. The tool never reads it; tests use it to
  play that person. It is written last, so its presence means the folder is complete.

An ``OUT`` that already holds files is refused unless ``--overwrite``, which first deletes only what this
script writes there (``images/``, ``test/``, ``classes.txt``, ``answers.csv``).
"""

from __future__ import annotations

import argparse
import csv
import gzip
import io
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from saal_lightning.data import vision_datasets
from saal_lightning.reporting.atomic_file import atomic_write_text

#: Fashion-MNIST's class names in label order (torchvision's ``FashionMNIST.classes``), with the slash of
#: ``T-shirt/top`` replaced so that each name is also a folder name.
CLASS_NAMES = (
    "T-shirt_top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
#: The training PNGs go into sub-folders of this many images each.
BATCH_SIZE = 100
SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
# What --overwrite deletes: exactly what make_image_folder writes, never anything else in OUT.
OUTPUTS = ("images", "test", "classes.txt", "answers.csv")


class ImageFolderError(Exception):
    """A problem with the arguments, the source files or OUT; the message says what to do about it."""


def make_image_folder(
    out: Path, train: int, test: int, seed: int = 0, source: Path | None = None, overwrite: bool = False
) -> dict[str, int]:
    """Write the example folder described in this module's docstring.

    Args:
        out: the folder to write; created if missing.
        train: how many unlabeled PNGs to draw from the training split.
        test: how many labeled PNGs to draw from the test split (0 for none); at least one per class otherwise.
        seed: seeds both draws: the same seed gives the same images.
        source: the folder with the IDX files; ``None`` for Debian's copy.
        overwrite: delete this script's earlier output in ``out`` instead of refusing a non-empty ``out``.

    Returns:
        ``{"train": ..., "test": ..., "classes": ...}``: the numbers of PNGs written and of classes.

    Raises:
        ImageFolderError: missing or malformed source files, counts out of range, or a non-empty ``out``.
    """
    source = Path(vision_datasets.DEBIAN_FASHION_MNIST_DIR if source is None else source)
    if train < 1:
        raise ImageFolderError(f"--train must be at least 1, got {train}")
    if test != 0 and test < len(CLASS_NAMES):
        raise ImageFolderError(f"--test must be 0 or at least {len(CLASS_NAMES)} (one per class), got {test}")
    train_images, train_labels = read_split(source, "train")
    test_images, test_labels = read_split(source, "test")
    for name, wanted, available in (("--train", train, len(train_images)), ("--test", test, len(test_images))):
        if wanted > available:
            raise ImageFolderError(f"{name} {wanted} is more than the {available} images in {source}")
    out = Path(out)
    _prepare_out(out, overwrite)  # only now: a missing or bad source leaves OUT untouched

    # One generator for both draws, in a fixed order, so that a seed fixes the whole folder.
    rng = np.random.default_rng(seed)
    train_indices = rng.choice(len(train_images), size=train, replace=False)
    test_indices = _balanced_draw(test_labels, test, rng)

    answers = []
    for position, index in enumerate(train_indices):
        relative = f"batch_{position // BATCH_SIZE:02d}/img_{index:05d}.png"
        _save_png(train_images[index], out / "images" / relative)
        answers.append((relative, CLASS_NAMES[train_labels[index]]))
    for name in CLASS_NAMES:
        (out / "test" / name).mkdir(parents=True, exist_ok=True)
    for index in test_indices:
        _save_png(test_images[index], out / "test" / CLASS_NAMES[test_labels[index]] / f"img_{index:05d}.png")

    atomic_write_text(out / "classes.txt", "".join(f"{name}\n" for name in CLASS_NAMES))
    table = io.StringIO()
    writer = csv.writer(table, lineterminator="\n")
    writer.writerow(("path", "label"))
    writer.writerows(sorted(answers))
    atomic_write_text(out / "answers.csv", table.getvalue())
    return {"train": len(train_indices), "test": len(test_indices), "classes": len(CLASS_NAMES)}


def read_split(source: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images, labels)`` of one split (``train`` or ``test``): ``uint8`` arrays of shape (N, 28, 28) and (N,)."""
    images_name, labels_name = SPLIT_FILES[split]
    images, labels = read_idx(_find(source, images_name)), read_idx(_find(source, labels_name))
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ImageFolderError(
            f"the {split} files in {source} do not match: images {images.shape}, labels {labels.shape}"
        )
    if labels.size and labels.max() >= len(CLASS_NAMES):
        raise ImageFolderError(f"the {split} labels in {source} go up to {labels.max()}; Fashion-MNIST has 10 classes")
    return images, labels


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (gzip-compressed if its name ends in ``.gz``) of unsigned bytes, as a ``uint8`` array."""
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    # The header: two zero bytes, the element type (0x08: unsigned byte), the number of dimensions, then one
    # big-endian 32-bit size per dimension.
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ImageFolderError(f"{path} is not an IDX file of unsigned bytes")
    ndim = data[3]
    shape = tuple(int(size) for size in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(shape)):
        raise ImageFolderError(f"{path} holds {body.size} bytes of data, its header says shape {shape}")
    return body.reshape(shape)


def _find(source: Path, name: str) -> Path:
    """``source/name``, or ``source/name.gz`` when only the compressed file is there."""
    for candidate in (source / name, source / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise ImageFolderError(
        f"Fashion-MNIST not found: no {name}[.gz] in {source}; install it with "
        "`apt-get install dataset-fashion-mnist`, or pass --source DIR with the four IDX files"
    )


def _balanced_draw(labels: np.ndarray, count: int, rng: np.random.Generator) -> list[int]:
    """``count`` indices drawn without replacement, ``count // 10`` per class and one more for a random few.

    Balanced, so that every class folder of the test set has images: ``ImageFolder`` refuses an empty one.
    """
    if count == 0:
        return []
    classes = len(CLASS_NAMES)
    per_class = np.full(classes, count // classes)
    per_class[rng.choice(classes, size=count % classes, replace=False)] += 1
    chosen: list[int] = []
    for label, wanted in enumerate(per_class):
        members = np.flatnonzero(labels == label)
        if wanted > len(members):
            raise ImageFolderError(f"--test {count} needs {wanted} images of class {label}; the test split has "
                                   f"{len(members)}")
        chosen.extend(int(index) for index in rng.choice(members, size=wanted, replace=False))
    return chosen


def _prepare_out(out: Path, overwrite: bool) -> None:
    """Refuse a non-empty ``out``, or with ``overwrite`` delete this script's earlier output there."""
    if out.exists() and not out.is_dir():
        raise ImageFolderError(f"{out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ImageFolderError(f"{out} already contains files; choose an empty or new folder, or pass --overwrite")
        for name in OUTPUTS:
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    out.mkdir(parents=True, exist_ok=True)


def _save_png(image: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.ascontiguousarray(image), mode="L").save(path)


def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, write the folder, print what was written; 2 with a message on an error."""
    parser = argparse.ArgumentParser(
        prog="make_image_folder.py",
        description="Write unlabeled Fashion-MNIST PNGs, a labeled test set and the answers, for the README's example.",
    )
    parser.add_argument("out", type=Path, help="the folder to write")
    parser.add_argument("--train", type=int, required=True, help="unlabeled PNGs drawn from the training split")
    parser.add_argument("--test", type=int, required=True, help="labeled PNGs drawn from the test split (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the draws (default 0)")
    parser.add_argument(
        "--source", type=Path, default=None,
        help=f"folder with the four IDX files, .gz or plain (default {vision_datasets.DEBIAN_FASHION_MNIST_DIR})",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace this script's earlier output in OUT")
    args = parser.parse_args(argv)
    try:
        counts = make_image_folder(args.out, args.train, args.test, args.seed, args.source, args.overwrite)
    except ImageFolderError as err:
        print(f"make_image_folder: {err}", file=sys.stderr)
        return 2
    print(
        f"wrote {counts['train']} unlabeled images to {args.out / 'images'}, {counts['test']} labeled test images "
        f"to {args.out / 'test'} ({counts['classes']} classes, see classes.txt), answers in "
        f"{args.out / 'answers.csv'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
