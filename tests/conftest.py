"""Shared fixtures: a tiny random Llama (built in-process, real SmolLM2 tokenizer) for fast plumbing tests,
and the real default model for the tests marked ``slow``."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def default_model_dir() -> str:
    """The real default model's cached directory (dequantized once per machine, ~30 s the first time)."""
    from adapters.default_model import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, default_model_dir) -> str:
    """A 2-layer, width-32 random Llama saved with the real tokenizer: loads and runs in milliseconds."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("tiny-llama")
    tok = AutoTokenizer.from_pretrained(default_model_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      tie_word_embeddings=True, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return str(d)


@pytest.fixture(scope="session")
def tiny_backend(tiny_model_dir):
    from adapters.hf import HFBackend

    return HFBackend(tiny_model_dir, device="cpu")


@pytest.fixture(scope="session")
def real_backend(default_model_dir):
    from adapters.hf import HFBackend

    return HFBackend("smollm2-135m", device="cpu")


@pytest.fixture
def storage_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'bbpt.db'}"


@pytest.fixture
def sst2_jsonl(tmp_path) -> Path:
    """A small user data file in the custom-task format."""
    import gzip
    from importlib import resources

    src = resources.files("bbpt.tasks") / "data" / "sst2" / "train.jsonl.gz"
    lines = gzip.decompress(src.read_bytes()).decode().splitlines()
    neg = [ln for ln in lines if ln.endswith('"label": 0}')][:40]
    pos = [ln for ln in lines if ln.endswith('"label": 1}')][:40]
    p = tmp_path / "my.jsonl"
    p.write_text("\n".join(neg + pos) + "\n")
    return p


# -- PostgreSQL -----------------------------------------------------------------------------------------------

def _pg_bindir() -> Path | None:
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))   # Debian keeps them off PATH
    return versions[-1].parent if versions else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def postgres_url():
    """$BBPT_TEST_POSTGRES_URL, or a throwaway cluster on a free loopback port, stopped afterwards."""
    pytest.importorskip("psycopg", reason="needs the psycopg driver: pip install 'bbpt[postgres]'")
    if os.environ.get("BBPT_TEST_POSTGRES_URL"):
        yield os.environ["BBPT_TEST_POSTGRES_URL"]
        return
    bindir = _pg_bindir()
    if bindir is None:
        pytest.skip("no PostgreSQL server: set BBPT_TEST_POSTGRES_URL=postgresql+psycopg://user@host/db, or "
                    "install one (apt-get install postgresql) so initdb and pg_ctl are found")
    # Not under pytest's tmp_path: as root that sits in a 0700 folder the postgres user cannot enter.
    data = Path(tempfile.mkdtemp(prefix="bbpt-pg-"))
    as_user = []
    if os.geteuid() == 0:           # initdb refuses to run as root: run the cluster as the postgres user
        import pwd

        try:
            pw = pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no 'postgres' user to own a test cluster")
        os.chown(data, pw.pw_uid, pw.pw_gid)
        as_user = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    pg = lambda *args: subprocess.run(as_user + [str(bindir / args[0]), *map(str, args[1:])], check=True,
                                      capture_output=True, text=True)
    try:
        pg("initdb", "-D", data / "db", "-U", "postgres", "--auth=trust", "-E", "UTF8")
        pg("pg_ctl", "-D", data / "db", "-l", data / "log", "-w", "-o",
           f"-p {port} -k {data} -c listen_addresses=127.0.0.1", "start")
        yield f"postgresql+psycopg://postgres@127.0.0.1:{port}/postgres"
    finally:
        if (data / "db" / "postmaster.pid").exists():
            pg("pg_ctl", "-D", data / "db", "-m", "immediate", "-w", "stop")
        shutil.rmtree(data, ignore_errors=True)
