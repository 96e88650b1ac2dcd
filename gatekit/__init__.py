"""gatekit: dynamic channel and layer gating for residual networks (Bejnordi and Krestel)."""
from .blocks import GateSite, register_channelwise_module
from .convert import convert, gate_sites
from .errors import (
    AlreadyConvertedError, GatekitError, InternalError, NoResidualBlockError, NotConvertedError, SkippedBlocksWarning,
    TraceError, UngatableBlockError,
)
from .skipped_sites import SkippedSite
from .gate import Gate
from .dynamic_macs import dynamic_macs
from .gated_model import GatekitInfo, gates_of
from .losses import SparsityLoss, gate_loss, sparsity_loss
from .losses import (
    BatchShapingLoss, MacBudgetLoss, TargetRateLoss, batch_shaping_loss, deployed_macs, expected_macs, mac_budget_loss,
    target_rate_loss,
)
from .checkpoint import load, save
from .compact import BlockFold, Compaction, compact
from .optim import param_groups
from .profiler import BlockProfile, Profile, profile
from .sparse import sparse
from .stats import BlockStats, gate_stats, summarize
from .temperature import TemperatureSchedule, set_temperature
from .noise import NoiseSchedule, set_noise
from .sparsity_schedule import SparsitySchedule
from .distillation import DistillationLoss
from .batchnorm import recalibrate_batchnorm
from .warm_start import warm_start
from .exits import ExitInfo, ExitSite, ExitsError, add_exits, exit_sites
from .exit_macs import exit_macs
from .exit_fitting import ExitFit, fit_exits
from .exit_calibration import ExitCalibration, calibrate_exits
from .losses.exit_loss import exit_loss
from ._version import __version__
