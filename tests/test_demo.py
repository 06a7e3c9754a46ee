"""The Gradio demo, headless: through gradio_client and in a real browser (Debian chromium +
Playwright, never a browser download), with a screenshot the test inspects."""
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from mmaccel.testing.tiny import build

gr = pytest.importorskip("gradio")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    from mmaccel.demo_app import build_demo

    model, proc = build("llava_onevision", seed=4)
    demo = build_demo(model, proc)
    _, url, _ = demo.launch(server_name="127.0.0.1", server_port=free_port(), prevent_thread_lock=True, quiet=True)
    yield url
    demo.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("demo") / "scene.png"
    img = np.full((90, 130, 3), 240, dtype=np.uint8)
    img[20:60, 30:70] = (220, 40, 40)
    Image.fromarray(img).save(path)
    return path


def ask_in_browser(p, url: str, media_box: str, media, question: str, stream: bool = False):
    """Open the demo in headless chromium, upload ``media`` into ``media_box``, type the
    question, tick Stream if asked and press Run. -> (browser, page)."""
    browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
    page = browser.new_page(viewport={"width": 1200, "height": 1800})
    page.goto(url)
    page.locator(f"{media_box} input[type=file]").set_input_files(str(media))
    page.get_by_label("Question").fill(question)
    if stream:
        page.locator("#stream input[type=checkbox]").check()
    page.get_by_role("button", name="Run").click()
    return browser, page


def test_demo_binds_loopback_and_answers_through_the_api(demo_url, picture):
    from gradio_client import Client, handle_file

    assert demo_url.startswith("http://127.0.0.1:")
    client = Client(demo_url, verbose=False)
    base, fast, speed, gallery, stats = client.predict(handle_file(str(picture)), None, "what is the color ?",
                                                       "pool", 0.25, api_name="/answer")
    assert isinstance(base, str) and isinstance(fast, str)
    assert "visual tokens kept" in speed and "| pool |" in speed
    assert stats["visual_tokens_kept"] < stats["visual_tokens_in"] and len(gallery) == 1


def test_demo_reports_missing_media(demo_url):
    from gradio_client import Client

    with pytest.raises(Exception, match="Upload an image or a video"):
        Client(demo_url, verbose=False).predict(None, None, "what ?", "fastv", 0.25, api_name="/answer")


@pytest.mark.skipif(not shutil.which("chromium") and not shutil.which("/usr/bin/chromium"),
                    reason="Debian chromium is not installed (apt-get install -y chromium)")
def test_demo_in_a_real_browser(demo_url, picture, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    shot = tmp_path / "demo.png"
    with sync_playwright() as p:
        browser, page = ask_in_browser(p, demo_url, "#image", picture, "what is the color ?")
        expect(page.locator("#speed")).to_contain_text("visual tokens kept", timeout=60_000)
        kept = page.locator("#kept img").first
        expect(kept).to_be_visible(timeout=30_000)
        kept.evaluate("img => img.decode()")  # visible can precede painted under load
        page.wait_for_timeout(500)  # let the gallery's fade-in finish
        box = kept.bounding_box()
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert box["width"] > 20 and box["height"] > 20
    shot_img = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    region = shot_img[int(box["y"]):int(box["y"] + box["height"]), int(box["x"]):int(box["x"] + box["width"])]
    # the kept-token picture shows kept (bright background) and dropped (dimmed) cells side by side
    bright = (region > 200).all(-1).mean()
    dimmed = (region < 110).all(-1).mean()
    assert bright > 0.05 and dimmed > 0.05, (bright, dimmed)
    reds = (shot_img[..., 0] > 180) & (shot_img[..., 1] < 90) & (shot_img[..., 2] < 90)
    assert reds.sum() > 200  # the uploaded picture (a red square) is on the page


def test_demo_command_refuses_a_busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "mmaccel.cli", "demo", "--port", str(port)],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "cannot listen on 127.0.0.1" in out.stderr and "Traceback" not in out.stderr


def test_demo_answers_about_a_video(demo_url, tmp_path):
    from gradio_client import Client, handle_file

    from test_pipeline_cli import write_video

    clip = write_video(tmp_path / "clip.mp4", frames=8)
    base, fast, speed, gallery, stats = Client(demo_url, verbose=False).predict(
        None, handle_file(str(clip)), "which direction ?", "pool", 0.25, api_name="/answer")
    assert isinstance(fast, str) and stats["visual_tokens_kept"] < stats["visual_tokens_in"]
    assert len(gallery) == 8  # one kept-token picture per sampled frame


def test_demo_streams_a_video_through_an_stc_session(demo_url, picture, tmp_path):
    """"Stream" ticked: the frames go one by one into a StreamSession and the accelerated answer,
    its counts and its pictures (one per frame, the pruned cells dimmed) are the session's."""
    from gradio_client import Client, handle_file

    from mmaccel.pipeline import prepare_media
    from mmaccel.stream import StreamSession
    from test_pipeline_cli import write_video

    clip = write_video(tmp_path / "clip.mp4", frames=8)
    client = Client(demo_url, verbose=False)
    base, fast, speed, gallery, stats = client.predict(None, handle_file(str(clip)), "which direction ?", "fastv",
                                                       0.5, True, api_name="/answer")
    model, proc = build("llava_onevision", seed=4)
    session = StreamSession(model, proc, retention=0.5)
    for frame in prepare_media(str(clip), num_frames=8).items[0]:
        session.add_frame(frame)
    expected = session.ask("which direction ?", 24)
    assert fast == expected.text and stats["method"] == "stc-stream"
    assert stats["visual_tokens_kept"] == expected.stats.visual_tokens_kept < stats["visual_tokens_in"]
    assert "Streamed: 8 frames" in speed and "| stc-stream |" in speed and len(gallery) == 8
    with pytest.raises(Exception, match="Streaming answers about a video"):
        client.predict(handle_file(str(picture)), None, "what ?", "fastv", 0.5, True, api_name="/answer")


@pytest.mark.skipif(not shutil.which("chromium") and not shutil.which("/usr/bin/chromium"),
                    reason="Debian chromium is not installed (apt-get install -y chromium)")
def test_demo_streams_in_a_real_browser(demo_url, tmp_path):
    """The Stream checkbox in the page: a video uploaded, Stream ticked, Run: the streamed line,
    the stc-stream row and one kept-token picture per frame appear."""
    from playwright.sync_api import expect, sync_playwright

    from test_pipeline_cli import write_video

    clip = write_video(tmp_path / "clip.mp4", frames=8)
    with sync_playwright() as p:
        browser, page = ask_in_browser(p, demo_url, "#video", clip, "which direction ?", stream=True)
        expect(page.locator("#speed")).to_contain_text("Streamed: 8 frames", timeout=60_000)
        expect(page.locator("#speed")).to_contain_text("stc-stream")
        expect(page.locator("#kept img")).to_have_count(8, timeout=30_000)
        browser.close()
