"""The official E2B SDK makes sandboxes from a template that `soulbox template build` made
from a Dockerfile: `Sandbox.create("<name>")` starts on the template's layers, runs its start
command, and its commands see the template's files, environment, working directory and user.
Run by tests/all/templates.rs with E2B_API_URL, E2B_SANDBOX_URL, E2B_API_KEY and TEMPLATE."""

import os
import time

from e2b import Sandbox, SandboxException

TEMPLATE = os.environ["TEMPLATE"]


def main():
    sandbox = Sandbox.create(TEMPLATE, timeout=120)
    try:
        # The files the build installed, and the environment, cwd and user it set.
        result = sandbox.commands.run("cat /app/out.txt /app/greeting.txt; echo $MESSAGE; pwd; id -u")
        assert result.stdout == "hello world\nhi from the context\nhello world\n/app\n1000\n", result.stdout
        # A whiteout of the build hides a file of the base image.
        result = sandbox.commands.run("test -e /bin/vi && echo present || echo absent")
        assert result.stdout.strip() == "absent", result.stdout
        # What the build left in the user's home is in the sandbox's workspace, and the files
        # API reads it there.
        assert sandbox.files.read("/home/user/.cache/x") == "kept\n"
        assert sandbox.files.read("/home/user/uid.txt").strip() == "1000"
        # The start command ran when the sandbox was made.
        for _ in range(50):
            if sandbox.files.exists("/home/user/started"):
                break
            time.sleep(0.1)
        assert sandbox.files.read("/home/user/started") == "started\n"
        # The root is the sandbox's own writable layer: root may change it.
        sandbox.commands.run("echo mine > /etc/motd && rm /bin/ls", user="root")
        assert sandbox.commands.run("cat /etc/motd").stdout == "mine\n"
        # A file written through the files API lands in the workspace the commands see.
        sandbox.files.write("/home/user/note.txt", "from the sdk")
        assert sandbox.commands.run("cat /home/user/note.txt").stdout == "from the sdk"
    finally:
        sandbox.kill()

    # A second sandbox of the template starts from the template, not from the first's changes.
    other = Sandbox.create(TEMPLATE, timeout=60)
    try:
        result = other.commands.run("test -e /bin/ls && echo present; cat /etc/motd 2>&1 || true")
        assert result.stdout.startswith("present\n") and "mine" not in result.stdout, result.stdout
    finally:
        other.kill()

    # An unknown template is refused with the SDK's own exception.
    try:
        Sandbox.create("no-such-template", timeout=30)
    except SandboxException as e:
        assert "not found" in str(e), e
    else:
        raise AssertionError("an unknown template was accepted")
    print("ok")


if __name__ == "__main__":
    main()
    # The SDK's native transport may abort in interpreter teardown (see tests/all/e2b_sdk.rs).
    os._exit(0)
