"""fashion_jax.support.storage's local files: whole-file writes that survive a crash."""

import os

from fashion_jax.support import storage


def test_a_whole_file_write_is_on_disk_before_it_replaces_the_old(tmp_path, monkeypatch):
  """The new content was renamed over the old unsynced: a crash soon after (power, a VM's host)
  left an empty file on XFS or ext4 with data=writeback: a run's config.json, or metrics.jsonl
  rewritten on resume (truncate_after) with every line lost."""
  path, events = tmp_path / "metrics.jsonl", []
  path.write_text("old\n")
  fsync, replace = os.fsync, os.replace

  def synced(fd):
    events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
    fsync(fd)

  def replaced(source, target):
    events.append(("replace", os.fspath(source)))
    replace(source, target)

  monkeypatch.setattr(storage.os, "fsync", synced)
  monkeypatch.setattr(storage.os, "replace", replaced)
  storage.write_text(str(path), "new\n")
  assert path.read_text() == "new\n"
  assert [kind for kind, _ in events] == ["fsync", "replace"], events
  assert events[0][1] == events[1][1], events  # The temporary file's, then renamed.
  assert os.listdir(tmp_path) == ["metrics.jsonl"]
