"""ISTR model: backbone, RoI pooler, refinement stages and typed outputs.

Shape letters used in every docstring and comment of istr_viz:

    B batch, Q queries, K stages, G ground-truth instances in one image, C classes,
    D hidden width, M mask-embedding dimension (the basis "k"), S mask side (e.g. 28),
    H and W image height and width (Hp, Wp padded), L FPN levels, P RoI side (7).

Boxes: ``boxes_xyxy`` are pixels of the valid (unpadded) image; ``boxes_cxcywh`` are normalised by
that image's (W, H). Image sizes are [H, W].

Typical use::

    model = build_model(ModelConfig(), num_classes, basis)
    out = model(batch.images, batch.image_sizes)      # ISTROutput, all K stages
    out.final.logits, out.stages[0].boxes_xyxy, out.stacked("masks")  # (K, B, Q, S, S)
"""

from istr_viz.model.backbone import Backbone, build_backbone
from istr_viz.model.istr import ISTR, build_model
from istr_viz.model.outputs import ISTROutput, StageOutput
from istr_viz.model.pooler import RoIPooler, assign_fpn_levels
from istr_viz.model.stage import RefinementStage

__all__ = ["ISTR", "Backbone", "ISTROutput", "RefinementStage", "RoIPooler", "StageOutput",
           "assign_fpn_levels", "build_backbone", "build_model"]
