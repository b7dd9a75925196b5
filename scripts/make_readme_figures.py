"""Make the README pictures from a checkpoint: every stage, the matching, and the mask basis.

    python scripts/make_readme_figures.py                      # the shipped checkpoint
    python scripts/make_readme_figures.py --checkpoint runs/shapes/last.pt --index 3

Writes three PNGs into ``--out`` (default ``docs/images``):

- ``stages.png``: every refinement stage of one val image (``plot_stage_grid``);
- ``matching.png``: the Hungarian assignment of the same image at stage 1 and at the last stage,
  and which query owns each instance at each stage (``plot_assignments``,
  ``plot_assignment_timeline``);
- ``basis.png``: the mask basis stored in the checkpoint (``plot_basis_components``).

The image is the ``--index``-th of the built-in shapes val set, or of ``--data ROOT``'s ``val/``.
Every picture comes from istr_viz's own drawing functions, so the README shows what the notebooks
and the demo show. Exit status 2 with one line for a missing or unusable checkpoint or data set.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from matplotlib.figure import Figure

NAMES = ("stages", "matching", "basis")


def readme_figures(checkpoint: Path, data_root: Path | None = None, index: int = 0,
                   score_threshold: float | None = None, device: str | None = "cpu"
                   ) -> dict[str, Figure]:
    """The three figures, by name (``NAMES``), for the checkpoint and one val image;
    ``score_threshold`` None: the one the checkpoint's evaluation chose (0.3 if none)."""
    from istr_viz.data.layout import default_data_root, split_paths
    from istr_viz.evaluate import eval_dataset
    from istr_viz.inspect import assignment_table, match_image
    from istr_viz.predictor import load_model, suggested_score_threshold
    from istr_viz.viz import (new_figure, plot_assignment_timeline, plot_assignments,
                              plot_basis_components, plot_stage_grid)

    model, predictor = load_model(checkpoint, device=device)
    val = split_paths(data_root if data_root is not None else default_data_root(), "val")
    dataset = eval_dataset(val, predictor.config, predictor.category_ids)
    if not 0 <= index < len(dataset):
        raise IndexError(f"--index {index} is outside the val set's 0..{len(dataset) - 1}")
    prediction = predictor.predict(dataset.image_path(index))
    if score_threshold is None:
        score_threshold = suggested_score_threshold(predictor.metrics, fallback=0.3)
    stages = plot_stage_grid(prediction, score_threshold)

    matches = match_image(model, dataset, index, loss_cfg=predictor.config.loss)
    matching, axes = new_figure(1, 3, (4.2, 4.2))
    plot_assignments(matches, 1, ax=axes[0, 0])
    plot_assignments(matches, -1, ax=axes[0, 1])
    plot_assignment_timeline(assignment_table(matches.matches), matches.num_queries,
                             ax=axes[0, 2])

    basis = plot_basis_components(model.basis, num=min(11, model.basis.dim))
    return {"stages": stages, "matching": matching, "basis": basis}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="checkpoint file (default: the shipped "
                        "checkpoints/istr_shapes.pt, or $ISTR_VIZ_CHECKPOINT)")
    parser.add_argument("--data", help="data set root with val/ (default: the built-in shapes)")
    parser.add_argument("--index", type=int, default=0, help="which val image (default 0)")
    parser.add_argument("--score-threshold", type=float, default=None,
                        help="detections drawn in stages.png score at least this (default: the "
                             "threshold the checkpoint's evaluation chose, else 0.3)")
    parser.add_argument("--out", default="docs/images", help="output folder")
    parser.add_argument("--dpi", type=float, default=100)
    args = parser.parse_args(argv)

    from istr_viz.errors import IstrVizError
    from istr_viz.predictor import default_checkpoint
    from istr_viz.viz import figure_to_png

    try:
        checkpoint = default_checkpoint(args.checkpoint)
        figures = readme_figures(checkpoint, Path(args.data) if args.data else None, args.index,
                                 args.score_threshold)
    except IstrVizError as err:
        print(f"error: {err.one_line()}", file=sys.stderr)
        return 2
    except IndexError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name in NAMES:
        path = out / f"{name}.png"
        path.write_bytes(figure_to_png(figures[name], args.dpi))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
