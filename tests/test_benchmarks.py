"""The benchmark scripts' own arithmetic: the FLOP count a step's rate is built on, and how the
PyTorch reference step is found (the timings themselves are never tested: benchmarks/ prints them)."""

import json

import jax
import jax.numpy as jnp

from benchmarks import run, train_step


def test_program_flops_counts_the_traced_program():
    m, k, n = 48, 32, 40
    lowered = jax.jit(lambda a, b: jnp.tanh(a @ b)).lower(
        jax.ShapeDtypeStruct((m, k), jnp.float32), jax.ShapeDtypeStruct((k, n), jnp.float32))
    flops = train_step.program_flops(lowered)
    # 2mkn for the product; XLA adds a few per element for tanh, never fewer than the product's.
    assert 2 * m * k * n <= flops <= 2 * m * k * n + 64 * m * n


def test_program_flops_is_none_without_an_analysis():
    class NoAnalysis:
        def cost_analysis(self):
            raise NotImplementedError

    assert train_step.program_flops(NoAnalysis()) is None


def test_torch_step_names_a_missing_interpreter(capsys):
    assert run.torch_step("usleep", 8, 1, 0, python="/nonexistent/python") is None
    note = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert note["kind"] == "note" and "/nonexistent/python not found" in note["problem"]


def test_torch_step_reports_a_failing_interpreter(capsys, tmp_path):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'no torch here' >&2\nexit 3\n")
    fake.chmod(0o755)
    assert run.torch_step("usleep", 8, 1, 0, python=str(fake)) is None
    note = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert note["problem"] == "the torch step failed (exit 3)"
    assert "no torch here" in note["stderr_tail"]
