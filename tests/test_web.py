"""The web page: protection through its API, its limits and safety, and a real browser driving it (tiny models)."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zipfile
from http.server import ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import defend
from conftest import ROOT, export_tiny_onnx_face_model, tiny_autoencoder_tiny, write_photo
from evaluation.calibration import model_digest, write_thresholds
from evaluation.web.page import PageConfig, display_name
from evaluation.web.server import serve
from utils import UserError, read_heif

LEVELS = 4


def face_photo(path: Path, size: int = 160) -> Path:
    """The bundled portrait, small (MTCNN finds the face; tiny models protect it in seconds)."""
    Image.open(ROOT / "assets" / "astronaut.png").convert("RGB").resize((size, size), Image.LANCZOS).save(path)
    return path


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The page on a free localhost port with a tiny autoencoder, a tiny face model to attack and another to judge
    (with a threshold table of its own), 3 iterations, and small limits."""
    root = tmp_path_factory.mktemp("page")
    tiny_autoencoder_tiny().save_pretrained(root / "vae")
    attacked = export_tiny_onnx_face_model(root / "attacked")
    judge = str(export_tiny_onnx_face_model(root / "judge"))
    write_thresholds(root / "thresholds.json", {judge: {
        "model": judge, "far": 0.01, "threshold": 0.5, "genuine_pairs": 1, "impostor_pairs": 1, "false_rejects": 0.0,
        "model_sha256": model_digest(judge), "photos": "none (a test)", "command": "none"}})
    (root / "tmp").mkdir()
    config = PageConfig(protect_options=["--vae", str(root / "vae"), "--fr_model", str(attacked), "--num_iters", "3"],
                        judges=judge, check_vae=str(root / "vae"), thresholds=root / "thresholds.json", device="cpu",
                        max_files=3, max_upload_mb=0.5, max_megapixels=0.5, temp_dir=root / "tmp")
    server, state = serve(config, "127.0.0.1", 0)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    state.photos = root
    yield state
    server.shutdown()
    server.server_close()
    state.close()
    assert not state.root.exists()  # everything the page wrote is gone when it stops
    assert list((root / "tmp").iterdir()) == []


def request(page, method: str, path: str, body: bytes | None = None, headers: dict | None = None,
            api: bool = True) -> tuple[int, dict, bytes]:
    all_headers = {"X-Facelock": "1"} if api else {}
    req = urllib.request.Request(page.url + path, data=body, method=method, headers={**all_headers, **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def api(page, method: str, path: str, payload=None, **kwargs) -> tuple[int, dict]:
    body = json.dumps(payload).encode() if isinstance(payload, dict) else payload
    status, _, data = request(page, method, path, body, **kwargs)
    return status, json.loads(data)


def upload(page, session: str, data: bytes, name: str) -> tuple[int, dict]:
    return api(page, "POST", f"/api/upload?session={session}", data,
               headers={"X-File-Name": urllib.request.quote(name), "Content-Type": "application/octet-stream"})


def new_session(page) -> str:
    status, data = api(page, "POST", "/api/session")
    assert status == 200
    return data["session"]


def wait(page, session: str, job: str, seconds: float = 120) -> dict:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        status, data = api(page, "GET", f"/api/job?session={session}&job={job}")
        assert status == 200
        if data["state"] in ("done", "failed"):
            return data
        time.sleep(0.2)
    raise AssertionError(f"job {job} did not finish in {seconds} s")


def files_under(folder: Path) -> set[Path]:
    return {p for p in folder.rglob("*") if p.is_file()}


def test_protects_photos_through_its_api_and_offers_pngs_and_a_zip(page, tmp_path):
    session = new_session(page)
    ids = []
    for name in ("me.jpg", "me again.png"):
        status, photo = upload(page, session, face_photo(tmp_path / "face.png").read_bytes(), name)
        assert status == 200 and photo["name"] == name and (photo["width"], photo["height"]) == (160, 160)
        ids.append(photo["id"])
    status, job = api(page, "POST", "/api/protect", {"session": session, "photos": ids, "levels": LEVELS,
                                                     "preset": "small"})
    assert status == 200
    result = wait(page, session, job["job"])
    assert [r["name"] for r in result["results"]] == ["me.jpg", "me again.png"]
    clean = np.asarray(Image.open(tmp_path / "face.png"))
    for entry in result["results"]:
        url = f"/files/{session}/{entry['protected']}?download={entry['download']}"
        status, headers, data = request(page, "GET", url, api=False)
        assert status == 200 and headers["Content-Type"] == "image/png"
        assert f'filename="{entry["download"]}"' in headers["Content-Disposition"]
        protected = np.asarray(Image.open(io.BytesIO(data)))
        assert protected.shape == clean.shape
        assert 0 < np.abs(protected.astype(int) - clean.astype(int)).max() <= LEVELS
        report = entry["report"]
        assert report["linf_255"] <= LEVELS and report["judges"][0]["threshold"] == 0.5
        assert [r["sharing"] for r in report["results"]] == ["as posted", "JPEG 75", "1080 px + JPEG 85"]
        assert all(r["verdict"] in ("recognised", "not recognised", "no face found") for r in report["results"])
        for image in ("original", "difference"):
            assert request(page, "GET", f"/files/{session}/{entry[image]}", api=False)[0] == 200
    status, _, data = request(page, "GET", f"/files/{session}/{result['archive']}?download=all", api=False)
    assert status == 200
    assert sorted(zipfile.ZipFile(io.BytesIO(data)).namelist()) == ["me_again_protected.png", "me_protected.png"]


def test_bad_uploads_get_one_clear_line_and_the_page_goes_on(page, tmp_path):
    session = new_session(page)
    status, data = upload(page, session, b"just some notes\n", "notes.txt")
    assert status == 400 and data["error"] == "notes.txt: not an image file"
    noise = write_photo(tmp_path / "noise.png", size=(128, 128)).read_bytes()
    status, data = upload(page, session, noise, "noise.png")
    assert status == 400 and data["error"].startswith("no face found in noise.png")
    status, data = upload(page, session, b"\0" * 600_000, "huge.jpg")
    assert status == 413 and "too large" in data["error"] and "0.5 MB" in data["error"]
    wide = Image.new("RGB", (1000, 600), (200, 180, 160))
    buffer = io.BytesIO()
    wide.save(buffer, format="PNG")
    status, data = upload(page, session, buffer.getvalue(), "wide.png")
    assert status == 400 and "megapixels" in data["error"]
    face = face_photo(tmp_path / "face.png").read_bytes()
    ids = [upload(page, session, face, "face.png")[1]["id"] for _ in range(3)]
    status, data = upload(page, session, face, "face.png")
    assert status == 413 and "too many photos: the page takes up to 3 at a time" in data["error"]
    status, data = api(page, "POST", "/api/protect", {"session": session, "photos": ids, "levels": 99,
                                                      "preset": "small"})
    assert status == 400 and "strength" in data["error"]
    status, data = api(page, "POST", "/api/protect", {"session": session, "photos": ids, "levels": 1,
                                                      "preset": "../paper"})
    assert status == 400 and "unknown preset" in data["error"]
    assert api(page, "GET", "/api/info")[0] == 200  # still serving


def test_uploaded_names_are_never_paths_and_files_stay_in_the_session_folder(page, tmp_path):
    assert read_heif()
    assert display_name("../../etc/passwd") == "passwd" and display_name("..\\..\\x.png") == "x.png"
    assert display_name("a\x00b\nc.jpg") == "abc.jpg" and display_name("") == "photo"
    before = files_under(page.photos)
    session = new_session(page)
    status, data = upload(page, session, face_photo(tmp_path / "face.png").read_bytes(), "../../../evil.png")
    assert status == 200 and data["name"] == "evil.png"
    written = files_under(page.photos) - before
    assert written and all(page.root / session in p.parents for p in written)
    assert not any(p.name == "evil.png" for p in page.photos.rglob("*"))
    Image.open(tmp_path / "face.png").save(tmp_path / "face.heic", format="HEIF", quality=90)  # a phone's photo
    status, data = upload(page, session, (tmp_path / "face.heic").read_bytes(), "IMG_0001.HEIC")
    assert status == 200 and (data["name"], data["width"], data["height"]) == ("IMG_0001.HEIC", 160, 160)
    for path in (f"/files/{session}/..%2F..%2Fthresholds.json", f"/files/{session}/../thresholds.json",
                 f"/files/{session}/original-{data['id']}.png/..", "/files/nosuchsession/original-1.png"):
        assert request(page, "GET", path, api=False)[0] == 404


def test_api_requests_need_the_page_header_and_its_own_host(page):
    assert request(page, "POST", "/api/session", api=False)[0] == 403  # another site's form cannot start work
    status, data = api(page, "POST", "/api/protect", b"{not json")
    assert status == 400 and data["error"] == "malformed request"
    status, _, body = request(page, "GET", "/", headers={"Host": "attacker.example:80"}, api=False)
    assert status == 403 and b"own address" in body  # DNS rebinding
    status, headers, body = request(page, "GET", "/", api=False)
    assert status == 200 and b"Protect your photos" in body and "default-src 'self'" in \
        headers["Content-Security-Policy"]


def test_no_traceback_reaches_the_browser(page, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("secret internals\nTraceback (most recent call last)")

    monkeypatch.setattr(page, "describe_models", broken)
    status, _, body = request(page, "GET", "/api/info")
    assert status == 500 and b"secret" not in body and b"Traceback" not in body
    assert b"details are in its terminal" in body
    monkeypatch.setattr(page, "checker", broken)
    session = new_session(page)
    photo = upload(page, session, face_photo(tmp_path / "face.png").read_bytes(), "face.png")[1]
    job = api(page, "POST", "/api/protect", {"session": session, "photos": [photo["id"]], "levels": 2,
                                             "preset": "small"})[1]
    result = wait(page, session, job["job"])
    assert result["results"] == [{"name": "face.png", "error": "face.png: the protection failed (secret internals)"}]
    assert result["state"] == "failed" and result["stage"].startswith("failed")  # not "finished" at 100 %

    def unavailable(*args, **kwargs):
        raise UserError("cannot load face model 'mobilefacenet'")

    monkeypatch.setattr(page, "checker", unavailable)  # a judge missing offline: the photo is still protected
    photo = upload(page, session, face_photo(tmp_path / "face.png").read_bytes(), "face.png")[1]
    job = api(page, "POST", "/api/protect", {"session": session, "photos": [photo["id"]], "levels": 2,
                                             "preset": "small"})[1]
    (entry,) = wait(page, session, job["job"])["results"]
    assert entry["report"] is None and entry["conclusion"] == "not checked: cannot load face model 'mobilefacenet'"
    assert entry["linf_255"] <= 2
    assert request(page, "GET", f"/files/{session}/{entry['protected']}", api=False)[0] == 200


def test_a_session_s_files_are_deleted_when_it_ends_or_idles(page, tmp_path):
    face = face_photo(tmp_path / "face.png").read_bytes()
    session = new_session(page)
    assert upload(page, session, face, "face.png")[0] == 200
    assert (page.root / session).is_dir()
    status, _, _ = request(page, "POST", f"/api/end?session={session}", api=False)  # what the tab sends on closing
    assert status == 200 and not (page.root / session).exists()
    assert upload(page, session, face, "face.png")[0] == 404
    idle = new_session(page)
    page.sessions[idle].last_seen -= page.config.session_minutes * 60 + 1
    page.expire()
    assert not (page.root / idle).exists()


def test_listens_on_localhost_unless_shared_with_a_warning(tmp_path, monkeypatch, capsys):
    served = []
    monkeypatch.setattr(ThreadingHTTPServer, "serve_forever", lambda server: served.append(server.server_address))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    assert defend.main(["--web", "--port", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert served[-1][0] == "127.0.0.1" and "WARNING" not in out
    assert f"open http://127.0.0.1:{served[-1][1]}" in out
    assert defend.main(["--web", "--share", "--port", "0", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert served[-1][0] == "0.0.0.0" and out.startswith("WARNING: --share") and "every network interface" in out
    assert list(tmp_path.iterdir()) == []  # the temporary folders are gone
    with pytest.raises(SystemExit):
        defend.main(["--web", "--help"])
    assert "--max_upload_mb" in capsys.readouterr().out
    with pytest.raises(UserError, match="protection options are not valid"):
        defend.main(["--web", "--port", "0", "--num_iters", "zero"])
    assert list(tmp_path.iterdir()) == []
    assert defend.build_parser().parse_args(["--input_path", "a", "--defend_method", "noise"]).web is False
    assert "--web" in defend.build_parser().format_help()


def test_results_speak_plainly_and_say_what_to_do_next(page, tmp_path):
    session = new_session(page)
    photo = upload(page, session, face_photo(tmp_path / "face.png").read_bytes(), "face.png")[1]
    job = api(page, "POST", "/api/protect", {"session": session, "photos": [photo["id"]], "levels": 2,
                                             "preset": "small"})[1]
    (entry,) = wait(page, session, job["job"])["results"]
    words = [entry["conclusion"], entry["next_step"], *entry["judges_in_words"]]
    assert entry["next_step"] and entry["judges_in_words"] and entry["judges_in_words"][0].startswith(
        f"{entry['report']['judges'][0]['model']}, a face-recognition model the protection did not attack")
    assert not any("python -m" in w or "[-1, 1]" in w or "threshold_source" in w for w in words)
    script = (ROOT / "evaluation" / "web" / "static" / "app.js").read_text()
    assert "[-1, 1]" not in script and "threshold_source" not in script


def test_a_running_job_tells_the_time_left():
    from evaluation.web.page import Job

    job = Job("j", [], 4, "small", state="running")
    assert job.seconds_left() is None  # nothing done yet: no guess
    job.advance(0.25)
    job.started -= 30  # a quarter done in 30 s
    assert 85 <= job.seconds_left() <= 95 and job.status()["seconds_left"] == round(job.seconds_left())
    job.state = "done"
    assert job.status()["seconds_left"] is None


def test_concurrent_uploads_cannot_pass_the_limit(page, tmp_path):
    session = new_session(page)
    face = face_photo(tmp_path / "face.png").read_bytes()
    answers = []
    threads = [threading.Thread(target=lambda: answers.append(upload(page, session, face, "face.png")[0]))
               for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers.count(200) == page.config.max_files and answers.count(413) == 12 - page.config.max_files


def test_uploads_are_decoded_one_at_a_time(page, tmp_path, monkeypatch):
    """However many photos arrive together, one is decoded at a time, so memory does not grow with them."""
    import evaluation.web.page as page_module

    inside, most = [0], [0]
    real = page_module.load_image

    def load(path):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        time.sleep(0.2)  # long enough for the others to arrive
        try:
            return real(path)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(page_module, "load_image", load)
    face = face_photo(tmp_path / "face.png").read_bytes()
    sessions = [new_session(page) for _ in range(3)]
    threads = [threading.Thread(target=upload, args=(page, session, face, "face.png")) for session in sessions]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1 and all(len(page.sessions[s].photos) == 1 for s in sessions)


def test_animations_and_transparent_pictures_say_how_they_were_read(page, tmp_path):
    session = new_session(page)
    face = Image.open(face_photo(tmp_path / "face.png"))
    buffer = io.BytesIO()
    face.save(buffer, format="GIF", save_all=True, append_images=[face.rotate(90)], duration=100)
    status, data = upload(page, session, buffer.getvalue(), "animated.gif")
    assert status == 200 and data["notes"] == ["it has 2 frames; only the first is protected"]
    buffer = io.BytesIO()
    Image.new("RGBA", (160, 160), (10, 20, 30, 0)).save(buffer, format="PNG")
    status, data = upload(page, session, buffer.getvalue(), "clear.png")
    assert status == 400 and "fully transparent" in data["error"] and "white" in data["error"]


def test_no_preset_that_needs_a_gpu_is_offered_on_a_cpu(page):
    assert page.device.type == "cpu" and list(page.presets()) == ["small"]
    assert list(api(page, "GET", "/api/info")[1]["presets"]) == ["small"]
    session = new_session(page)
    status, data = api(page, "POST", "/api/protect", {"session": session, "photos": [1], "levels": 2,
                                                      "preset": "paper"})
    assert status == 400


def small_page(tmp_path: Path, **options):
    root = tmp_path / "small"
    root.mkdir()
    config = PageConfig(protect_options=["--vae", str(root), "--num_iters", "1"], device="cpu", temp_dir=root,
                        **options)
    server, state = serve(config, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, state


def test_a_stalled_client_is_dropped_and_idle_sessions_go_on_their_own(tmp_path):
    import socket

    server, state = small_page(tmp_path, socket_timeout=0.5, session_minutes=0.005)
    try:
        stalled = socket.create_connection(server.server_address, timeout=30)
        stalled.sendall(b"GET / HTTP/1.1\r\n")  # and never the rest
        assert stalled.recv(1024) == b""  # the server closed it (the client's own timeout is 30 s)
        stalled.close()
        session = state.new_session()
        deadline = time.monotonic() + 60
        while session.folder.exists() and time.monotonic() < deadline:  # no request comes in the meantime
            time.sleep(0.1)
        assert not session.folder.exists() and session.id not in state.sessions
    finally:
        server.shutdown()
        server.server_close()
        state.close()


@pytest.mark.parametrize("port", ["-1", "70000"])
def test_a_port_that_cannot_be_had_leaves_nothing_behind(tmp_path, monkeypatch, port):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(UserError, match="port"):
        defend.main(["--web", "--port", port, "--device", "cpu"])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("signals", [("SIGINT", "SIGINT"), ("SIGTERM",)])
def test_stopping_the_page_mid_job_stops_the_job_and_deletes_the_uploads(page, tmp_path, signals):
    """A real process, a job protecting a photo for a long time, and Ctrl+C (twice) or `kill`: the process exits 0
    at once, and nothing of the user's is left in the temporary folder."""
    import signal
    import subprocess
    import sys

    temp = tmp_path / "tmp"
    temp.mkdir()
    root = page.photos
    command = [sys.executable, "-m", "evaluation.web", "--port", "0", "--device", "cpu", "--judge",
               str(root / "judge" / "model.onnx"), "--check_vae", str(root / "vae"), "--vae", str(root / "vae"),
               "--fr_model", str(root / "attacked" / "model.onnx"), "--num_iters", "1000000"]
    process = subprocess.Popen(command, cwd=ROOT, env={**os.environ, "TMPDIR": str(temp)}, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    try:
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("open http://"):
                break
        url = line.split()[1]
        server = type("Server", (), {"url": url})
        session = new_session(server)
        photo = upload(server, session, face_photo(tmp_path / "face.png").read_bytes(), "face.png")[1]
        job = api(server, "POST", "/api/protect", {"session": session, "photos": [photo["id"]], "levels": 2,
                                                   "preset": "small"})[1]["job"]
        deadline = time.monotonic() + 300
        while "iteration" not in api(server, "GET", f"/api/job?session={session}&job={job}")[1]["stage"]:
            assert time.monotonic() < deadline, "the job did not start"
            time.sleep(0.2)
        assert any(temp.rglob("original-*.png"))  # the user's photo is there while the page runs
        for name in signals:
            process.send_signal(getattr(signal, name))
            time.sleep(0.3)
        output = process.communicate(timeout=120)[0]
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, "".join(lines) + output
    assert "stopped; the page's temporary files are deleted" in output and "terminate called" not in output
    assert not [p for p in temp.iterdir() if p.name.startswith("facelock-page-")]  # (torch may keep a cache there)


# ------------------------------------------------------------------------------------------ in a real browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_a_person_protects_a_photo_in_a_real_browser(page, tmp_path):
    if CHROMIUM is None:
        pytest.skip("no Chromium here (.ci/run installs Debian's chromium where it can)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    photo = face_photo(tmp_path / "portrait.png")
    notes = tmp_path / "notes.txt"
    notes.write_text("not a photo")
    artifacts = [tmp_path] + ([Path(os.environ["FACELOCK_ARTIFACTS"])] if os.environ.get("FACELOCK_ARTIFACTS") else [])
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch_persistent_context(  # a fresh profile folder
            tmp_path / "profile", executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS,
            accept_downloads=True, viewport={"width": 1200, "height": 1000})
        try:
            tab = browser.new_page()
            tab.goto(page.url)
            tab.wait_for_selector("#preset option", state="attached")
            assert "small: autoencoder vae, face model attacked" in tab.inner_text("#preset")  # the models it uses
            assert "verdicts by" in tab.text_content("#models") and "judge" in tab.text_content("#models")
            tab.set_input_files("#files", str(notes))
            tab.click("#protect")
            tab.wait_for_selector("#errors li")
            assert tab.inner_text("#errors") == "notes.txt: not an image file"

            tab.set_input_files("#files", str(photo))
            tab.fill("#budget", str(LEVELS))
            tab.click("#protect")
            tab.wait_for_selector(".result", timeout=60_000)
            assert tab.inner_text("#errors") == ""
            for image in tab.query_selector_all(".result img"):  # original, protected, difference: all drawn
                assert image.evaluate("img => img.complete && img.naturalWidth") == 160
            verdicts = [v.inner_text() for v in tab.query_selector_all(".result .verdict")]
            assert len(verdicts) == 3 and set(verdicts) <= {"recognised", "not recognised", "no face found"}
            assert tab.inner_text(".result .conclusion")
            with tab.expect_download() as download:
                tab.click(".result a.download")
            saved = tmp_path / "download.png"
            download.value.save_as(saved)
            assert download.value.suggested_filename == "portrait_protected.png"
            protected = np.asarray(Image.open(saved))
            clean = np.asarray(Image.open(photo))
            assert protected.shape == clean.shape
            assert 0 < np.abs(protected.astype(int) - clean.astype(int)).max() <= LEVELS
            for folder in artifacts:
                folder.mkdir(parents=True, exist_ok=True)
                tab.screenshot(path=str(folder / "web_page.png"), full_page=True)
            assert (tmp_path / "web_page.png").stat().st_size > 10_000
        finally:
            browser.close()
