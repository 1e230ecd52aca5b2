"""Neural networks: the EDM EGNN (one padded molecule, vmapped by callers) and a small MLP student."""

from .convert import egnn_config_from_edm as egnn_config_from_edm, egnn_from_state_dict as egnn_from_state_dict
from .egnn import EGNN as EGNN, MLPNet as MLPNet
