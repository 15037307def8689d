"""``python tests/hang_in_save.py MARKER N ARGS...`` runs ``vlp ARGS...`` whose N-th checkpoint save stops mid-write.

The N-th save writes its weights and state into its ``.step_*.partial-PID`` folder, then, instead of the manifest
that completes it, creates MARKER and sleeps: a test kills the process there to get a save killed mid-write
without depending on timing. Only this test helper patches the save; vlp itself has no such hook.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from vlp.cli.main import main
from vlp.training import checkpoint


def _hang_at_save(marker: Path, save_number: int) -> None:
    original = checkpoint.write_text_atomic
    manifests = 0

    def write(path: Path, text: str) -> None:
        nonlocal manifests
        if path.name == checkpoint.MANIFEST_FILE:
            manifests += 1
            if manifests == save_number:
                marker.write_text(str(path.parent))
                time.sleep(600)
        original(path, text)

    checkpoint.write_text_atomic = write


if __name__ == "__main__":
    _hang_at_save(Path(sys.argv[1]), int(sys.argv[2]))
    sys.exit(main(sys.argv[3:]))
