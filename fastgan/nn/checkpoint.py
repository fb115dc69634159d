"""Checkpoint loading that accepts DataParallel/DDP checkpoints (keys prefixed ``module.``)."""
import torch


def strip_module_prefix(state_dict):
    """The state_dict with one leading ``module.`` removed from every key that has it."""
    return {key.removeprefix("module."): value for key, value in state_dict.items()}


def load_checkpoint(model, checkpoint, map_location="cpu", strict=True):
    """Load a state_dict (or a path to one) into ``model``; returns load_state_dict's result.

    Mismatched architectures raise ValueError listing the missing, unexpected and mis-shaped keys."""
    state = torch.load(checkpoint, map_location=map_location, weights_only=True) if not isinstance(
        checkpoint, dict) else checkpoint
    state = strip_module_prefix(state)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if strict and (missing or unexpected or shapes):
        lines = ([f"missing keys: {', '.join(missing)}"] if missing else []) + (
            [f"unexpected keys: {', '.join(unexpected)}"] if unexpected else []) + (
            [f"shape mismatch: {'; '.join(shapes)}"] if shapes else [])
        raise ValueError(f"checkpoint does not fit {type(model).__name__} ({'; '.join(lines)}); "
                         "check --ngf/--ndf/--nz/--nc match the run that saved it")
    return model.load_state_dict(state, strict=strict)
