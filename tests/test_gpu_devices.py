"""tests/test_vllm_engine.py's NCCL test picks the driver's GPU beside the engine actor's (checked here on CPU)."""
import pytest

from gpu_devices import free_device_index


def test_the_driver_takes_a_gpu_the_engine_actor_does_not_hold():
    assert free_device_index([0], None, 2) == 1  # Ray gave the actor GPU 0: a plain "cuda" would be the same device
    assert free_device_index(["1"], None, 2) == 0
    assert free_device_index(["2"], "2,3", 2) == 1  # the driver sees physical 2 and 3 as cuda:0 and cuda:1
    assert free_device_index(["GPU-b"], "GPU-a,GPU-b", 2) == 0


def test_no_gpu_left_for_the_driver_is_an_error():
    with pytest.raises(RuntimeError, match=r"the actor holds \['0', '1'\]"):
        free_device_index(["0", "1"], None, 2)
