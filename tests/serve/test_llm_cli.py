"""Simon Willison's ``llm`` command-line tool, configured for meshd's OpenAI-compatible endpoint
(``extra-openai-models.yaml`` in a private ``LLM_USER_PATH``), against three loopback daemons."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import QUESTION, SERVED, TOKENS

pytestmark = pytest.mark.slow
LLM = Path(sys.executable).with_name("llm")


def run_llm(home: Path, *args: str) -> str:
    # no plugins: the embedded model's wheel registers one for llama.cpp, which this test does not install
    env = {**os.environ, "LLM_USER_PATH": str(home), "OPENAI_API_KEY": "unused", "LLM_LOAD_PLUGINS": ""}
    out = subprocess.run([str(LLM), *args], env=env, capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_llm_prompts_the_mesh(client_mesh, tmp_path):
    (tmp_path / "extra-openai-models.yaml").write_text(
        f"- model_id: meshd\n  model_name: {SERVED}\n  api_base: {client_mesh.url(2)}/v1\n  can_stream: true\n"
    )
    assert "meshd" in run_llm(tmp_path, "models")
    opts = ["-o", "temperature", "0", "-o", "max_tokens", str(TOKENS)]
    assert run_llm(tmp_path, "-m", "meshd", "--no-stream", *opts, QUESTION).strip() == client_mesh.text.strip()
    assert run_llm(tmp_path, "-m", "meshd", *opts, QUESTION).strip() == client_mesh.text.strip()  # streamed
    # llm's own options reach the sampler: a frequency penalty is accepted and changes nothing it must not
    penalised = run_llm(tmp_path, "-m", "meshd", "--no-stream", *opts, "-o", "frequency_penalty", "0.5", QUESTION)
    assert penalised.strip()
