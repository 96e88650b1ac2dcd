"""Sparsity regularizers for gated models (paper section 3.3 and the works it builds on)."""
from .attached import gate_loss
from .sparsity import SparsityLoss, sparsity_loss
