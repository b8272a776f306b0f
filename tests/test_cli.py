"""The ``chunkvale`` command line on a tiny random model directory (word-level tokenizer with a
chat template), so every path runs in seconds: generate, demo, bench, errors."""

import json
import os
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

from chunkvale import baseline, cli  # noqa: E402

WORDS = ["[UNK]", "<s>", "</s>"] + [f"w{i}" for i in range(40)] + (
    "system user assistant you are a helpful bot the is of and to what how much does cost it in stock "
    "can i return if already opened box".split())


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    path = tmp_path_factory.mktemp("tiny-llama")
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]", bos_token="<s>",
                                               eos_token="</s>", pad_token="</s>")
    tok.chat_template = ("{% for m in messages %}<s> {{ m['role'] }} {{ m['content'] }} </s> {% endfor %}"
                         "{% if add_generation_prompt %}<s> assistant {% endif %}")
    tok.save_pretrained(path)
    torch.manual_seed(3)
    cfg = transformers.LlamaConfig(vocab_size=len(WORDS), hidden_size=64, intermediate_size=128,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                                   initializer_range=0.2, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    return path


def hf_greedy(path, token_ids, n):
    model = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    return baseline.hf_generate(model, [token_ids], max_new_tokens=n, eos_ids={2}, pad_id=2).outputs[0]


def write_jsonl(path, rows):
    path.write_bytes(b"".join((r if isinstance(r, bytes) else (r if isinstance(r, str) else json.dumps(r)).encode())
                              + b"\n" for r in rows))


def test_generate_writes_one_line_per_request_in_order(model_dir, tmp_path):
    prompts = tmp_path / "in.jsonl"
    out = tmp_path / "out.jsonl"
    write_jsonl(prompts, [
        {"prompt": "what does w3 cost", "id": "a"},
        {"messages": [{"role": "user", "content": "can i return it"}], "max_new_tokens": 5},
        {"token_ids": [1, 5, 6, 7, 8], "n": 2, "temperature": 1.0, "seed": 4},
    ])
    assert cli.main(["generate", "--model", str(model_dir), "--prompts", str(prompts), "--out", str(out),
                     "--max-new-tokens", "7", "--no-progress"]) == 0
    # Written as each request finishes: in completion order, each naming its input line.
    rows = sorted((json.loads(line) for line in out.read_text().splitlines()), key=lambda r: r["line"])
    assert [(r["id"], r["line"]) for r in rows] == [("a", 1), (2, 2), (3, 3)]
    assert not any("error" in r for r in rows)
    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    first = tok("what does w3 cost")["input_ids"]
    assert rows[0]["samples"][0]["token_ids"] == hf_greedy(model_dir, first, 7)
    assert len(rows[1]["samples"][0]["token_ids"]) <= 5
    assert len(rows[2]["samples"]) == 2
    assert rows[0]["metrics"]["prompt_tokens"] == len(first)
    assert rows[0]["text"] == tok.decode(rows[0]["samples"][0]["token_ids"], skip_special_tokens=True)


def test_python_dash_m_runs_the_cli(model_dir, tmp_path):
    prompts = tmp_path / "in.jsonl"
    write_jsonl(prompts, [{"token_ids": [1, 9, 10, 11], "max_new_tokens": 3}])
    proc = subprocess.run([sys.executable, "-m", "chunkvale", "generate", "--model", str(model_dir),
                           "--prompts", str(prompts), "--no-progress"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    # The last line: an editable install (-Ceditable.rebuild=true) may print its rebuild check first.
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    assert row["samples"][0]["token_ids"] == hf_greedy(model_dir, [1, 9, 10, 11], 3)


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "hi"', "line 2: not valid JSON"),
    ('{"prompt": "hi", "colour": 1}', "line 2: unknown field(s) ['colour']"),
    ('["hi"]', "line 2: expected a JSON object"),
    ('{"prompt": "hi", "id": "x", "colour": 1}', "line 2 (id='x'): unknown field(s) ['colour']"),
    (b'{"prompt": "h\xffi"}', "line 2: not valid UTF-8 (byte 0xff at column 14)"),
])
def test_generate_reports_bad_input_in_one_line(model_dir, tmp_path, capsys, line, message):
    prompts = tmp_path / "in.jsonl"
    write_jsonl(prompts, [{"prompt": "hi"}, line])
    assert cli.main(["generate", "--model", str(model_dir), "--prompts", str(prompts), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_generate_names_a_missing_prompts_file(tmp_path, capsys):
    assert cli.main(["generate", "--prompts", str(tmp_path / "missing.jsonl")]) == 2
    assert "--prompts: no such file" in capsys.readouterr().err


def test_generate_names_a_bad_model_path(tmp_path, capsys):
    prompts = tmp_path / "in.jsonl"
    write_jsonl(prompts, [{"prompt": "hi"}])
    assert cli.main(["generate", "--model", str(tmp_path / "nope"), "--prompts", str(prompts)]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_generate_names_a_model_dir_without_tokenizer(model_dir, tmp_path, capsys):
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(model_dir / name, bare / name)
    prompts = tmp_path / "in.jsonl"
    write_jsonl(prompts, [{"prompt": "hi"}])
    assert cli.main(["generate", "--model", str(bare), "--prompts", str(prompts)]) == 2
    err = capsys.readouterr().err
    assert "has no usable tokenizer" in err and "Traceback" not in err


@pytest.mark.parametrize("flags, message", [
    (["--digest", "sphere"], "--digest: configure eviction, which needs --kv-budget TOKENS (not given)"),
    (["--sink-chunks", "2", "--device-kv-tokens", "256"],
     "--sink-chunks, --device-kv-tokens: configure eviction, which needs --kv-budget"),
    (["--kv-budget", "512", "--host-bytes", "4096"],
     "--host-bytes: bounds the host tier, which needs --device-kv-tokens"),
    (["--kv-budget", "512", "--device-kv-tokens", "256", "--spill-path", "x.bin"],
     "--spill-path: holds host copies past --host-bytes, which is not given"),
    (["--kv-budget", "512", "--device-kv-tokens", "32"],
     "--device-kv-tokens: expected at least one chunk (--chunk-size 64 tokens), got 32"),
    (["--kv-budget", "0"], "argument --kv-budget: expected an integer >= 1, got 0"),
    (["--kv-budget", "lots"], "argument --kv-budget: expected an integer >= 1, got 'lots'"),
    (["--kv-budget", "512", "--window-chunks", "-1"], "argument --window-chunks: expected an integer >= 0, got -1"),
    (["--kv-budget", "512", "--digest", "cube"], "argument --digest: invalid choice: 'cube'"),
])
def test_generate_eviction_flag_errors_name_the_flag(tmp_path, capsys, flags, message):
    # Checked before the prompts file or the model are read.
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["generate", "--prompts", str(tmp_path / "never-read.jsonl"), *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "chunkvale generate: error:" in err and message in err


@pytest.mark.parametrize("flags, message", [
    # The core's checks, which need the chunk size and the model: the flag leads the message.
    (["--kv-budget", "100"], "--kv-budget: eviction.budget_tokens: expected at least (sink_chunks + window_chunks + 1) "
                             "* chunk_size = 256, got 100"),
    (["--kv-budget", "4096", "--device-kv-tokens", "128"], "--device-kv-tokens: eviction.device_chunks: "),
])
def test_generate_core_eviction_errors_name_the_flag(model_dir, tmp_path, capsys, flags, message):
    prompts = tmp_path / "in.jsonl"
    write_jsonl(prompts, [{"prompt": "hi"}])
    assert cli.main(["generate", "--model", str(model_dir), "--prompts", str(prompts), "--no-progress", *flags]) == 2
    err = capsys.readouterr().err
    assert f"chunkvale generate: error: {message}" in err and "Traceback" not in err


def test_generate_eviction_flags_build_the_eviction_config():
    from chunkvale import Eviction

    args = cli._parser().parse_args(["generate", "--prompts", "p.jsonl", "--chunk-size", "32", "--kv-budget", "1024",
                                     "--digest", "sphere", "--sink-chunks", "2", "--window-chunks", "3",
                                     "--topk-chunks", "0", "--dense-layers", "1", "--device-kv-tokens", "1000",
                                     "--host-bytes", "65536", "--spill-path", "s.bin"])
    # 1000 tokens round down to 31 chunks of 32; --topk-chunks 0 stays 0 (sink + window only).
    assert cli.eviction_from_args(args, pytest.fail) == Eviction(
        budget_tokens=1024, sink_chunks=2, window_chunks=3, topk_chunks=0, digest="sphere", dense_layers=1,
        host_bytes=65536, spill_path="s.bin", device_chunks=31)
    args = cli._parser().parse_args(["generate", "--prompts", "p.jsonl", "--kv-budget", "700"])
    assert cli.eviction_from_args(args, pytest.fail) == Eviction(budget_tokens=700)
    args = cli._parser().parse_args(["generate", "--prompts", "p.jsonl"])
    assert cli.eviction_from_args(args, pytest.fail) is None


def test_generate_with_eviction_and_a_host_tier(model_dir, tmp_path, capsys):
    prompts = tmp_path / "in.jsonl"
    n_words = len(WORDS)
    write_jsonl(prompts, [{"token_ids": [(7 * i + 3 * r) % n_words for i in range(80)], "id": r} for r in range(3)])
    common = ["generate", "--model", str(model_dir), "--prompts", str(prompts), "--max-new-tokens", "8",
              "--chunk-size", "16", "--no-progress", "--threads", "1"]
    budget = ["--kv-budget", "48", "--dense-layers", "1", "--sink-chunks", "1", "--window-chunks", "1",
              "--topk-chunks", "1", "--selection", "shared"]  # the host tier's selection (its default)

    def run(*flags):
        out = tmp_path / "out.jsonl"
        assert cli.main([*common, "--out", str(out), *flags]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        return [r["samples"][0]["token_ids"] for r in rows], capsys.readouterr().err

    dense, err = run()
    assert "eviction" not in err
    budgeted, err = run(*budget)
    assert budgeted != dense  # 80-token prompts over a 48-token budget: chunks are left out
    assert "eviction (budget 48 tokens):" in err and "scored chunks left out of attention" in err
    assert "host tier" not in err
    # 6 device chunks (96 tokens) hold one prompt (5 chunks) at a time; host copies past two
    # blocks go to the spill file. Same tokens: the host tier never changes what is attended.
    tiered, err = run(*budget, "--device-kv-tokens", "100", "--host-bytes", "40000",
                      "--spill-path", str(tmp_path / "spill.bin"))
    assert tiered == budgeted
    assert "host tier (6 device chunks per evicting layer):" in err and " recalls, " in err
    assert " 0 recalls" not in err
    # Per-KV-head selection (the default without a host tier) attends other chunks here.
    per_head, err = run(*budget[:-2])
    assert per_head != budgeted and "eviction (budget 48 tokens):" in err


def test_demo_serves_the_batch_and_compares_with_transformers(model_dir, tmp_path, capsys):
    numbers = tmp_path / "demo.json"
    assert cli.main(["demo", "--model", str(model_dir), "--requests", "4", "--system-tokens", "100",
                     "--max-new-tokens", "6", "--chunk-size", "16", "--json", str(numbers)]) == 0
    out = capsys.readouterr().out
    assert "KV peak, shared" in out and "throughput" in out and "A0:" in out
    got = json.loads(numbers.read_text())
    # Four requests sharing a >= 100-token prompt hold it once.
    assert got["kv_bytes_peak"] < 0.6 * got["kv_bytes_peak_unshared"]
    assert got["identical_answers"] == 4
    assert got["generated_tokens"] > 0 and got["baseline_tokens_per_s"] > 0


def _plots():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "bench", "plots.py")
    spec = importlib.util.spec_from_file_location("bench_plots", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _record(name, mean, group="attention", params=None, extra=None, median=None):
    stats = {"mean": mean, "stddev": mean / 10}
    if median is not None:
        stats["median"] = median
    return {"name": name, "group": group, "params": params or {}, "extra_info": extra or {}, "stats": stats}


def test_plots_compute_speedups_and_write_pngs(tmp_path):
    plots = _plots()
    records = [
        _record("ours-512", 0.5, params={"shared_tokens": 512, "impl": "chunkvale", "batch": 8}),
        _record("dense-512", 2.0, params={"shared_tokens": 512, "impl": "dense", "batch": 8}),
        _record("ours-1024", 0.5, extra={"shared_tokens": 1024, "impl": "chunkvale"}, params={"batch": 8}),
        _record("dense-1024", 3.0, extra={"shared_tokens": 1024, "impl": "dense"}, params={"batch": 8}),
        # bench/test_bench_cpu.py's keys: ns shared tokens, impl, dtype; medians preferred to means.
        _record("cpu-ours", 9.9, extra={"ns": 256, "impl": "chunkvale", "dtype": "float32"}, median=1.0),
        _record("cpu-torch", 9.9, extra={"ns": 256, "impl": "torch", "dtype": "float32"}, median=2.5),
        _record("mem-4", 0.01, group="memory", params={"requests": 4},
                extra={"kv_bytes": 2**20, "kv_bytes_unshared": 4 * 2**20}),
        _record("mem-8", 0.01, group="memory", params={"requests": 8},
                extra={"kv_bytes": 2**20, "kv_bytes_unshared": 8 * 2**20}),
    ]
    assert plots.speedup_series(records) == {"vs dense (batch=8)": [(512.0, 4.0), (1024.0, 6.0)],
                                             "vs torch (dtype=float32)": [(256.0, 2.5)]}
    assert plots.memory_series(records)["without sharing"] == [(4.0, 4.0), (8.0, 8.0)]
    path = tmp_path / "b.json"
    path.write_text(json.dumps({"benchmarks": records}))
    written = {p.name for p in plots.draw(path, tmp_path / "png")}
    assert written == {"speedup_vs_shared_prefix.png", "memory_vs_requests.png", "time_attention.png",
                       "time_memory.png"}
    for name in written:
        assert (tmp_path / "png" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a pytest-benchmark JSON"):
        plots.draw(tmp_path / "bad.json", tmp_path)


def test_bench_runs_a_suite_and_draws_its_plots(tmp_path):
    pytest.importorskip("pytest_benchmark")
    suite = tmp_path / "suite"
    suite.mkdir()
    (suite / "test_small_bench.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('requests', [2, 4])\n"
        "def test_mem(benchmark, requests):\n"
        "    benchmark.extra_info.update(kv_bytes=requests * 10, kv_bytes_unshared=requests * 40)\n"
        "    benchmark(sum, range(100))\n")
    out = tmp_path / "out"
    assert cli.main(["bench", "--suite", str(suite), "--out", str(out)]) == 0
    assert len(json.loads((out / "benchmarks.json").read_text())["benchmarks"]) == 2
    assert (out / "memory_vs_requests.png").is_file()
    assert cli.main(["bench", "--suite", str(tmp_path / "empty")]) == 2
