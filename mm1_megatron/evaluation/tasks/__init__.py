"""Evaluation tasks read from their official files (or the synthetic world).

``load_task(name, paths)`` returns a ``Task``: evaluation examples and demonstrations
(the task's train split), both ordered by id. ``load_task_paths(yaml)`` reads where the
official files are; ``docs/evaluation.md`` lists the tasks, their files and keys.
"""

from mm1_megatron.evaluation.tasks.paths import PATH_KEYS, TaskPaths, load_task_paths
from mm1_megatron.evaluation.tasks.records import EvalExample, Task
from mm1_megatron.evaluation.tasks.registry import TASK_NAMES, TASKS, load_task, task_spec

__all__ = [
    "PATH_KEYS",
    "TASKS",
    "TASK_NAMES",
    "EvalExample",
    "Task",
    "TaskPaths",
    "load_task",
    "load_task_paths",
    "task_spec",
]
