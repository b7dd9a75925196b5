"""Command line: ``python -m istr_viz <command>`` or ``istr-viz <command>``.

Each subcommand converts its arguments to typed values and calls one library function. Every
:class:`~istr_viz.errors.IstrVizError` becomes one line ``error: <file>: <entry>: <reason>`` on
stderr and exit status 2; argparse's own usage errors also exit with 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from istr_viz.errors import DataError, IstrVizError


def _write_json(path: str | None, payload: dict) -> None:
    if path:
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(payload, indent=2) + "\n")


def _cmd_make_shapes(args: argparse.Namespace) -> int:
    from istr_viz.data.shapes import make_shapes

    summary = make_shapes(
        Path(args.out), num_train=args.train, num_val=args.val, size=args.size, seed=args.seed
    )
    print(json.dumps(summary))
    return 0


def _dataset_paths(args: argparse.Namespace, split: str = "val", prefix: str = ""):
    """The (annotation file, image folder) pair from ``--ann/--images`` or ``--data ROOT``."""
    from istr_viz.data.layout import DatasetPaths, split_paths

    ann, images = getattr(args, f"{prefix}ann"), getattr(args, f"{prefix}images")
    if getattr(args, "data", None):
        if ann or images:
            raise DataError("give either --data or the annotation file and image folder, not both",
                            file=args.data)
        return split_paths(args.data, split)
    if not ann or not images:
        flag = prefix.replace("_", "-")
        raise DataError(f"give --{flag}ann FILE and --{flag}images DIR, or --data ROOT")
    return DatasetPaths(Path(ann), Path(images)).check_exists()


def _cmd_check_data(args: argparse.Namespace) -> int:
    """Print the summary; exit 2 with one line per problem when entries had to be skipped."""
    from istr_viz.data.check import check_dataset, format_summary

    paths = _dataset_paths(args, args.split)
    summary = check_dataset(paths.ann_file, paths.images_dir, progress=True)
    print(format_summary(summary))
    _write_json(args.json_out, summary)
    problems = summary["skipped"]
    for p in problems[:20]:
        print(f"error: {p['file']}: {p['entry']}: {p['reason']}", file=sys.stderr)
    if len(problems) > 20:
        print(f"error: ... and {len(problems) - 20} more problems (see the summary)", file=sys.stderr)
    return 2 if problems else 0


def _cmd_fit_basis(args: argparse.Namespace) -> int:
    from istr_viz.basis import fit_basis_from_coco

    ann = Path(args.ann)
    if args.images is not None and not Path(args.images).is_dir():
        raise DataError("image folder not found", file=args.images)
    basis, report = fit_basis_from_coco(
        ann, dim=args.dim, mask_size=args.mask_size, recipe=args.recipe, seed=args.seed
    )
    basis.save(args.out)
    print(
        f"fitted dim={report['dim']} on {report['n_masks']} masks of {report['mask_size']}x"
        f"{report['mask_size']}: explained variance {report['explained_variance_cumulative']:.3f}, "
        f"held-out reconstruction mIoU {report['recon_miou']:.4f}; saved {args.out}"
    )
    _write_json(args.json_out, report)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="istr-viz",
        description="Train ISTR and look inside it: data sets, mask bases, models, visualisations.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("make-shapes", help="write the synthetic shapes data set in COCO format")
    from istr_viz.data import layout

    p.add_argument("--out", required=True, help="output root (gets train/ and val/)")
    p.add_argument("--train", type=int, default=layout.DEFAULT_SHAPES_TRAIN, help="training images")
    p.add_argument("--val", type=int, default=layout.DEFAULT_SHAPES_VAL, help="validation images")
    p.add_argument("--size", type=int, default=layout.DEFAULT_SHAPES_SIZE, help="image side in px")
    p.add_argument("--seed", type=int, default=layout.DEFAULT_SHAPES_SEED)
    p.set_defaults(func=_cmd_make_shapes)

    p = sub.add_parser("check-data", help="validate a COCO data set and summarise it")
    p.add_argument("--ann", help="COCO instances annotation file")
    p.add_argument("--images", help="folder the file_names are relative to")
    p.add_argument("--data", help="or a data set root holding train/ and val/")
    p.add_argument("--split", default="val", choices=["train", "val"], help="split of --data")
    p.add_argument("--json-out", help="also write the summary as JSON")
    p.set_defaults(func=_cmd_check_data)

    p = sub.add_parser("fit-basis", help="fit the PCA mask-embedding basis on a COCO data set")
    p.add_argument("--ann", required=True, help="COCO instances annotation file")
    p.add_argument("--images", help="image folder (not read: masks come from the annotations)")
    p.add_argument("--dim", type=int, default=60, help="basis size (embedding length)")
    p.add_argument("--mask-size", type=int, default=28, help="mask side S")
    p.add_argument("--recipe", choices=["istr", "binary"], default="istr",
                   help="istr: noisy logit space, whitened, sigmoid decode; binary: plain PCA")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output .npz file")
    p.add_argument("--json-out", help="also write the report as JSON")
    p.set_defaults(func=_cmd_fit_basis)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; return the exit status (0 ok, 2 bad input)."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except IstrVizError as err:
        print(f"error: {err.one_line()}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
