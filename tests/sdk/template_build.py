"""The official E2B SDK builds a template through E2B's own template-build API
(`Template.build`: files uploaded by hash, steps, status polled with logs), served by
SoulBox's builder, then makes a sandbox of it. Run by tests/all/templates.rs with
E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY."""

import os
import tempfile

from e2b import BuildException, Sandbox, Template


def main():
    context = tempfile.mkdtemp()
    with open(os.path.join(context, "app.sh"), "w") as f:
        f.write("#!/bin/sh\necho app-ran\n")
    template = (
        Template(file_context_path=context)
        .from_template("base")
        .copy("app.sh", "/home/user/app/", mode=0o755)
        .run_cmd("echo built-as-$(id -un) > /home/user/who.txt")
        .run_cmd("mkdir -p /opt/tool && echo tool-1 > /opt/tool/version", user="root")
        .set_envs({"GREETING": "hello from the sdk"})
        .set_workdir("/home/user/app")
        .set_start_cmd("echo started > /home/user/started", "test -f /home/user/started")
    )
    logs = []
    info = Template.build(template, "sdk-app:v1", on_build_logs=logs.append)
    assert info.name == "sdk-app:v1", info
    messages = [entry.message for entry in logs]
    assert any("RUN echo built-as" in m for m in messages), messages
    assert Template.exists("sdk-app")
    assert not Template.exists("no-such-template")

    # Tags: assigned to the build a name:tag points at, listed, removed.
    assigned = Template.assign_tags("sdk-app:v1", ["stable", "prod"])
    assert sorted(assigned.tags) == ["prod", "stable"], assigned
    listed = {tag.tag: str(tag.build_id) for tag in Template.get_tags("sdk-app")}
    assert set(listed) == {"v1", "stable", "prod"}, listed
    assert listed["stable"] == listed["v1"] == str(assigned.build_id), listed
    Template.remove_tags("sdk-app", ["prod"])
    assert {tag.tag for tag in Template.get_tags("sdk-app")} == {"v1", "stable"}

    sandbox = Sandbox.create("sdk-app:stable", timeout=120)
    try:
        result = sandbox.commands.run(
            "cat /home/user/who.txt /opt/tool/version; echo $GREETING; pwd; ./app.sh; "
            "stat -c %a app.sh; cat /home/user/started"
        )
        expected = (
            "built-as-user\ntool-1\nhello from the sdk\n/home/user/app\napp-ran\n755\nstarted\n"
        )
        assert result.stdout == expected, result.stdout
    finally:
        sandbox.kill()

    # An unchanged template rebuilds from the cache.
    logs = []
    Template.build(template, "sdk-app:v1", on_build_logs=logs.append)
    assert sum(1 for entry in logs if entry.message == "CACHED") == 2, [e.message for e in logs]

    # A failing step fails the build with the step's message.
    broken = Template().from_template("base").run_cmd("echo nope; exit 3")
    try:
        Template.build(broken, "sdk-broken")
    except BuildException as e:
        assert "exited with code 3" in str(e), e
    else:
        raise AssertionError("a failing step built")
    assert not Template.exists("sdk-broken")
    print("ok", flush=True)


if __name__ == "__main__":
    main()
    # The SDK's native transport may abort in interpreter teardown (see tests/all/e2b_sdk.rs).
    os._exit(0)
