"""``hf``: a Hugging Face transformers model from a folder, local or at any fsspec URL.

``[model] path = "models/tiny-llama"`` (a folder with ``config.json``, ``*.safetensors``
weights and the tokenizer files). The objective chooses the class: ``AutoModelForCausalLM``
(``causal-lm``), ``AutoModelForSeq2SeqLM`` (``seq2seq``), ``AutoModel`` for classification
(``AutoModelForTextEncoding``, the encoder, for encoder-decoders; features are the
attention-masked mean of the last hidden states). Weights load from safetensors only,
never with remote code, never from the network (``HF_HUB_OFFLINE``). A folder at a URL
(``s3://``, ``memory://``, ...) is first copied into a local cache, once per process:
pickled weights (``*.bin``, ``*.pt``, ...) are left behind, and a folder whose other
files are far larger than its weights is refused.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from collections.abc import Mapping
from typing import Any

import attrs
from torch import nn

from adapterkit.plugin_api import AdapterkitError, positive

from .text import TextEncoder

PICKLES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz", ".h5", ".msgpack")
SLACK_BYTES = 64 * 2**20  # tokenizer files and the like, beyond the weights' own size
_LOCAL: dict[str, str] = {}  # URL -> its local copy, for this process


class ModelFolderError(AdapterkitError):
    """A model folder cannot be used: missing, no safetensors weights, too large, unloadable."""


def _quiet() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a model folder is all there is: never reach the hub
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def local_folder(path: str, storage_options: Mapping[str, Any] | None = None) -> str:
    """A local folder holding the model at ``path``: the path itself, or a cached copy of a URL
    (only its top-level files; pickles left out; at most twice the weights plus 64 MiB)."""
    if "://" not in path and "::" not in path:
        folder = os.path.expanduser(path)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ModelFolderError(f"model folder {path!r} has no config.json (a Hugging Face model folder)")
        return folder
    if path in _LOCAL:
        return _LOCAL[path]
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(path, **(storage_options or {}))
        listing = [entry for entry in fs.ls(root, detail=True) if entry.get("type") == "file"]
    except Exception as exc:  # any backend's failure (botocore's errors are not OSErrors)
        raise ModelFolderError(f"cannot list model folder {path}: {type(exc).__name__}: {exc}") from None
    files = {entry["name"].rstrip("/").rsplit("/", 1)[-1]: entry for entry in listing}
    files = {name: entry for name, entry in files.items() if not name.lower().endswith(PICKLES)}
    if "config.json" not in files:
        raise ModelFolderError(f"model folder {path} has no config.json (a Hugging Face model folder)")
    weights = sum(int(e.get("size") or 0) for n, e in files.items() if n.endswith(".safetensors"))
    if not weights:
        raise ModelFolderError(f"model folder {path} has no *.safetensors weights (pickled weights are never loaded)")
    total = sum(int(e.get("size") or 0) for e in files.values())
    if total > 2 * weights + SLACK_BYTES:
        raise ModelFolderError(
            f"model folder {path} holds {total:,} bytes for {weights:,} bytes of weights; "
            "copy only the model's files (config, safetensors, tokenizer) into its folder"
        )
    local = tempfile.mkdtemp(prefix="adapterkit-model-")
    atexit.register(shutil.rmtree, local, True)
    try:
        for name, entry in files.items():
            fs.get_file(entry["name"], os.path.join(local, name))
    except Exception as exc:
        raise ModelFolderError(f"cannot copy model folder {path}: {type(exc).__name__}: {exc}") from None
    _LOCAL[path] = local
    return local


class HFModel(TextEncoder):
    """Any transformers model folder (see the module docstring); recipe targets name its
    modules (Llama: ``q_proj``, ``v_proj``; GPT-2: ``c_attn``; T5: ``q``, ``v``; BERT: ``query``, ``value``)."""


    @attrs.frozen
    class Config:
        path: str
        """The model folder: a path or any fsspec URL."""
        max_length: int = attrs.field(default=128, validator=positive)
        """Input tokens kept per example (prompts for language models)."""
        target_length: int = attrs.field(default=16, validator=positive)
        """Target tokens kept per example (text-to-text objectives)."""
        storage_options: dict[str, Any] = attrs.field(factory=dict)

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._tokenizer: Any = None

    def folder(self) -> str:
        return local_folder(self.config.path, self.config.storage_options)

    def hf_config(self) -> Any:
        _quiet()
        from transformers import AutoConfig

        return self._load(AutoConfig, "its config")

    def _load(self, cls: Any, what: str, **kwargs: Any) -> Any:
        try:
            return cls.from_pretrained(self.folder(), local_files_only=True, trust_remote_code=False, **kwargs)
        except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
            raise ModelFolderError(f"cannot load {what} from model folder {self.config.path!r}: {reason}") from None

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            _quiet()
            from transformers import AutoTokenizer

            tokenizer = self._load(AutoTokenizer, "a tokenizer")
            if tokenizer.pad_token_id is None:
                if tokenizer.eos_token_id is None:
                    raise ModelFolderError(f"the tokenizer of {self.config.path!r} has neither a pad nor an eos token")
                tokenizer.pad_token = tokenizer.eos_token
            self._tokenizer = tokenizer
        return self._tokenizer

    def build(self) -> nn.Module:
        return self.build_for("encoder")

    def build_for(self, kind: str) -> nn.Module:
        _quiet()
        import transformers

        if kind == "causal-lm":
            cls: Any = transformers.AutoModelForCausalLM
        elif kind == "seq2seq":
            cls = transformers.AutoModelForSeq2SeqLM
        elif kind == "encoder":
            encoder_decoder = bool(getattr(self.hf_config(), "is_encoder_decoder", False))
            cls = transformers.AutoModelForTextEncoding if encoder_decoder else transformers.AutoModel
        else:
            return super().build_for(kind)
        model = self._load(cls, f"a {kind} model", use_safetensors=True)
        return model.eval()  # type: ignore[no-any-return]

