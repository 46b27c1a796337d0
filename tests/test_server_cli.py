"""`pagedserve serve` as a user runs it: a subprocess with the API key from the environment
and an inline --chat-template, stopped by SIGTERM mid-stream (final abort event, exit 0)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx

from pagedserve.entrypoints.cli import main

TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant] {% endif %}")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_argument_errors(capsys):
    assert main(["serve"]) == 2
    assert "MODEL_DIR" in capsys.readouterr().err
    assert main(["serve", "/nonexistent", "--chat-template", "no-such-template.jinja"]) == 2
    assert "chat-template" in capsys.readouterr().err


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
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, (tmp_path / "server.log").read_text()
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)

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
