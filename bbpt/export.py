"""Export a finished study's prompt (native or PEFT prompt tuning) and import a PEFT prompt back.

The exported matrix is the one ``Session.finish`` saved: the full prompt P = P0 + ΔP of the trial selected on
dev. The saved directory is checked against the database before use, because ``runs/<study>`` is keyed by
name only and another database may have written a study of the same name there.

PEFT's prompt tuning prepends the virtual tokens to the whole input, which is bbpt's prefix placement; a prompt
tuned after some text (``{prompt}`` later in the template: the infix placement, bbpt's default for soft prompts
since config version 3) has no PEFT equivalent and is refused. An imported PEFT prompt is always a prefix.
bbpt's own metadata rides along in the safetensors header, so ``import-peft`` of a bbpt export restores the
task, template and label words; a foreign adapter needs them from flags.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from bbpt.config import StudyConfig
from bbpt.errors import ConfigError, StudyError
from bbpt.prompt import SavedPrompt
from bbpt.storage import Storage

log = logging.getLogger(__name__)

PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_KEY = "prompt_embeddings"
BIAS_FILE = "label_bias.json"
META_KEY = "bbpt"


def study_prompt(storage: Storage, name: str, runs_dir: str | Path = "runs") -> SavedPrompt:
    """The prompt a finished study saved, found where it said it saved it or under ``runs_dir``."""
    row = storage.require_study(name)
    if row.state != "complete" or not row.summary:
        raise StudyError(f"study {name!r} is {row.state}, so no prompt has been selected on dev yet; finish it by "
                         "rerunning the same `bbpt optimize` command, then export")
    if "prompt_path" not in row.summary:    # a study spec's manual/icl arm: it scored a fixed text prompt
        raise StudyError(f"study {name!r} is a {row.summary.get('optimizer', 'baseline')} arm of a study spec: it "
                         "tuned nothing, so there is no soft prompt to export; its template is in `bbpt studies "
                         f"show {name}`")
    if row.summary.get("prompt_text") is not None:
        raise StudyError(f"study {name!r} tuned a discrete prompt, which is plain text: print it with `bbpt studies "
                         f"show {name} --text` (also in {row.summary['prompt_path']}/prompt.txt); export is for "
                         "soft prompts")
    places = list(dict.fromkeys([Path(row.summary["prompt_path"]), Path(runs_dir) / name]))
    for d in places:
        if (d / "prompt.safetensors").exists() and (d / "prompt.json").exists():
            saved = SavedPrompt.load(d)
            if _belongs(saved.meta, row):
                return saved
    raise StudyError(f"no saved prompt of study {name!r} (looked in {', '.join(map(str, places))}); it is "
                     "written on the machine that finished the study: pass its folder with --runs-dir")


def _belongs(meta: dict, row) -> bool:
    """Same study name, same results-relevant config, same dev and test scores as the database records."""
    s = row.summary
    try:
        same_config = not StudyConfig.from_dict(meta["config"]).differences(StudyConfig.from_dict(row.config))
        return (meta.get("study") == row.name and same_config and meta["dev"][s["metric"]] == s["dev"]
                and meta["test"][s["metric"]] == s["test"])
    except (KeyError, TypeError, ConfigError):
        return False


def to_peft(saved: SavedPrompt, out: str | Path) -> Path:
    from safetensors.numpy import save_file

    from adapters.default_model import resolve_model

    meta = saved.meta
    if saved.depth == "deep":
        raise ConfigError("this is a deep prompt (offsets on the hidden states before several layers, as BBTv2), "
                          "which PEFT has no adapter type for; use --format bbpt (eval, predict and serve load it)")
    if saved.depth == "input":
        _require_prefix(meta.get("template") or "")
    if meta.get("prompt_is", "P0 + delta") != "P0 + delta":
        raise ConfigError("this prompt was tuned through a remote backend, so only its offset from P0 was saved "
                          "(P0 stays with the server); PEFT needs the full prompt: use --format bbpt")
    tokens, width = saved.prompt.shape
    common = dict(task_type="CAUSAL_LM", num_virtual_tokens=tokens, num_transformer_submodules=1,
                  base_model_name_or_path=resolve_model(meta["model"]), revision=None, inference_mode=True,
                  auto_mapping=None, modules_to_save=None)
    if saved.depth == "prefix":
        weights, config = _peft_prefix(saved.layers["prefix"]), dict(common, peft_type="PREFIX_TUNING")
        n_layers, _, _, kv_width = saved.layers["prefix"].shape
        heads = int(meta["kv_heads"])
        # PEFT sizes a grouped-query prefix by the key/value heads: token_dim = kv_heads × head_dim
        config.update(token_dim=kv_width, num_layers=n_layers, num_attention_heads=heads,
                      encoder_hidden_size=width, prefix_projection=False)
    else:
        weights = saved.prompt
        config = dict(common, peft_type="PROMPT_TUNING", token_dim=width, num_attention_heads=None, num_layers=None,
                      prompt_tuning_init="RANDOM", prompt_tuning_init_text=None, tokenizer_name_or_path=None,
                      tokenizer_kwargs=None)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({PEFT_KEY: np.ascontiguousarray(weights, dtype=np.float32)}, str(out / PEFT_WEIGHTS),
              metadata={"format": "pt", META_KEY: json.dumps(meta)})
    (out / PEFT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    if saved.bias is not None:
        # PEFT has no place for a label bias: write it beside the adapter, with what to do with it.
        words = meta["label_words"]
        (out / BIAS_FILE).write_text(json.dumps(dict(
            label_words=words, bias=saved.bias.tolist(),
            how="PEFT cannot carry this prompt's calibration: add bias[i] to the log-prob of label_words[i]'s "
                "first token before taking the argmax, as bbpt eval/predict/serve do"), indent=2) + "\n")
        log.warning("this prompt is calibrated (a bias per label) and PEFT cannot carry that: %s/%s says how to "
                    "apply it; without it, predictions can differ from bbpt's", out, BIAS_FILE)
    return out


def from_peft(src: str | Path, out: str | Path, task_config: StudyConfig | None = None) -> Path:
    """A PEFT prompt-tuning adapter as a native prompt directory. ``task_config`` says what the prompt is for
    when the adapter was not exported by bbpt (a bbpt export carries that itself)."""
    from safetensors import safe_open

    src = Path(src)
    try:
        config = json.loads((src / PEFT_CONFIG).read_text())
        with safe_open(str(src / PEFT_WEIGHTS), framework="pt") as f:
            header = f.metadata() or {}
            prompt = f.get_tensor(PEFT_KEY).float().numpy()
    except (OSError, ValueError, KeyError) as e:
        raise ConfigError(f"{str(src)!r} is not a PEFT prompt-tuning adapter ({e}); it needs {PEFT_CONFIG} and "
                          f"{PEFT_WEIGHTS} with the key {PEFT_KEY!r}") from None
    kind = config.get("peft_type")
    if kind not in ("PROMPT_TUNING", "PREFIX_TUNING") or config.get("num_transformer_submodules", 1) != 1:
        raise ConfigError(f"{str(src)!r} holds a {kind} adapter with "
                          f"{config.get('num_transformer_submodules')} submodule(s); bbpt imports prompt tuning "
                          "and prefix tuning of decoder-only models (PROMPT_TUNING or PREFIX_TUNING, one "
                          "submodule) only")
    layers = None
    if kind == "PREFIX_TUNING":
        if config.get("prefix_projection"):
            raise ConfigError(f"{str(src)!r} is a prefix with a projection MLP (prefix_projection=true), whose "
                              "keys and values PEFT computes at load time; export it from PEFT in inference mode")
        layers = {"prefix": _bbpt_prefix(prompt, int(config["num_layers"]))}
    if META_KEY in header:
        meta = json.loads(header[META_KEY])
    elif task_config is None:
        raise ConfigError(f"{str(src)!r} was not exported by bbpt, so it does not say what it classifies; pass "
                          "--task NAME, or --data with --template and --labels")
    else:
        if layers is not None:      # a prefix has no input-layer prompt: P0 is recorded as zeros
            prompt = np.zeros((prompt.shape[0], int(config.get("encoder_hidden_size") or config["token_dim"])),
                              np.float32)
        meta = _foreign_meta(config, prompt, task_config)
        if layers is not None:
            meta.update(depth="prefix", layers=list(range(int(config["num_layers"]))),
                        kv_heads=int(config["num_attention_heads"]))
    meta["imported_from"] = str(src)
    return SavedPrompt(prompt, meta, layers=layers).save(out)


def _peft_prefix(prefix: np.ndarray) -> np.ndarray:
    """bbpt's prefix ``[L, 2, m, W]`` as PEFT's PREFIX_TUNING embedding ``[m, L·2·W]``: PEFT views a row as
    ``[L·2, heads, head_dim]`` with layer l's keys at 2l and its values at 2l + 1."""
    n_layers, two, m, width = prefix.shape
    return prefix.transpose(2, 0, 1, 3).reshape(m, n_layers * two * width)


def _bbpt_prefix(weights: np.ndarray, n_layers: int) -> np.ndarray:
    m = weights.shape[0]
    return weights.reshape(m, n_layers, 2, -1).transpose(1, 2, 0, 3).copy()


def _require_prefix(template: str) -> None:
    if "{prompt}" in template and not template.startswith("{prompt}"):
        raise ConfigError(f"the template {template!r} puts the prompt after some text, but PEFT prompt tuning "
                          "always prepends it to the whole input; use --format bbpt, or tune it as a prefix "
                          "(bbpt optimize --prompt-position prefix)")


def _foreign_meta(config: dict, prompt: np.ndarray, cfg: StudyConfig) -> dict:
    from bbpt.session import load_task_for

    # PEFT prepends its virtual tokens to the whole input: the import is a prefix whatever bbpt's default is.
    cfg = dataclasses.replace(cfg, model=config["base_model_name_or_path"], prompt_tokens=int(prompt.shape[0]),
                              prompt_position="prefix" if cfg.prompt_position is not None else None)
    task = load_task_for(cfg)
    _require_prefix(task.template.source)
    return dict(study=None, model=cfg.model, task=task.name, template=task.template.source,
                label_words=task.label_words, label_names=task.label_names, tokens=cfg.prompt_tokens,
                width=int(prompt.shape[1]), prompt_is="P0 + delta", config=cfg.to_dict())
