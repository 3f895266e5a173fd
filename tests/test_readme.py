"""The README's Python blocks run as written, in order, in one fresh interpreter.

The blocks build on each other as a reader would run them (one namespace).
The transformers block builds a small model from a config: nothing is
downloaded.  Outputs of the usage block are checked against SDPA.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"

CHECKS = """
import torch.nn.functional as F
torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.1),
                           rtol=1e-5, atol=1e-5)
assert tokens.shape == (2, 12 + 8), tokens.shape
assert swap.calls == 1, swap.calls
print("README blocks ran")
"""


def python_blocks():
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_the_usage_blocks():
    blocks = python_blocks()
    assert len(blocks) >= 3
    assert "torch.ops.xegpu.attention(q, k, v, is_causal=True)" in blocks[0]
    assert any("attn_implementation" in b for b in blocks) and any("replace_sdpa()" in b for b in blocks)


def test_readme_python_blocks_run(tmp_path):
    program = "\n\n".join(python_blocks()) + CHECKS
    env = dict(os.environ, XEGPU_ATTN_CACHE_DIR=str(tmp_path / "cache"))
    done = subprocess.run([sys.executable, "-c", program], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "README blocks ran" in done.stdout
