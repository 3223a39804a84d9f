"""`openclaw serve`: an OpenAI-compatible HTTP API (/v1/models, /v1/chat/completions, /v1/completions).

Standard library only (http.server): one thread per connection validates a request and renders its prompt;
one engine thread owns the LLM and decodes every live request in one batch (llm.Streams), fed through a
queue, with deltas (plain data) coming back through a queue per request. Errors are OpenAI-style JSON with a 4xx
status. Clients cannot hold what they do not use: connections are bounded and time out when silent, and a
request whose client has gone (closed socket, failed write) is cancelled, freeing its KV slots, within one poll.
The OpenAI wire format lives in openai_api.py, the engine thread in engine_loop.py; this file is the HTTP side.
"""

import json
import logging
import queue
import select
import socket
import sys
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from openclaw.config import ServerConfig
from openclaw.llm import LLM, Delta
from openclaw.server.engine_loop import EngineLoop, Job
from openclaw.server.openai_api import ApiError, Reply, parse_chat, parse_completion

log = logging.getLogger(__name__)
POLL = 0.1  # seconds between checks that a waiting request's client is still there


class ClientGone(Exception):
    """The client closed its connection: nobody is left to answer."""


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: "Server"
    streaming = False  # headers of a stream are out: errors go in-band from then on
    allow = "GET, POST"  # a 405's Allow header: the methods the path takes

    def setup(self) -> None:
        self.timeout = self.server.config.read_timeout  # every read and write of this connection
        super().setup()

    def do_GET(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        if path == "/v1/models":
            self._json(200, {"object": "list", "data": [self.server.api.model_card()]})
        elif path == "/v1/models/" + self.server.api.model_name:
            self._json(200, self.server.api.model_card())
        elif path in ("/health", "/v1/health"):
            loop = self.server.loop
            ok = loop.is_alive()
            self._json(200 if ok else 503, {"status": "ok" if ok else "down", "max_batch": loop.max_batch,
                                            "max_seqs": self.server.api.llm.config.max_seqs, **loop.load})
        else:
            self._error(self._no_route(path))

    def do_POST(self) -> None:
        path = self.path.split("?")[0].rstrip("/")
        parse = {"/v1/chat/completions": parse_chat, "/v1/completions": parse_completion}.get(path)
        job = None
        try:
            if parse is None:
                self._raw_body()  # read first, so an error reply leaves no unread bytes on a kept-alive connection
                raise self._no_route(path)
            request, reply = parse(self.server.api, self._body())
            job = self.server.loop.submit(request)
            first = self._next(job)
            if isinstance(first, ApiError):
                raise first
            if reply.stream:
                self._stream(job, reply)
            else:
                self._complete(job, reply)
        except ApiError as e:
            self._error(e)
        except (ClientGone, ConnectionError, TimeoutError):  # nobody to answer
            self.close_connection = True
        except Exception:  # a bug: this request gets a 500 (or loses its stream), the server goes on
            log.exception("%s %s failed", self.command, path)
            self.close_connection = True
            if not self.streaming:
                self._error(ApiError(500, "the server failed on this request; see its log", kind="server_error"))
        finally:
            if job is not None:  # gone, failed or done: free its slots (a finished job is already forgotten)
                job.cancelled.set()

    def _no_route(self, path: str) -> ApiError:
        """405 for a route of the other method (GET /v1/chat/completions, POST /health), else 404."""
        get = path in ("/v1/models", "/v1/models/" + self.server.api.model_name, "/health", "/v1/health")
        allowed = "GET" if get else "POST" if path in ("/v1/chat/completions", "/v1/completions") else None
        if allowed is None:
            return ApiError(404, f"no route {self.command} {path}", code="not_found")
        self.allow = allowed
        return ApiError(405, f"{path} takes {allowed}, not {self.command}", code="method_not_allowed")

    def _no_method(self) -> None:
        self.allow = "GET, POST"
        try:
            self._raw_body()  # read it, so a kept-alive connection stays usable
            raise ApiError(405, f"{self.command} is not supported; use GET or POST", code="method_not_allowed")
        except ApiError as e:
            self._error(e)

    do_PUT = do_DELETE = do_PATCH = _no_method

    def _body(self) -> dict:
        raw = self._raw_body()
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, ints past 4300 digits, nesting past the stack
            raise ApiError(400, f"the request body is not valid JSON: {type(e).__name__}: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        return body

    def _raw_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._chunked()
        length = self.headers.get("Content-Length") or "0"
        if not (length.isascii() and length.isdigit()):  # "²".isdigit() is True, and int("²") raises
            self.close_connection = True  # where this body ends is unknown
            raise ApiError(400, f"Content-Length {length!r} is not a number of bytes")
        limit = self.server.config.max_body
        if int(length) > limit:
            self.close_connection = True
            raise ApiError(413, f"request body of {length} bytes is over the {limit} byte limit")
        return self.rfile.read(int(length))

    def _chunked(self) -> bytes:
        """A body sent with Transfer-Encoding: chunked (clients streaming an upload send no Content-Length)."""
        raw, limit = b"", self.server.config.max_body
        while True:
            try:
                size = int(self.rfile.readline(64).split(b";")[0].strip(), 16)
            except ValueError:
                size = -1
            if size < 0:
                self.close_connection = True
                raise ApiError(400, "malformed chunked request body")
            if len(raw) + size > limit:
                self.close_connection = True
                raise ApiError(413, f"request body is over the {limit} byte limit")
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers, then the blank line that ends the body
                    pass
                return raw
            raw += self.rfile.read(size)
            self.rfile.readline(8)  # the CRLF after each chunk

    def _next(self, job: Job) -> Delta | ApiError | str:
        """The job's next event; raises ClientGone as soon as the client has closed its connection."""
        while True:
            try:
                event = job.events.get(timeout=POLL)
            except queue.Empty:
                if not self.server.loop.is_alive():
                    return ApiError(503, "the engine thread has stopped", kind="server_error")
                event = None
            if self._client_gone():
                raise ClientGone
            if event is not None:
                return event

    def _client_gone(self) -> bool:
        """Whether the client has closed its end (its socket reads as ended or failed). Bytes it sent ahead, such as
        a pipelined next request, stay unread."""
        poller = select.poll()  # not select.select: it fails on descriptors past 1024
        poller.register(self.connection, select.POLLIN)
        if not poller.poll(0):
            return False
        try:
            return not self.connection.recv(1, socket.MSG_PEEK)
        except OSError:
            return True

    def _complete(self, job: Job, reply: Reply) -> None:
        while True:
            event = self._next(job)
            if isinstance(event, ApiError):
                raise event
            reply.add(event)
            if event.finish_reason == "error":
                raise reply.error(event)
            if event.finish_reason:
                break
        self._json(200, reply.final())

    def _stream(self, job: Job, reply: Reply) -> None:
        self.streaming = True
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if (first := reply.first_chunk()) is not None:
            self._chunk(first)
        while True:
            event = self._next(job)
            if isinstance(event, ApiError):  # headers are gone: report in-band, as OpenAI does
                self._chunk({"error": event.body()["error"]})
                break
            for chunk in reply.chunks(event):
                self._chunk(chunk)
            if event.finish_reason:
                break
        self._chunk("[DONE]")
        self.wfile.write(b"0\r\n\r\n")

    def _chunk(self, data) -> None:
        text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        payload = f"data: {text}\n\n".encode()
        self.wfile.write(f"{len(payload):x}\r\n".encode() + payload + b"\r\n")
        self.wfile.flush()

    def _json(self, status: int, body: dict) -> None:
        data = json.dumps(body, ensure_ascii=False).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if self.close_connection:
            self.send_header("Connection", "close")
        if status == 405:
            self.send_header("Allow", self.allow)
        self.end_headers()
        self.wfile.write(data)

    def _error(self, e: ApiError) -> None:
        self._json(e.status, e.body())

    def log_message(self, format: str, *args) -> None:
        self.server.log(f"{self.address_string()} {format % args}")


BUSY = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s")


class Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128  # the listen backlog: connections the kernel holds before accept

    def __init__(self, address: tuple[str, int], limits: ServerConfig, log: Callable[[str], None] = lambda line: None):
        """Bound and listening at once (port 0 picks a free one: server_address), so that a busy port is refused
        before the model loads; it answers once start() has given it the API and its engine thread."""
        self.api, self.loop, self.log = None, None, log
        self.config = limits
        self.connections = threading.BoundedSemaphore(self.config.max_connections)
        self.open: set[socket.socket] = set()  # connections with a handler thread, closed by server_close
        self.open_lock = threading.Lock()
        super().__init__(address, Handler)  # last: a failed bind calls server_close, which needs the above

    def start(self, llm: LLM, api) -> None:
        """Start llm's engine thread; serve_forever answers api's routes from then on."""
        self.api, self.loop = api, EngineLoop(llm, self.log)
        self.loop.start()

    def process_request(self, request, client_address) -> None:
        """A thread per connection, up to max_connections; past that a 503 at once, so that stalled clients can never
        hold every thread (or every file descriptor) and the server keeps accepting."""
        if not self.connections.acquire(blocking=False):
            body = json.dumps(ApiError(503, f"the server has its {self.config.max_connections} connections open; "
                                       "retry", kind="server_error").body()).encode()
            try:
                request.settimeout(1.0)
                request.sendall(BUSY % (len(body), body))
            except OSError:
                pass
            self.shutdown_request(request)
            return
        with self.open_lock:
            self.open.add(request)
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: give the slot back
            self._closed(request)
            raise

    def process_request_thread(self, request, client_address) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._closed(request)

    def _closed(self, request) -> None:
        with self.open_lock:
            self.open.discard(request)
        self.connections.release()

    def server_close(self) -> None:
        """Stop listening and end every open connection, so no handler thread outlives the server (idle keep-alive
        connections would otherwise hold theirs until the read timeout)."""
        super().server_close()
        with self.open_lock:
            connections = list(self.open)
        for conn in connections:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def handle_error(self, request, client_address) -> None:
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return  # the client hung up (a reset keep-alive connection, a closed stream): nobody to answer
        log.exception("request from %s failed", client_address[0])


def make_server(llm: LLM, api, host: str, port: int, log: Callable[[str], None] = lambda line: None) -> Server:
    """A bound server (port 0 picks a free one: server.server_address) with its engine thread started."""
    server = Server((host, port), api.limits, log)
    server.start(llm, api)
    return server


def serve_until_interrupted(server: Server) -> None:
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.loop.stop()
        server.server_close()
        server.loop.join(timeout=5)
        if not server.loop.is_alive():
            server.loop.llm.close()  # the engine thread is gone: the statistics are safe to read
