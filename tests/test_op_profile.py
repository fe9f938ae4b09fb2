"""benchmarks/op_profile.py: the HLO text parser against hand-written instructions, and one profiled run.

The profiled run is a subprocess: `jax.profiler` is process-wide state, kept out of the test worker."""

import json
import pathlib
import subprocess
import sys
import textwrap

from benchmarks import op_profile

HLO = """
ENTRY %main.4 (x.1: f32[8,16], w.2: f32[16,4]) -> f32[8,4] {
  %x.1 = f32[8,16]{1,0} parameter(0)
  %dot.3 = f32[8,4]{1,0} dot(%x.1, %w.2), lhs_contracting_dims={1}, metadata={op_name="jit(f)/dot_general"}
  ROOT %tanh_fusion = f32[8,4]{1,0} fusion(%dot.3), kind=kLoop, calls=%fused_computation
}
"""


def test_hlo_instructions_reads_shape_and_jax_op():
    got = op_profile.hlo_instructions(HLO)
    assert got["dot.3"] == ("f32[8,4]", "dot_general")  # the op_name's last element
    assert got["tanh_fusion"] == ("f32[8,4]", "fusion")  # no metadata: the opcode
    assert got["x.1"] == ("f32[8,16]", "parameter")


def test_op_table_finds_the_product_of_a_profiled_run():
    script = textwrap.dedent("""
        import dataclasses, json
        import jax, jax.numpy as jnp
        from benchmarks import op_profile
        x, w = jnp.ones((256, 512)), jnp.ones((512, 384))
        compiled = jax.jit(lambda x, w: jnp.tanh(x @ w) * 2.0).lower(x, w).compile()
        rows, total = op_profile.op_table(compiled, (x, w), per=2)
        print(json.dumps({"rows": [dataclasses.asdict(r) for r in rows], "total": total}))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                          cwd=pathlib.Path(__file__).resolve().parent.parent)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    rows, total = [op_profile.OpRow(**r) for r in out["rows"]], out["total"]
    assert total > 0 and rows and all(r.ms >= 0 and r.events >= 1 for r in rows)
    assert sum(r.ms for r in rows) <= total + 1e-9
    assert any(r.shape == "f32[256,384]" for r in rows), rows
