"""A model's input-embedding table read alone from its safetensors: what a client needs to build embeddings
(``--backend vllm``) or to snap vectors to tokens (``--space discrete``) without loading the transformer."""

from __future__ import annotations

from pathlib import Path

from bbpt.errors import ConfigError


def load_input_embeddings(path: str):
    """The input-embedding matrix alone, and the model config, from a local model directory's safetensors.

    The parameter's name comes from the model class itself (built on the meta device, so no memory is used),
    not from a list of model families.
    """
    import torch
    from safetensors import safe_open
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(path)
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config)
    table = skeleton.get_input_embeddings().weight
    name = next(n for n, p in skeleton.named_parameters() if p is table)
    tail = ".".join(name.split(".")[-2:])          # e.g. embed_tokens.weight, for checkpoints with other prefixes
    files = sorted(Path(path).glob("*.safetensors"))
    for f in files:
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key == name or key.endswith("." + tail):
                    return st.get_tensor(key).float(), config
    raise ConfigError(f"no input-embedding tensor ({name}) in the safetensors files of {path} ({len(files)} "
                      "found); the model's safetensors must be local to read its embedding table")
