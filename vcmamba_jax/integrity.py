"""Checksums of a directory of files (a checkpoint step, an exported model).

`write_manifest(dir)` records the size and sha256 of every file under `dir` in
`dir/vcmamba_checksums.json`; `verify_step(dir)` says which file is missing, truncated or
changed, or returns None when all match. Standard library only.
"""

from __future__ import annotations

import hashlib
import json
import os

MANIFEST = 'vcmamba_checksums.json'


def _sha256(path: str) -> str:
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 20):
      digest.update(chunk)
  return digest.hexdigest()


def _files_of(step_dir: str) -> list[str]:
  found = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if rel != MANIFEST:
        found.append(rel)
  return sorted(found)


# Orbax rewrites these after the step's files are complete (commit time): only their presence
# is recorded.
_UPDATED_AT_COMMIT = ('_CHECKPOINT_METADATA', 'commit_success.txt')


def write_manifest(step_dir: str) -> None:
  """Writes MANIFEST (size and sha256 of every file under `step_dir`) atomically."""
  files = {}
  for rel in _files_of(step_dir):
    path = os.path.join(step_dir, rel)
    if os.path.basename(rel) in _UPDATED_AT_COMMIT:
      files[rel] = {}
    else:
      files[rel] = {'size': os.path.getsize(path), 'sha256': _sha256(path)}
  tmp = os.path.join(step_dir, MANIFEST + '.tmp')
  with open(tmp, 'w') as f:
    json.dump({'version': 1, 'files': files}, f, indent=1, sort_keys=True)
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, os.path.join(step_dir, MANIFEST))


def has_manifest(step_dir: str) -> bool:
  return os.path.isfile(os.path.join(step_dir, MANIFEST))


def verify_step(step_dir: str) -> str | None:
  """None if every file of the step is present with its recorded size and sha256, else what is
  wrong, e.g. 'state/manifest.ocdbt is 120 bytes, 977 expected (truncated)'."""
  try:
    with open(os.path.join(step_dir, MANIFEST)) as f:
      files = json.load(f)['files']
  except FileNotFoundError:
    return f'{MANIFEST} is missing (the save did not complete)'
  except (OSError, ValueError, KeyError, TypeError) as e:
    return f'{MANIFEST} is unreadable ({e})'
  for rel, expected in sorted(files.items()):
    path = os.path.join(step_dir, rel)
    if not os.path.isfile(path):
      return f'{rel} is missing'
    if not expected:
      continue  # presence only
    size = os.path.getsize(path)
    if size != expected['size']:
      how = 'truncated' if size < expected['size'] else 'grown'
      return f'{rel} is {size} bytes, {expected["size"]} expected ({how})'
    if _sha256(path) != expected['sha256']:
      return f'{rel} has changed (sha256 mismatch: corrupted bytes)'
  return None
