"""``python -m monai_ckpt.data``: make a dataset or check one.

    python -m monai_ckpt.data brain-tissue --source <mni152 dir> --output <dataset dir>
    python -m monai_ckpt.data synthetic --output <dataset dir> --shape 32 32 32 --num-classes 4
    python -m monai_ckpt.data check <dataset dir>/dataset.json --num-classes 4
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from .checks import DataCheckError, load_checked_datalist
from .datasets import make_brain_tissue_dataset, make_synthetic_dataset

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m monai_ckpt.data", description="Make a dataset in MSD layout, or check one.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("brain-tissue", help="derive the 4-class brain-tissue dataset from the MNI152 template")
    p.add_argument("--source", required=True, help="folder with the MNI ICBM152 2009a files and NOTICE.md")
    p.add_argument("--output", required=True)
    p.add_argument("--num-training", type=int, default=6)
    p.add_argument("--num-test", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--spacing", type=float, default=2.0)
    p = sub.add_parser("synthetic", help="tiny nested-ellipsoid volumes")
    p.add_argument("--output", required=True)
    p.add_argument("--num-training", type=int, default=3)
    p.add_argument("--num-test", type=int, default=1)
    p.add_argument("--shape", type=int, nargs=3, default=[32, 32, 32])
    p.add_argument("--num-classes", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("check", help="check a dataset.json (files, shapes, affines, label values)")
    p.add_argument("datalist_file")
    p.add_argument("--key", default="training")
    p.add_argument("--num-classes", type=int)
    args = parser.parse_args(argv)
    if args.command == "brain-tissue":
        out = make_brain_tissue_dataset(args.source, args.output, args.num_training, args.num_test, args.seed,
                                        args.spacing)
    elif args.command == "synthetic":
        out = make_synthetic_dataset(args.output, args.num_training, args.num_test, args.shape, args.num_classes,
                                     args.seed)
    else:
        try:
            items = load_checked_datalist(Path(args.datalist_file).parent, args.key, args.num_classes,
                                          args.datalist_file)
        except DataCheckError as e:
            print(f"error: {e}")
            return 1
        print(f"{len(items)} items OK")
        return 0
    print(f"dataset written to {out}")
    return 0
