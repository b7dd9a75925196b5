"""The Gradio demo's Blocks (the only module that imports gradio).

``app.py`` parses its arguments, calls :func:`build_demo` and :func:`launch`; tests call the same
functions. The page has four tabs (Predict, Matching, Mask basis, Model) laid out over
``istr_viz.demo_logic``, which holds everything that can be tested without gradio. The checkpoint
and the data set are opened once in :func:`build_demo` and every callback closes over them; what
belongs to one visitor (the prediction of the image shown, the matching of the sample shown) sits
in ``gr.State``, so moving a slider only redraws. Every callback has an ``api_name`` and can be
called with ``gradio_client``.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr
import pandas as pd

from istr_viz.demo_logic.card import AP_COLUMNS, ap_rows, config_dict, model_card
from istr_viz.demo_logic.images import ImageLimits, load_upload
from istr_viz.demo_logic.mask_basis import prepare_basis, render_basis
from istr_viz.demo_logic.matching import (
    history_image,
    match_sample,
    matching_problem,
    render_matching,
    sample_choices,
)
from istr_viz.demo_logic.predict import (
    DETECTION_COLUMNS,
    examples,
    load_example,
    next_stage,
    predict_loaded,
    render_prediction,
    start_stage,
)
from istr_viz.demo_logic.served import DemoData, ServedModel, open_checkpoint, open_data
from istr_viz.errors import IstrVizError
from istr_viz.predictor import default_checkpoint, suggested_score_threshold
from istr_viz.viz.matching import ASSIGNMENT_COLUMNS

MAX_FILE_SIZE = "20mb"  # uploads over this are refused by Gradio itself
UPLOAD_LIMITS = ImageLimits(max_pixels=40_000_000, max_side=1024)
PLAY_INTERVAL_S = 1.0  # time per stage when playing
DEFAULT_THRESHOLD = 0.3  # the slider's start for a checkpoint that records no threshold
STATE_TTL_S = 3600  # a visitor's prediction is forgotten after an hour
MODEL_QUEUE = "model"  # every callback that runs the model waits in this one queue


def status_markdown(served: ServedModel, data: DemoData) -> str:
    """The page's status line: which checkpoint and data are served, or why none is."""
    lines = [served.status()]
    lines.append(f"Data: `{data.root}`." if data.ok else data.message)
    return "  \n".join(lines)


def stage_slider(num_stages: int) -> gr.Slider:
    """A stage slider 1..K at K (fixed at 1 when there is a single stage or no model)."""
    return gr.Slider(1, max(num_stages, 2), value=num_stages, step=1, label="Stage",
                     interactive=num_stages > 1)


def _table(rows: list[list], columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=columns)


def build_demo(checkpoint: str | Path | None = None, data_root: str | Path | None = None,
               device: str | None = None) -> gr.Blocks:
    """The demo page. ``checkpoint`` defaults to ``$ISTR_VIZ_CHECKPOINT`` or the shipped one;
    ``data_root`` (a folder with train/ and val/) to the built-in shapes. A checkpoint or data
    set that cannot be opened gives a message in the page, never an exception."""
    served = open_checkpoint(default_checkpoint(checkpoint, must_exist=False), device)
    data = open_data(data_root)
    choices = examples(data)
    labels = list(choices)
    first_example = next((label for label, ex in choices.items() if ex.index is not None),
                         labels[0])
    num_stages = served.num_stages
    start_threshold = suggested_score_threshold(
        served.predictor.metrics if served.ok else None, DEFAULT_THRESHOLD)
    samples = sample_choices(data)
    matching_issue = matching_problem(served, data)
    match_dataset = data.val_dataset(served.config) if not matching_issue else None
    basis_view = prepare_basis(served, data)
    first_recon, first_curves, first_basis_summary = render_basis(basis_view, basis_view.basis.dim)

    # ------------------------------------------------------------------ Predict callbacks

    no_views = (None, _table([], DETECTION_COLUMNS), None)  # overlay, table, grid

    def show(result, stage, threshold):
        view = render_prediction(result, stage, threshold)
        return view.overlay, _table(view.rows, DETECTION_COLUMNS), view.grid, view.summary

    def show_stage(result, stage, threshold):
        view = render_prediction(result, stage, threshold, with_grid=False)
        return view.overlay, _table(view.rows, DETECTION_COLUMNS), view.summary

    def refuse(message: str):
        gr.Warning(message)
        return (None, *no_views, message)

    def predict_example(label, stage, threshold):
        """Run the model on a named example; returns the state and the views."""
        if not served.ok:
            return (None, *no_views, served.message)
        if label not in choices:
            return refuse(f"Unknown example {label!r}; pick one from the list.")
        try:
            loaded, gt_boxes, gt_labels = load_example(choices[label], data, UPLOAD_LIMITS)
        except IstrVizError as err:
            return refuse(f"This example cannot be read: {err.one_line()}")
        result = predict_loaded(served, loaded, gt_boxes, gt_labels)
        return (result, *show(result, stage, threshold))

    def predict_upload(path, stage, threshold):
        """Read an uploaded file safely, then run the model on it."""
        if not served.ok:
            return (None, *no_views, served.message)
        if path is None:
            return (None, *no_views, "Upload an image or pick an example.")
        name = Path(str(path)).name  # Gradio keeps the uploaded file's own name
        try:
            loaded = load_upload(path, UPLOAD_LIMITS, name=name)
        except IstrVizError as err:
            return refuse(f"Upload refused: {err.one_line()}")
        result = predict_loaded(served, loaded)
        return (result, *show(result, stage, threshold))

    def nothing_to_redraw() -> str:
        return served.message if not served.ok else "Pick an example or upload an image."

    def redraw_stage(result, stage, threshold):
        """Redraw the kept prediction at another stage: overlay, table and status (the model
        does not run, the grid of every stage stays)."""
        if result is None:
            return None, no_views[1], nothing_to_redraw()
        return show_stage(result, stage, threshold)

    def redraw_threshold(result, stage, threshold):
        """Redraw the kept prediction at another threshold, grid included (the model does not
        run)."""
        if result is None:
            return (*no_views, nothing_to_redraw())
        return show(result, stage, threshold)

    def play(stage):
        return start_stage(stage, num_stages), gr.Timer(active=num_stages > 1)

    def play_step(stage):
        stage, playing = next_stage(stage, num_stages)
        return stage, gr.Timer(active=playing)

    # ------------------------------------------------------------------ Matching callbacks

    def show_matching(im, stage):
        view = render_matching(im, stage)
        return view.assignment, view.costs, _table(view.rows, ASSIGNMENT_COLUMNS), view.summary

    def match(index, stage):
        """Run the model on a val sample and match every stage to its ground truth."""
        if matching_issue:
            return None, None, None, None, _table([], ASSIGNMENT_COLUMNS), matching_issue
        if index is None or not 0 <= int(index) < len(match_dataset):
            gr.Warning("Pick a data set image.")
            return None, None, None, None, _table([], ASSIGNMENT_COLUMNS), "Pick a data set image."
        im = match_sample(served, match_dataset, int(index))
        assignment, costs, table, summary = show_matching(im, stage)
        return im, assignment, history_image(im), costs, table, summary

    def redraw_matching(im, stage):
        """Redraw the kept matching at another stage (the model does not run)."""
        if im is None:
            return None, None, _table([], ASSIGNMENT_COLUMNS), matching_issue or \
                "Pick a data set image."
        return show_matching(im, stage)

    def open_matching(im, index, stage):
        """When the tab opens: match the chosen sample once if nothing is shown yet."""
        if im is not None or matching_issue:
            return gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip()
        return match(index, stage)

    # ------------------------------------------------------------------ Basis and card

    def basis(k, first):
        """Reconstruct masks with k components; IoU against k with k marked."""
        return render_basis(basis_view, k, first)

    def card() -> tuple[str, list, dict]:
        """The checkpoint's card (Markdown), its per-stage AP rows (``AP_COLUMNS``) and its
        configuration."""
        metrics = served.predictor.metrics if served.ok else {}
        return model_card(served, data), ap_rows(metrics), config_dict(served)

    # ------------------------------------------------------------------ layout

    with gr.Blocks(title="istr_viz", delete_cache=(3600, 7200)) as demo:
        gr.Markdown("# istr_viz: look inside ISTR instance segmentation")
        gr.Markdown(
            "Learnable query boxes are refined over several stages; each query predicts a class,"
            " a box and a mask embedding decoded by a PCA basis. Training matches queries to"
            " the ground truth with the Hungarian algorithm.")
        gr.Markdown(status_markdown(served, data), elem_id="status")
        with gr.Tabs():
            with gr.Tab("Predict", id="predict"):
                if not served.ok:
                    gr.Markdown(served.message, elem_id="predict-message")
                with gr.Row():
                    with gr.Column(scale=1):
                        example = gr.Dropdown(labels, value=first_example, label="Example",
                                              info="shapes val images and scikit-image photos")
                        upload = gr.File(label="or upload an image", file_types=["image"],
                                         type="filepath")
                        stage = stage_slider(num_stages)
                        play_button = gr.Button("Play the stages", size="sm")
                        threshold = gr.Slider(0.0, 1.0, value=start_threshold, step=0.01,
                                              label="Score threshold")
                        info = gr.Markdown(label="Prediction status", elem_id="predict-status")
                    with gr.Column(scale=2):
                        overlay = gr.Image(label="Detections at this stage (ground truth dashed)",
                                           format="png", interactive=False)
                table = gr.Dataframe(headers=DETECTION_COLUMNS, label="Detections drawn",
                                     interactive=False)
                grid = gr.Image(label="Every stage", format="png", interactive=False)
                timer = gr.Timer(PLAY_INTERVAL_S, active=False)
                result = gr.State(None, time_to_live=STATE_TTL_S)
            with gr.Tab("Matching", id="matching") as matching_tab:
                if matching_issue:
                    gr.Markdown(matching_issue, elem_id="matching-message")
                with gr.Row():
                    sample = gr.Dropdown(samples, value=samples[0][1] if samples else None,
                                         label="Data set image (val, with ground truth)")
                    m_stage = stage_slider(num_stages)
                m_info = gr.Markdown(label="Matching status", elem_id="matching-status")
                with gr.Row():
                    assignment = gr.Image(label="Assignment: GT (dashed) to its query",
                                          format="png", interactive=False)
                    history = gr.Image(label="Owner of each GT through the stages",
                                       format="png", interactive=False)
                costs = gr.Image(label="Matching cost: total and weighted terms", format="png",
                                 interactive=False)
                m_table = gr.Dataframe(headers=ASSIGNMENT_COLUMNS, label="Assignment",
                                       interactive=False)
                matches = gr.State(None, time_to_live=STATE_TTL_S)
            with gr.Tab("Mask basis", id="basis"):
                gr.Markdown(basis_view.source, elem_id="basis-source")
                with gr.Row():
                    k = gr.Slider(1, basis_view.basis.dim, value=basis_view.basis.dim, step=1,
                                  label="k (components kept)")
                    first = gr.Slider(0, max(len(basis_view.masks) - 1, 1), value=0, step=1,
                                      label="First mask shown")
                b_info = gr.Markdown(first_basis_summary, label="Basis status",
                                     elem_id="basis-status")
                gr.Image(basis_view.components, label="Mean and leading components",
                         format="png", interactive=False)
                with gr.Row():
                    recon = gr.Image(first_recon, label="Masks and their reconstructions at k",
                                     format="png", interactive=False)
                    curve = gr.Image(first_curves, label="Reconstruction IoU versus k",
                                     format="png", interactive=False)
            with gr.Tab("Model", id="model"):
                card_md, card_ap, card_config = card()
                gr.Markdown(card_md, elem_id="model-card")
                gr.Dataframe(_table(card_ap, AP_COLUMNS), headers=AP_COLUMNS,
                             label="AP per stage (percent)", interactive=False)
                gr.JSON(card_config, label="Configuration")

        # ------------------------------------------------------------------ events

        predict_outputs = [result, overlay, table, grid, info]
        example.change(predict_example, [example, stage, threshold], predict_outputs,
                       api_name="predict_example", concurrency_id=MODEL_QUEUE)
        upload.upload(predict_upload, [upload, stage, threshold], predict_outputs,
                      api_name="predict_upload", concurrency_id=MODEL_QUEUE)
        demo.load(predict_example, [example, stage, threshold], predict_outputs,
                  api_name="predict_first_example", concurrency_id=MODEL_QUEUE)
        stage.change(redraw_stage, [result, stage, threshold], [overlay, table, info],
                     api_name="redraw_prediction", trigger_mode="always_last")
        threshold.change(redraw_threshold, [result, stage, threshold],
                         [overlay, table, grid, info], api_name="redraw_threshold",
                         trigger_mode="always_last")
        play_button.click(play, stage, [stage, timer], api_name="play")
        timer.tick(play_step, stage, [stage, timer], api_name="play_step")

        matching_outputs = [matches, assignment, history, costs, m_table, m_info]
        sample.change(match, [sample, m_stage], matching_outputs, api_name="match_sample",
                      concurrency_id=MODEL_QUEUE)
        matching_tab.select(open_matching, [matches, sample, m_stage], matching_outputs,
                            api_name="open_matching", concurrency_id=MODEL_QUEUE)
        m_stage.change(redraw_matching, [matches, m_stage], [assignment, costs, m_table, m_info],
                       api_name="redraw_matching", trigger_mode="always_last")

        gr.on([k.change, first.change], basis, [k, first], [recon, curve, b_info],
              api_name="basis", trigger_mode="always_last")
        gr.api(card, api_name="model_card")
    return demo


def launch(demo: gr.Blocks, server_name: str = "127.0.0.1", server_port: int | None = 7860,
           max_file_size: str | int = MAX_FILE_SIZE, prevent_thread_lock: bool = False):
    """Serve ``demo`` through Gradio's queue on ``server_name`` (localhost unless told otherwise),
    refusing uploads over ``max_file_size``."""
    return demo.queue(max_size=64, default_concurrency_limit=1).launch(
        server_name=server_name, server_port=server_port, max_file_size=max_file_size,
        prevent_thread_lock=prevent_thread_lock, state_session_capacity=1000, quiet=False)


__all__ = ["MAX_FILE_SIZE", "UPLOAD_LIMITS", "build_demo", "launch", "status_markdown"]
