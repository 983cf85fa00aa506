"""verify holds one model at a time, and widens a 16-bit checkpoint to float32 without a second copy.

The memory checks run the step in a fresh interpreter and read its peak resident set (VmHWM)
from ``/proc/self/status``: the kernel's own figure, file-mapped pages included.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_models import ARCHS, random_direction_run

from cosmic_bake.model.loading import load_model
from cosmic_bake.verify.widen import load_widened, stored_float_dtype

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status"),
]

PROMPT = "Write a short poem about the sea."


def _logits(lm) -> torch.Tensor:
    enc = lm.tokenizer([PROMPT], return_tensors="pt")
    with torch.no_grad():
        return lm.model(**enc, use_cache=False).logits


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_widened_model_equals_a_float32_load(arch, dtype, tiny_model_factory):
    folder = tiny_model_factory(arch, dtype=dtype, tied=arch in ("llama", "gemma3_text"))
    assert stored_float_dtype(folder) == dtype
    direct = load_model(str(folder), dtype="float32")
    widened = load_widened(str(folder), "float32")
    assert widened.dtype == torch.float32
    for name, t in direct.model.state_dict().items():
        assert torch.equal(widened.model.state_dict()[name], t), name
    buffers = dict(widened.model.named_buffers())
    for name, b in direct.model.named_buffers():  # computed ones too (RoPE, Gemma 3's embedding scale)
        assert b.dtype == buffers[name].dtype and torch.equal(buffers[name], b), name
    assert torch.equal(_logits(widened), _logits(direct))


def test_mixed_or_float32_checkpoints_load_as_usual(tiny_model_factory):
    folder = tiny_model_factory("qwen2")
    assert stored_float_dtype(folder) == torch.float32
    assert load_widened(str(folder), "float32").model.dtype == torch.float32


_CHILD = r"""
import json, sys
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
step, a, b, c = sys.argv[1:5]
import torch, transformers
from cosmic_bake import api
from cosmic_bake.model.loading import load_model
from cosmic_bake.verify.widen import load_widened
import cosmic_bake.verify.runtime
base = status("VmRSS")
if step == "load":
    lm = load_model(a, dtype="float32")
elif step == "widen":
    lm = load_widened(a, "float32")
elif step == "one":  # one model, loaded as verify loads it, run on verify's prompts
    from cosmic_bake.model.chat import ChatFormat
    from cosmic_bake.prompts.sets import verify_prompts
    lm = load_widened(a, "float32")
    with torch.no_grad():
        lm.model(**ChatFormat(lm.tokenizer).encode(verify_prompts(limit=2)), use_cache=False)
else:
    assert api.verify(a, b, c, limit=2).passed
print(json.dumps({"base": base, "peak": status("VmHWM")}))
"""


def _peak_above_base(*args: str) -> int:
    out = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True, check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    return r["peak"] - r["base"]


@pytest.fixture(scope="module")
def wide_bf16(tiny_model_factory):
    """A bf16 model big enough for its size to show in a resident set (~130 MB stored, ~260 MB in float32)."""
    return tiny_model_factory("llama", dtype=torch.bfloat16, hidden_size=1024, intermediate_size=4096, num_layers=4)


def _stored_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def test_widening_does_not_hold_the_stored_copy(wide_bf16):
    """from_pretrained's float32 load also holds the mapped bf16 file at its peak; widening does not."""
    stored = _stored_bytes(wide_bf16)
    plain, widened = _peak_above_base("load", str(wide_bf16), "", ""), _peak_above_base("widen", str(wide_bf16), "", "")
    assert plain - widened > 0.7 * stored, f"plain {plain / 2**20:.0f} MiB, widened {widened / 2**20:.0f} MiB"


def test_verify_holds_one_model_at_a_time(wide_bf16, tmp_path):
    """verify (original, then baked, each in float32) peaks about where one model run alone does."""
    from cosmic_bake import api

    run = random_direction_run(wide_bf16, tmp_path / "run", 2)
    baked = tmp_path / "baked"
    api.bake(str(wide_bf16), run, baked)
    model = 2 * _stored_bytes(baked)  # float32
    one = _peak_above_base("one", str(baked), "", "")
    both = _peak_above_base("verify", str(wide_bf16), str(baked), str(run))
    assert both < one + 0.3 * model, f"verify {both / 2**20:.0f} MiB vs one model {one / 2**20:.0f} MiB"
