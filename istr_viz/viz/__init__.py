"""Drawing for istr_viz: every function returns a ``matplotlib.figure.Figure`` built without pyplot.

``figures`` holds the generic pieces (a new figure, image panels, Figure -> pixels / PNG, ``show``
for notebooks); each other module draws one subject from arrays and output dataclasses, never
from a model: ``basis_plots`` the mask basis, ``stages`` and ``trajectories`` the refinement
stages, ``attention`` the query self-attention, ``matching`` the Hungarian assignments,
``curves`` the training curves and ``evaluation`` COCO AP, precision / recall and the worst
images. In a notebook, display a figure with ``show(plot_...(...))``.
"""

from __future__ import annotations

from istr_viz.viz.attention import attention_matrix, plot_attention, plot_attention_grid
from istr_viz.viz.basis_plots import (
    component_step,
    decode_codes,
    encode_masks,
    mask_iou,
    mean_mask,
    plot_basis_components,
    plot_coefficient_histograms,
    plot_component_walk,
    plot_explained_variance,
    plot_iou_vs_k,
    plot_recipe_comparison,
    plot_reconstructions,
    reconstruct,
    walk_code,
    walk_component,
)
from istr_viz.viz.curves import LiveTrainingPlot, plot_training_curves
from istr_viz.viz.evaluation import (
    ImageErrors,
    PRCurves,
    image_errors,
    plot_error_breakdown,
    plot_mask_ap_ceilings,
    plot_pr_by_stage,
    plot_pr_curves,
    plot_prediction_gallery,
    plot_stage_ap,
    pr_curves,
    worst_images,
)
from istr_viz.viz.figures import (
    figure_to_array,
    figure_to_png,
    hide_unused,
    image_panel,
    new_figure,
    show,
    signed_panel,
)
from istr_viz.viz.matching import (
    ASSIGNMENT_COLUMNS,
    assignment_rows,
    plot_assignment_history,
    plot_assignment_timeline,
    plot_assignments,
    plot_churn,
    plot_cost_matrix,
    plot_cost_terms,
    select_queries,
)
from istr_viz.viz.stages import plot_stage_grid, stage_counts
from istr_viz.viz.trajectories import (
    draw_query_highlight,
    draw_trajectories,
    plot_box_trajectories,
    plot_query_through_stages,
    plot_score_heatmap,
    plot_stage_view,
    query_trajectories,
    score_matrix,
    top_queries,
)

__all__ = [
    "component_step", "decode_codes", "encode_masks", "figure_to_array", "figure_to_png",
    "hide_unused", "image_panel", "mask_iou", "mean_mask", "new_figure",
    "plot_basis_components", "plot_coefficient_histograms", "plot_component_walk",
    "plot_explained_variance", "plot_iou_vs_k", "plot_recipe_comparison",
    "plot_reconstructions", "reconstruct", "show", "signed_panel", "walk_code",
    "walk_component",
]

__all__ += [  # stages, matching and attention (trajectories.py, matching.py, attention.py)
    "ASSIGNMENT_COLUMNS", "assignment_rows", "attention_matrix", "draw_query_highlight",
    "draw_trajectories", "plot_assignment_history", "plot_assignment_timeline",
    "plot_assignments", "plot_attention", "plot_attention_grid", "plot_box_trajectories",
    "plot_churn", "plot_cost_matrix", "plot_cost_terms", "plot_query_through_stages",
    "plot_score_heatmap", "plot_stage_view", "query_trajectories", "score_matrix",
    "select_queries", "top_queries",
]

__all__ += [  # training curves, per-stage grid, evaluation (curves.py, stages.py, evaluation.py)
    "ImageErrors", "LiveTrainingPlot", "PRCurves", "image_errors", "plot_error_breakdown",
    "plot_mask_ap_ceilings", "plot_pr_by_stage", "plot_pr_curves", "plot_prediction_gallery",
    "plot_stage_ap",
    "plot_stage_grid", "plot_training_curves", "pr_curves", "stage_counts", "worst_images",
]
