"""Jupyter explorers (ipywidgets): the only package of istr_viz that imports ipywidgets.

Each explorer is a thin class over the ``istr_viz.viz`` plot functions with a ``.widget``
property to display; its controls call named ``_on_*`` methods and its state sits in attributes.
"""

from __future__ import annotations

from istr_viz.widgets.basis_explorer import BasisExplorer
from istr_viz.widgets.matching_explorer import MatchingExplorer
from istr_viz.widgets.stage_explorer import StageExplorer

__all__ = ["BasisExplorer"]
__all__ += ["MatchingExplorer", "StageExplorer"]
