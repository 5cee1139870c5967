"""Read files out of a tar, a zip or a folder by relative path (prepare only).

A *store* maps a relative path (``"JPEGImages/000005.jpg"``) to bytes. The
official archives are read in place, without extracting them: an uncompressed
tar is indexed once and then read at random; a zip has its own index.

An archive that cannot be opened is a ``UserError`` on one line; a member
that cannot be read (a truncated or damaged archive) is an ``OSError``, so an
image is skipped like any unreadable one and an annotation stops prepare with
one line.

``stat_listing`` / ``listing_digest`` sum up the loose files a dataset is
read from (names, sizes, mtimes), so that prepare notices images replaced
in a folder whose path did not change.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import threading
import zipfile
import zlib

from rebll_jax.errors import UserError


class DirStore:
  """Files under a folder."""

  def __init__(self, root: str):
    self.root = root
    self.where = root

  def exists(self, rel: str) -> bool:
    return os.path.isfile(os.path.join(self.root, rel))

  def read(self, rel: str) -> bytes:
    with open(os.path.join(self.root, rel), "rb") as f:
      return f.read()


class _MemberStore:
  """Shared logic of tar and zip: members indexed under a path prefix."""

  def __init__(self, path: str, names, prefix: str):
    self.where = path
    self._names = {}
    for n in names:
      i = n.find(prefix) if prefix else 0
      if i >= 0:
        self._names[n[i + len(prefix):]] = n
    self._lock = threading.Lock()

  def exists(self, rel: str) -> bool:
    return rel in self._names


class TarStore(_MemberStore):
  """Members of a tar under ``prefix`` (e.g. ``"VOC2007/"``)."""

  def __init__(self, path: str, prefix: str = ""):
    try:
      self._tar = tarfile.open(path, "r:*")
      members = {m.name: m for m in self._tar.getmembers() if m.isfile()}
    except tarfile.ReadError:
      raise UserError(f"cannot read tar archive {path}: not a tar file, or "
                      "a damaged or truncated one") from None
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
      raise UserError(f"cannot read tar archive {path}: "
                      f"{_one_line(e)}") from None
    self._members = members
    super().__init__(path, members, prefix)

  def read(self, rel: str) -> bytes:
    with self._lock:
      try:
        f = self._tar.extractfile(self._members[self._names[rel]])
        return f.read()
      except (tarfile.TarError, EOFError, zlib.error) as e:
        raise OSError(f"damaged member {rel} of {self.where}: "
                      f"{_one_line(e)}") from None


class ZipStore(_MemberStore):
  """Members of a zip under ``prefix`` (e.g. ``"train2014/"``)."""

  def __init__(self, path: str, prefix: str = ""):
    try:
      self._zip = zipfile.ZipFile(path)
      names = [n for n in self._zip.namelist() if not n.endswith("/")]
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error) as e:
      raise UserError(f"cannot read zip archive {path}: "
                      f"{_one_line(e)}") from None
    super().__init__(path, names, prefix)

  def read(self, rel: str) -> bytes:
    with self._lock:
      try:
        return self._zip.read(self._names[rel])
      except (zipfile.BadZipFile, EOFError, zlib.error, NotImplementedError,
              RuntimeError) as e:
        raise OSError(f"damaged member {rel} of {self.where}: "
                      f"{_one_line(e)}") from None


def _one_line(error: BaseException) -> str:
  return " ".join(str(error).split()) or type(error).__name__


def file_signature(path: str) -> list:
  """(path, size, mtime) of a file or folder: cheap identity of an input."""
  st = os.stat(path)
  return [os.path.abspath(path), int(st.st_size), int(st.st_mtime_ns)]


def stat_listing(root: str, rels) -> list:
  """[(rel, size, mtime_ns)] of loose files under ``root``; (rel, -1, -1)
  where one is missing.

  What the "already prepared" check compares besides the fingerprint: a file
  added, removed or replaced (a new size or mtime) changes the listing, while
  the folder's path, all the fingerprint holds of it, does not.
  """
  out = []
  for rel in rels:
    try:
      st = os.stat(os.path.join(root, rel))
      out.append((rel, int(st.st_size), int(st.st_mtime_ns)))
    except OSError:
      out.append((rel, -1, -1))
  return out


def listing_digest(listing: dict) -> dict:
  """``{"files": N, "missing": M, "sha256": hex}`` of
  ``{split: stat_listing(...)}``."""
  h = hashlib.sha256()
  n = missing = 0
  for split in sorted(listing):
    for rel, size, mtime in listing[split]:
      h.update(f"{split}\0{rel}\0{size}\0{mtime}\n".encode(
          "utf-8", "surrogateescape"))
      n += 1
      missing += size < 0
  return {"files": n, "missing": missing, "sha256": h.hexdigest()}


def file_key(path: str):
  """What makes two paths the same file: (device, inode) where it exists
  (symbolic and hard links alike), else the path with links resolved."""
  try:
    st = os.stat(path)
    return ("inode", st.st_dev, st.st_ino)
  except OSError:
    return ("path", os.path.realpath(path))
