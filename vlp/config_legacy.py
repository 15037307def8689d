"""Older config keys still read when a config loads, rewritten into their current form.

``eval.zeroshot_urls`` / ``eval.zeroshot_classnames`` / ``eval.zeroshot_templates`` / ``eval.retrieval_urls``
(before evaluations became the mapping ``eval.tasks``) become the tasks ``eval.tasks.zeroshot`` and
``eval.tasks.retrieval``, so the ``config.yaml`` of an older run still loads and its metrics keep their names
(``eval/zeroshot/acc1``, ...). A non-empty one warns with the new form; without its ``*_urls`` the class names and
templates did nothing then and do nothing now.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

from vlp.config import ConfigError

# older key under ``eval`` -> (task name = type, field)
LEGACY_EVAL_KEYS: dict[str, tuple[str, str]] = {
    "zeroshot_urls": ("zeroshot", "urls"),
    "zeroshot_classnames": ("zeroshot", "classnames"),
    "zeroshot_templates": ("zeroshot", "templates"),
    "retrieval_urls": ("retrieval", "urls"),
}


def upgrade_legacy_keys(tree: Mapping[str, Any]) -> dict[str, Any]:
    """``tree`` (a config as nested mappings) with the older ``eval.*`` keys rewritten into ``eval.tasks``."""
    section = tree.get("eval")
    if not isinstance(section, Mapping) or not any(key in section for key in LEGACY_EVAL_KEYS):
        return dict(tree)
    section = dict(section)
    legacy = {key: section.pop(key) for key in LEGACY_EVAL_KEYS if key in section}
    tasks = section.get("tasks") or {}
    if not isinstance(tasks, Mapping):
        return {**tree, "eval": section}  # the loader names the bad eval.tasks value
    tasks = dict(tasks)
    for name in ("zeroshot", "retrieval"):
        if not legacy.get(f"{name}_urls"):
            continue
        if name in tasks:
            raise ConfigError(f"eval.{name}_urls and eval.tasks.{name} are both given: keep eval.tasks.{name} "
                              f"(eval.{name}_urls is its older form)")
        fields = {field: legacy[key] for key, (task, field) in LEGACY_EVAL_KEYS.items()
                  if task == name and key in legacy}
        new_form = ", ".join(f"eval.tasks.{name}.{field}" for field in fields)
        warnings.warn(f"eval.{name}_* keys are deprecated: write {new_form} (evaluations are the mapping eval.tasks)",
                      FutureWarning, stacklevel=3)
        tasks[name] = {"type": name, **fields}
    section["tasks"] = tasks
    return {**tree, "eval": section}
