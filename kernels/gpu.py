"""What launch decisions need to know about the GPU, asked once per device."""
import functools

import torch

SM_COUNT_DEFAULT = 132  # a Hopper SXM part's; off the GPU (the interpreter) kernels plan as if on one


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device, cpu: int = SM_COUNT_DEFAULT) -> int:
    """Streaming multiprocessors of `device`; `cpu` stands in off the GPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return cpu
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
