"""Weights on the Hugging Face Hub: 'hf-hub:' paths resolved to files in the Hub's local cache.

A Hub path names a repository and optionally a file in it and a revision:

    hf-hub:SLDGroup/VCMamba/VCMamba-B.pth          one file (any format the loader reads)
    hf-hub:SLDGroup/VCMamba/VCMamba-B.pth@<rev>    ... at a branch, tag or commit
    hf-hub:user/my-vcmamba                         a folder written by save_pretrained and uploaded
    hf-hub:user/my-vcmamba@v1.0                    ... at a revision
    hf-hub:timm/regnety_160.deit_in1k              a timm repository (model.safetensors or
                                                   pytorch_model.bin)

`resolve` downloads through `huggingface_hub` into its cache (HF_HUB_CACHE, default
~/.cache/huggingface/hub), so a second call, another process or an offline machine
(HF_HUB_OFFLINE=1) with that cache reads the same files without the network. It returns a local
path that the normal loader (`load_pretrained`) then reads: a file, or for a repository written by
`save_pretrained` its snapshot directory (config.json + model.safetensors + README.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from vcmamba_jax.convert.pytorch import CheckpointError

HUB_PREFIX = 'hf-hub:'
CONFIG_NAME = 'config.json'  # save_pretrained's config; timm repositories have one too
# Weight files of a repository named without a file, in the order they are tried.
WEIGHT_NAMES = ('model.safetensors', 'pytorch_model.bin')
LIBRARY_NAME = 'vcmamba_jax'  # config.json 'library_name' of a save_pretrained folder

_PATH = re.compile(
  r'^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev_repo>[^/]+))?'
  r'(?:/(?P<filename>[^@]+?))?(?:@(?P<rev>[^@]+))?$'
)


class HubError(CheckpointError):
  """A Hub path that cannot be resolved (not in the cache offline, unknown repo/file/revision)."""


@dataclasses.dataclass(frozen=True)
class HubPath:
  """A parsed 'hf-hub:' path."""

  repo_id: str  # 'owner/name'
  filename: str | None = None  # a file in the repository (may contain '/'), or the whole repo
  revision: str | None = None  # branch, tag or commit; None = 'main'

  def __str__(self) -> str:
    out = HUB_PREFIX + self.repo_id
    if self.filename:
      out += '/' + self.filename
    return out + (f'@{self.revision}' if self.revision else '')


def is_hub_path(path: object) -> bool:
  return isinstance(path, str) and path.startswith(HUB_PREFIX)


def parse_hub_path(path: str) -> HubPath:
  """'hf-hub:owner/name[/file][@revision]' (also 'hf-hub:owner/name@revision/file')."""
  if not is_hub_path(path):
    raise HubError(f'{path!r} is not a Hub path: expected {HUB_PREFIX}owner/name[/file][@revision]')
  match = _PATH.match(path[len(HUB_PREFIX) :])
  if match is None:
    raise HubError(
      f'{path!r} is not a valid Hub path: expected {HUB_PREFIX}owner/name[/file][@revision], '
      f'e.g. {HUB_PREFIX}SLDGroup/VCMamba/VCMamba-B.pth'
    )
  if match['rev_repo'] and match['rev']:
    raise HubError(f'{path!r} names two revisions; give one, at the end: ...@revision')
  return HubPath(match['repo'], match['filename'] or None, match['rev_repo'] or match['rev'])


def _offline() -> bool:
  from huggingface_hub import constants

  flag = os.environ.get('HF_HUB_OFFLINE')
  if flag is not None:  # read at call time, so that it can be set after importing the library
    return flag.strip().lower() in ('1', 'true', 'yes', 'on')
  return bool(constants.HF_HUB_OFFLINE)


def cache_dir() -> str:
  """The Hub cache used: $HF_HUB_CACHE (read at call time) or huggingface_hub's default."""
  from huggingface_hub import constants

  return os.environ.get('HF_HUB_CACHE') or constants.HF_HUB_CACHE


def _how_to_get(ref: HubPath, filename: str) -> str:
  revision = f' --revision {ref.revision}' if ref.revision else ''
  return (
    f'download it once where the Hub is reachable (`hf download {ref.repo_id}'
    f'{" " + filename if filename else ""}{revision}`, or this same call without HF_HUB_OFFLINE) and copy that cache here, or '
    f'point HF_HUB_CACHE at a cache that holds it; or pass a local file instead'
  )


def _download(ref: HubPath, filename: str, revision: str | None) -> str:
  """hf_hub_download with errors that name the problem and the fix."""
  from huggingface_hub import errors, hf_hub_download

  offline = _offline()
  try:
    return hf_hub_download(
      ref.repo_id,
      filename,
      revision=revision,
      cache_dir=cache_dir(),
      local_files_only=offline,
      library_name=LIBRARY_NAME,
    )
  except errors.LocalEntryNotFoundError as e:
    why = 'HF_HUB_OFFLINE is set' if offline else 'the Hub could not be reached'
    raise HubError(
      f'{HUB_PREFIX}{ref.repo_id}: {filename} (revision {revision or "main"}) is not in the '
      f'Hugging Face cache {cache_dir()} and {why}. To get it, {_how_to_get(ref, filename)}.'
    ) from e
  except errors.GatedRepoError as e:
    raise HubError(
      f'{HUB_PREFIX}{ref.repo_id} is gated: accept its terms on the Hub and log in '
      '(`hf auth login` or HF_TOKEN)'
    ) from e
  except errors.RepositoryNotFoundError as e:
    raise HubError(
      f'no Hub repository {ref.repo_id!r} (or it is private: log in with `hf auth login`); '
      'check the spelling, e.g. hf-hub:SLDGroup/VCMamba/VCMamba-B.pth'
    ) from e
  except errors.RevisionNotFoundError as e:
    raise HubError(f'Hub repository {ref.repo_id!r} has no revision {revision!r}') from e
  except errors.EntryNotFoundError:
    raise  # the caller tries the next candidate or reports the repository's files


def _repo_files(ref: HubPath) -> list[str] | None:
  try:
    from huggingface_hub import list_repo_files

    return list_repo_files(ref.repo_id, revision=ref.revision)
  except Exception:  # offline or no access: the error message just lists nothing
    return None


def _missing_file_error(ref: HubPath, names: tuple[str, ...]) -> HubError:
  files = None if _offline() else _repo_files(ref)
  listing = f'; it holds {sorted(files)[:20]}' if files else ''
  return HubError(
    f'Hub repository {ref.repo_id!r} (revision {ref.revision or "main"}) has no '
    f'{" / ".join(names)}{listing}. Name the file: {HUB_PREFIX}{ref.repo_id}/FILE'
  )


def is_vcmamba_config(path: str) -> bool:
  """Whether `path` is a config.json written by save_pretrained (not, e.g., timm's)."""
  try:
    with open(path) as f:
      config = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(config, dict) and config.get('library_name') == LIBRARY_NAME


def _commit_of(snapshot_file: str) -> str | None:
  """The commit of a file in the cache: .../snapshots/<commit>/<filename>."""
  parts = os.path.normpath(snapshot_file).split(os.sep)
  if 'snapshots' in parts:
    return parts[parts.index('snapshots') + 1]
  return None


def resolve(path: str) -> str:
  """A local path for a Hub path: the file, or a save_pretrained folder's snapshot directory.

  Downloads (with huggingface_hub's progress bars) into the Hub cache when the files are not
  there yet; offline (HF_HUB_OFFLINE=1) only the cache is read.

  Raises:
    HubError: the repository, file or revision does not exist, or offline it is not in the cache
      (the message says how to get it).
  """
  from huggingface_hub import errors

  ref = parse_hub_path(path)
  if ref.filename:
    try:
      return _download(ref, ref.filename, ref.revision)
    except errors.EntryNotFoundError as e:
      raise _missing_file_error(ref, (ref.filename,)) from e

  # A whole repository: one of ours (config.json + model.safetensors) or a timm-style one.
  revision = ref.revision
  not_cached: HubError | None = None
  try:
    config = _download(ref, CONFIG_NAME, revision)
    revision = _commit_of(config) or revision  # the weights of the same commit
    if is_vcmamba_config(config):
      weights = _download(ref, WEIGHT_NAMES[0], revision)
      return os.path.dirname(weights)
  except errors.EntryNotFoundError:
    pass  # no config.json: look for the weights alone
  except HubError as e:
    if not isinstance(e.__cause__, errors.LocalEntryNotFoundError):
      raise
    not_cached = e  # offline: a cache may hold the weights without the config
  for name in WEIGHT_NAMES:
    try:
      return _download(ref, name, revision)
    except errors.EntryNotFoundError:
      continue
    except HubError as e:
      if not isinstance(e.__cause__, errors.LocalEntryNotFoundError):
        raise
      not_cached = not_cached or e
  if not_cached is not None:
    raise HubError(
      f'{ref}: none of {CONFIG_NAME}, {", ".join(WEIGHT_NAMES)} is in the Hugging Face cache '
      f'{cache_dir()} and {"HF_HUB_OFFLINE is set" if _offline() else "the Hub is unreachable"}. '
      f'To get them, {_how_to_get(ref, "")}.'
    ) from not_cached
  raise _missing_file_error(ref, WEIGHT_NAMES)
