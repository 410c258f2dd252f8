"""Take the README's picture of the web editor: the shipped example edited with the embedded model at its own
settings (as `make demo`), photographed in headless chromium (Debian's chromium and chromium-driver, driven by
Selenium).

    python docs/take_screenshot.py [docs/app.png]
"""

from __future__ import annotations

import re
import shutil
import socket
import sys
import tempfile
from pathlib import Path

from PIL import Image
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from dit4edit.app import EXAMPLE, EXAMPLE_SOURCE, EXAMPLE_TARGET, Editor, serve
from dit4edit.pipeline import DiT4EditPipeline, default_model

WINDOW = (1280, 1000)
WIDTH = 960  # of the stored picture
COLOURS = 256  # palette PNG: a small file (96 turned the edited blue circle navy once the heat maps took the palette)


def main(out: str = "docs/app.png") -> None:
    pipe = DiT4EditPipeline.from_pretrained(default_model())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    app = serve(Editor(pipe), "127.0.0.1", port)  # the page starts from the model's own settings
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", f"--window-size={WINDOW[0]},{WINDOW[1]}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(options=options, service=Service(executable_path=shutil.which("chromedriver")))
    try:
        browser.get(app.local_url)
        wait = WebDriverWait(browser, 300)
        wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "#image input[type=file]"))
        browser.find_element(By.CSS_SELECTOR, "#image input[type=file]").send_keys(str(EXAMPLE.resolve()))
        browser.find_element(By.CSS_SELECTOR, "#source textarea").send_keys(EXAMPLE_SOURCE)
        browser.find_element(By.CSS_SELECTOR, "#target textarea").send_keys(EXAMPLE_TARGET)
        wait.until(lambda page: page.find_elements(By.CSS_SELECTOR, "#image img"))
        browser.find_element(By.CSS_SELECTOR, "#edit").click()
        wait.until(lambda page: re.fullmatch(r"Inverted [^\n]*", page.find_element(By.CSS_SELECTOR, "#status").text))
        with tempfile.TemporaryDirectory() as scratch:
            raw = Path(scratch) / "raw.png"
            browser.save_screenshot(str(raw))
            picture = Image.open(raw).convert("RGB")
    finally:
        browser.quit()
        app.close()
    picture = picture.resize((WIDTH, round(picture.height * WIDTH / picture.width)), Image.LANCZOS)
    picture.quantize(COLOURS, method=Image.Quantize.MEDIANCUT).save(out, optimize=True)
    print(f"wrote {out} ({Path(out).stat().st_size // 1024} KB)")


if __name__ == "__main__":
    main(*sys.argv[1:])
