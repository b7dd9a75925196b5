"""Training curves and the per-stage grid render what they are given."""

from __future__ import annotations

import json

import numpy as np
from matplotlib.lines import Line2D

from istr_viz.engine import read_metrics
from istr_viz.viz.curves import plot_training_curves, smooth
from istr_viz.viz.figures import figure_to_array


def _records(num_iters: int = 30, num_stages: int = 3) -> list[dict]:
    rows = []
    for it in range(1, num_iters + 1):
        row = {"iter": it, "loss": 10.0 / it, "lr": 1e-4}
        for k in range(1, num_stages + 1):
            row[f"stage{k}/loss_class"] = 1.0 / (k * it)
            row[f"stage{k}/loss_giou"] = 2.0 / (k * it)
        rows.append(row)
    rows.append({"iter": num_iters, "eval": {"bbox_AP": 0.4, "segm_AP": 0.3,
                                             "per_stage_segm_AP": [0.1, 0.2, 0.3]}})
    return rows


def test_one_panel_per_term_one_line_per_stage(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in _records()))
    fig = plot_training_curves(read_metrics(path), smoothing=1)
    visible = [ax for ax in fig.axes if ax.get_visible()]
    titles = [ax.get_title() for ax in visible]
    assert titles == ["total loss", "class", "giou", "val AP"]
    class_ax = visible[1]
    lines = [ln for ln in class_ax.get_lines() if isinstance(ln, Line2D)]
    assert [ln.get_label() for ln in lines] == ["stage 1", "stage 2", "stage 3"]
    np.testing.assert_allclose(lines[1].get_ydata(), [1.0 / (2 * it) for it in range(1, 31)])
    image = figure_to_array(fig)
    assert image.dtype == np.uint8 and image.ndim == 3


def test_smooth_is_a_running_mean():
    np.testing.assert_allclose(smooth([1, 2, 3, 4], 2), [1, 1.5, 2.5, 3.5])
    np.testing.assert_allclose(smooth([1, 2, 3], 1), [1, 2, 3])
