"""End to end: the real Streamlit server on a free localhost port, driven by headless Chromium."""

import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest

@pytest.fixture
def server(models_folder, free_port):
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "robustedge.cli", "app", "--models", str(models_folder),
                             "--port", str(port), "--host", "127.0.0.1"], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            if urllib.request.urlopen(url + "/_stcore/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(0.5)
    else:
        os.killpg(proc.pid, signal.SIGTERM)
        pytest.fail("the Streamlit server did not come up: " + proc.stdout.read().decode()[-2000:])
    yield url
    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(timeout=30)


def test_attack_in_a_real_browser(server, tmp_path, chrome, keep_screenshot):
    from selenium.webdriver.support.ui import WebDriverWait

    driver = chrome("1400,1100")
    start = time.perf_counter()
    driver.get(server + "/?model=natural/best.safetensors&attack=PGD&eps=0.3")
    # the whole result, not its first element: under load Streamlit paints the message before the images'
    # captions (a flake on a loaded machine read the page between the two)
    WebDriverWait(driver, 120).until(lambda d: all(
        part in d.find_element("tag name", "body").text for part in ("attack took", "perturbation, amplified")))
    elapsed = time.perf_counter() - start
    body = driver.find_element("tag name", "body").text
    assert "Prediction flipped" in body and "perturbation, amplified" in body
    time.sleep(1)  # let the images and charts paint
    shot = tmp_path / "demo.png"
    driver.save_screenshot(str(shot))
    from PIL import Image

    assert shot.stat().st_size > 20_000
    with Image.open(shot) as img:
        assert img.size[0] >= 1000 and len(img.convert("RGB").getcolors(1 << 24)) > 50  # not a blank page
    keep_screenshot(shot, "demo.png")
    print(f"page load to attack result: {elapsed:.1f} s; screenshot {shot}")
