# A test's crash of the controller, for the crash suites: with
# HAPAIR_STOP_AFTER_CHANGE_PAST=K the run dies (os._exit, as a killed
# ansible-playbook would: no recap, no cleanup) right after the first task
# numbered above K that changed a host has ended on every host, as the next
# task starts. The linear strategy starts a task only once the one before
# has ended on every host.
#
# A stop after a task that changed nothing leaves the hosts as the stop
# after the last task that changed something did, so stopping after each
# task that changes a host covers a stop after every task.
#
# Each task, as it ends, is appended to HAPAIR_TASK_LOG when set: its
# number, whether it changed a host, and its name.

from __future__ import annotations

import os
import sys

from ansible.plugins.callback import CallbackBase

STOPPED_EXIT = 97


class CallbackModule(CallbackBase):
    CALLBACK_VERSION = 2.0
    CALLBACK_TYPE = "aggregate"
    CALLBACK_NAME = "stop_after_task"
    CALLBACK_NEEDS_ENABLED = True

    def __init__(self):
        super().__init__()
        self.number = 0
        self.name = ""
        self.changed = False
        past = os.environ.get("HAPAIR_STOP_AFTER_CHANGE_PAST", "")
        self.past = int(past) if past else None
        self.log = os.environ.get("HAPAIR_TASK_LOG")

    def _task_ended(self, may_stop=True):
        if self.number and self.log:
            with open(self.log, "a", encoding="utf-8") as log:
                log.write(f"{self.number}\t{int(self.changed)}\t{self.name}\n")
        if may_stop and self.past is not None and self.changed and self.number > self.past:
            sys.stdout.write(f"\nHAPAIR-STOPPED after task {self.number}: {self.name}\n")
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(STOPPED_EXIT)

    def v2_playbook_on_task_start(self, task, is_conditional):
        self._task_ended()
        self.number += 1
        self.name = task.get_name()
        self.changed = False

    def v2_runner_on_ok(self, result):
        if result._result.get("changed"):
            self.changed = True

    def v2_playbook_on_stats(self, stats):
        # The run has ended: a stop now would only lose the recap.
        self._task_ended(may_stop=False)
