"""The web page's state: its models, the browser sessions and their uploads, and one worker protecting one photo at
a time with the pipeline library (`methods.pipeline`), each result checked by `evaluation.check`.

What the page runs is a `PageConfig`; `evaluation.web.server` serves it over HTTP.
"""

from __future__ import annotations

import itertools
import logging
import queue
import re
import secrets
import shutil
import tempfile
import threading
import time
import unicodedata
import zipfile
from dataclasses import dataclass, field
from http import HTTPStatus
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import torch
from PIL import Image

from methods.models.faces import FaceDetector, NoFaceError
from methods.models.loading import load_autoencoder, local_copy
from methods.pipeline.options import PRESETS, OptionError, ProtectionOptions, flags, resolve
from methods.pipeline.photos import reading_notes
from methods.pipeline.placement import budget_levels
from methods.pipeline.protect import Protector
from methods.progress import observe
from methods.transforms import fit_long_side
from utils import (
    InputError,
    UserError,
    derive_seed,
    image_size,
    load_image,
    pick_device,
    pil_to_tensor,
    save_png,
)

from ..check import Checker, conclusion, load_judges, split_models

logger = logging.getLogger(__name__)

#: The page's presets (defend.py's), with what to expect of each.
PAGE_PRESETS = {
    "small": "under two minutes per portrait on a laptop CPU (the square around the face)",
    "paper": "the paper's models and step; needs a GPU",
}
#: Judges tried in order for the verdicts: the first one the protection did not attack.
#: Presets too slow without a GPU: not offered on a CPU.
GPU_PRESETS = ("paper",)
JUDGE_CANDIDATES = ("mobilefacenet", "mobileface", "facenet", "sface")
MAX_LEVELS = 16
#: The strength the page starts at: the small preset's budget in whole 8-bit levels (4).
DEFAULT_LEVELS = int(budget_levels(PRESETS["small"]["attack_budget"]))
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
    socket_timeout: float = 60.0  # seconds a connection may stall before the server drops it


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
    state: str = "queued"  # queued, running, done, failed (no photo protected)
    stage: str = "waiting for the previous job"
    fraction: float = 0.0
    results: list[dict] = field(default_factory=list)
    archive: str | None = None
    started: float | None = None  # when the protection itself began (after the models were loaded)

    def advance(self, fraction: float) -> None:
        if self.started is None:
            self.started = time.monotonic()
        self.fraction = fraction

    def seconds_left(self) -> float | None:
        """The time the job still needs at the pace so far; None until a little of it is done."""
        if self.started is None or self.fraction < 0.02 or self.state not in ("queued", "running"):
            return None
        elapsed = time.monotonic() - self.started
        return elapsed * (1 - self.fraction) / self.fraction

    def status(self) -> dict:
        left = self.seconds_left()
        return {"id": self.id, "state": self.state, "stage": self.stage, "fraction": round(self.fraction, 4),
                "seconds_left": None if left is None else round(left), "results": self.results,
                "archive": self.archive}


@dataclass
class Session:
    id: str
    folder: Path
    photos: dict[int, Photo] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)
    closed: bool = False

    reserved: int = 0  # uploads under way, counted against the limit before they land

    def busy(self) -> bool:
        return any(job.state in ("queued", "running") for job in self.jobs.values())


class Cancelled(Exception):
    """The page is stopping (or the job's tab has closed): the job ends at its next step."""


class Page:
    """The page's state: models, sessions, one worker protecting one photo at a time, and its temporary folder."""

    def __init__(self, config: PageConfig) -> None:
        self.config = config
        self.device = pick_device(config.device)
        self.default_preset = "small" if self.device.type == "cpu" else "paper"
        for preset in PAGE_PRESETS:
            self.protection_options(preset, DEFAULT_LEVELS)  # refuse bad options now rather than at the first photo
        self.root = Path(tempfile.mkdtemp(prefix="facelock-page-", dir=config.temp_dir))
        self.sessions: dict[str, Session] = {}
        self.lock = threading.Lock()
        self.decode_lock = threading.Lock()  # one upload is decoded at a time, so memory stays bounded
        self.stopping = threading.Event()
        self.detector = FaceDetector()
        self.jobs: queue.Queue[tuple[Session, Job] | None] = queue.Queue()
        self.counter = itertools.count(1)
        self._protector: tuple[tuple, Protector] | None = None
        self._checkers: dict[str, Checker] = {}
        self._check_autoencoder: torch.nn.Module | None = None
        self.worker = threading.Thread(target=self._work, name="facelock-page-worker", daemon=True)
        self.worker.start()
        self.reaper = threading.Thread(target=self._reap, name="facelock-page-reaper", daemon=True)
        self.reaper.start()

    # -------------------------------------------------------------------------------------------- models
    def protection_options(self, preset: str, levels: int) -> ProtectionOptions:
        """FaceLock under `preset` at `levels`/255, with the page's extra options (given last, as on a command line)."""
        try:
            return resolve("facelock", **{"preset": preset, "attack_budget": levels / 127.5,
                                          **flags(self.config.protect_options, "facelock")})
        except OptionError as error:
            raise UserError(f"the page's protection options are not valid: {' '.join(self.config.protect_options)} "
                            f"({error})") from None

    def protector(self, preset: str, levels: int) -> Protector:
        """The protection for `preset` at `levels`/255; the last one is kept, as models take seconds to load."""
        key = (preset, levels)
        if self._protector is None or self._protector[0] != key:
            self._protector = None  # free the previous models first
            self._protector = (key, Protector(self.protection_options(preset, levels), self.device, progress=False))
        return self._protector[1]

    def presets(self) -> dict[str, str]:
        """The presets this computer can run: without a GPU, not those that need one."""
        return {name: expect for name, expect in PAGE_PRESETS.items()
                if self.device.type != "cpu" or name not in GPU_PRESETS}

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
        for preset, expect in self.presets().items():
            chosen = self.protection_options(preset, DEFAULT_LEVELS)
            vae = where(chosen.vae) if chosen.vae else f"{chosen.model_id} (its vae/)"
            lpips = "LPIPS-VGG" if chosen.lpips == "vgg" else "no LPIPS"
            summary = (f"{preset}: autoencoder {short(chosen.vae or chosen.model_id)}, face model "
                       f"{short(chosen.fr_model)}, {lpips} ({expect})")
            presets[preset] = {"summary": summary, "autoencoder": vae, "face_model": where(chosen.fr_model),
                               "lpips": chosen.lpips, "iterations": chosen.num_iters, "max_size": chosen.max_size,
                               "judge": where(self.judge_spec(chosen.fr_model)) + " (not attacked; the verdicts)",
                               "editor": f"round trip of {where(self.config.check_vae)}"}
        return {"device": str(self.device), "default_preset": self.default_preset, "presets": presets,
                "limits": {"max_files": self.config.max_files, "max_upload_mb": self.config.max_upload_mb,
                           "max_megapixels": self.config.max_megapixels},
                "budget": {"default": DEFAULT_LEVELS, "max": MAX_LEVELS}}

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

    def _reap(self) -> None:
        """End idle sessions on a clock of their own, not only when another request comes."""
        while not self.stopping.wait(min(60.0, self.config.session_minutes * 15)):
            self.expire()

    def close(self, wait: float = 30.0) -> bool:
        """Stop: the job in progress ends at its next step, queued ones are dropped, and every file of the page is
        deleted. Returns whether the worker stopped within `wait` seconds (the files are deleted either way)."""
        self.stopping.set()
        self.jobs.put(None)
        self.worker.join(timeout=wait)
        shutil.rmtree(self.root, ignore_errors=True)
        return not self.worker.is_alive()

    # -------------------------------------------------------------------------------------------- uploads
    def upload(self, session: Session, raw_name: str, length: int, read) -> dict:
        """Store one uploaded photo after checking it; returns its id, name and size."""
        name = display_name(raw_name)
        limit = self.config.max_upload_mb * 1e6
        if length > limit:
            raise PageError(f"{name} is too large ({length / 1e6:.1f} MB); the page takes photos up to "
                            f"{self.config.max_upload_mb:g} MB", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
        with self.lock:  # uploaded and not yet protected, and those on their way: a race cannot pass the limit
            if len(session.photos) + session.reserved >= self.config.max_files:
                raise PageError(f"too many photos: the page takes up to {self.config.max_files} at a time (reload "
                                f"the page to start again)", HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
            session.reserved += 1
        try:
            return self._store(session, name, length, read)
        finally:
            with self.lock:
                session.reserved -= 1

    def _store(self, session: Session, name: str, length: int, read) -> dict:
        photo_id = next(self.counter)
        upload = session.folder / f"upload-{photo_id}"
        upload.write_bytes(read(length))
        try:
            with self.decode_lock:
                image, notes = self._decode(upload, name)
            path = session.folder / f"original-{photo_id}.png"
            save_png(np.asarray(image), path)
        finally:
            upload.unlink(missing_ok=True)
        with self.lock:
            session.photos[photo_id] = Photo(photo_id, name, path)
        return {"id": photo_id, "name": name, "width": image.width, "height": image.height, "notes": notes}

    def _decode(self, upload: Path, name: str) -> tuple[Image.Image, list[str]]:
        """The uploaded photo, checked (size, face), with what a person should know about how it was read."""
        width, height = image_size(upload)
        if width * height > self.config.max_megapixels * 1e6:
            raise PageError(f"{name} is too large ({width}x{height}, {width * height / 1e6:.0f} megapixels); "
                            f"the page takes up to {self.config.max_megapixels:g} megapixels")
        try:
            image = load_image(upload)
        except InputError as error:
            raise PageError(str(error).replace(str(upload), name)) from None
        notes = reading_notes(upload)
        with torch.no_grad():
            faces = self.detector(fit_long_side(pil_to_tensor(image), 1024))
        if not len(faces.index):
            why = f" ({'; '.join(notes)})" if notes else ""
            raise PageError(f"no face found in {name}{why}: the protection hides a face from face recognition; "
                            f"choose a photo where a face is clearly visible")
        return image, notes

    def submit(self, session: Session, request: dict) -> Job:
        ids = request.get("photos")
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i in session.photos for i in ids):
            raise PageError("choose one or more uploaded photos to protect")
        levels, preset = request.get("levels"), request.get("preset")
        if not isinstance(levels, int) or not 1 <= levels <= MAX_LEVELS:
            raise PageError(f"the strength must be a whole number of levels from 1 to {MAX_LEVELS} (in 1/255)")
        if preset not in self.presets():
            raise PageError(f"unknown preset here; choose one of {', '.join(self.presets())}")
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
            except Cancelled:
                job.results.append({"error": "stopped before it finished"})
            except Exception as error:  # the page goes on; the browser gets one line, the terminal the traceback
                logger.exception("job %s failed", job.id)
                job.results.append({"error": one_line(error)})
            finally:
                protected = any("protected" in result for result in job.results)
                job.state, job.fraction = ("done" if protected else "failed"), 1.0
                if session.closed:
                    job.stage = "session ended"
                elif protected:
                    job.stage = "finished"
                else:
                    job.stage = "failed: no photo could be protected (the reasons are above)"
                if session.closed:
                    self.end_session(session.id)

    def _run(self, session: Session, job: Job) -> None:
        count = len(job.photos)
        job.stage = f"loading the {job.preset} models"
        protector = self.protector(job.preset, job.levels)
        written = []
        for k, photo in enumerate(job.photos):
            if session.closed or self.stopping.is_set():
                raise Cancelled

            def follow(desc: str, done: int, total: int | None, k: int = k) -> None:
                if self.stopping.is_set() or session.closed:
                    raise Cancelled  # raised inside the attack's loop: the job ends at its next step
                if total:
                    job.advance((k + 0.9 * done / total) / count)
                    job.stage = f"protecting photo {k + 1} of {count}: iteration {done} of {total}"

            job.stage = f"protecting photo {k + 1} of {count}"
            try:
                result = self._protect(session, job, k, protector, follow)
            except Cancelled:
                raise
            except (UserError, NoFaceError, PageError) as error:
                result = {"name": photo.name, "error": f"{photo.name}: {one_line(error)}"}
            except Exception as error:
                logger.exception("protecting %s failed", photo.path)
                result = {"name": photo.name, "error": f"{photo.name}: the protection failed ({one_line(error)})"}
            job.results.append(result)
            if "protected" in result:
                written.append((photo, session.folder / result["protected"]))
        if len(written) > 1:
            job.archive = self._archive(session, job, written)

    def _protect(self, session: Session, job: Job, k: int, protector: Protector, follow) -> dict:
        photo = job.photos[k]
        image = load_image(photo.path)
        with observe(follow):
            (protected, stats), = protector.protect([image], [derive_seed(protector.options.seed, photo.name)])
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
            report = self.checker(protector.options.fr_model)(image, Image.fromarray(protected))
        except (UserError, NoFaceError) as error:
            result["conclusion"] = f"not checked: {one_line(error)}"
        else:
            result.update(report=report, conclusion=conclusion(report), next_step=next_step(report, job.levels),
                          judges_in_words=[judge_in_words(judge) for judge in report["judges"]])
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


def next_step(report: dict, levels: int) -> str:
    """What a person can do after the verdict, in plain words."""
    summary = report["summary"]
    if all(v == "not recognised" for v in summary.values()):
        return ("The face was not recognised in any of the ways of sharing tried. No protection is a guarantee: other "
                "editors and face models may still recognise it.")
    if all(v == "unknown" for v in summary.values()):
        return "The check could not give a verdict here; the protected photo is still written and can be downloaded."
    stronger = min(2 * levels, MAX_LEVELS)
    if stronger > levels:
        return (f"Try a stronger setting (for example {stronger} of {MAX_LEVELS}): the change is more visible but "
                f"survives more editing. The verdict means that a face-recognition model still matched the edited "
                f"photo to you in the ways of sharing marked 'recognised'.")
    return ("This is already the strongest setting. The verdict means that a face-recognition model still matched the "
            "edited photo to you in the ways of sharing marked 'recognised'; the protection cannot promise more.")


def judge_in_words(judge: dict) -> str:
    """Which face model gave the verdicts and how much its threshold can be trusted, for a person."""
    if judge["threshold"] is None:
        return f"{judge['model']} judged the face, but no threshold is known for it here, so it gives no verdict."
    return (f"{judge['model']}, a face-recognition model the protection did not attack, judged the face: it calls a "
            f"similarity above {judge['threshold']:.2f} the same person, a line that mistakes about {judge['far']:.0%} "
            f"of strangers for the person.")


def one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__
