from .hrfpn import HRFPN, HRNetV2p

__all__ = ["HRFPN", "HRNetV2p"]
