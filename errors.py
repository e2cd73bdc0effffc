"""The one kind of error a user can fix, and the notes a run prints once.

A UserError is a mistake the user can fix (a flag, a path, the data, a full disk): the command line
prints its message alone and exits 1 (processes.stop). A note is said once a run, by rank 0, with
the sample ids of every process that saw it (processes.print_notes)."""

import errno
import os
import shutil


class UserError(ValueError):
    """A mistake the user can fix (a flag, a path, the data): its message alone, no traceback."""


def agreed_error(message):
    """A UserError that every process raises at the same point (it came from values they share)."""
    error = UserError(message)
    error.agreed = True
    return error


NOTES = []  # this process's (text, sample ids): processes.print_notes prints each once a run


def note(text, ids=()):
    """{n} in text: the count of every process's ids (each checks a share); {ids}: five of them."""
    NOTES.append((text, list(ids)))


def take_notes():
    """This process's notes since the last call, and none left."""
    notes = NOTES[:]
    NOTES.clear()
    return notes


def full_disk(error, path):
    """Whether a write failed for want of space: ENOSPC, as an OSError or in the message of the
    error of a library that writes on its own (torch.save, safetensors: "os error 28")."""
    by_errno = getattr(error, "errno", None) == errno.ENOSPC
    by_message = os.strerror(errno.ENOSPC) in str(error)
    return by_errno or by_message or shutil.disk_usage(path).free < 2**26
