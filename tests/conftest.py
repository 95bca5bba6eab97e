"""Shared fixtures: a tiny random checkpoint, the embedded model loaded once, the faked REST runtime.

Helpers that tests import by name live in ``support.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from support import FakeRuntime, make_tiny_checkpoint, serve

from meshd.serve.api import create_app
from models.source import ModelSource
from models.stage import Stage

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny_checkpoint(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def embedded_source():
    return ModelSource.resolve("default")


@pytest.fixture(scope="session")
def embedded(embedded_source):
    return Stage.load(embedded_source, dtype="fp32")


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded_source):
    return embedded_source.load_tokenizer()


@pytest.fixture
async def rt(embedded_tokenizer):
    """The REST API's runtime faked (canned generation, real tokenizer): API and client tests."""
    return FakeRuntime(embedded_tokenizer)


@pytest.fixture
async def url(rt):
    """Base URL of the real REST app serving ``rt`` on a free loopback port."""
    async with serve(create_app(rt)) as u:
        yield u
