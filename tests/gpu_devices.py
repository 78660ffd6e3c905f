"""The CUDA device a test's own process may take beside a Ray actor that holds GPUs."""


def free_device_index(held: list, visible: str | None, device_count: int) -> int:
    """This process's CUDA index of the first GPU that `held` (the actor's `ray.get_gpu_ids()`) does not name.

    Ray's GPU ids are the entries of the CUDA_VISIBLE_DEVICES the local Ray started under, this process's own
    (`visible`; None: every device, numbered 0..device_count-1); this process numbers its devices by their position
    in that list. NCCL refuses two ranks of one group on one device, so a plain "cuda" (index 0) beside an actor
    holding GPU 0 cannot work.
    """
    ids = visible.split(",") if visible else [str(i) for i in range(device_count)]
    taken = {str(gpu) for gpu in held}
    free = [index for index, gpu in enumerate(ids) if gpu not in taken]
    if not free:
        raise RuntimeError(f"no GPU left for this process: the actor holds {sorted(taken)} of {ids}")
    return free[0]
