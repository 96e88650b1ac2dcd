"""Sparsity regularizers for gated models (paper section 3.3 and the works it builds on)."""
from .attached import gate_loss
from .batch_shaping import BatchShapingLoss, batch_shaping_loss
from .mac_budget import MacBudgetLoss, deployed_macs, expected_macs, mac_budget_loss
from .sparsity import SparsityLoss, sparsity_loss
from .target_rate import TargetRateLoss, target_rate_loss
