# hapair's action plugin: one SSH round trip per module task.
#
# Ansible's own path for a binary module copies the binary and an args file
# to a fresh temporary directory on every task, runs it, and removes the
# directory: several round trips. hapair's modules are installed on each
# host once instead, named by their SHA-256, and every task is then one
# exec with its arguments on stdin:
#
#   f=/usr/local/libexec/hapair/MODULE-SHA256
#   the file's checksum is checked, then it is exec'd; any other file
#   (absent, replaced, a symlink) is never run: the controller's build is
#   installed in its place, and that one runs, in the same round trip as
#   the install.
#
# A changed build has another checksum, so it is installed on its next
# task; an unchanged one never is again. The installed module is also the
# operator's command on the host (/usr/local/sbin/MODULE), as the seed types
# alation_conf.
#
# Everything Ansible users rely on stays Ansible's: check mode and diff
# (the _ansible_* keys the module reads), become (the command is wrapped
# like any other), no_log (the executor censors the result), the result's
# shape (Ansible's own parser), ansible-doc (the sidecar docs in the
# library). An async task (step 8's long copy) takes Ansible's own path.
#
# `make stage` links this file as playbooks/action_plugins/MODULE.py for
# every module, which makes it the action of each.

from __future__ import annotations

import hashlib
import json
import shlex

from ansible.module_utils.common.json import Direction, get_module_encoder
from ansible.plugins.action import ActionBase
from ansible.utils.display import Display
from ansible.vars.clean import remove_internal_keys

display = Display()

INSTALL_DIR = "/usr/local/libexec/hapair"
COMMAND_DIR = "/usr/local/sbin"
# Printed by the remote command when the module must be installed first.
NOT_INSTALLED = "hapair-module-not-installed"
UNSAFE_DIR = (
    f"{INSTALL_DIR} must be a directory of root's, mode 755, not a symlink: "
    "another account could swap a module there before it runs. Fix its owner and "
    "mode (chown root: ...; chmod 755 ...), then run again."
)

def sha256_of(path: str) -> str:
    """The build's SHA-256. Each task runs in a worker process of its own,
    so there is nothing to cache it in; for a module of a few MB it costs a
    millisecond or two."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# The directory is root's and no one else may write to it (else a file
# checked here could be swapped before it runs): `stat` must say exactly
# this, or the module is installed anew, which fails on such a directory.
SAFE_DIR = "0 drwxr-xr-x"


def safe_dir_test() -> str:
    d = shlex.quote(INSTALL_DIR)
    return f'[ ! -L {d} ] && [ "$(stat -c \'%u %A\' {d})" = {shlex.quote(SAFE_DIR)} ]'


def run_installed(installed: str, digest: str) -> str:
    """Runs the installed module when its checksum is the build's; else
    says it is not installed. Its stdin (the arguments) goes to the module."""
    f = shlex.quote(installed)
    check = shlex.quote(f"{digest}  {installed}")
    return (
        f"if {safe_dir_test()} && [ -f {f} ] && [ ! -L {f} ] "
        f"&& echo {check} | sha256sum --check --status; "
        f"then exec {f}; else echo {NOT_INSTALLED}; fi"
    )


def install_and_run(name: str, uploaded: str, installed: str, digest: str) -> str:
    """Checks the upload, puts it in place (atomically, older builds of the
    module gone), links the operator's command, and runs it."""
    q = shlex.quote
    tmp = q(f"{installed}.new")
    return " && ".join(
        [
            "umask 022",
            f"mkdir -p {q(INSTALL_DIR)}",
            f"{{ {safe_dir_test()} || {{ echo {q(UNSAFE_DIR)} >&2; exit 1; }}; }}",
            f"echo {q(f'{digest}  {uploaded}')} | sha256sum --check --status",
            f"rm -f {tmp}",
            f"cp {q(uploaded)} {tmp}",
            f"chmod 0755 {tmp}",
            f"mv -f {tmp} {q(installed)}",
            f"for old in {q(INSTALL_DIR)}/{q(name)}-*; do "
            f'[ "$old" = {q(installed)} ] || rm -f "$old"; done',
            f"ln -sfn {q(installed)} {q(f'{COMMAND_DIR}/{name}')}",
            f"exec {q(installed)}",
        ]
    )


class ActionModule(ActionBase):
    # True would make a remote temporary directory before every task: a
    # round trip. It is made only when a module must be installed.
    TRANSFERS_FILES = False
    # Step 8's and 9's long copies run async, by Ansible's own wrapper.
    _supports_async = True

    def run(self, tmp=None, task_vars=None):
        result = super().run(tmp, task_vars)
        del tmp
        if task_vars is None:
            task_vars = {}
        if self._task.async_val:
            # Ansible's async wrapper runs the module from its own copy.
            wrap_async = not self._connection.has_native_async
            result.update(self._execute_module(task_vars=task_vars, wrap_async=wrap_async))
            return result

        name = self._task.action.split(".")[-1]
        local = self._shared_loader_obj.module_loader.find_plugin(self._task.action)
        if local is None:
            result.update(failed=True, msg=f"module {name} is not in the library: run `make stage`")
            return result
        digest = sha256_of(local)
        installed = f"{INSTALL_DIR}/{name}-{digest}"

        module_args = dict(self._task.args)
        self._update_module_args(name, module_args, task_vars)
        encoder = get_module_encoder("legacy", Direction.CONTROLLER_TO_MODULE)
        in_data = json.dumps(module_args, cls=encoder)

        res = self._low_level_execute_command(run_installed(installed, digest), in_data=in_data)
        if res.get("stdout", "").strip() == NOT_INSTALLED:
            display.vvv(f"hapair: installing {name} ({digest[:12]}) on {self._play_context.remote_addr}")
            self._make_tmp_path()
            uploaded = self._connection._shell.join_path(self._connection._shell.tmpdir, name)
            self._transfer_file(local, uploaded)
            self._fixup_perms2([self._connection._shell.tmpdir, uploaded], execute=True)
            res = self._low_level_execute_command(
                install_and_run(name, uploaded, installed, digest), in_data=in_data
            )
            self._remove_tmp_path(self._connection._shell.tmpdir)
            if res.get("rc") != 0 and not res.get("stdout", "").strip():
                result.update(failed=True, msg=f"can't install {name}: {res.get('stderr', '').strip()}")
                return result

        data = self._parse_returned_data(res, "legacy")
        remove_internal_keys(data)
        result.update(data)
        return result
