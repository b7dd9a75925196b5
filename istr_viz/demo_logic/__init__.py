"""The demo's logic, testable without gradio: ``istr_viz.demo`` lays it out in a page.

- :mod:`~istr_viz.demo_logic.served`: the checkpoint and data set the page serves (never raising).
- :mod:`~istr_viz.demo_logic.images`: uploads read safely (size from the header, then decoded).
- :mod:`~istr_viz.demo_logic.predict`: examples, one prediction per image, redraws per stage.
- :mod:`~istr_viz.demo_logic.matching`: per-stage Hungarian matching of a val image.
- :mod:`~istr_viz.demo_logic.mask_basis`: components, reconstructions and IoU against k.
- :mod:`~istr_viz.demo_logic.card`: the checkpoint's card and AP per stage.
"""
