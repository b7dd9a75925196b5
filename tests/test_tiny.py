"""istr_viz.tiny (the notebooks' SMALL model) and the live loss plot that 02_train draws."""

from __future__ import annotations

import numpy as np
import pytest

from istr_viz.checkpoint import load_checkpoint
from istr_viz.config import Config
from istr_viz.data.coco import load_annotations
from istr_viz.data.layout import split_paths
from istr_viz.engine import read_metrics
from istr_viz.errors import DataError
from istr_viz.evaluate import eval_dataset
from istr_viz.predictor import load_model
from istr_viz.tiny import TINY_INPUT, TINY_MODEL, make_tiny_run, make_tiny_shapes, tiny_config
from istr_viz.viz.curves import LiveTrainingPlot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class FakeDisplay:
    """Stands in for IPython's ``display(..., display_id=True)`` and its handle."""

    def __init__(self):
        self.shown, self.updates = [], []

    def __call__(self, image):
        self.shown.append(image)
        return self

    def update(self, image):
        self.updates.append(image)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    live = LiveTrainingPlot(min_interval_s=0.0, display=FakeDisplay())
    result = make_tiny_run(tmp_path_factory.mktemp("tiny"), iters=6, evaluate=True, on_log=live)
    return result, live


def test_tiny_config_is_the_preset_shrunk():
    cfg = tiny_config(iters=7)
    assert cfg.model == TINY_MODEL and cfg.train.max_iters == 7
    assert (cfg.data.test_min_size, cfg.data.test_max_size) == TINY_INPUT
    assert Config.from_dict(cfg.to_dict()) == cfg  # travels in a checkpoint


def test_tiny_shapes_are_a_data_set_root(tmp_path):
    train, val = make_tiny_shapes(tmp_path, num_train=3, num_val=2)
    assert train == split_paths(tmp_path, "train") and val == split_paths(tmp_path, "val")
    assert len(load_annotations(train.ann_file).image_ids) == 3
    assert len(load_annotations(val.ann_file).image_ids) == 2


def test_tiny_run_writes_a_checkpoint_that_loads_and_predicts(run):
    tiny, _ = run
    assert tiny.iterations == 6 and tiny.checkpoint == tiny.out_dir / "last.pt"
    ckpt = load_checkpoint(tiny.checkpoint)
    assert Config.from_dict(ckpt["config"]).model == TINY_MODEL
    assert len(ckpt["metrics"]["per_stage"]) == TINY_MODEL.num_stages  # evaluate=True
    model, predictor = load_model(tiny.checkpoint, device="cpu")
    dataset = eval_dataset(tiny.val, predictor.config, predictor.category_ids)
    prediction = predictor.predict(dataset.image_path(0))
    assert prediction.num_stages == TINY_MODEL.num_stages
    assert prediction.stage(1).query_boxes_xyxy.shape == (TINY_MODEL.num_queries, 4)
    image, _ = dataset[0]
    assert max(image.shape[-2:]) <= TINY_INPUT[1] and min(image.shape[-2:]) == TINY_INPUT[0]


def test_eval_dataset_refuses_other_categories(run):
    tiny, _ = run
    with pytest.raises(DataError, match="categories"):
        eval_dataset(tiny.val, tiny_config(), category_ids=[1, 2])


def test_live_plot_sees_every_record_and_redraws_in_one_display(run):
    tiny, live = run
    records = read_metrics(tiny.out_dir / "metrics.jsonl")
    assert live.records == records
    assert sum("loss" in r for r in records) == 6 and any("eval" in r for r in records)
    display = live._display
    assert len(display.shown) == 1  # one display, updated in place
    assert len(display.updates) == live.draws - 1 == len(records) - 1  # min_interval_s = 0
    assert display.shown[0].data.startswith(PNG_MAGIC)
    total = live.figure.axes[0].get_lines()[0]
    np.testing.assert_allclose(total.get_ydata(), [r["loss"] for r in records if "loss" in r])


def test_live_plot_waits_between_draws_but_not_after_an_evaluation():
    display = FakeDisplay()
    live = LiveTrainingPlot(min_interval_s=3600, display=display)
    for it in range(1, 4):
        live({"iter": it, "loss": 1.0 / it, "stage1/loss_class": 0.5 / it})
    assert live.draws == 1 and len(display.shown) == 1 and not display.updates
    live({"iter": 3, "eval": {"bbox_AP": 0.1, "segm_AP": 0.2, "per_stage_segm_AP": [0.2]}})
    assert live.draws == 2 and len(display.updates) == 1
    fig = live.finish()
    assert live.draws == 3 and fig is live.figure
    titles = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    assert titles == ["total loss", "class", "val AP"]
    np.testing.assert_allclose(fig.axes[0].get_lines()[0].get_ydata(), [1.0, 0.5, 1 / 3])
