"""A Hugging Face Hub cache laid out exactly as huggingface_hub writes it, for offline tests.

CACHE/models--<owner>--<name>/blobs/<sha256>                    the file contents
CACHE/models--<owner>--<name>/snapshots/<commit>/<filename>     -> ../../blobs/<sha256>
CACHE/models--<owner>--<name>/refs/<revision>                   the commit (e.g. refs/main)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def add_to_hub_cache(
  cache: Path,
  repo_id: str,
  files: dict[str, bytes | Path],
  *,
  refs: tuple[str, ...] = ('main',),
  commit: str | None = None,
) -> str:
  """Puts `files` ({filename in the repo: contents or a file to copy}) into `cache` as one commit
  of model repo `repo_id`, that each of `refs` points to. Returns the commit hash."""
  repo_dir = Path(cache) / ('models--' + repo_id.replace('/', '--'))
  contents = {
    name: data if isinstance(data, bytes) else Path(data).read_bytes()
    for name, data in files.items()
  }
  if commit is None:
    digest = hashlib.sha1(repo_id.encode())
    for name in sorted(contents):
      digest.update(name.encode() + hashlib.sha256(contents[name]).digest())
    commit = digest.hexdigest()
  for name, data in contents.items():
    sha = hashlib.sha256(data).hexdigest()
    blob = repo_dir / 'blobs' / sha
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(data)
    link = repo_dir / 'snapshots' / commit / name
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.exists() or link.is_symlink():
      link.unlink()
    link.symlink_to(os.path.relpath(blob, link.parent))
  for ref in refs:
    ref_file = repo_dir / 'refs' / ref
    ref_file.parent.mkdir(parents=True, exist_ok=True)
    ref_file.write_text(commit)
  return commit
