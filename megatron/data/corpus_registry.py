"""Named corpora for ``prepare_data.py``: one shipped with the repo, others downloaded on demand.

A remote corpus is fetched once into ``<data_dir>/<name>/`` (to a temporary name, then renamed) and reused unless
``force`` is set. Without network the download fails with one line that says what to do instead.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from megatron.data.errors import CorpusError, CorpusFetchError

SHIPPED_DIR = Path(__file__).resolve().parent / "corpora"


@dataclass(frozen=True)
class Corpus:
    """A named corpus: either ``local_dir`` (shipped) or ``url`` (downloaded and, for zip/tar, extracted)."""

    name: str
    description: str
    local_dir: Path | None = None
    url: str | None = None
    #: inside the downloaded/extracted folder: the file or folder to tokenize ("" = everything)
    member: str = ""


CORPORA: dict[str, Corpus] = {
    "pg19_sample": Corpus(
        "pg19_sample",
        "5 public-domain PG-19 books (~3 MB) shipped in the repository; works offline",
        local_dir=SHIPPED_DIR / "pg19_sample",
    ),
    "enwik8": Corpus(
        "enwik8",
        "first 100 MB of an English Wikipedia XML dump (one document)",
        url="https://data.deepai.org/enwik8.zip",
        member="enwik8",
    ),
    "tinyshakespeare": Corpus(
        "tinyshakespeare",
        "the complete works of Shakespeare as one ~1 MB text file",
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        member="input.txt",
    ),
}


def get_corpus(name: str, registry: dict[str, Corpus] | None = None) -> Corpus:
    reg = CORPORA if registry is None else registry
    if name not in reg:
        raise CorpusError(f"unknown dataset {name!r}; expected one of: {', '.join(sorted(reg))} (or pass --input)")
    return reg[name]


def _download(url: str, dest: Path, timeout: float, hint: str) -> None:
    tmp = dest.with_name(dest.name + f".part-{os.getpid()}")
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
            shutil.copyfileobj(resp, out, length=1 << 20)
    except (urllib.error.URLError, OSError, ValueError) as exc:
        if tmp.exists():
            tmp.unlink()
        reason = getattr(exc, "reason", exc)
        raise CorpusFetchError(
            f"could not download {url}: {reason}; without network access, {hint} or tokenize local files with --input"
        ) from exc
    os.replace(tmp, dest)


def _extract(archive: Path, into: Path) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for member in zf.namelist():
                target = (into / member).resolve()
                if into.resolve() not in target.parents and target != into.resolve():
                    raise CorpusFetchError(f"{archive}: refusing archive member outside the target folder: {member}")
            zf.extractall(into)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as tf:
            tf.extractall(into, filter="data")


def fetch_corpus(
    name: str,
    data_dir: str | os.PathLike,
    force: bool = False,
    registry: dict[str, Corpus] | None = None,
    timeout: float = 30.0,
) -> Path:
    """Return the file or folder holding the raw text of corpus ``name``, downloading it if needed."""
    corpus = get_corpus(name, registry)
    if corpus.local_dir is not None:
        if not corpus.local_dir.is_dir():
            raise CorpusError(f"shipped corpus {name!r} is missing its folder {corpus.local_dir}")
        return corpus.local_dir
    assert corpus.url is not None
    folder = Path(data_dir) / name / "raw"
    target = folder / corpus.member if corpus.member else folder
    if target.exists() and not force:
        return target
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    archive = folder / Path(urllib.request.url2pathname(corpus.url.rsplit("/", 1)[-1]) or "download").name
    hint = f"put the extracted {corpus.member or 'files'} into {folder} by hand"
    _download(corpus.url, archive, timeout, hint)
    if zipfile.is_zipfile(archive) or tarfile.is_tarfile(archive):
        _extract(archive, folder)
        archive.unlink()
    if not target.exists():
        raise CorpusFetchError(f"downloaded {corpus.url} but {target} is not in it")
    return target
