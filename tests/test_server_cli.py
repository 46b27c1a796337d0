"""`pagedserve serve` as a user runs it: a subprocess with the API key from the environment
and an inline --chat-template, stopped by SIGTERM mid-stream (final abort event, exit 0);
and the graceful-shutdown grace period (short requests finish, long ones are aborted)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
from server_helpers import ServerThread, make_async_llm, no_requests_left

from pagedserve.entrypoints.cli import main
from pagedserve.entrypoints.openai.api_server import _GracefulServer, build_app

TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_argument_errors(capsys):
    assert main(["serve", "/nonexistent", "--chat-template", "no-such-template.jinja"]) == 2
    assert "chat-template" in capsys.readouterr().err


def _wait_healthy(proc, url: str, log_path) -> None:
    deadline = time.monotonic() + 90
    while True:
        assert proc.poll() is None, log_path.read_text()
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.2)


def test_serve_without_a_model_serves_the_demo_model(tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "pagedserve.entrypoints.cli", "serve", "--host", "127.0.0.1",
                                 "--port", str(port), "--uvicorn-log-level", "warning"],
                                env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=log, stderr=subprocess.STDOUT)
        try:
            _wait_healthy(proc, url, log_path)
            assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "pagedserve-demo"
            r = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
                "model": "pagedserve-demo", "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 24,
                "temperature": 0})
            assert r.status_code == 200, r.text
            assert len(r.json()["choices"][0]["message"]["content"].split()) >= 3
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "demo model" in log_path.read_text()


def test_serve_subprocess_auth_template_and_sigterm(llama_dir, tmp_path):
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PAGEDSERVE_API_KEY": "env-key", "OMP_NUM_THREADS": "1"}
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "pagedserve.entrypoints.cli", "serve", llama_dir, "--host",
                             "127.0.0.1", "--port", str(port), "--served-model-name", "tiny", "--max-model-len", "256",
                             "--chat-template", TEMPLATE, "--uvicorn-log-level", "warning"],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(proc, url, tmp_path / "server.log")

        assert httpx.get(f"{url}/v1/models").status_code == 401
        auth = {"Authorization": "Bearer env-key"}
        assert httpx.get(f"{url}/v1/models", headers=auth).json()["data"][0]["id"] == "tiny"
        messages = [{"role": "user", "content": "hi"}]
        tok = httpx.post(f"{url}/tokenize", json={"messages": messages, "return_token_strs": True}).json()
        detok = httpx.post(f"{url}/detokenize", json={"tokens": tok["tokens"]}).json()["prompt"]
        assert detok == "[user] hi\n[assistant] "

        events = []
        with httpx.stream("POST", f"{url}/v1/completions", headers=auth, timeout=30, json={
                "model": "tiny", "prompt": "a long story", "max_tokens": 240, "ignore_eos": True,
                "stream": True}) as r:
            assert r.status_code == 200, r.read()
            lines = r.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line[6:])
                    break
            proc.send_signal(signal.SIGTERM)
            events += [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        last = json.loads(events[-2])["choices"][0]
        assert last["finish_reason"] == "abort"
        assert len(events) < 240  # aborted, not finished
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()


def _events_iter(lines):
    return (line[6:] for line in lines if line.startswith("data: "))


def _events(lines) -> list[str]:
    return list(_events_iter(lines))


def _start_upload(url: str, body: dict) -> tuple[socket.socket, bytes]:
    """Send a request's headers and the start of its body; the rest later."""
    data = json.dumps(body).encode()
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(data) + data[:5])
    time.sleep(0.3)  # the server has taken the connection and is reading the body
    return sock, data[5:]


def _finish_upload(upload: tuple[socket.socket, bytes]) -> tuple[int, bytes]:
    sock, rest = upload
    with sock:
        sock.sendall(rest)
        raw = b""
        while b"\r\n\r\n" not in raw or not raw.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_draining_refuses_new_work(llama_dir):
    llm = make_async_llm(llama_dir)
    srv = ServerThread(build_app(llm, "m"))
    try:
        assert httpx.get(f"{srv.url}/health").status_code == 200
        llm.stop_accepting()  # what SIGTERM does first
        assert httpx.get(f"{srv.url}/health").status_code == 503  # load balancers stop sending
        r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["type"] == "ServiceUnavailableError"
        assert no_requests_left(llm)
    finally:
        srv.stop()
        llm.shutdown()


def test_shutdown_grace_period_finishes_short_and_aborts_long(llama_dir):
    llm = make_async_llm(llama_dir, max_model_len=2048)
    srv = ServerThread(build_app(llm, "m"), lambda config: _GracefulServer(config, llm, grace=1.0))
    body = {"prompt": "p", "ignore_eos": True, "stream": True, "temperature": 0}
    try:
        with httpx.stream("POST", f"{srv.url}/v1/completions", json={**body, "max_tokens": 2000}) as long_r, \
                httpx.stream("POST", f"{srv.url}/v1/completions", json={**body, "max_tokens": 3}) as short_r:
            long_lines, short_lines = long_r.iter_lines(), short_r.iter_lines()
            first = [next(_events_iter(lines)) for lines in (long_lines, short_lines)]
            # A request caught mid-upload by the shutdown: its handler runs while draining.
            late = _start_upload(srv.url, {"prompt": "late", "max_tokens": 2})
            srv.server.handle_exit(signal.SIGTERM, None)  # what the signal handler does
            status, body = _finish_upload(late)
            assert status == 503 and json.loads(body)["error"]["type"] == "ServiceUnavailableError"
            try:  # new connections: refused (or reset, if accepted as it closes) once the listener is closed,
                assert httpx.get(f"{srv.url}/health").status_code == 503  # 503 until then
            except (httpx.ConnectError, httpx.ReadError, httpx.RemoteProtocolError):
                pass
            short_events = first[1:] + _events(short_lines)
            long_events = first[:1] + _events(long_lines)
        assert short_events[-1] == long_events[-1] == "[DONE]"
        assert json.loads(short_events[-2])["choices"][0]["finish_reason"] == "length"
        assert json.loads(long_events[-2])["choices"][0]["finish_reason"] == "abort"
        srv.thread.join(10)
        assert not srv.thread.is_alive()  # stopped accepting and exited
        assert no_requests_left(llm)
    finally:
        srv.stop()
        llm.shutdown()
