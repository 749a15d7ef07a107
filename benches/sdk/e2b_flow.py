"""Times the E2B SDK flows against `soulbox serve` on loopback (run by benches/benches/e2b_sdk.rs
with E2B_API_URL, E2B_SANDBOX_URL and E2B_API_KEY set): for each template, a new sandbox to the
result of its first command, and a new sandbox to the result of `run_code('1+1')`. The sandbox
is killed after each sample, outside the timed part. Prints one JSON object per row."""

import json
import os
import sys
import time

from e2b import Sandbox
from e2b_code_interpreter import Sandbox as CodeSandbox

ITERATIONS = int(os.environ.get("SOULBOX_BENCH_ITERATIONS", "50"))
WARMUP = 3
TEMPLATES = ["base", "code-interpreter-v1", "python", "javascript", "ruby"]
# A template built from a Dockerfile for the run: commands only (it has no code interpreter).
BUILT = os.environ.get("SOULBOX_BENCH_BUILT_TEMPLATE")


def first_command(template):
    began = time.perf_counter()
    sandbox = Sandbox.create(template)
    result = sandbox.commands.run("echo ready")
    elapsed = time.perf_counter() - began
    assert result.stdout == "ready\n", result
    sandbox.kill()
    return elapsed


def first_cell(template):
    began = time.perf_counter()
    sandbox = CodeSandbox.create(template)
    execution = sandbox.run_code("1+1")
    elapsed = time.perf_counter() - began
    assert execution.text == "2", execution
    sandbox.kill()
    return elapsed


def percentile(samples, p):
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


def row(flow, template, measure):
    for _ in range(WARMUP):
        measure(template)
    samples = [measure(template) for _ in range(ITERATIONS)]
    print(json.dumps({
        "flow": flow,
        "template": template,
        "iterations": ITERATIONS,
        "p50_ms": percentile(samples, 50) * 1000,
        "p99_ms": percentile(samples, 99) * 1000,
    }), flush=True)


for template in TEMPLATES + ([BUILT] if BUILT else []):
    row("create + first command", template, first_command)
for template in TEMPLATES:
    row("create + run_code('1+1')", template, first_cell)
# The SDK's native HTTP transport sometimes aborts while the interpreter tears down; every
# row is printed by now.
sys.stdout.flush()
os._exit(0)
