"""sde_mol: E(3)-equivariant diffusion, consistency and distillation models for 3D molecules in JAX.

The names a notebook needs, from their modules (deeper names stay in their modules: `sde_mol.samplers`,
`sde_mol.objectives.consistency`, ...):

    molecules   Molecule, remove_com, project, com_free_normal, com_free_normal_log_prob
    SDEs        AbstractSDE (write `marginal` and you have a new SDE), DiscreteVPSDE, PolynomialVPSDE,
                CosineVPSDE, VESDE, KarrasSDE
    denoisers   AbstractDenoiser, EpsDenoiser, KarrasDenoiser, ConsistencyFunction, GuidedDenoiser, EGNN
    sampling    AbstractSampler (sampler(denoiser, mask, n_feat, *, key)), Ancestral, DDIM, PFODE (any diffrax
                solver), ReverseSDE, Consistency, sample_molecules
    training    EDMEpsLoss, ContinuousDenoisingLoss, KarrasLoss, ConsistencyLoss, ProgressiveDistillation,
                TrainState, init_state, make_step, build_optimizer
    data, files load_qm9, qm9_info, load_denoiser, evaluate (EDM's metrics)
"""

from ._version import __version__ as __version__
from .data.qm9 import load_qm9 as load_qm9, qm9_info as qm9_info
from .denoisers import (
    AbstractDenoiser as AbstractDenoiser,
    ConsistencyFunction as ConsistencyFunction,
    EpsDenoiser as EpsDenoiser,
    GuidedDenoiser as GuidedDenoiser,
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
from .run.load import load_denoiser as load_denoiser
from .samplers import (
    DDIM as DDIM,
    PFODE as PFODE,
    AbstractSampler as AbstractSampler,
    Ancestral as Ancestral,
    Consistency as Consistency,
    ReverseSDE as ReverseSDE,
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
from .training.optim import build_optimizer as build_optimizer
from .training.state import TrainState as TrainState, init_state as init_state, make_step as make_step
