"""One run per workdir: an advisory lock that dies with its process.

``fcntl.flock`` on ``WORKDIR/.lock``: the kernel releases it when the
holding process exits, however it exits (kill -9 included), so a stale lock
never blocks the rerun. The file holds the holder's pid and host, so the
refusal can name the other process. Only process 0 of a multi-host run takes
it (the processes of one run share the workdir).
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket

from rebll_jax.errors import UserError

LOCK_NAME = ".lock"


class WorkdirLock:
  """Held from ``acquire()`` until ``release()`` (or the process ends)."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_NAME)
    self.fd = None

  def acquire(self) -> "WorkdirLock":
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
        os.close(fd)
        raise
      holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
      os.close(fd)
      raise UserError(
          f"workdir {os.path.dirname(self.path)} is in use by another run "
          f"({holder or 'unknown process'}); wait for it to finish, or use "
          "another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode(), 0)
    self.fd = fd
    return self

  def release(self):
    if self.fd is not None:
      os.close(self.fd)  # closing the descriptor drops the flock
      self.fd = None
