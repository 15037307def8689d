"""The child process of ``bench.train``: one training run of ours or open_clip's, with step timestamps recorded.

``python -m bench.train_child ours|open_clip MODEL_JSON TIMES_JSON -- ARGV...``

1. registers the benchmark architecture (``MODEL_JSON``) with ``open_clip.add_model_config``: both trainers
   build models by name from open_clip's registry, so the custom config must be registered in their process;
2. installs a global optimizer step post-hook that appends ``time.monotonic()`` after every optimizer step
   (CLOCK_MONOTONIC: system-wide on Linux, so the parent can compare it with its own launch time), measuring
   both trainers from the outside in exactly the same way, whatever their own logs say;
3. for open_clip: patches its webdataset reader for webdataset 1.0.2 and its sample shuffle buffer to ours;
4. runs ``vlp.cli.main.main(ARGV)`` or ``open_clip_train.main.main(ARGV)``, then writes ``TIMES_JSON``
   (``{"step_times": [...], "exit": ...}``), also when the run fails.

This module imports nothing from vlp or open_clip_train at module level, so neither trainer's process carries
the other's imports (memory is measured per process tree).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

SHUFFLE_BUFFER = 1000  # ours (data.shuffle_buffer default): open_clip's module constants are set to it too


def _record_steps(times: list[float]) -> None:
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(lambda optimizer, args, kwargs: times.append(time.monotonic()))


def _patch_open_clip() -> None:
    """open_clip 3.3.0 + webdataset 1.0.2: the same one-line fix and shuffle settings as ``bench/data.py``.

    webdataset >= 0.2.96 ends each shard with an ``{}`` marker that open_clip's ``group_by_keys_nothrow`` does
    not expect (``KeyError: 'fname'``, open_clip #935 / webdataset #384); upstream's fix is ``eof_value=None``.
    Copied rather than imported from ``bench.data`` so that open_clip's process does not import vlp.
    """
    import open_clip_train.data as oc_data
    from webdataset.tariterators import tar_file_expander, url_opener

    def tar_samples(src: Iterator[dict], handler=None) -> Iterator[dict]:  # noqa: ANN001
        handler = handler or oc_data.log_and_continue
        files = tar_file_expander(url_opener(src, handler=handler), handler=handler, eof_value=None)
        return oc_data.group_by_keys_nothrow(files, handler=handler)

    oc_data.tarfile_to_samples_nothrow = tar_samples
    oc_data._SAMPLE_SHUFFLE_SIZE = oc_data._SAMPLE_SHUFFLE_INITIAL = SHUFFLE_BUFFER


def run(who: str, model_json: str, argv: list[str], times: list[float]) -> int:
    """Register the architecture, then run one trainer's ``main(argv)``; its exit code."""
    import open_clip

    open_clip.add_model_config(model_json)
    _record_steps(times)
    if who == "ours":
        from vlp.cli.main import main

        return int(main(argv) or 0)
    if who == "open_clip":
        _patch_open_clip()
        import open_clip_train.main as oc_main

        return int(oc_main.main(argv) or 0)
    raise SystemExit(f"unknown trainer {who!r}: expected ours or open_clip")


def main(args: list[str]) -> int:
    if len(args) < 4 or args[3] != "--":
        raise SystemExit(__doc__.split("\n\n")[1])
    who, model_json, times_json, argv = args[0], args[1], Path(args[2]), args[4:]
    times: list[float] = []
    code, error = 1, None
    try:
        code = run(who, model_json, argv, times)
    except BaseException as err:  # noqa: BLE001 - reported to the parent through TIMES_JSON and the exit code
        error = "".join(traceback.format_exception_only(err)).strip()
        traceback.print_exc()
        code = err.code if isinstance(err, SystemExit) and isinstance(err.code, int) else 1
    times_json.write_text(json.dumps({"who": who, "step_times": times, "exit": code, "error": error}))
    return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
