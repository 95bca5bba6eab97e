"""Shared fixtures: a tiny random checkpoint, the embedded model loaded once, the faked REST runtime.

Helpers that tests import by name live in ``support.py``."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from support import FakeRuntime, make_tiny_checkpoint, serve

from meshd.serve.api import create_app
from models.source import ModelSource
from models.stage import Stage

torch.set_num_threads(2)


def _cache_without_user_heads() -> None:
    """Point ``$XDG_CACHE_HOME`` (for this process and the daemons it starts) at a fresh directory that
    links every entry of the real cache but ``meshd/heads``: measured profiles, tokenizers and built
    kernels only save time, while a head the user trained (``meshd train-draft``) would change what
    ``auto`` drafts with, and so the figures tests check. Tests that need a cache of their own still
    set the variable themselves."""
    real = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    fresh = Path(tempfile.mkdtemp(prefix="meshd-test-cache-"))
    atexit.register(shutil.rmtree, fresh, True)  # the links only: rmtree does not follow them
    (fresh / "meshd").mkdir()
    for entry in real.iterdir() if real.is_dir() else ():
        if entry.name != "meshd":
            (fresh / entry.name).symlink_to(entry)
    for entry in (real / "meshd").iterdir() if (real / "meshd").is_dir() else ():
        if entry.name != "heads":
            (fresh / "meshd" / entry.name).symlink_to(entry)
    os.environ["XDG_CACHE_HOME"] = str(fresh)


_cache_without_user_heads()


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
