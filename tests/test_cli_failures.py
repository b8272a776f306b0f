"""``chunkvale generate`` loses nothing: every result is written as it finishes, a failing
request becomes an error record (line and id named) with a non-zero exit at the end, an
unwritable --out is found before the model is loaded, and an interrupt keeps what was written."""

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from chunkvale import baseline, cli, generate_cmd  # noqa: E402
from test_cli import hf_greedy, model_dir, write_jsonl  # noqa: E402,F401  (the same tiny model directory)


def hf_greedy_ignoring_eos(path, token_ids, n):
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    return baseline.hf_generate(model, [token_ids], max_new_tokens=n, eos_ids={2}, pad_id=2,
                                ignore_eos=True).outputs[0]


def rows_of(path):
    return sorted((json.loads(line) for line in path.read_text().splitlines()), key=lambda r: r["line"])


def test_a_prompt_over_kv_tokens_is_an_error_record_and_the_others_are_written(model_dir, tmp_path, capsys):
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = [1, 5, 6, 7, 8]
    write_jsonl(prompts, [{"token_ids": good, "id": "first"},
                          {"token_ids": [(3 * i) % 40 + 3 for i in range(200)], "id": "huge"},
                          {"token_ids": good[::-1]}])
    code = cli.main(["generate", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out),
                     "--kv-tokens", "128", "--chunk-size", "16", "--max-new-tokens", "4", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert f"--prompts {prompts}, line 2: request 1 (id='huge'): request.token_ids: 200 tokens" in err
    assert "1 of 3 requests FAILED" in err
    first, huge, third = rows_of(out)
    assert (first["id"], huge["id"], third["id"]) == ("first", "huge", 3)
    assert huge["finish_reason"] == "error" and "raise capacity_tokens (--kv-tokens)" in huge["error"]
    assert huge["error"].startswith("ValueError: ") and huge["samples"] == []
    assert first["samples"][0]["token_ids"] == hf_greedy(model_dir, good, 4)
    assert third["samples"][0]["token_ids"] == hf_greedy(model_dir, good[::-1], 4)


def test_a_request_that_fails_while_running_is_written_with_its_tokens(model_dir, tmp_path, capsys):
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    long = [(7 * i) % 40 + 3 for i in range(40)]
    # 40 prompt + 40 new tokens outgrow a 64-token pool: the decode fails part-way, alone.
    write_jsonl(prompts, [{"token_ids": long, "max_new_tokens": 40, "ignore_eos": True, "id": "long"},
                          {"token_ids": [1, 9, 10], "max_new_tokens": 3, "id": "short"}])
    code = cli.main(["generate", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out),
                     "--kv-tokens", "64", "--chunk-size", "16", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert f"line 1 (id='long'): CapacityError: KV cache too small for this request" in err
    long_row, short_row = rows_of(out)
    assert long_row["error"].startswith("CapacityError") and long_row["finish_reason"] == "error"
    got = long_row["samples"][0]["token_ids"]
    assert 0 < len(got) < 40 and got == hf_greedy_ignoring_eos(model_dir, long, len(got))
    assert "error" not in short_row and short_row["samples"][0]["token_ids"] == hf_greedy(model_dir, [1, 9, 10], 3)


@pytest.mark.parametrize("where", ["missing-dir/out.jsonl", "a-directory"])
def test_an_unwritable_out_is_found_before_loading_the_model(tmp_path, capsys, where):
    prompts = tmp_path / "in.jsonl"
    write_jsonl(prompts, [{"prompt": "hi"}])
    (tmp_path / "a-directory").mkdir()
    # The model path does not exist either: the --out error comes first, so nothing was loaded.
    code = cli.main(["generate", "--model", str(tmp_path / "no-model"), "--prompts", str(prompts),
                     "--out", str(tmp_path / where)])
    err = capsys.readouterr().err
    assert code == 2 and "chunkvale generate: error: --out: " in err and "config.json" not in err


def test_an_existing_out_is_kept_when_the_model_fails_to_load(tmp_path, capsys):
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(prompts, [{"prompt": "hi"}])
    out.write_text("earlier results\n")
    assert cli.main(["generate", "--model", str(tmp_path / "no-model"), "--prompts", str(prompts),
                     "--out", str(out)]) == 2
    assert out.read_text() == "earlier results\n"
    fresh = tmp_path / "fresh.jsonl"
    assert cli.main(["generate", "--model", str(tmp_path / "no-model"), "--prompts", str(prompts),
                     "--out", str(fresh)]) == 2
    assert not fresh.exists()  # created only by the writability check, removed again
    capsys.readouterr()


def test_results_are_on_disk_as_they_finish_and_survive_an_interrupt(model_dir, tmp_path, capsys, monkeypatch):
    prompts, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(prompts, [{"token_ids": [1, 5, 6], "max_new_tokens": 2, "id": "quick"},
                          {"token_ids": [1, 7, 8], "max_new_tokens": 30, "ignore_eos": True, "id": "slow"}])
    real_stream = generate_cmd.Engine.stream
    seen_on_disk = []

    def stream(self, progress=None):
        for res in real_stream(self, progress):
            yield res
            # The record of the result just handed out is already flushed to the file.
            seen_on_disk.append([json.loads(x)["id"] for x in out.read_text().splitlines()])
            raise KeyboardInterrupt

    monkeypatch.setattr(generate_cmd.Engine, "stream", stream)
    code = cli.main(["generate", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out),
                     "--no-progress"])
    assert code == 130
    assert seen_on_disk == [["quick"]]
    assert [r["id"] for r in rows_of(out)] == ["quick"]
    assert "interrupted; 1 results written" in capsys.readouterr().err
