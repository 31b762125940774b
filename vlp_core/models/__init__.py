"""The BLIP MED model, its tokenizer and architectures (importable without the trainer).

``create_model(arch, tokenizer)`` builds a model from an architecture JSON file chosen by
name (``vlp_core/models/architectures/<name>.json``) or by path, as open_clip does.
"""
from __future__ import annotations

import importlib
import json
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch and transformers load on first use, not when `vlp --help` imports this package
    from vlp_core.models.med import BlipMED, MedConfig, ModelError
    from vlp_core.models.tokenizer import load_tokenizer, train_tokenizer

_LAZY = {"BlipMED": "med", "MedConfig": "med", "ModelError": "med", "load_tokenizer": "tokenizer",
         "train_tokenizer": "tokenizer"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(f"vlp_core.models.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'vlp_core.models' has no attribute {name!r}")


def list_architectures() -> list[str]:
    folder = resources.files("vlp_core.models") / "architectures"
    return sorted(p.name[: -len(".json")] for p in folder.iterdir() if p.name.endswith(".json"))


def load_architecture(arch: str | Path) -> dict[str, Any]:
    path = Path(arch)
    if not path.suffix == ".json":
        path = Path(str(resources.files("vlp_core.models") / "architectures" / f"{arch}.json"))
    if not path.is_file():
        from vlp_core.models.med import ModelError

        raise ModelError(f"unknown architecture {arch!r} (known: {', '.join(list_architectures())}, or a .json path)")
    d = json.loads(path.read_text())
    d.pop("_comment", None)
    d["arch"] = str(arch)
    return d


def create_model(arch: str | Path = "tiny", tokenizer=None, **overrides: Any) -> "BlipMED":
    """A freshly initialised :class:`BlipMED` of architecture ``arch`` (a
    :class:`~vlp_core.models.vilbert.ViLBERT` when the architecture's ``family`` is
    ``vilbert``); token ids and vocab size come from ``tokenizer``; ``overrides`` replace
    architecture fields."""
    from vlp_core.models.med import BlipMED, MedConfig

    d = {**load_architecture(arch), **overrides}
    if d.get("family", "blip") == "vilbert":  # the family registry replaces this dispatch
        from vlp_core.models.vilbert import create_vilbert

        return create_vilbert(arch, tokenizer, **overrides)
    if tokenizer is not None:
        d.update(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
                 sep_token_id=tokenizer.sep_token_id, enc_token_id=tokenizer.convert_tokens_to_ids("[ENC]"),
                 dec_token_id=tokenizer.convert_tokens_to_ids("[DEC]"))
    cfg = MedConfig.from_dict(d)
    model = BlipMED(cfg, tokenizer=tokenizer)
    model.copy_params()
    return model


def load_pretrained(directory: str | Path):
    """The saved model in ``directory``: a :class:`~vlp_core.models.vilbert.ViLBERT` when its
    ``config.json`` says ``model_type: vlp-vilbert``, else a :class:`BlipMED` (which names what
    is wrong with any other folder).  The family registry replaces this dispatch."""
    from vlp_core.models.med import BlipMED
    from vlp_core.models.vilbert import ViLBERT, is_vilbert_dir

    return (ViLBERT if is_vilbert_dir(directory) else BlipMED).from_pretrained(directory)


__all__ = ["BlipMED", "MedConfig", "ModelError", "create_model", "list_architectures", "load_architecture",
           "load_pretrained", "load_tokenizer", "train_tokenizer"]
