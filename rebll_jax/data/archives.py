"""Read files out of a tar, a zip or a folder by relative path (prepare only).

A *store* maps a relative path (``"JPEGImages/000005.jpg"``) to bytes. The
official archives are read in place, without extracting them: an uncompressed
tar is indexed once and then read at random; a zip has its own index.

An archive that cannot be opened is a ``UserError`` on one line; a member
that cannot be read (a truncated or damaged archive) is an ``OSError``, so an
image is skipped like any unreadable one and an annotation stops prepare with
one line.
"""

from __future__ import annotations

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
