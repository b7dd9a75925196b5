"""istr_viz: learn, train and look inside ISTR query-based instance segmentation.

The public entry points::

    from istr_viz import MaskBasis, load_model, train, get_preset
    basis = MaskBasis.fit(masks, dim=60)                 # the PCA mask-embedding basis
    model, predictor = load_model("checkpoints/istr_shapes.pt")
    prediction = predictor.predict("photo.jpg")          # every refinement stage

Drawing lives in :mod:`istr_viz.viz`, notebook widgets in :mod:`istr_viz.widgets` and the Gradio
demo in :mod:`istr_viz.demo`; importing ``istr_viz`` loads none of them.
"""

from istr_viz.basis import MaskBasis
from istr_viz.config import PRESETS, Config, apply_overrides, get_preset
from istr_viz.engine import train
from istr_viz.errors import CheckpointError, ConfigError, DataError, IstrVizError
from istr_viz.evaluate import evaluate_model
from istr_viz.predictor import Prediction, Predictor, load_model

__version__ = "0.1.0"

__all__ = [
    "PRESETS", "CheckpointError", "Config", "ConfigError", "DataError", "IstrVizError", "MaskBasis",
    "Prediction", "Predictor", "__version__", "apply_overrides", "evaluate_model", "get_preset",
    "load_model", "train",
]
