"""runtime.keep_freed_memory(): glibc malloc keeps freed activation memory (no page faults on
every forward); once per process, off with DARKNET_CFG_MALLOC=0."""
import subprocess
import sys
import textwrap

import pytest

CHILD = textwrap.dedent("""
    import resource, sys, torch
    from darknet_cfg.runtime import keep_freed_memory
    ok = keep_freed_memory()
    assert keep_freed_memory() is ok            # once per process, same answer
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(8 << 20).fill_(1)                # 32 MiB, freed at once
    f0 = faults()
    for _ in range(20):
        torch.empty(8 << 20).fill_(1)
    print(ok, faults() - f0)
""")


def _run(env_value):
    import os
    env = dict(os.environ)
    if env_value is not None:
        env["DARKNET_CFG_MALLOC"] = env_value
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, env=env,
                         check=True).stdout.split()
    return out[0] == "True", int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt: Linux only")
def test_keep_freed_memory_reuses_blocks_and_can_be_turned_off():
    ok, faults = _run(None)
    if not ok:
        pytest.skip("not glibc: nothing to tune")
    ok_off, faults_off = _run("0")
    assert ok_off is False
    # glibc maps and unmaps each 32 MiB block: 20 x 8,192 page faults; kept in the heap, the
    # blocks are reused: a heap growth or two (measured 8,192 and, once, 16,384), however many
    # blocks follow
    assert faults <= 3 * 8192 < 15 * 8192 <= faults_off
