"""The lm-eval backend ``chunkvale`` (python/chunkvale/lm_eval_model.py): on tasks whose data this
test writes (no downloads), with the full cache it gives lm-eval's own ``hf`` backend's results on
the same requests — the same generated text, log-likelihoods equal to float32 rounding, the same
greedy flags and metrics — on the embedded SmolLM2-135M; with a budget it runs and the budget
applies; ``lm_eval --model chunkvale`` works from the command line."""

import json
import math
import os
import random
import shutil
import subprocess
import sys

import pytest

lm_eval = pytest.importorskip("lm_eval")
pytest.importorskip("transformers")

from chunkvale import models  # noqa: E402

WORDS = ("river stone lamp garden window paper market winter silver orchard letter engine harbor "
         "candle meadow bridge forest signal pocket ladder").split()

TASKS = {
    # Multiple choice: one loglikelihood request per choice, sharing the context.
    "cv_choice": """
task: cv_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/choice.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
""",
    # Perplexity of whole documents.
    "cv_rolling": """
task: cv_rolling
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/rolling.jsonl
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
""",
    # Greedy generation until a newline.
    "cv_generate": """
task: cv_generate
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}/generate.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 24
  do_sample: false
metric_list:
  - metric: exact_match
""",
}


def _sentence(rng, n):
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def _write_tasks(root):
    """Task YAMLs and their JSONL data, generated here: a directory for ``--include_path``."""
    rng = random.Random(23)
    data = root / "data"
    data.mkdir()
    rows = {
        "choice": [{"question": f"{_sentence(rng, 12)} Which word comes next?",
                    "choices": [rng.choice(WORDS) for _ in range(3)], "answer": rng.randrange(3)} for _ in range(4)],
        # ~200 tokens each: longer than the budget tested below.
        "rolling": [{"text": " ".join(_sentence(rng, 10) for _ in range(14))} for _ in range(2)],
        "generate": [{"prompt": f"List of words: {_sentence(rng, 30)}\nThe same list again:",
                      "answer": "x"} for _ in range(2)],
    }
    for name, docs in rows.items():
        (data / f"{name}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs))
    for task, text in TASKS.items():
        (root / f"{task}.yaml").write_text(text.format(data=data))
    return root


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    return _write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))


@pytest.fixture(scope="module")
def model_dir():
    return str(models.embedded_model_dir())


def _evaluate(model, model_args, task_dir):
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args=model_args, tasks=list(TASKS), task_manager=TaskManager(
        include_path=str(task_dir)), batch_size=1, log_samples=True, bootstrap_iters=0)


@pytest.fixture(scope="module")
def hf_results(model_dir, task_dir):
    return _evaluate("hf", f"pretrained={model_dir},device=cpu,dtype=float32", task_dir)


def _responses(results, task):
    return [s["filtered_resps"] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def test_full_cache_matches_the_hf_backend(model_dir, task_dir, hf_results):
    ours = _evaluate("chunkvale", f"pretrained={model_dir}", task_dir)
    # Generation: the same text.
    assert _responses(ours, "cv_generate") == _responses(hf_results, "cv_generate")
    assert all(r[0].strip() for r in _responses(ours, "cv_generate"))  # it did generate something
    # Log-likelihoods: equal to float32 rounding (attention sums in another order), the same greedy flags.
    for task in ("cv_choice", "cv_rolling"):
        for a, b in zip(_responses(ours, task), _responses(hf_results, task), strict=True):
            for x, y in zip(a, b, strict=True):
                ll_a, ll_b = (x[0], y[0]) if isinstance(x, (list, tuple)) else (x, y)
                assert ll_a == pytest.approx(ll_b, rel=1e-5, abs=1e-4), task
                if isinstance(x, (list, tuple)):
                    assert x[1] == y[1], task
    for task in TASKS:
        metrics = {k: v for k, v in hf_results["results"][task].items() if isinstance(v, float)}
        assert metrics and {k: ours["results"][task][k] for k in metrics} == pytest.approx(metrics, rel=1e-5), task


def test_budget_applies_to_decode_rows(model_dir, task_dir, hf_results):
    # Budget 64 tokens in chunks of 16 (1 sink + 2 window + 1 top-k), past dense layer 0: the
    # ~200-token documents are scored one decode row at a time, over budget after token 64.
    ours = _evaluate("chunkvale", f"pretrained={model_dir},kv_budget=64,chunk_size=16,dense_layers=1,digest=sphere",
                     task_dir)
    budgeted = [r[0] for r in _responses(ours, "cv_rolling")]
    full = [r[0] for r in _responses(hf_results, "cv_rolling")]
    assert all(math.isfinite(x) for x in budgeted)
    assert budgeted != pytest.approx(full, rel=1e-4)  # attention saw less of the context
    assert len(_responses(ours, "cv_generate")) == 2


def test_bad_budget_is_refused_with_the_field_named(model_dir):
    from lm_eval.api.registry import get_model

    with pytest.raises(ValueError, match="eviction.topk_chunks"):
        get_model("chunkvale").create_from_arg_string(f"pretrained={model_dir},kv_budget=256,topk_chunks=8")
    with pytest.raises(ValueError, match="eviction.selection"):
        get_model("chunkvale").create_from_arg_string(f"pretrained={model_dir},kv_budget=256,selection=row")
    lm = get_model("chunkvale").create_from_arg_string(f"pretrained={model_dir},kv_budget=256,selection=shared")
    assert lm.eviction.resolved_selection() == "shared"


def test_lm_eval_command_line_finds_the_backend(model_dir, task_dir, tmp_path):
    exe = shutil.which("lm_eval", path=os.path.dirname(sys.executable)) or shutil.which("lm_eval")
    assert exe, "lm_eval's command is not installed"
    out = subprocess.run([exe, "--model", "chunkvale", "--model_args", f"pretrained={model_dir}",
                          "--tasks", "cv_choice", "--include_path", str(task_dir), "--limit", "2",
                          "--output_path", str(tmp_path)],
                         capture_output=True, text=True, timeout=600, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "cv_choice" in out.stdout and "acc" in out.stdout
