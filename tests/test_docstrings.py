"""The examples in the docstrings run, with the model that ships, and print what they say."""

import doctest
import importlib
from pathlib import Path

import pytest

MODULES = [
    "captioner",
    "captioner.models.captioner",
    "captioner.data.vocabulary",
    "captioner.metrics.cider",
    "captioner.serve",
    "captioner.serve.batching",
    "captioner.serve.server",
]


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name, monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # examples/dog.jpg, as in the README
    module = importlib.import_module(name)
    extra = {"Captioner": importlib.import_module("captioner").Captioner, "httpx": importlib.import_module("httpx")}
    result = doctest.testmod(module, extraglobs=extra, optionflags=doctest.ELLIPSIS, verbose=False)
    assert result.attempted > 0, f"{name} has no examples"
    assert result.failed == 0
