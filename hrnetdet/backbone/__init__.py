from .hrnet import HRNet, HRModule

__all__ = ["HRNet", "HRModule"]
