"""A web page for protecting your own photos, on your own computer, and reading whether it worked: the HTTP server
and its command line (the page's state is `evaluation.web.page`).

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
import json
import logging
import os
import re
import signal
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import parse_qs, urlsplit

from methods.models.faces import NoFaceError
from utils import UserError

from .page import API_HEADER, JSON_LIMIT, Page, PageConfig, PageError, download_stem, one_line

logger = logging.getLogger(__name__)

#: Seconds the page waits, when stopped, for the photo in progress to reach its next step.
STOP_SECONDS = 20.0

STATIC = Path(__file__).resolve().parent / "static"

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
        timeout = page.config.socket_timeout  # a stalled or slow client is dropped instead of holding a thread
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
                self._json(HTTPStatus.BAD_REQUEST, {"error": one_line(error)})
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
    """Start the page's server (not yet serving: call `serve_forever`, e.g. in a thread). Port 0: any free port.
    The port is taken before the page makes its temporary folder, so a port that cannot be had leaves nothing."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port}: a port is a number from 0 (any free one) to 65535")
    try:
        server = ThreadingHTTPServer((host, port), BaseHTTPRequestHandler)
    except (OSError, OverflowError) as error:
        raise UserError(f"cannot listen on {host}:{port} ({error}); choose another --port") from None
    try:
        page = Page(config)
    except BaseException:
        server.server_close()
        raise
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
    parser.add_argument("--judge", help="face model(s) for the verdicts (default: the first of mobilefacenet, "
                                        "mobileface, facenet, sface that the preset does not attack and that loads "
                                        "without the network)")
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
    if not all(value > 0 for value in (args.max_files, args.max_upload_mb, args.max_megapixels, args.session_minutes)):
        raise UserError("--max_files, --max_upload_mb, --max_megapixels and --session_minutes must be > 0")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port {args.port}: a port is a number from 0 (any free one) to 65535")
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
    for signum in (signal.SIGINT, signal.SIGTERM):  # Ctrl+C and `kill`, even where Ctrl+C came in ignored
        signal.signal(signum, stop)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):  # a second Ctrl+C must not cut the clean-up short
            signal.signal(signum, signal.SIG_IGN)
        server.server_close()
        stopped = page.close(wait=STOP_SECONDS)
        print("stopped; the page's temporary files are deleted", flush=True)
        if not stopped:  # the worker is still inside a model's code: leave without waiting for it
            os._exit(0)
    return 0


def stop(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt
