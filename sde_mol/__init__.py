"""sde_mol: E(3)-equivariant diffusion, consistency and distillation models for 3D molecules in JAX.

The names a notebook needs, from their modules (deeper names stay in their modules: `sde_mol.samplers`,
`sde_mol.objectives.consistency`, ...):

    molecules   Molecule, remove_com, project, com_free_normal, com_free_normal_log_prob
    SDEs        AbstractSDE (write `marginal` and you have a new SDE), DiscreteVPSDE, PolynomialVPSDE,
                CosineVPSDE, VESDE, KarrasSDE
    denoisers   AbstractDenoiser, EpsDenoiser, KarrasDenoiser, ConsistencyFunction, EGNN
    sampling    ancestral_sample, ddim_sample, pf_ode_sample, reverse_sde_sample, consistency_sample,
                sample_molecules
    training    EDMEpsLoss, ContinuousDenoisingLoss, KarrasLoss, ConsistencyLoss, ProgressiveDistillation,
                TrainState, init_state, make_step, build_optimizer
    data, files load_qm9, qm9_info, load_denoiser, evaluate (EDM's metrics)
"""

__version__ = "0.1.0"

from .configs import load_denoiser as load_denoiser
from .data.qm9 import load_qm9 as load_qm9, qm9_info as qm9_info
from .denoisers import (
    AbstractDenoiser as AbstractDenoiser,
    ConsistencyFunction as ConsistencyFunction,
    EpsDenoiser as EpsDenoiser,
    KarrasDenoiser as KarrasDenoiser,
)
from .metrics import evaluate as evaluate
from .molecule import (
    Molecule as Molecule,
    com_free_normal as com_free_normal,
    com_free_normal_log_prob as com_free_normal_log_prob,
    project as project,
    remove_com as remove_com,
)
from .nn.egnn import EGNN as EGNN
from .objectives.consistency import ConsistencyLoss as ConsistencyLoss
from .objectives.denoising import (
    ContinuousDenoisingLoss as ContinuousDenoisingLoss,
    EDMEpsLoss as EDMEpsLoss,
    KarrasLoss as KarrasLoss,
)
from .objectives.progressive import ProgressiveDistillation as ProgressiveDistillation
from .samplers import (
    ancestral_sample as ancestral_sample,
    consistency_sample as consistency_sample,
    ddim_sample as ddim_sample,
    pf_ode_sample as pf_ode_sample,
    reverse_sde_sample as reverse_sde_sample,
    sample_molecules as sample_molecules,
)
from .sde import (
    VESDE as VESDE,
    AbstractSDE as AbstractSDE,
    CosineVPSDE as CosineVPSDE,
    DiscreteVPSDE as DiscreteVPSDE,
    KarrasSDE as KarrasSDE,
    PolynomialVPSDE as PolynomialVPSDE,
)
from .train import (
    TrainState as TrainState,
    build_optimizer as build_optimizer,
    init_state as init_state,
    make_step as make_step,
)
