"""What the trainer's log says when MLflow fails: the call and the cause in a few words, from
the real errors MLflow raises against a closed port, a server that never answers and a server
that answers 503 with an HTML page (a CI run once logged a 456-character line for one of them)."""

from __future__ import annotations

import http.server
import socket
import threading

import pytest
from mlflow import MlflowClient

from avts_dist.tracking.writer import _ERROR_CHARS, _one_line


@pytest.fixture
def quick_http(monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")


def _error(url: str) -> BaseException:
    with pytest.raises(Exception) as info:
        MlflowClient(url).get_run("0" * 32)
    return info.value


def _served_error(handler) -> BaseException:
    """The error of a call to a real HTTP server answering with ``handler``."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        return _error(f"http://127.0.0.1:{server.server_address[1]}")
    finally:
        server.shutdown()
        server.server_close()


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_refused_connection_names_the_call_and_cause(quick_http):
    line = _one_line(_error(f"http://127.0.0.1:{_closed_port()}"))
    assert line.startswith("runs/get: ") and "Error" in line, line
    assert len(line) < 60


def test_a_server_that_never_answers_is_a_short_timeout(quick_http):
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)  # accepts into the backlog and never answers
        exc = _error(f"http://127.0.0.1:{silent.getsockname()[1]}")
    assert len(str(exc)) > _ERROR_CHARS  # MLflow's own text is long
    # urllib3 either gives up on retries ("Caused by ReadTimeoutError") or requests raises its
    # own ReadTimeout (MLflow: "failed with timeout exception ... Read timed out.").
    assert _one_line(exc) in ("runs/get: ReadTimeoutError", "runs/get: timed out"), str(exc)


def test_an_html_error_page_is_its_status(quick_http):
    class Unavailable(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            body = b"<html><head><title>503</title></head><body>" + b"x" * 500 + b"</body></html>"
            self.send_response(503)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    exc = _served_error(Unavailable)
    assert _one_line(exc) == "runs/get: HTTP 503", str(exc)[:300]


def test_a_connection_broken_mid_answer_is_named():
    """The server goes while it answers: headers promise 200 bytes, 10 come (a CI run's shape)."""

    class Broken(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", "200")
            self.end_headers()
            self.wfile.write(b'{"run": {"')
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)

        def log_message(self, *args):
            pass

    exc = _served_error(Broken)
    assert _one_line(exc) in ("runs/get: Connection broken", "runs/get: ProtocolError"), str(exc)


def test_an_unknown_failure_of_a_call_keeps_the_call_and_is_short():
    exc = RuntimeError(
        "API request to http://h:5000/api/2.0/mlflow/runs/log-batch failed with exception "
        "('Something new: " + 300 * "z" + "')"
    )
    line = _one_line(exc)
    assert line.startswith("runs/log-batch: Something new: zz") and len(line) == _ERROR_CHARS


def test_other_errors_are_cut_to_one_short_line():
    long = RuntimeError("first line\n" + "y" * 1000)
    line = _one_line(long)
    assert "\n" not in line and len(line) == _ERROR_CHARS and line.startswith("first line y")
    assert line.endswith("...")
    assert _one_line(RuntimeError()) == "RuntimeError"
    assert _one_line(ValueError("no MLflow run yet")) == "no MLflow run yet"
