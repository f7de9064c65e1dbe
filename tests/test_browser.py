"""End to end: the real Streamlit server on a free localhost port, driven by headless Chromium."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

SCREENSHOT_DIR = os.environ.get("ROBUSTEDGE_SCREENSHOT_DIR")


def _chromium() -> tuple[str, str]:
    """Debian's chromium + chromedriver, installed here when missing (as the test set-up)."""
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if all(found):
        return found  # type: ignore[return-value]
    if shutil.which("apt-get") and hasattr(os, "geteuid") and os.geteuid() == 0:
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, timeout=900)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium", "chromium-driver"], env=env,
                       capture_output=True, timeout=1200)
    found = shutil.which("chromium"), shutil.which("chromedriver")
    if not all(found):
        pytest.skip("Debian's chromium and chromium-driver are not installed and could not be installed here "
                    "(needs root and apt-get)")
    return found  # type: ignore[return-value]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(models_folder):
    port = _free_port()
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


def test_attack_in_a_real_browser(server, tmp_path):
    chromium, chromedriver = _chromium()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1400,1100", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(chromedriver), options=options)
    try:
        start = time.perf_counter()
        driver.get(server + "/?model=natural/best.safetensors&attack=PGD&eps=0.3")
        WebDriverWait(driver, 120).until(lambda d: "attack took" in d.find_element("tag name", "body").text)
        elapsed = time.perf_counter() - start
        body = driver.find_element("tag name", "body").text
        assert "Prediction flipped" in body and "perturbation, amplified" in body
        time.sleep(1)  # let the images and charts paint
        shot = tmp_path / "demo.png"
        driver.save_screenshot(str(shot))
    finally:
        driver.quit()
    from PIL import Image

    assert shot.stat().st_size > 20_000
    with Image.open(shot) as img:
        assert img.size[0] >= 1000 and len(img.convert("RGB").getcolors(1 << 24)) > 50  # not a blank page
    if SCREENSHOT_DIR:
        Path(SCREENSHOT_DIR).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(SCREENSHOT_DIR) / "demo.png")
    print(f"page load to attack result: {elapsed:.1f} s; screenshot {shot}")
