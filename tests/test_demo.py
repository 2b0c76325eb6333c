"""demo.py in a real browser: Debian's headless Chromium, driven by Playwright, against the server
started as a user starts it (`python demo.py --tiny`, in a subprocess), streaming the toy student
shipped in weights/. The page loads and plays; a prompt switch mid-stream changes what is made
(the toy scorer: before the switch the old prompt's object, after it the new one's); two tabs stream
at once and a closed one leaves the other streaming; past --max-streams a tab is told it is busy; a
bad upload gets its message while the stream goes on; an uploaded image starts the video."""

import json
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

import toy_world as toy

ROOT = Path(__file__).resolve().parents[1]
STUDENT = ROOT / "weights" / "toy_student.safetensors"
CHROMIUM = shutil.which("chromium")

pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="needs Debian's chromium (apt-get install -y chromium; .ci/run does)"
)


def start_demo(args: list[str], timeout: float = 180) -> tuple[subprocess.Popen, str]:
    """`python demo.py ARGS` in a subprocess -> (it, the line it prints when it serves:
    "demo: <model> (<world>) at http://<host>:<port>"); it is stopped if it does not serve."""
    cmd = [sys.executable, "demo.py", "--port", "0"] + args
    out = subprocess.PIPE
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, text=True)
    lines = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            line = lines.get(timeout=1)
        except queue.Empty:
            if proc.poll() is not None:
                break
            continue
        if line.startswith("demo: "):  # (warnings may come first)
            return proc, line.strip()
    proc.kill()
    raise AssertionError(f"demo.py did not serve within {timeout} s (exit code {proc.poll()})")


@pytest.fixture(scope="module")
def server():
    """`python demo.py --tiny` on a free port, at most 2 streams; -> its address."""
    proc, line = start_demo(["--tiny", "--max-streams", "2"])
    try:
        assert line.startswith(f"demo: {STUDENT} "), line  # the shipped student, by default
        url = line.split(" at ")[-1]
        assert url.startswith("http://127.0.0.1:")  # bound to this machine only, unless told
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(autouse=True)
def no_stream_left(request):
    """Every test starts with all of the server's stream slots free (the last test's streams
    end after their tabs close)."""
    if "server" in request.fixturenames:
        url = request.getfixturevalue("server")
        deadline = time.time() + 60
        while streams(url) and time.time() < deadline:
            time.sleep(0.1)
        assert streams(url) == 0


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    import demo

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=demo.CHROMIUM_FLAGS)
        yield browser
        browser.close()


def open_page(browser, url, query="asap=1"):
    page = browser.new_page()
    page.set_default_timeout(120_000)  # (a slow, shared 2-core machine)
    page.goto(f"{url}/?{query}")
    page.wait_for_function("window.demo && window.demo.ready")
    return page


def chunks(page) -> int:
    return page.evaluate("window.demo.chunks.length")


def wait_chunks(page, n: int, timeout: float = 120):
    page.wait_for_function(f"window.demo.chunks.length >= {n}", timeout=timeout * 1000)


def best_prompt(frames: np.ndarray) -> str:
    """The toy prompt whose clips fit uint8 frames (F, 16, 16, 3) best."""
    psnr = toy.psnr_to_all(torch.from_numpy(frames)[None])[0]  # (48, 121)
    return toy.PROMPTS[int(psnr.amax(1).argmax())]


def streams(url) -> int:
    with urllib.request.urlopen(f"{url}/info") as r:
        return json.load(r)["streams"]


def test_the_page_streams_and_a_prompt_switch_changes_what_is_made(server, browser):
    page = open_page(browser, server, "asap=1&record=1")
    page.fill("#prompt", "a red square moving right")
    page.click("#start")
    wait_chunks(page, 4)
    page.fill("#prompt", "a blue circle moving down")
    page.click("#switch")
    switched = chunks(page)
    wait_chunks(page, switched + 12)
    page.click("#stop")
    stats = page.evaluate("window.demo.stats()")
    assert 0 < stats["first"] < 60 and stats["fps"] > 1 and not stats["errors"], stats
    shown = re.match(
        r"first chunk (\d+\.\d{3}) s \| (\d+) frames \| (\d+\.\d) frames/s",
        page.inner_text("#stats"),
    )
    assert shown and int(shown[2]) == stats["frames"] and float(shown[1]) > 0, page.inner_text(
        "#stats"
    )
    records = page.evaluate("window.demo.recorded")
    page.close()
    frames = np.array([r["rgba"] for r in records], dtype=np.uint8).reshape(-1, 16, 16, 4)[..., :3]
    prompts = [r["prompt"] for r in records]
    first_new = prompts.index("a blue circle moving down")  # the first frame made after the switch
    assert first_new >= 12 and all(p == "a red square moving right" for p in prompts[:first_new])
    assert all(p == "a blue circle moving down" for p in prompts[first_new:])
    before = toy.parse_prompt(best_prompt(frames[:12]))  # chunks 0-3, the old prompt
    after = toy.parse_prompt(best_prompt(frames[-12:]))  # the last 4 chunks, the new prompt
    assert before[:2] == ("red", "square") and after[:2] == ("blue", "circle"), (before, after)


def test_two_tabs_stream_at_once_and_a_closed_tab_leaves_the_other_streaming(server, browser):
    one, two = open_page(browser, server), open_page(browser, server)
    one.click("#start")
    two.click("#start")
    wait_chunks(one, 3)
    wait_chunks(two, 3)
    assert streams(server) == 2
    one.close()  # mid-stream
    seen = chunks(two)
    wait_chunks(two, seen + 5)  # the other tab goes on
    deadline = time.time() + 10
    while streams(server) != 1 and time.time() < deadline:  # the closed tab's stream has ended
        time.sleep(0.1)
    assert streams(server) == 1
    two.close()


def test_past_max_streams_a_tab_is_told_it_is_busy(server, browser):
    pages = [open_page(browser, server) for _ in range(3)]
    for page in pages[:2]:
        page.click("#start")
        wait_chunks(page, 1)
    pages[2].click("#start")
    pages[2].wait_for_function("window.demo.errors.length > 0")
    assert "busy" in pages[2].inner_text("#message") and chunks(pages[2]) == 0
    for page in pages:
        page.close()


def test_a_bad_upload_gets_its_message_and_the_stream_goes_on(server, browser):
    page = open_page(browser, server)
    page.click("#start")
    wait_chunks(page, 2)
    garbage = {"name": "cat.png", "mimeType": "image/png", "buffer": os.urandom(3000)}
    page.set_input_files("#image", files=[garbage])
    page.wait_for_function("window.demo.errors.length > 0")
    assert "cannot read 'the uploaded image'" in page.inner_text("#message")
    seen = chunks(page)
    wait_chunks(page, seen + 3)  # the stream went on
    big = {"name": "big.png", "mimeType": "image/png", "buffer": bytes(5 << 20)}
    page.set_input_files("#image", files=[big])
    page.wait_for_function("window.demo.errors.length > 1")
    assert "the limit is 4 MB" in page.inner_text("#message")
    assert page.is_disabled("#use_image")  # nothing was taken
    seen = chunks(page)
    wait_chunks(page, seen + 3)  # and the stream goes on
    page.close()


def test_an_uploaded_image_starts_the_video(server, browser):
    import imageio.v3 as iio

    still = toy.render("a green circle moving left", 6, 3, 1)[0].numpy()  # (16, 16, 3)
    png = iio.imwrite("<bytes>", still, extension=".png")
    page = open_page(browser, server, "asap=1&record=1")
    page.set_input_files(
        "#image", files=[{"name": "first.png", "mimeType": "image/png", "buffer": png}]
    )
    page.wait_for_function("!document.getElementById('use_image').disabled")
    page.fill("#prompt", "a green circle moving left")
    page.click("#start")
    wait_chunks(page, 4)
    page.click("#stop")
    records = page.evaluate("window.demo.recorded")
    frames = np.array([r["rgba"] for r in records], dtype=np.uint8).reshape(-1, 16, 16, 4)[..., :3]
    assert (frames[:3] == still).all()  # the first chunk is the image, still
    assert toy.parse_prompt(best_prompt(frames[:12]))[:2] == ("green", "circle")
    page.close()


def test_an_uploaded_video_is_followed_to_its_end(server, browser):
    import imageio.v3 as iio

    clip = toy.render("a yellow square moving up", 4, 9, 12).numpy()  # (12, 16, 16, 3)
    gif = iio.imwrite("<bytes>", clip, extension=".gif", loop=0)
    page = open_page(browser, server, "asap=1&record=1")
    video = {"name": "clip.gif", "mimeType": "image/gif", "buffer": gif}
    page.set_input_files("#video", files=[video])
    page.wait_for_function("!document.getElementById('use_video').disabled")
    page.fill("#prompt", "a yellow square moving up")
    page.fill("#strength", "0.5")
    page.click("#start")
    page.wait_for_function("document.getElementById('message').textContent.includes('ended')")
    records = page.evaluate("window.demo.recorded")
    frames = np.array([r["rgba"] for r in records], dtype=np.uint8).reshape(-1, 16, 16, 4)[..., :3]
    assert len(frames) == 12  # the video's 12 frames, then the stream ends
    assert toy.parse_prompt(best_prompt(frames))[:2] == ("yellow", "square")
    page.close()


def test_the_same_page_streams_wan_through_its_vae(wan_run, browser):
    """The Wan path on a CPU: the tiny random Wan directory's student, the VAE decoding each chunk
    in the loop (latent frame 0 is one pixel frame, every later one four)."""
    common, run = wan_run
    proc, line = start_demo(common + ["--window", "9"])  # (the sink of 3 and two chunks)
    try:
        assert line.startswith(f"demo: {run / 'dmd.safetensors'} (Wan)"), line
        page = open_page(browser, line.split(" at ")[-1], "asap=1&record=1")
        page.fill("#prompt", "a cat walking")
        page.click("#start")
        page.wait_for_function("window.demo.chunks.length >= 3 || window.demo.errors.length > 0")
        assert not page.evaluate("window.demo.errors"), page.evaluate("window.demo.errors")
        page.click("#stop")
        sizes = page.evaluate("window.demo.chunks.map((c) => c.frames)")
        assert sizes[:3] == [9, 12, 12]  # 1 + 4 (K - 1) pixel frames, then 4 K
        assert page.evaluate("document.getElementById('screen').width") == 48  # 8 x 6 latents
        page.close()
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_a_bad_message_is_answered_and_another_sites_page_is_refused(server, browser):
    page = open_page(browser, server)
    page.evaluate("send([1, 2]); send({type: 'start', prompt: 'a red square moving up', seed: -5})")
    page.wait_for_function("window.demo.errors.length >= 2")
    errors = page.evaluate("window.demo.errors")
    assert errors[:2] == ["a message is a JSON object", "the seed is a whole number in [0, 2^31)"]
    page.click("#start")  # the connection is still there
    wait_chunks(page, 2)
    page.close()
    elsewhere = browser.new_page()  # a page of another origin (about:blank)
    port = server.rsplit(":", 1)[1]
    opened = elsewhere.evaluate(
        """(port) => new Promise((resolve) => {
             const ws = new WebSocket(`ws://127.0.0.1:${port}/stream`);
             ws.onopen = () => resolve(true);
             ws.onclose = () => resolve(false);
           })""",
        port,
    )
    assert opened is False
    elsewhere.close()
