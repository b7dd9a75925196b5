"""The demo starts from app.py, answers every tab's function through gradio_client, survives bad
input and renders in a real browser (screenshots kept in test-artifacts/)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import free_port
from test_demo_logic import png_header

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
TAB_NAMES = ("Predict", "Matching", "Mask basis", "Model")


@contextmanager
def app_process(log: Path, *args: str):
    """Run ``python app.py ARGS --server-port PORT`` until the block ends; yields its URL."""
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "OMP_NUM_THREADS": "1",
           "MPLBACKEND": "Agg"}
    env.pop("ISTR_VIZ_CHECKPOINT", None)
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "app.py", *args, "--server-port", str(port)],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.time() + 180
        while True:
            if proc.poll() is not None:
                raise AssertionError("app exited early:\n" + log.read_text())
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    raise AssertionError("app did not answer in 180 s:\n" + log.read_text())
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def app_url(tiny_run, tmp_path_factory):
    root, checkpoint = tiny_run
    log = tmp_path_factory.mktemp("app") / "app.log"
    with app_process(log, "--checkpoint", str(checkpoint), "--data", str(root),
                     "--max-file-size", "1mb") as url:
        yield url


@pytest.fixture(scope="module")
def client(app_url):
    return Client(app_url, verbose=False)


@pytest.fixture(scope="module")
def reference(tiny_run):
    """The same checkpoint loaded in the test process, to check what the page answers."""
    from istr_viz.predictor import load_model

    return load_model(tiny_run[1], device="cpu")[1]


def rows(table: dict) -> list[list]:
    return table["data"]


def page_config(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url + "config", timeout=10).read())


def markdown_by_id(url: str, elem_id: str) -> str:
    for comp in page_config(url)["components"]:
        if comp.get("props", {}).get("elem_id") == elem_id:
            return comp["props"]["value"]
    raise AssertionError(f"no component {elem_id}")


# ----------------------------------------------------------------------------- serving


def test_app_binds_localhost_and_serves(app_url):
    assert app_url.startswith("http://127.0.0.1:")
    html = urllib.request.urlopen(app_url, timeout=10).read().decode()
    assert "istr_viz" in html
    assert "Serving checkpoint" in markdown_by_id(app_url, "status")


def test_every_callback_is_named_for_gradio_client(client):
    names = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    assert names >= {"/predict_example", "/predict_upload", "/redraw_prediction",
                     "/redraw_threshold", "/play",
                     "/play_step", "/match_sample", "/redraw_matching", "/basis", "/model_card"}


# ----------------------------------------------------------------------------- Predict


def test_the_detection_table_is_the_prediction_at_each_stage(client, reference, tiny_run):
    overlay, table, grid, summary = client.predict("val 000001.png", 2, 0.0,
                                                   api_name="/predict_example")
    image = np.asarray(Image.open(tiny_run[0] / "val" / "images" / "000001.png").convert("RGB"))
    expected = reference.predict(image, return_attention=False)
    for stage in (2, 1):
        if stage == 1:  # the slider: redraws the prediction kept for this session
            overlay, table, summary = client.predict(1, 0.0, api_name="/redraw_prediction")
        records = expected.to_records(stage, 0.0, with_masks=False)
        got = rows(table)
        assert len(got) == len(records) > 0
        assert f"{len(got)} detections" in summary and f"stage {stage} of 2" in summary
        for row, rec in zip(got, records):
            x, y, w, h = rec["bbox"]
            assert row[0] == rec["query"] and row[1] == rec["category_name"]
            np.testing.assert_allclose(row[3:7], [x, y, x + w, y + h], atol=0.11)
        assert Image.open(overlay).size[0] > 200 and Image.open(grid).size[0] > 200
    assert "ground-truth instances" in summary


def test_a_higher_threshold_draws_fewer_detections(client):
    client.predict("photo coins", 2, 0.0, api_name="/predict_example")
    _, low, grid, _ = client.predict(2, 0.0, api_name="/redraw_threshold")
    _, high, _, summary = client.predict(2, 0.99, api_name="/redraw_threshold")
    assert len(rows(high)) < len(rows(low)) and "grayscale" in summary
    assert Image.open(grid).size[0] > 200


def test_the_play_button_steps_the_stage_slider(client):
    assert client.predict(2, api_name="/play")[0] == 1
    assert client.predict(1, api_name="/play_step")[0] == 2


def test_uploads_rgba_grayscale_and_bad_files(client, tmp_path):
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (80, 90, 4), dtype=np.uint8), "RGBA").save(
        tmp_path / "rgba.png")
    Image.fromarray(rng.integers(0, 255, (80, 90), dtype=np.uint8), "L").save(tmp_path / "g.jpg")
    (tmp_path / "fake.png").write_text("not a picture")
    png_header(tmp_path / "bomb.png", 20000, 20000)
    (tmp_path / "big.png").write_bytes(b"\0" * 1_500_000)  # over the app's --max-file-size 1mb
    (tmp_path / "notes.txt").write_text("hello")

    def upload(name):
        return client.predict(handle_file(str(tmp_path / name)), 2, 0.0,
                              api_name="/predict_upload")

    overlay, table, _, summary = upload("rgba.png")
    assert "transparency dropped" in summary and rows(table) and overlay
    assert "grayscale" in upload("g.jpg")[3]
    overlay, table, _, summary = upload("fake.png")
    assert summary.startswith("Upload refused") and "not an image file" in summary
    assert overlay is None and rows(table) == []
    assert "not decoded" in upload("bomb.png")[3]
    with pytest.raises(Exception, match="(?i)file type"):
        upload("notes.txt")
    with pytest.raises(Exception, match="(?i)(too large|size|413)"):
        upload("big.png")
    assert "detections" in upload("rgba.png")[3]  # the app still serves


def test_twenty_concurrent_predictions_all_succeed(client):
    names = ["photo coins", "photo cat", "photo coffee", "photo astronaut"]
    jobs = [client.submit(names[i % 4], 2, 0.3, api_name="/predict_example") for i in range(20)]
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda job: job.result(timeout=300), jobs))
    assert all("detections" in r[3] for r in results)


# ----------------------------------------------------------------------------- other tabs


def test_the_assignment_numbers_the_ground_truth_of_the_image(client, tiny_run):
    ann = json.loads((tiny_run[0] / "val" / "annotations.json").read_text())
    for index, image in enumerate(ann["images"]):
        count = sum(1 for a in ann["annotations"]
                    if a["image_id"] == image["id"] and not a.get("iscrowd"))
        if not count:
            continue
        _, history, costs, table, summary = client.predict(index, 2, api_name="/match_sample")
        assert [r[0] for r in rows(table)] == list(range(count))
        assert f"of {count} ground-truth instances matched" in summary
        _, _, table, summary = client.predict(1, api_name="/redraw_matching")
        assert len(rows(table)) == count and "stage 1 of 2" in summary
        assert Image.open(history).size[0] > 100 and Image.open(costs).size[0] > 100


def test_the_basis_tab_reconstructs_at_any_k(client):
    recon, curves, summary = client.predict(4, 2, api_name="/basis")
    assert summary.startswith("k = 4 of 12")
    assert Image.open(recon).size[0] > 200 and Image.open(curves).size[0] > 200


def test_the_model_card_has_data_config_and_ap_per_stage(client):
    card, ap, config = client.predict(api_name="/model_card")
    assert "2 iterations" in card and "train/annotations.json" in card
    assert [row[0] for row in ap] == [1, 2]
    assert config["model"]["num_stages"] == 2


def has_text(*texts: str) -> str:
    """JavaScript: true once the rendered page shows every one of ``texts``."""
    return " && ".join(["document.body"] + [f"document.body.innerText.includes({json.dumps(t)})"
                                            for t in texts])


def test_app_renders_in_chromium(app_url, browser_page, artifacts_dir):
    page = browser_page
    page.open(app_url)
    # rendered by Gradio's JavaScript (not in the raw HTML); the first example is predicted on load
    assert page.wait_for(has_text("look inside ISTR", *TAB_NAMES, "detections with score"), 90), \
        page.text()
    text = page.text()
    for label in (*TAB_NAMES, "Serving checkpoint", "Score threshold", "Play the stages",
                  "Detections drawn", "Every stage"):
        assert label in text, label
    assert page.evaluate("document.querySelectorAll('img').length") >= 2
    assert page.screenshot(artifacts_dir / "app_predict.png").stat().st_size > 20000
    assert page.click_button("Play the stages")  # the timer steps the slider 1, 2 and stops
    assert page.wait_for(has_text("stage 1 of 2"), 30), page.text()
    assert page.wait_for(has_text("stage 2 of 2"), 30), page.text()
    assert page.click_tab("Matching")  # opening the tab matches the first sample
    assert page.wait_for(has_text("ground-truth instances matched"), 90), page.text()
    page.screenshot(artifacts_dir / "app_matching.png")
    assert page.click_tab("Mask basis") and page.wait_for(has_text("reconstructing"), 30)
    page.screenshot(artifacts_dir / "app_basis.png")
    assert page.click_tab("Model") and page.wait_for(has_text("AP per stage"), 30)
    page.screenshot(artifacts_dir / "app_model.png")


# ----------------------------------------------------------------------------- no checkpoint


@pytest.fixture(scope="module")
def bare_app_url(tiny_run, tmp_path_factory):
    base = tmp_path_factory.mktemp("bare_app")
    with app_process(base / "app.log", "--checkpoint", str(base / "missing.pt"),
                     "--data", str(tiny_run[0])) as url:
        yield url


def test_without_a_checkpoint_the_page_says_how_to_train_one(bare_app_url):
    message = markdown_by_id(bare_app_url, "predict-message")
    assert "No checkpoint is present yet" in message and "python -m istr_viz train" in message
    client = Client(bare_app_url, verbose=False)
    overlay, table, _, summary = client.predict("photo coins", 1, 0.3,
                                                api_name="/predict_example")
    assert overlay is None and "No checkpoint" in summary
    recon, _, summary = client.predict(3, 0, api_name="/basis")  # needs only the data
    assert summary.startswith("k = 3 of") and Image.open(recon).size[0] > 200
    assert "fitted just now" in markdown_by_id(bare_app_url, "basis-source")


def test_without_a_checkpoint_the_page_renders(bare_app_url, browser_page, artifacts_dir):
    page = browser_page
    page.open(bare_app_url)
    assert page.wait_for(has_text("No checkpoint is present yet", "python -m istr_viz train",
                                  *TAB_NAMES, "Score threshold"), 60), page.text()
    page.screenshot(artifacts_dir / "app_no_checkpoint.png")
    assert page.click_tab("Mask basis") and page.wait_for(has_text("fitted just now"), 30)
    page.screenshot(artifacts_dir / "app_no_checkpoint_basis.png")


def test_a_checkpoint_that_does_not_load_is_reported_in_the_page(tiny_run, tmp_path):
    from istr_viz.demo import build_demo

    (tmp_path / "broken.pt").write_bytes(b"PK\3\4 broken")
    demo = build_demo(tmp_path / "broken.pt", tiny_run[0])
    status = next(b.value for b in demo.blocks.values() if getattr(b, "elem_id", None) == "status")
    assert "could not be loaded" in status and "broken.pt" in status


def test_the_threshold_slider_starts_at_the_checkpoints_own_threshold(tiny_run, tmp_path):
    from istr_viz.checkpoint import load_checkpoint, save_checkpoint
    from istr_viz.demo import DEFAULT_THRESHOLD, build_demo

    state = load_checkpoint(tiny_run[1])
    for name, chosen, start in [("chosen", {"threshold": 0.1234}, 0.12),
                                ("none", None, DEFAULT_THRESHOLD)]:
        path = save_checkpoint(tmp_path / f"{name}.pt",
                               **{**state, "metrics": {**state["metrics"], "score_threshold": chosen}})
        demo = build_demo(path, tiny_run[0])
        slider, = [b for b in demo.blocks.values() if getattr(b, "label", None) == "Score threshold"]
        assert slider.value == pytest.approx(start), name
