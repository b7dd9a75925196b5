"""The Gradio demo's Blocks (the only module that imports gradio).

``app.py`` parses its arguments and calls :func:`build_demo`; tests import this module and call
the same function without launching a browser.
"""

from __future__ import annotations

from pathlib import Path

import gradio as gr

DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "istr_shapes.pt"


def status_markdown(checkpoint: Path | None) -> str:
    """The page's status line: which checkpoint is served, or why none is."""
    if checkpoint is None or not Path(checkpoint).is_file():
        where = checkpoint if checkpoint is not None else DEFAULT_CHECKPOINT
        return (
            f"**No checkpoint is present yet** (looked for `{where}`). "
            "Train one with `python -m istr_viz train` and pass `--checkpoint FILE`."
        )
    return f"Serving checkpoint `{checkpoint}`."


def build_demo(checkpoint: Path | None = None, data_root: Path | None = None) -> gr.Blocks:
    """The demo page. ``checkpoint`` defaults to the shipped one; ``data_root`` to the built-in shapes."""
    checkpoint = checkpoint if checkpoint is not None else DEFAULT_CHECKPOINT
    with gr.Blocks(title="istr_viz") as demo:
        gr.Markdown("# istr_viz: look inside ISTR instance segmentation")
        gr.Markdown(status_markdown(checkpoint), elem_id="status")
    return demo
