"""The web app: the editor's functions without a browser, its API through gradio_client, the `serve` command, and
one end-to-end run in a real headless browser (skipped where chromium is not installed)."""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import socket
import threading
import urllib.request
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import SOURCE, TARGET, random_image
from PIL import Image

from dit4edit import cli
from dit4edit.app import (EXAMPLE_SOURCE, EXAMPLE_TARGET, PAGE_OPTIONS, Editor, editor_mask, is_loopback, page_options,
                          page_values)
from dit4edit.control import AttentionControl
from dit4edit.errors import DiT4EditError
from dit4edit.request import Settings, resolve

FAST = Settings(steps=3, inversion="dpm")  # a few naive steps: the app's paths, not the edit's quality
GREEN = "a green circle on a white background"


class Counting:
    """Counts a pipeline method's calls, keeps the keyword arguments of the last one, and the most calls that ran
    at once."""

    def __init__(self, pipe, name: str, monkeypatch):
        self.calls, self.running, self.most_at_once, self.kwargs = 0, 0, 0, {}
        self._lock = threading.Lock()
        original = getattr(pipe, name)

        def counted(*args, **kwargs):
            with self._lock:
                self.calls += 1
                self.kwargs = kwargs
                self.running += 1
                self.most_at_once = max(self.most_at_once, self.running)
            try:
                return original(*args, **kwargs)
            finally:
                with self._lock:
                    self.running -= 1

        monkeypatch.setattr(pipe, name, counted)


@pytest.fixture
def editor(tiny_pipe):
    return Editor(tiny_pipe)


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "input.png"
    random_image(64, 48).save(path)
    return path


# --- the editor, without a browser -------------------------------------------------------------------------------


def test_a_second_target_reuses_the_inversion(editor, tiny_pipe, picture, monkeypatch):
    inverts, edits = Counting(tiny_pipe, "invert", monkeypatch), Counting(tiny_pipe, "edit", monkeypatch)
    first = editor.edit(picture, SOURCE, TARGET, FAST)
    second = editor.edit(Image.open(picture), SOURCE, GREEN, FAST)  # same pixels, given another way
    assert inverts.calls == 1
    # the pipeline's progress bars run: the page's progress bar follows them (gr.Progress(track_tqdm=True))
    assert inverts.kwargs["disable_progress"] is False and edits.kwargs["disable_progress"] is False
    assert not first.reused and second.reused
    assert "Reused the inversion" in second.status() and f"saved {first.inversion_seconds:.1f} s" in second.status()
    assert "Inverted in" in first.status()
    editor.edit(picture, "a red square on a white background", GREEN, FAST)  # another source prompt
    editor.edit(picture, SOURCE, GREEN, Settings(steps=4, inversion="dpm"))  # other inversion settings
    assert inverts.calls == 3


def test_edit_shows_the_edit_its_reconstruction_the_word_maps_and_a_download(editor, picture):
    outcome = editor.edit(picture, SOURCE, TARGET, FAST)
    assert outcome.edited.size == outcome.reconstruction.size == (64, 48)
    labels = [label for _, label in outcome.word_maps]
    assert {"source: red", "source: circle", "target: blue"} <= set(labels)
    assert all(tile.size == (64, 48) for tile, _ in outcome.word_maps)
    assert outcome.blend_mask is None  # neither local blend nor a brushed mask
    with Image.open(outcome.download) as saved:
        assert saved.format == "PNG" and saved.size == (64, 48)
        assert np.array_equal(np.asarray(saved.convert("RGB")), np.asarray(outcome.edited))
    blended = editor.edit(picture, SOURCE, TARGET, FAST.with_options({"local_blend": "circle"}))
    assert blended.blend_mask is not None and blended.blend_mask.size == (64, 48)


def test_direct_inversion_on_the_page_makes_an_identity_edit_its_reconstruction(editor, picture):
    # naive inversion: without direct inversion the same prompt regenerates something else than the input's latent
    plain = editor.edit(picture, SOURCE, SOURCE, FAST)
    direct = editor.edit(picture, SOURCE, SOURCE, Settings(steps=3, inversion="dpm", direct_inversion=True))
    gap = [np.abs(np.asarray(o.edited, float) - np.asarray(o.reconstruction, float)).mean() for o in (plain, direct)]
    assert gap[1] < 0.5 < gap[0], gap


def test_a_brushed_mask_is_the_editable_region(editor, picture):
    layer = Image.new("RGBA", (64, 48), (0, 0, 0, 0))
    layer.paste((255, 0, 255, 255), (0, 0, 32, 48))  # the left half brushed
    mask = editor_mask({"background": None, "layers": [layer], "composite": None})
    values = np.asarray(mask)
    assert values[:, :32].min() == 255 and values[:, 32:].max() == 0
    assert editor_mask({"background": None, "layers": [Image.new("RGBA", (64, 48))], "composite": None}) is None
    assert editor_mask(None) is None
    outcome = editor.edit(picture, SOURCE, TARGET, FAST, mask)
    shown = np.asarray(outcome.blend_mask, dtype=float)  # bright where editable, darkened elsewhere
    source = np.asarray(Image.open(picture).convert("RGB"), dtype=float)
    assert np.allclose(shown[:, :32], source[:, :32], atol=1) and shown[:, 40:].mean() < 0.5 * source[:, 40:].mean()


@pytest.mark.parametrize("change, message", [
    (dict(image=None), "no image"),
    (dict(image="corrupt"), "not an image or corrupt"),
    (dict(source="  "), "source prompt is empty"),
    (dict(target=""), "target prompt is empty"),
    (dict(settings=FAST.with_options({"local_blend": "triangle"})), "triangle"),
    (dict(settings=FAST.with_options({"self_layers": "3:99"})), "outside the model"),
    (dict(settings=Settings(steps=0)), "steps must be between"),
    (dict(settings=Settings(inversion="newton")), "unknown inversion method"),
])  # fmt: skip
def test_a_bad_request_fails_before_any_work_and_the_next_one_works(editor, tiny_pipe, picture, tmp_path,
                                                                      monkeypatch, change, message):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(b"\x89PNG not really")
    request = dict(image=picture, source=SOURCE, target=TARGET, settings=FAST)
    request.update(change)
    if request["image"] == "corrupt":
        request["image"] = corrupt
    inverts, edits = Counting(tiny_pipe, "invert", monkeypatch), Counting(tiny_pipe, "edit", monkeypatch)
    with pytest.raises(DiT4EditError, match=message):
        editor.edit(**request)
    assert edits.calls == 0 and inverts.calls <= 1  # invert itself refuses a bad method or step count up front
    assert editor.edit(picture, SOURCE, TARGET, FAST).edited.size == (64, 48)


def test_the_apps_defaults_are_the_command_lines(tiny_pipe, tiny_model_dir):
    model = ["--model", str(tiny_model_dir)]  # a model without its own defaults (dit4edit.json)
    flags = cli.build_parser().parse_args(["edit", "in.png", "-t", TARGET, "-o", "out.png", *model])
    page = page_values(Editor(tiny_pipe).resolved())
    assert page == page_values(resolve(cli.settings_from_args(flags)))
    assert (page["merging"], page["direct_inversion"]) == (True, False)
    serve = cli.build_parser().parse_args(["serve", "--steps", "7", "--inversion", "ddim", *model])
    started = page_values(Editor(tiny_pipe, settings=cli.settings_from_args(serve)).resolved())
    assert (started["steps"], started["inversion"], started["guidance"]) == (7, "ddim", page["guidance"])


def test_page_submissions_are_strictly_typed_options():
    values = dict(zip(PAGE_OPTIONS, [30.0, 4.5, "dpm", 1e-5, 0.4, "", 0.8, "auto", "", "", False, False, True]))
    options = page_options(values)
    assert options["steps"] == 30 and options["no_merge"] is True and "self_layers" not in options
    settings = Settings().with_options(options)
    assert settings.steps == 30 and settings.merge is None and settings.direct_inversion is True
    for name, bad, message in (("steps", 2.7, "steps must be an integer"), ("merging", "no", "true or false"),
                               ("local_blend_changed", "no", "true or false"), ("reweight", "blue", "WORD=VALUE")):
        with pytest.raises(DiT4EditError, match=message):
            Settings().with_options(page_options({**values, name: bad}))


def test_the_page_starts_from_the_models_own_settings_and_control(tiny_pipe, monkeypatch):
    from dit4edit.model_folder import ModelDefaults

    library = page_values(Editor(tiny_pipe).resolved())  # no dit4edit.json: the library's
    assert library["self_replace_steps"] == AttentionControl().self_replace_steps
    model = ModelDefaults(guidance_scale=2.5, num_inference_steps=12, inversion="dpm",
                          control={"self_mode_early": "p2p", "self_replace_steps": 1.0, "self_layers": [0, 1]})
    monkeypatch.setattr(tiny_pipe, "defaults", model)
    editor = Editor(tiny_pipe)
    page = page_values(editor.resolved())
    assert (page["steps"], page["guidance"], page["inversion"], page["tol"]) == (12, 2.5, "dpm", library["tol"])
    assert (page["self_replace_steps"], page["self_layers"]) == (1.0, "0:1")
    # A submission of the page as shown is the model's control; what the page does not show (the early
    # self-attention mode) stays as the model has it.
    own = resolve(Settings().with_options(page_options(page)), model).control
    assert own == AttentionControl(self_mode_early="p2p", self_replace_steps=1.0, self_layers=(0, 1))
    moved = resolve(Settings().with_options(page_options({**page, "self_replace_steps": 0.5})), model).control
    assert moved == AttentionControl(self_mode_early="p2p", self_replace_steps=0.5, self_layers=(0, 1))


def test_the_page_and_the_command_line_turn_the_models_local_blend_off(tiny_pipe, monkeypatch):
    from dit4edit.model_folder import ModelDefaults

    model = ModelDefaults(control={"local_blend_changed": True, "local_blend_normalize": "minmax"})
    monkeypatch.setattr(tiny_pipe, "defaults", model)
    page = page_values(Editor(tiny_pipe).resolved())
    assert page["local_blend_changed"] is True
    off = resolve(Settings().with_options(page_options({**page, "local_blend_changed": False})), model).control
    assert off == AttentionControl(local_blend_normalize="minmax")
    for flag, on in (([], True), (["--no-local-blend-changed"], False), (["--local-blend-changed"], True)):
        args = cli.build_parser().parse_args(["edit", "in.png", "-t", TARGET, "-o", "out.png", *flag])
        assert resolve(cli.settings_from_args(args), model).control.local_blend_changed is on


def test_the_librarys_warnings_reach_the_page(editor, tiny_pipe, picture, monkeypatch):
    from dit4edit.model_folder import ModelDefaults

    words = ["a", "red", "circle", "on", "white", "background"]
    monkeypatch.setattr(tiny_pipe, "defaults", ModelDefaults(vocabulary=words))
    outcome = editor.edit(picture, SOURCE, TARGET, FAST)
    assert len(outcome.warnings) == 1 and "not trained on: blue" in outcome.warnings[0]
    assert outcome.status().splitlines()[-1] == f"Warning: {outcome.warnings[0]}"
    assert editor.edit(picture, SOURCE, SOURCE, FAST).warnings == []


def test_loopback_addresses():
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "192.168.1.4", "::", "example.org"]))


# --- the `serve` command -----------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_refuses_a_busy_port_before_loading_the_model(monkeypatch, capsys):
    monkeypatch.setattr(cli, "load_pipeline", lambda args, *more, **named: pytest.fail("the model was loaded"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        code = cli.main(["serve", "--port", str(taken.getsockname()[1])])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("dit4edit: error: cannot listen on 127.0.0.1:") and err.count("\n") == 1
    assert cli.main(["serve", "--port", "70000"]) == 2
    assert "--port must be between 1 and 65535" in capsys.readouterr().err


@pytest.mark.parametrize("host, warned", [("127.0.0.1", False), ("0.0.0.0", True)])
def test_serve_loads_the_model_once_and_warns_off_loopback(tiny_pipe, tiny_model_dir, monkeypatch, capsys, host,
                                                           warned):
    from dit4edit import app

    loads, served = [], []
    monkeypatch.setattr(cli, "load_pipeline", lambda args, *more, **named: loads.append(args.model) or tiny_pipe)
    running = SimpleNamespace(local_url="http://here/", block_thread=lambda: served.append("blocked"))
    monkeypatch.setattr(app, "serve", lambda *args: served.append(args) or running)
    port = free_port()
    model = str(tiny_model_dir)
    assert cli.main(["serve", "--host", host, "--port", str(port), "--steps", "5", "--model", model]) == 0
    err = capsys.readouterr().err
    assert loads == [model] and len(served) == 2 and served[1] == "blocked"
    editor, served_host, served_port = served[0]
    assert editor.pipe is tiny_pipe and (served_host, served_port, editor.settings.steps) == (host, port, 5)
    assert ("warning: serving on 0.0.0.0" in err) is warned and "the editor is at http://here/" in err
    assert err.count("\n") == 1 + int(warned)


# --- the running app: API and browser ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_pipe):
    pytest.importorskip("gradio", reason="the web app needs the app extra (pip install 'dit4edit[app]')")
    from dit4edit.app import serve

    editor = Editor(tiny_pipe, settings=FAST)
    app = serve(editor, "127.0.0.1", free_port())
    yield app, editor
    app.close()


@pytest.fixture(scope="module")
def client(server):
    from gradio_client import Client

    return Client(server[0].local_url, verbose=False, download_files=False)  # outputs as URLs, fetched below


def fetched(url: str) -> Image.Image:
    """An image the app serves, read over a fresh connection."""
    with urllib.request.urlopen(url, timeout=60) as response:
        return Image.open(io.BytesIO(response.read()))


def test_the_api_edits_with_three_inputs_and_answers_bad_requests_with_errors(server, client, picture, tmp_path,
                                                                               monkeypatch):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    app, editor = server
    parameters = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/edit"]["parameters"]
    assert [p["parameter_name"] for p in parameters[:3]] == ["image", "source", "target"]
    assert all(p["parameter_has_default"] for p in parameters[3:])
    inverts = Counting(editor.pipe, "invert", monkeypatch)
    edited, *_, status = client.predict(handle_file(str(picture)), SOURCE, TARGET, api_name="/edit")
    assert fetched(edited["url"]).size == (64, 48) and "Inverted in" in status

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not a picture")
    with pytest.raises(AppError, match="not an image or corrupt"):
        client.predict(handle_file(str(not_an_image)), SOURCE, TARGET, api_name="/edit")
    with pytest.raises(AppError, match="source prompt is empty"):
        client.predict(handle_file(str(picture)), "", TARGET, api_name="/edit")
    with pytest.raises(AppError, match="local-blend word"):
        client.predict(handle_file(str(picture)), SOURCE, TARGET, local_blend="triangle", api_name="/edit")

    edited, *_, status = client.predict(handle_file(str(picture)), SOURCE, GREEN, api_name="/edit")
    assert fetched(edited["url"]).size == (64, 48) and "Reused the inversion" in status
    assert inverts.calls == 1

    layer = tmp_path / "brush.png"  # the image editor's value: the left half brushed
    brushed = Image.new("RGBA", (64, 48))
    brushed.paste((255, 0, 255, 255), (0, 0, 32, 48))
    brushed.save(layer)
    brush = {"background": handle_file(str(picture)), "layers": [handle_file(str(layer))], "composite": None}
    edited, _, shown, *_ = client.predict(handle_file(str(picture)), SOURCE, GREEN, mask=brush, api_name="/edit")
    region = np.asarray(fetched(shown["url"]).convert("L"), dtype=float)
    assert region.shape == (48, 64) and region[:, :32].mean() > 1.5 * region[:, 40:].mean()


def test_the_api_refuses_hostile_requests_in_one_line_before_inverting(server, client, picture, tmp_path,
                                                                       monkeypatch):
    from gradio_client import handle_file
    from gradio_client.exceptions import AppError

    app, editor = server
    inverts = Counting(editor.pipe, "invert", monkeypatch)
    thin = tmp_path / "thin.png"
    Image.new("RGB", (1, 300_000), "white").save(thin)  # 300k pixels, but 16x that to work on
    junk = tmp_path / "layer.png"
    junk.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    brush = {"background": handle_file(str(picture)), "layers": [handle_file(str(junk))], "composite": None}
    cases = [((handle_file(str(thin)), SOURCE, TARGET), {}, "over the limit"),
             ((handle_file(str(picture)), SOURCE, TARGET), {"steps": 2.7}, "steps"),
             ((handle_file(str(picture)), SOURCE, TARGET), {"local_blend_changed": "no"}, "true or false"),
             ((handle_file(str(picture)), SOURCE, "\u200b\u2060"), {}, "empty"),
             ((handle_file(str(picture)), SOURCE, TARGET), {"mask": brush}, "mask")]
    for inputs, options, message in cases:
        with pytest.raises(AppError) as error:
            client.predict(*inputs, **options, api_name="/edit")
        text = str(error.value)
        assert message in text, (options, text)
        assert "\n" not in text.strip() and "/tmp" not in text and str(tmp_path) not in text
    assert inverts.calls == 0


def test_concurrent_requests_are_queued_on_the_model(server, picture, monkeypatch):
    from gradio_client import Client, handle_file

    app, editor = server
    edits = Counting(editor.pipe, "edit", monkeypatch)
    users = [Client(app.local_url, verbose=False, download_files=False) for _ in range(3)]
    jobs = [user.submit(handle_file(str(picture)), SOURCE, target, api_name="/edit")
            for user, target in zip(users, (TARGET, GREEN, SOURCE))]
    assert all(fetched(job.result(timeout=120)[0]["url"]).size == (64, 48) for job in jobs)
    assert edits.calls == 3 and edits.most_at_once == 1


@pytest.fixture(scope="module")
def browser():
    """Headless chromium driven by Selenium through the system's chromium-driver (nothing is downloaded)."""
    pytest.importorskip("selenium", reason="the browser test needs selenium (pip install 'dit4edit[test]')")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no headless browser: install Debian's chromium and chromium-driver "
                    "(apt-get install chromium chromium-driver; `make test` does where apt-get may run)")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--window-size=1280,1000"):
        options.add_argument(flag)
    session = webdriver.Chrome(options=options, service=Service(executable_path=driver))
    yield session
    session.quit()


def test_in_a_browser_upload_type_edit_and_see_the_picture(server, browser, tmp_path):
    from selenium.webdriver.support.ui import WebDriverWait

    app, _ = server
    picture = tmp_path / "upload.png"
    random_image(64, 48, seed=3).save(picture)
    wait = WebDriverWait(browser, 120)
    with page_state_on_failure(browser, tmp_path / "failure.png"):
        drive_the_page(app, browser, wait, picture)


@contextlib.contextmanager
def page_state_on_failure(browser, screenshot):
    """On a failure, say what the page showed (status line, messages) and keep a screenshot."""
    from selenium.webdriver.common.by import By

    try:
        yield
    except Exception as error:
        browser.save_screenshot(str(screenshot))
        status = [e.text for e in browser.find_elements(By.CSS_SELECTOR, "#status")]
        messages = [e.text for e in browser.find_elements(By.CSS_SELECTOR, ".toast-body")]
        raise AssertionError(f"{type(error).__name__} in the browser: status {status}, messages {messages}, "
                             f"screenshot {screenshot}") from error


def drive_the_page(app, browser, wait, picture):
    """Upload, type, meet the empty-prompt message, edit, check the picture, edit another target, load the example."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as shown

    browser.get(app.local_url)
    wait.until(lambda page: "dit4edit" in page.title)

    def status_changes(click):
        """Click, then wait for a new status line (not the old one under a progress bar, not a queue notice)."""
        before = browser.find_element(By.CSS_SELECTOR, "#status").text
        click()

        def new_status(page):
            text = page.find_element(By.CSS_SELECTOR, "#status").text
            return text if text != before and re.fullmatch(r"(Inverted|Reused) [^\n]*", text) else False

        return wait.until(new_status)

    wait.until(shown.presence_of_element_located((By.CSS_SELECTOR, "#image input[type=file]"))).send_keys(
        str(picture))
    wait.until(shown.presence_of_element_located((By.CSS_SELECTOR, "#image img")))
    source = browser.find_element(By.CSS_SELECTOR, "#source textarea")
    target = browser.find_element(By.CSS_SELECTOR, "#target textarea")
    target.send_keys(TARGET)
    browser.find_element(By.CSS_SELECTOR, "#edit").click()  # no source prompt yet: a message, no result
    toast = wait.until(shown.visibility_of_element_located((By.CSS_SELECTOR, ".toast-body")))
    assert "source prompt is empty" in toast.text and "Traceback" not in browser.page_source

    source.send_keys(SOURCE)
    status = status_changes(browser.find_element(By.CSS_SELECTOR, "#edit").click)
    assert status.startswith("Inverted in")
    result = fetched(browser.find_element(By.CSS_SELECTOR, "#edited img").get_attribute("src"))
    assert result.format == "PNG" and result.size == (64, 48)

    target.clear()
    target.send_keys(GREEN)
    assert status_changes(browser.find_element(By.CSS_SELECTOR, "#edit").click).startswith("Reused the inversion")

    browser.find_element(By.CSS_SELECTOR, "tr.tr-body").click()  # the shipped example fills the inputs
    # The page fills the fields one after the other: on a loaded machine the target can lag the source, so wait for
    # both (a page that never fills the target still fails, at the wait's timeout).
    wait.until(lambda page: (source.get_attribute("value"), target.get_attribute("value"))
               == (EXAMPLE_SOURCE, EXAMPLE_TARGET))
