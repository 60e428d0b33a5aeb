"""``python -m monai_ckpt.data``: make a dataset or check one.

    python -m monai_ckpt.data brain-tissue --source <mni152 dir> --output <dataset dir>
    python -m monai_ckpt.data synthetic --output <dataset dir> --shape 32 32 32 --num-classes 4
    python -m monai_ckpt.data check <dataset dir>

A dataset is written only into an empty (or new) folder, or with ``--overwrite`` over a dataset these commands
wrote, whose files the new one does not list are then removed; any other file in the folder is never touched (the
command refuses and names it). ``check`` reads the label values from ``dataset.json``'s ``labels``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from ..arguments import DefaultsHelpFormatter, non_negative_int, positive_float, positive_int

__all__ = ["main"]


def _classes(text: str) -> int:
    """An argparse type: a number of classes, background included (at least 2)."""
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"counts the background: a segmentation needs at least 2 classes, got {value}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m monai_ckpt.data", formatter_class=DefaultsHelpFormatter,
                                     description="Make a dataset in Medical Segmentation Decathlon layout, or check one.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("brain-tissue", formatter_class=DefaultsHelpFormatter,
                       help="derive the 4-class brain-tissue dataset from the MNI152 template")
    p.add_argument("--source", required=True, help="folder with the MNI ICBM152 2009a files and NOTICE.md")
    p.add_argument("--output", required=True, help="the dataset folder to write")
    p.add_argument("--num-training", type=positive_int, default=6, help="labelled subjects")
    p.add_argument("--num-test", type=non_negative_int, default=2, help="unlabelled subjects")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--spacing", type=positive_float, default=2.0, help="voxel size, mm")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --output")
    p = sub.add_parser("synthetic", formatter_class=DefaultsHelpFormatter, help="tiny nested-ellipsoid volumes")
    p.add_argument("--output", required=True, help="the dataset folder to write")
    p.add_argument("--num-training", type=positive_int, default=3, help="labelled volumes")
    p.add_argument("--num-test", type=non_negative_int, default=1, help="unlabelled volumes")
    p.add_argument("--shape", type=positive_int, nargs=3, default=[32, 32, 32], help="spatial size")
    p.add_argument("--num-classes", type=_classes, default=4, help="classes, background included")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --output")
    p = sub.add_parser("check", formatter_class=DefaultsHelpFormatter,
                       help="check a dataset (files, shapes, affines, label values)")
    p.add_argument("dataset", help="the dataset folder (the one with dataset.json), or its dataset.json")
    p.add_argument("--key", default="training", help="the list of dataset.json to check (training, test...)")
    p.add_argument("--num-classes", type=_classes,
                   help="classes, background included (default: the labels dataset.json declares)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; errors in the user's input are one line on stderr (exit status 1)."""
    args = _parser().parse_args(argv)
    try:
        if args.command == "check":
            return _check(args)
        from .datasets import make_brain_tissue_dataset, make_synthetic_dataset

        if args.command == "brain-tissue":
            out = make_brain_tissue_dataset(args.source, args.output, args.num_training, args.num_test, args.seed,
                                            args.spacing, overwrite=args.overwrite)
        else:
            out = make_synthetic_dataset(args.output, args.num_training, args.num_test, args.shape, args.num_classes,
                                         args.seed, overwrite=args.overwrite)
    except (ValueError, OSError) as error:  # DataCheckError is a ValueError; missing or non-empty folders OSErrors
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(f"dataset written to {out}")
    return 0


def _check(args: argparse.Namespace) -> int:
    from .checks import DataCheckError, declared_labels, load_checked_datalist

    given = Path(args.dataset)
    datalist_file = given / "dataset.json" if given.is_dir() else given
    if not datalist_file.is_file():
        where = "not found" if not given.exists() else "has no dataset.json"
        raise DataCheckError(f"{given}: {where}; give the dataset folder in Medical Segmentation Decathlon layout (the "
                             "one with dataset.json, imagesTr/, labelsTr/), or its dataset.json")
    labels = declared_labels(datalist_file)
    items = load_checked_datalist(datalist_file.parent, args.key, args.num_classes, datalist_file,
                                  label_values=labels if args.num_classes is None else None)
    if args.num_classes is not None:
        checked = f"label values 0..{args.num_classes - 1}"
    elif labels is not None:
        checked = f"label values {', '.join(map(str, sorted(labels)))} from dataset.json"
    else:
        checked = "label values not checked: dataset.json declares no labels; give --num-classes"
    print(f"{len(items)} {args.key} items OK ({checked})")
    return 0
