"""``lookalike app`` in a real browser: the page served by the command, driven in headless Chromium.

Debian's ``chromium`` runs through Python ``playwright`` (no browser build is ever downloaded). The app runs
the shipped demo model on the CPU with few steps at its own 32 px, so the whole visit takes well under a minute.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import lookalike
from lookalike.encoders.prepare import load_reference
from lookalike.errors import LookalikeError
from lookalike.pipeline.subject import Subject, file_sha256

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
try:
    from playwright.sync_api import sync_playwright
except ImportError:  # pragma: no cover
    sync_playwright = None

pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (Debian: apt-get install -y chromium)"),
    pytest.mark.skipif(sync_playwright is None, reason="the playwright Python package is missing (pip install playwright)"),
]

STEPS = "3"
WAIT_MS = 120_000  # generous: CI machines are shared; a visit takes ~25 s on two idle cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _reference(path: Path) -> Path:
    """A reference from the demo's world: one of its coloured, patterned shapes on a plain background."""
    from lookalike.world.render import all_identities, random_scene, render

    identity = all_identities()[5]
    Image.fromarray(render(identity, random_scene(np.random.default_rng(1)), size=64)).save(path)
    return path


@pytest.fixture(scope="module")
def app_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """``python -m lookalike app --model demo`` on a free 127.0.0.1 port, stopped after the tests."""
    tmp_path = tmp_path_factory.mktemp("app")
    port = _free_port()
    package_parent = str(Path(lookalike.__file__).parent.parent)  # the package under test (symbolic links kept)
    env = dict(os.environ, GRADIO_TEMP_DIR=str(tmp_path / "gradio"), TMPDIR=str(tmp_path),
               PYTHONPATH=os.pathsep.join(filter(None, [package_parent, os.environ.get("PYTHONPATH")])))
    log = (tmp_path / "app.log").open("w")
    server = subprocess.Popen([sys.executable, "-m", "lookalike", "app", "--model", "demo", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 90
        while True:
            if server.poll() is not None:
                pytest.fail(f"the app exited with {server.returncode}: {(tmp_path / 'app.log').read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(url, timeout=2):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the app did not answer in 90 s: {(tmp_path / 'app.log').read_text()[-2000:]}")
                time.sleep(0.3)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()


def _download(page, link, folder: Path) -> Path:  # noqa: ANN001
    with page.expect_download() as info:
        link.click()
    path = folder / info.value.suggested_filename
    info.value.save_as(path)
    return path


def _set_number(page, elem_id: str, value: str) -> None:  # noqa: ANN001
    box = page.locator(f"#{elem_id} input[type=number]").first
    box.fill(value)
    box.press("Enter")


def test_the_page_generates_downloads_saves_and_reuses_a_subject_offline(app_url: str, tmp_path: Path) -> None:
    reference = _reference(tmp_path / "subject.png")
    bad = tmp_path / "notes.png"
    bad.write_text("these are notes, not a picture\n")
    with pytest.raises(LookalikeError) as bad_error:
        load_reference(bad)
    expected_error = " ".join(str(bad_error.value).replace(str(bad), bad.name).split())
    downloads = tmp_path / "downloads"
    downloads.mkdir()
    requests: list[str] = []

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=["--no-sandbox"])
        try:
            context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})
            context.on("request", lambda request: requests.append(request.url))
            page = context.new_page()
            page.goto(app_url)
            page.wait_for_selector("#generate", timeout=WAIT_MS)

            # a reference photo, a prompt, few steps, a seed; Generate; wait for the PNG files
            page.locator("#reference-0 input[type=file]").set_input_files(str(reference))
            page.get_by_text(reference.name).first.wait_for(timeout=WAIT_MS)
            page.locator("#prompt textarea").fill("a shape on a green background")
            _set_number(page, "steps", STEPS)
            _set_number(page, "seed", "7")
            page.locator("#generate").click()
            link = page.locator("#png-files a").first
            link.wait_for(timeout=WAIT_MS)
            png = _download(page, link, downloads)
            meta = Image.open(png).text
            assert meta["prompt"] == "a shape on a green background"
            assert meta["seed"] == "7" and meta["steps"] == STEPS
            assert meta["adapter"] == "ip-adapter_sd15" and meta["scale"] == "0.6"
            assert json.loads(meta["references"]) == [file_sha256(reference)]
            # the gallery shows that same PNG (gradio's default webp would drop the metadata)
            src = page.locator("#gallery img").first.get_attribute("src")
            shown = context.request.get(src if src.startswith("http") else app_url.rstrip("/") + src).body()
            assert shown[:8] == b"\x89PNG\r\n\x1a\n" and b"tEXtprompt" in shown

            # save the subject: a .safetensors download that the library reads
            page.locator("#save-subject").click()
            subject_link = page.locator("#subject-out a").first
            subject_link.wait_for(timeout=WAIT_MS)
            subject_file = _download(page, subject_link, downloads)
            assert subject_file.suffix == ".safetensors"
            assert Subject.load(subject_file).sources == [file_sha256(reference)]

            # a text file named .png: the page shows the library's own sentence
            page.locator("#reference-1 input[type=file]").set_input_files(str(bad))
            page.get_by_text(bad.name).first.wait_for(timeout=WAIT_MS)
            page.locator("#generate").click()
            page.get_by_text(expected_error).first.wait_for(timeout=WAIT_MS)
            assert "Traceback" not in page.content()

            # load the saved subject and generate from it (the photos, bad one included, are not read)
            page.locator("#subject-in input[type=file]").set_input_files(str(subject_file))
            page.get_by_text(subject_file.name).first.wait_for(timeout=WAIT_MS)
            _set_number(page, "seed", "8")
            page.locator("#generate").click()
            page.get_by_text("no encoder run").first.wait_for(timeout=WAIT_MS)  # files and status come together
            again = _download(page, page.locator("#png-files a").first, downloads)
            meta = Image.open(again).text
            assert meta["seed"] == "8" and json.loads(meta["references"]) == [file_sha256(reference)]

            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()

    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 10 and len(np.unique(pixels)) > 50, "the screenshot is blank"
    hosts = {url.split("/")[2] for url in requests if url.startswith(("http:", "https:", "ws:", "wss:"))}
    assert hosts == {app_url.split("/")[2]}, f"the page contacted other hosts: {hosts}"


def test_gradio_client_calls_the_generate_endpoint_as_the_readme_shows(app_url: str, tmp_path: Path) -> None:
    from gradio_client import Client, handle_file

    reference = _reference(tmp_path / "subject.png")
    client = Client(app_url, verbose=False)
    images, summary, files = client.predict(reference_1=handle_file(str(reference)), prompt="a shape",
                                            seed=3, steps=int(STEPS), api_name="/generate")
    meta = Image.open(files[0]).text
    assert meta["prompt"] == "a shape" and meta["seed"] == "3" and "seed 3" in summary
    with pytest.raises(Exception, match="upload at least one reference photo"):
        client.predict(prompt="a shape", steps=int(STEPS), api_name="/generate")
