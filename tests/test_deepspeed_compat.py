"""Each use of DeepSpeed beyond its public API (sami/deepspeed_compat.py) is still there in the installed DeepSpeed:
an upgrade that moves one fails here, by name, instead of inside a training run."""
import inspect

import deepspeed.ops
from deepspeed.runtime.engine import DeepSpeedEngine
from deepspeed.runtime.zero import parameter_offload

from sami.deepspeed_compat import ZERO3_MODULE_FUNCTIONS


def test_the_cpu_shared_memory_op_is_in_the_table_skip_cpu_shm_comm_op_edits():
    assert "deepspeed_shm_comm" in deepspeed.ops.__compatible_ops__


def test_zero3_consolidated_state_dict_exists():
    assert callable(DeepSpeedEngine._zero3_consolidated_16bit_state_dict)


def test_zero3_still_reuses_the_module_functions_forget_zero3_module_functions_drops():
    source = inspect.getsource(parameter_offload)
    for name in ("pre_bwd_fn", "post_bwd_fn"):  # reused when present: the reason they are dropped after destroy()
        assert f'"{name}" not in module.__dict__' in source
    for name in ZERO3_MODULE_FUNCTIONS:
        assert name in source
