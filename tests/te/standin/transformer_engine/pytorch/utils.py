"""``transformer_engine.pytorch.utils``: the device rule the stand-in modules share."""

import torch


def resolve_device(device) -> torch.device:
    """TE builds parameters on ``device`` (default "cuda"); "meta" defers initialisation.
    A CUDA device on a machine without CUDA is refused with the reason."""
    device = torch.device("cuda", device) if isinstance(device, int) else torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "the Transformer Engine stand-in was asked for CUDA parameters on a machine "
            "without CUDA (Megatron-Core passes device='cpu' with use_cpu_initialization=True)"
        )
    return device
