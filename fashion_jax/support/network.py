"""A name lookup with a time limit, and URLs as messages show them (no JAX import here)."""

from __future__ import annotations

import socket
import threading
import urllib.parse


class NoAnswer(TimeoutError):
  """The lookup did not finish in time; its message says so, naming the host."""


def look_up(host: str, port: int | None, timeout: float) -> None:
  """Looks up `host`'s addresses within `timeout` seconds: raises what the lookup raised, or
  NoAnswer. getaddrinfo has no time limit of its own and ignores socket timeouts (offline, a
  resolver can hang for long), so it runs in a daemon thread: one still hanging must not keep the
  process alive after the error is printed (a pool's worker did, 35 s)."""
  failed = []

  def run():
    try:
      socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except Exception as e:  # pylint: disable=broad-except  # Raised below, in the caller.
      failed.append(e)

  thread = threading.Thread(target=run, name="fashion_jax-lookup", daemon=True)
  thread.start()
  thread.join(timeout)
  if thread.is_alive():
    raise NoAnswer(f"no answer for {host} within {round(timeout, 1):g} s (no network?)")
  if failed:
    raise failed[0]


def shown(url: str) -> str:
  """`url` as messages and logs say it: a user:password@ and a query (a token) hidden. An '@' past
  the host, where a password's '/', '?' or '#' (not percent-encoded) ended what urlsplit took for
  the host, hides everything up to it: that password had been shown whole."""
  if "@" not in urllib.parse.urlsplit(url).netloc and "@" in url.partition("//")[2]:
    url = url.partition("//")[0] + "//***@" + url.rpartition("@")[2]
  parts = urllib.parse.urlsplit(url)
  netloc = parts.netloc if "@" not in parts.netloc else "***@" + parts.netloc.rpartition("@")[2]
  return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query="***" if parts.query else ""))
