"""A web page for protecting your own photos, on your own computer, and reading whether it worked.

    python defend.py --web                 # then open http://127.0.0.1:7860 in a browser
    python -m evaluation.web [--port 7860] [--share] [--judge mobilefacenet] [defend.py options ...]

Upload one photo or several, choose a strength (the budget, in 1/255 levels) and a preset (`small`: TAESD and
SFace, minutes on a laptop CPU, the default without a GPU; `paper`: the editor's autoencoder, FaceNet and LPIPS-VGG,
the default with one), and the page protects them with FaceLock, shows for each the original, the protected photo,
their difference magnified and the verdicts of `evaluation.check`, and offers the protected PNGs (one zip for
several). Other defend.py options given on the command line (e.g. `--num_iters 50`) apply to every protection.

Safety: the page listens on 127.0.0.1 unless `--share` is given (then on every interface, with a warning). It takes
at most `--max_files` photos of at most `--max_upload_mb` MB and `--max_megapixels` each; uploaded names are shown,
never used as paths; everything it writes goes to one temporary folder, a sub-folder per browser session, deleted
when the tab closes (or after `--session_minutes` idle) and when the page stops. Errors reach the browser as one
line; tracebacks stay in the terminal. The page is plain HTML and JavaScript served by Python's standard library,
with no resource from the network.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import queue
import re
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
import unicodedata
import zipfile
from dataclasses import dataclass, field
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import parse_qs, unquote, urlsplit

import numpy as np
import torch
from PIL import Image

from methods.faces import FaceDetector, NoFaceError
from methods.progress import observe
from utils import (
    InputError,
    UserError,
    derive_seed,
    image_size,
    load_autoencoder,
    load_image,
    local_copy,
    pick_device,
    pil_to_tensor,
    run_script,
    save_png,
)

from .check import Checker, conclusion, fit_long_side, load_judges, split_models

logger = logging.getLogger(__name__)

STATIC = Path(__file__).resolve().parent / "static"
#: The page's presets (defend.py's), with what to expect of each.
PAGE_PRESETS = {
    "small": "about a minute per portrait on a laptop CPU (the square around the face)",
    "paper": "the paper's models and step; needs a GPU",
}
#: Judges tried in order for the verdicts: the first one the protection did not attack.
JUDGE_CANDIDATES = ("mobilefacenet", "mobileface", "facenet", "sface")
MAX_LEVELS = 16
DIFFERENCE_GAIN = 16
JSON_LIMIT = 64 * 1024
API_HEADER = "X-Facelock"


@dataclass
class PageConfig:
    """What the page runs; tests point the models at tiny ones."""

    protect_options: list[str] = field(default_factory=list)  # extra defend.py flags, after the preset's
    judges: str | None = None  # face model(s) for the verdicts; default: the first of JUDGE_CANDIDATES not attacked
    check_vae: str = "madebyollin/taesd"
    thresholds: Path | None = None
    device: str = "auto"
    max_files: int = 8
    max_upload_mb: float = 25.0
    max_megapixels: float = 50.0
    session_minutes: float = 60.0
    temp_dir: Path | None = None  # where the page's own temporary folder is made (default: the system's)


class PageError(Exception):
    """A problem with a request, shown to the user as it is."""

    def __init__(self, message: str, status: HTTPStatus = HTTPStatus.BAD_REQUEST) -> None:
        super().__init__(message)
        self.status = status


def display_name(raw: str) -> str:
    """An uploaded file's name as the page shows it: the last path component, printable, at most 80 characters.
    It is never used as a path."""
    name = re.split(r"[\\/]", unquote(raw or ""))[-1]
    name = "".join(c for c in unicodedata.normalize("NFC", name) if c.isprintable()).strip()
    return (name[:80] or "photo")


def download_stem(name: str) -> str:
    """A safe file-name stem for a download, from the display name."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).stem).strip("._") or "photo"
    return stem[:60]


@dataclass
class Photo:
    id: int
    name: str
    path: Path


@dataclass
class Job:
    id: str
    photos: list[Photo]
    levels: int
    preset: str
    state: str = "queued"  # queued, running, done
    stage: str = "waiting for the previous job"
    fraction: float = 0.0
    results: list[dict] = field(default_factory=list)
    archive: str | None = None

    def status(self) -> dict:
        return {"id": self.id, "state": self.state, "stage": self.stage, "fraction": round(self.fraction, 4),
                "results": self.results, "archive": self.archive}


@dataclass
class Session:
    id: str
    folder: Path
    photos: dict[int, Photo] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)
    closed: bool = False

    def busy(self) -> bool:
        return any(job.state != "done" for job in self.jobs.values())


class Page:
    """The page's state: models, sessions, one worker protecting one photo at a time, and its temporary folder."""

    def __init__(self, config: PageConfig) -> None:
        self.config = config
        self.device = pick_device(config.device)
        self.default_preset = "small" if self.device.type == "cpu" else "paper"
        for preset in PAGE_PRESETS:
            self.protection_args(preset, 4)  # refuse bad options now rather than at the first photo
        self.root = Path(tempfile.mkdtemp(prefix="facelock-page-", dir=config.temp_dir))
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()
        self.detector_lock = threading.Lock()
        self.detector = FaceDetector()
        self.jobs: queue.Queue[tuple[Session, Job] | None] = queue.Queue()
        self.counter = itertools.count(1)
        self._attack: tuple[tuple, Any, argparse.Namespace] | None = None
        self._checkers: dict[str, Checker] = {}
        self._check_autoencoder: torch.nn.Module | None = None
        self.worker = threading.Thread(target=self._work, name="facelock-page-worker", daemon=True)
        self.worker.start()

    # -------------------------------------------------------------------------------------------- models
    def protection_args(self, preset: str, levels: int) -> argparse.Namespace:
        import defend

        argv = ["--input_path", "upload", "--defend_method", "facelock", "--preset", preset,
                "--attack_budget", repr(levels / 127.5), *self.config.protect_options]
        try:
            return defend.parse_args(defend.build_parser(), argv)
        except SystemExit:
            raise UserError(f"the page's protection options are not valid: {' '.join(self.config.protect_options)}"
                            ) from None

    def attack(self, preset: str, levels: int) -> tuple[Any, argparse.Namespace]:
        """The protection for `preset` at `levels`/255; the last one is kept, as models take seconds to load."""
        import defend

        args = self.protection_args(preset, levels)
        key = (preset, levels)
        if self._attack is None or self._attack[0] != key:
            self._attack = None  # free the previous models first
            self._attack = (key, defend.build_attack(args, self.device, progress=False), args)
        return self._attack[1], self._attack[2]

    def judge_spec(self, attacked: str) -> str:
        if self.config.judges:
            return self.config.judges
        usable = [name for name in JUDGE_CANDIDATES if name not in split_models(attacked)]
        local = [name for name in usable if local_copy(name)]
        return (local or usable)[0]

    def checker(self, attacked: str) -> Checker:
        spec = self.judge_spec(attacked)
        if spec not in self._checkers:
            if self._check_autoencoder is None:
                self._check_autoencoder = load_autoencoder(self.config.check_vae, "", self.device, torch.float32)
            options = {"thresholds": self.config.thresholds} if self.config.thresholds else {}
            judges = load_judges(spec, self.device, protection_fr_model=attacked, **options)
            self._checkers[spec] = Checker(self._check_autoencoder, judges, self.config.check_vae)
        return self._checkers[spec]

    def describe_models(self) -> dict:
        """Which models each preset uses, and where they are loaded from."""

        def where(name: str) -> str:
            copy = local_copy(name)
            return f"{name} (local copy {copy})" if copy else name

        def short(name: str) -> str:
            path = Path(name)
            return path.parent.name if path.suffix == ".onnx" else path.name

        presets = {}
        for preset, expect in PAGE_PRESETS.items():
            args = self.protection_args(preset, 4)
            vae = where(args.vae) if args.vae else f"{args.model_id} (its vae/)"
            lpips = "LPIPS-VGG" if args.lpips == "vgg" else "no LPIPS"
            summary = (f"{preset}: autoencoder {short(args.vae or args.model_id)}, face model {short(args.fr_model)}, "
                       f"{lpips} ({expect})")
            presets[preset] = {"summary": summary, "autoencoder": vae, "face_model": where(args.fr_model),
                               "lpips": args.lpips, "iterations": args.num_iters, "max_size": args.max_size,
                               "judge": where(self.judge_spec(args.fr_model)) + " (not attacked; the verdicts)",
                               "editor": f"round trip of {where(self.config.check_vae)}"}
        return {"device": str(self.device), "default_preset": self.default_preset, "presets": presets,
                "limits": {"max_files": self.config.max_files, "max_upload_mb": self.config.max_upload_mb,
                           "max_megapixels": self.config.max_megapixels},
                "budget": {"default": 4, "max": MAX_LEVELS}}

    # -------------------------------------------------------------------------------------------- sessions
    def new_session(self) -> Session:
        session_id = secrets.token_urlsafe(18)
        folder = self.root / session_id
        folder.mkdir()
        session = Session(session_id, folder)
        with self.lock:
            self.sessions[session_id] = session
        return session

    def session(self, session_id: str) -> Session:
        with self.lock:
            session = self.sessions.get(session_id or "")
        if session is None or session.closed:
            raise PageError("this page's session has ended; reload the page", HTTPStatus.NOT_FOUND)
        session.last_seen = time.monotonic()
        return session

    def end_session(self, session_id: str) -> None:
        with self.lock:
            session = self.sessions.get(session_id or "")
            if session is None:
                return
            session.closed = True
            if session.busy():
                return  # the worker deletes it when its job ends
            del self.sessions[session_id]
        shutil.rmtree(session.folder, ignore_errors=True)

    def expire(self) -> None:
        """End the sessions idle for longer than `session_minutes`."""
        limit = time.monotonic() - self.config.session_minutes * 60
        with self.lock:
            stale = [s.id for s in self.sessions.values() if s.last_seen < limit and not s.busy()]
        for session_id in stale:
            self.end_session(session_id)

    def close(self) -> None:
        self.jobs.put(None)
        self.worker.join(timeout=60)
        shutil.rmtree(self.root, ignore_errors=True)

    # -------------------------------------------------------------------------------------------- uploads
    def upload(self, session: Session, raw_name: str, length: int, read) -> dict:
        """Store one uploaded photo after checking it; returns its id, name and size."""
        name = display_name(raw_name)
        limit = self.config.max_upload_mb * 1e6
        if length > limit:
            raise PageError(f"{name} is too large ({length / 1e6:.1f} MB); the page takes photos up to "
                            f"{self.config.max_upload_mb:g} MB", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        if len(session.photos) >= self.config.max_files:  # uploaded and not yet protected
            raise PageError(f"too many photos: the page takes up to {self.config.max_files} at a time (reload the "
                            f"page to start again)", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        photo_id = next(self.counter)
        upload = session.folder / f"upload-{photo_id}"
        upload.write_bytes(read(length))
        try:
            width, height = image_size(upload)
            if width * height > self.config.max_megapixels * 1e6:
                raise PageError(f"{name} is too large ({width}x{height}, {width * height / 1e6:.0f} megapixels); "
                                f"the page takes up to {self.config.max_megapixels:g} megapixels")
            try:
                image = load_image(upload)
            except InputError as error:
                raise PageError(str(error).replace(str(upload), name)) from None
            with self.detector_lock, torch.no_grad():
                faces = self.detector(fit_long_side(pil_to_tensor(image), 1024))
            if not len(faces.index):
                raise PageError(f"no face found in {name}: the protection hides a face from face recognition; "
                                f"choose a photo where a face is clearly visible")
            path = session.folder / f"original-{photo_id}.png"
            save_png(np.asarray(image), path)
        finally:
            upload.unlink(missing_ok=True)
        session.photos[photo_id] = Photo(photo_id, name, path)
        return {"id": photo_id, "name": name, "width": image.width, "height": image.height}

    def submit(self, session: Session, request: dict) -> Job:
        ids = request.get("photos")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i in session.photos for i in ids):
            raise PageError("choose one or more uploaded photos to protect")
        levels, preset = request.get("levels"), request.get("preset")
        if not isinstance(levels, int) or not 1 <= levels <= MAX_LEVELS:
            raise PageError(f"the strength must be a whole number of levels from 1 to {MAX_LEVELS} (in 1/255)")
        if preset not in PAGE_PRESETS:
            raise PageError(f"unknown preset; choose one of {', '.join(PAGE_PRESETS)}")
        job = Job(secrets.token_urlsafe(9), [session.photos.pop(i) for i in dict.fromkeys(ids)], levels, preset)
        with self.lock:
            session.jobs[job.id] = job
        self.jobs.put((session, job))
        return job

    # -------------------------------------------------------------------------------------------- the work
    def _work(self) -> None:
        while True:
            item = self.jobs.get()
            if item is None:
                return
            session, job = item
            job.state = "running"
            try:
                self._run(session, job)
            except Exception as error:  # the page goes on; the browser gets one line, the terminal the traceback
                logger.exception("job %s failed", job.id)
                job.results.append({"error": _one_line(error)})
            finally:
                job.state, job.fraction = "done", 1.0
                job.stage = "finished" if not session.closed else "session ended"
                if session.closed:
                    self.end_session(session.id)

    def _run(self, session: Session, job: Job) -> None:
        count = len(job.photos)
        job.stage = f"loading the {job.preset} models"
        attack, args = self.attack(job.preset, job.levels)
        written = []
        for k, photo in enumerate(job.photos):
            if session.closed:
                return

            def follow(desc: str, done: int, total: int | None, k: int = k) -> None:
                if total:
                    job.fraction = (k + 0.9 * done / total) / count
                    job.stage = f"protecting photo {k + 1} of {count}: iteration {done} of {total}"

            job.stage = f"protecting photo {k + 1} of {count}"
            try:
                result = self._protect(session, job, k, attack, args, follow)
            except (UserError, NoFaceError, PageError) as error:
                result = {"name": photo.name, "error": f"{photo.name}: {_one_line(error)}"}
            except Exception as error:
                logger.exception("protecting %s failed", photo.path)
                result = {"name": photo.name, "error": f"{photo.name}: the protection failed ({_one_line(error)})"}
            job.results.append(result)
            if "protected" in result:
                written.append((photo, session.folder / result["protected"]))
        if len(written) > 1:
            job.archive = self._archive(session, job, written)

    def _protect(self, session: Session, job: Job, k: int, attack, args, follow) -> dict:
        import defend

        photo = job.photos[k]
        image = load_image(photo.path)
        with observe(follow):
            (protected, stats), = defend.protect_images(attack, [image], [derive_seed(args.seed, photo.name)],
                                                        self.device, defend.placements([image], args, attack))
        tag = f"{job.id}-{photo.id}"
        save_png(protected, session.folder / f"protected-{tag}.png")
        difference = np.asarray(protected, dtype=np.int16) - np.asarray(image, dtype=np.int16)
        save_png(np.clip(128 + DIFFERENCE_GAIN * difference, 0, 255).astype(np.uint8),
                 session.folder / f"difference-{tag}.png")
        result = {"name": photo.name, "original": f"original-{photo.id}.png", "protected": f"protected-{tag}.png",
                  "difference": f"difference-{tag}.png", "difference_gain": DIFFERENCE_GAIN,
                  "download": f"{download_stem(photo.name)}_protected.png", "width": image.width,
                  "height": image.height, "budget_255": job.levels, "linf_255": stats["linf_255"],
                  "psnr": stats["psnr"], "seconds": stats["seconds"], "report": None, "conclusion": None}
        job.stage = f"checking photo {k + 1} of {len(job.photos)}"
        try:  # the protected photo is offered even where the check cannot run (e.g. its judge is not here)
            report = self.checker(args.fr_model)(image, Image.fromarray(protected))
        except (UserError, NoFaceError) as error:
            result["conclusion"] = f"not checked: {_one_line(error)}"
        else:
            result.update(report=report, conclusion=conclusion(report))
        return result

    def _archive(self, session: Session, job: Job, written: list[tuple[Photo, Path]]) -> str:
        name = f"protected-{job.id}.zip"
        used: set[str] = set()
        with zipfile.ZipFile(session.folder / name, "w", compression=zipfile.ZIP_STORED) as archive:
            for photo, path in written:
                entry = f"{download_stem(photo.name)}_protected.png"
                for n in itertools.count(2):
                    if entry not in used:
                        break
                    entry = f"{download_stem(photo.name)}_{n}_protected.png"
                used.add(entry)
                archive.write(path, entry)
        return name


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


# ------------------------------------------------------------------------------------------------------ HTTP

FILE_NAME = re.compile(r"(original-\d+|(protected|difference)-[A-Za-z0-9_-]+-\d+)\.png|protected-[A-Za-z0-9_-]+\.zip")
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; style-src 'self' 'unsafe-inline'; "
                               "frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Body:
    """A request body of `left` bytes, read at most once."""

    #: A refused upload smaller than this is read and dropped before the answer; a larger one is cut off.
    DRAIN_LIMIT = 256 * 2**20

    def __init__(self, rfile, length: int) -> None:
        self.rfile, self.left = rfile, length

    def read(self, size: int) -> bytes:
        data = self.rfile.read(min(size, self.left))
        self.left -= len(data)
        return data

    def drain(self) -> None:
        while 0 < self.left <= self.DRAIN_LIMIT:
            if not self.read(2**20):
                break


def make_handler(page: Page, allowed_hosts: set[str] | None) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "facelock-page"
        sys_version = ""

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
            logger.debug("%s " + format, self.address_string(), *args)

        def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
            self._json(HTTPStatus(code), {"error": message or HTTPStatus(code).phrase})

        def _send(self, status: HTTPStatus, body: bytes, content_type: str, extra: dict | None = None) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            for key, value in {**SECURITY_HEADERS, **(extra or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json(self, status: HTTPStatus, payload: dict) -> None:
            self._send(status, json.dumps(payload).encode(), "application/json")

        def _guarded(self, handle) -> None:
            try:
                if allowed_hosts is not None and self.headers.get("Host", "") not in allowed_hosts:
                    raise PageError("this page answers only at its own address", HTTPStatus.FORBIDDEN)
                page.expire()
                handle()
            except PageError as error:
                self.close_connection = True  # an unread upload body may follow
                self._json(error.status, {"error": str(error)})
            except (UserError, NoFaceError) as error:
                self._json(HTTPStatus.BAD_REQUEST, {"error": _one_line(error)})
            except (BrokenPipeError, ConnectionResetError):
                pass
            except Exception:
                logger.exception("request %s %s failed", self.command, self.path)
                self.close_connection = True
                self._json(HTTPStatus.INTERNAL_SERVER_ERROR,
                           {"error": "the page failed on this request; the details are in its terminal"})

        def _api(self) -> dict[str, str]:
            if self.headers.get(API_HEADER) != "1":  # a header no other site can make a browser send here
                raise PageError("not a request of this page", HTTPStatus.FORBIDDEN)
            return {k: v[0] for k, v in parse_qs(urlsplit(self.path).query).items()}

        def _length(self) -> int:
            try:
                length = int(self.headers["Content-Length"])
            except (KeyError, TypeError, ValueError):
                raise PageError("the request has no valid length", HTTPStatus.LENGTH_REQUIRED) from None
            if length < 0:
                raise PageError("the request has no valid length", HTTPStatus.LENGTH_REQUIRED)
            return length

        def _body_json(self) -> dict:
            length = self._length()
            if length > JSON_LIMIT:
                raise PageError("request too large", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            try:
                data = json.loads(self.rfile.read(length) or b"{}")
            except ValueError:
                raise PageError("malformed request") from None
            if not isinstance(data, dict):
                raise PageError("malformed request")
            return data

        def do_GET(self) -> None:  # noqa: N802 (the base class's name)
            self._guarded(self._get)

        def do_HEAD(self) -> None:  # noqa: N802
            self._guarded(self._get)

        def do_POST(self) -> None:  # noqa: N802
            self._guarded(self._post)

        def _get(self) -> None:
            path = urlsplit(self.path).path
            if path == "/":
                self._send(HTTPStatus.OK, (STATIC / "index.html").read_bytes(), "text/html; charset=utf-8")
            elif path == "/app.js":
                self._send(HTTPStatus.OK, (STATIC / "app.js").read_bytes(), "text/javascript; charset=utf-8")
            elif path == "/api/info":
                self._api()
                self._json(HTTPStatus.OK, page.describe_models())
            elif path == "/api/job":
                query = self._api()
                job = page.session(query.get("session", "")).jobs.get(query.get("job", ""))
                if job is None:
                    raise PageError("no such job", HTTPStatus.NOT_FOUND)
                self._json(HTTPStatus.OK, job.status())
            elif path.startswith("/files/"):
                self._file(path)
            else:
                raise PageError("not found", HTTPStatus.NOT_FOUND)

        def _file(self, path: str) -> None:
            parts = path.split("/")
            if len(parts) != 4 or not FILE_NAME.fullmatch(parts[3]):
                raise PageError("not found", HTTPStatus.NOT_FOUND)
            session = page.session(parts[2])
            target = session.folder / parts[3]
            if not target.is_file():
                raise PageError("not found", HTTPStatus.NOT_FOUND)
            query = parse_qs(urlsplit(self.path).query)
            extra = {}
            if "download" in query:
                extra["Content-Disposition"] = f'attachment; filename="{download_stem(query["download"][0])}.png"' \
                    if target.suffix == ".png" else 'attachment; filename="protected_photos.zip"'
            kind = "image/png" if target.suffix == ".png" else "application/zip"
            self._send(HTTPStatus.OK, target.read_bytes(), kind, extra)

        def _post(self) -> None:
            path = urlsplit(self.path).path
            if path == "/api/end":  # sent by the browser as the tab closes (navigator.sendBeacon: no headers)
                page.end_session(parse_qs(urlsplit(self.path).query).get("session", [""])[0])
                self._json(HTTPStatus.OK, {"ended": True})
                return
            query = self._api()
            if path == "/api/session":
                self._json(HTTPStatus.OK, {"session": page.new_session().id})
            elif path == "/api/upload":
                session = page.session(query.get("session", ""))
                body = Body(self.rfile, self._length())
                try:
                    answer = page.upload(session, self.headers.get("X-File-Name", ""), body.left, body.read)
                except PageError:
                    body.drain()  # so the browser, still sending, reads the answer instead of a broken connection
                    raise
                self._json(HTTPStatus.OK, answer)
            elif path == "/api/protect":
                data = self._body_json()
                job = page.submit(page.session(str(data.get("session", ""))), data)
                self._json(HTTPStatus.OK, {"job": job.id})
            else:
                raise PageError("not found", HTTPStatus.NOT_FOUND)

    return Handler


def serve(config: PageConfig, host: str = "127.0.0.1", port: int = 7860) -> tuple[ThreadingHTTPServer, Page]:
    """Start the page's server (not yet serving: call `serve_forever`, e.g. in a thread). Port 0: any free port."""
    page = Page(config)
    try:
        server = ThreadingHTTPServer((host, port), BaseHTTPRequestHandler)
    except OSError as error:
        page.close()
        raise UserError(f"cannot listen on {host}:{port} ({error}); choose another --port") from None
    port = server.server_address[1]
    loopback = host in ("127.0.0.1", "localhost", "::1")
    allowed = {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"} if loopback else None
    server.RequestHandlerClass = make_handler(page, allowed)
    server.daemon_threads = True
    return server, page


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("--port", type=int, default=7860, help="port on this computer (0: any free one)")
    parser.add_argument("--share", action="store_true",
                        help="listen on every network interface, so that other computers can reach the page "
                             "(anyone who can reach this computer can then use it)")
    parser.add_argument("--judge", help="face model(s) for the verdicts (default: mobilefacenet where "
                                        "FACELOCK_ASSETS has it, else a model the preset does not attack)")
    parser.add_argument("--check_vae", default="madebyollin/taesd", help="the autoencoder of the check's edit")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, ...")
    parser.add_argument("--max_files", type=int, default=8, help="photos per session")
    parser.add_argument("--max_upload_mb", type=float, default=25.0, help="size of one uploaded file")
    parser.add_argument("--max_megapixels", type=float, default=50.0, help="pixels of one photo, in millions")
    parser.add_argument("--session_minutes", type=float, default=60.0,
                        help="an idle session's files are deleted after this long")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args, protect_options = build_parser().parse_known_args(argv)
    if min(args.max_files, args.max_upload_mb, args.max_megapixels, args.session_minutes) <= 0:
        raise UserError("--max_files, --max_upload_mb, --max_megapixels and --session_minutes must be > 0")
    config = PageConfig(protect_options=protect_options, judges=args.judge, check_vae=args.check_vae,
                        device=args.device, max_files=args.max_files, max_upload_mb=args.max_upload_mb,
                        max_megapixels=args.max_megapixels, session_minutes=args.session_minutes)
    host = "0.0.0.0" if args.share else "127.0.0.1"
    server, page = serve(config, host, args.port)
    port = server.server_address[1]
    if args.share:
        print(f"WARNING: --share: the page listens on every network interface (port {port}); anyone who can reach "
              f"this computer can upload photos to it and use its processor. Stop it with Ctrl+C when done.")
    print(f"protecting photos on {page.device}; default preset {page.default_preset}; temporary files in "
          f"{page.root} (deleted at the end)")
    print(f"open http://127.0.0.1:{port} in a browser (Ctrl+C stops the page)", flush=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # `kill` cleans up as Ctrl+C does
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped; the page's temporary files are deleted")
    finally:
        server.server_close()
        page.close()
    return 0


if __name__ == "__main__":
    run_script(main)
