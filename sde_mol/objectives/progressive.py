"""Progressive distillation (Salimans & Ho 2022, Algorithm 2), with the stochastic-teacher variant of Lacombe &
Vaidya (2024) used for equivariant latent diffusion.

A student with N sampling steps learns in ONE deterministic DDIM step what its teacher does in TWO steps on the
twice finer grid. Time is continuous, t in [0, 1]; the student's grid is t_i = i / N (with EDM's discrete VP
table, t = t_int / T as everywhere in sde_mol, so a 1000-step teacher lives on i / 1000). One loss term, for
one molecule x with mask (`ProgressiveDistillation.loss_one`):

    N = N(k)                                    a traced integer (`HalvingSchedule`), never a shape
    i ~ U{1, ..., N},  t = i / N,  t' = (2i - 1) / (2N),  t'' = (i - 1) / N
    z_t = alpha_t x + sigma_t eps                eps standard normal on the state space
    z_t'  = teacher step t -> t'    from z_t     `samplers.ddim_step`, eta = 0 (DDIM) or eta = 1 (DDPM)
    z_t'' = teacher step t' -> t''  from z_t'
    x~    = (z_t'' - (sigma_t'' / sigma_t) z_t) / (alpha_t'' - (sigma_t'' / sigma_t) alpha_t)
    loss  = w(t) ||x_hat_student(t, z_t) - x~||^2 / dim,   w = max(alpha_t^2 / sigma_t^2, 1)

x~ is the x0 estimate for which one deterministic DDIM step t -> t'' from z_t lands exactly on z_t''
(`ddim_target`), so a perfect student reproduces its teacher's two steps in one. The weight is Salimans &
Ho's "truncated SNR" weighting max(||x - x_hat||^2, ||eps - eps_hat||^2); dim is the state-space dimension
(M - 1) 3 + M n_feat of the molecule.

Teacher sampling. With `teacher_eta = 0` the teacher's two steps are deterministic DDIM steps (Salimans & Ho).
With `teacher_eta = 1` they are DDPM ancestral steps: `ddim_step` with eta = 1 draws z_s from the posterior
q(z_s | z_t, x0 = x_hat), which is exactly EDM's p(z_s | z_t) (`samplers.ancestral_step`; pinned in a test).
Lacombe & Vaidya report that a stochastic teacher gives better students for latent molecule diffusion. We
could not read their Algorithm 1; our reading of it, which is the default (`student_eta = 0`): the two
teacher steps are ancestral with fresh noise and the target is solved from the noisy endpoint as if the
student's step were the deterministic DDIM step. Caveat (derived, and seen in tests): the expected target is then
(E[z_t''] - r z_t) / (alpha_t'' - r alpha_t), r = sigma_t'' / sigma_t, whose small-step limit is
2 x_hat - z_t / alpha_t (the mean of an ancestral step moves twice as far along the score as a DDIM step), so
a deterministic student learns the reverse SDE's drift without its noise and over-denoises; against the exact
oracle its samples miss every molecule (tests/test_progressive.py). `student_eta = 1` instead solves the
target for the student's own ancestral step (`ddim_target(..., eta=1)` inverts the posterior mean; for a fixed
x0 two posterior steps compose to one, so the first moment matches) and the student is then sampled with DDIM
eta = 1: that lands on the oracle's molecules, more slowly than a DDIM student (the target's variance grows
like N; the figures: experiments/NOTES.md, "Progressive distillation with a DDPM teacher").

The mean path (`teacher_noise=False`, with `teacher_eta = student_eta = 1`). The DDPM target's variance comes from
the teacher steps' fresh noise divided by alpha_s sigma_{t|s}^2 / sigma_t^2 (its std grows like sigma_t sigma_s /
(alpha_s sigma_{t|s}): several times the data's scale on fine grids). Leaving the noise out of both teacher steps
gives the target for which the mean of the student's ancestral step is the teacher's second step's mean taken at
its first step's mean, m2(m1(z_t)), instead of E[m2(m1(z_t) + c1 xi)]: the two differ by a term of second order in
the first step's noise c1 xi, and the target has no variance. The student is still sampled as an ancestral chain
(DDIM eta = 1) whose noise per step is the posterior std of its own (double) step; for a fixed x0 two posterior
steps compose to one, so that is also the teacher's two steps' noise. An approximation of ours, not a published
method; measured in experiments/NOTES.md.

One DDIM step function (`samplers.ddim_step`) serves the DDIM/DDPM samplers and this objective.

Successive halving without recompilation. Round r = 0..R-1 of a `HalvingSchedule` distils a teacher with
2 N_r steps into a student with N_r = N_0 / 2^(r+1) steps. N_r and r are computed from the TRACED step k, so
one compiled training step serves every round. The teacher of round r >= 1 is the student of round r - 1:
it is the `target` that `train.make_step` passes (the state's `target_model`), and `HalvingSchedule.
target_decay` (1 within a round, 0 on a round's last step) copies the student into the target exactly when a
round ends. The student simply carries on, so it is always initialised from its teacher. The teacher of round
0 is either that same target (a network teacher, from which the student was initialised: `teacher=None`) or
a fixed `teacher` field, e.g. the exact oracle, which has no weights to initialise a student from; the
choice between the two is a `lax.cond` on the traced round, so it does not recompile either.
"""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Int

from ..denoisers import AbstractDenoiser
from ..molecule import Molecule, com_free_normal, project, squared_error, state_dim
from ..samplers import ddim_step
from ..sde import AbstractSDE
from ..typing import IntScalar, Key, NodeMask, Real, Scalar
from .base import AbstractObjective

# --- the halving schedule --------------------------------------------------------------------------------


class HalvingSchedule(eqx.Module):
    """Rounds of progressive distillation as pure functions of the (traced) training step k.

    Round r = min(k // steps_per_round, n_rounds - 1) distils a 2 N_r-step teacher into an N_r-step student,
    N_r = n_teacher / 2^(r + 1). `n_teacher` (the first teacher's step count) must be divisible by
    2^n_rounds, so that every student grid is exactly half its teacher's."""

    n_teacher: int = eqx.field(static=True)
    steps_per_round: int = eqx.field(static=True)
    n_rounds: int = eqx.field(static=True)

    def __check_init__(self):
        if self.n_rounds < 1 or self.steps_per_round < 1:
            raise ValueError(
                f"HalvingSchedule: n_rounds ({self.n_rounds}) and steps_per_round ({self.steps_per_round}) must be >= 1"
            )
        if self.n_teacher % 2**self.n_rounds:
            raise ValueError(
                f"HalvingSchedule: the teacher's step count {self.n_teacher} must be divisible by 2^n_rounds = "
                f"{2**self.n_rounds} so that every round halves an integer grid (e.g. 1024 or 512 for 8 rounds)"
            )

    def round(self, step: IntScalar) -> Int[Array, ""]:
        k = jnp.asarray(step, jnp.int32)
        return jnp.minimum(k // self.steps_per_round, self.n_rounds - 1)

    def student_steps(self, step: IntScalar) -> Int[Array, ""]:
        """N of the student trained at step k (traced)."""
        return jnp.right_shift(jnp.int32(self.n_teacher), self.round(step) + 1)

    def steps_of_round(self, r: int) -> int:
        """N of round r's student (host-side, e.g. for checkpoint names)."""
        if not 0 <= r < self.n_rounds:
            raise ValueError(f"round {r} is outside 0..{self.n_rounds - 1}")
        return self.n_teacher >> (r + 1)

    def target_decay(self, step: IntScalar) -> Real:
        """`make_step`'s target rate: 1 (keep the teacher) except on a round's last step, where 0 copies the
        student, just updated, into the target: the teacher of the next round."""
        k = jnp.asarray(step, jnp.int32)
        return jnp.where((k + 1) % self.steps_per_round == 0, 0.0, 1.0).astype(jnp.float32)


class LevelledState(eqx.Module):
    """A state z of a sampling chain at level `level` of the student's grid (t = level / N, N the student's step
    count at the training step): a row of `ProgressiveDistillation.teacher_trajectory`. Given to `loss_one` in
    place of a data molecule, it is distilled where it stands instead of at a noised data state. In a batch,
    `level` has the batch axis."""

    z: Molecule
    level: Int[Array, "*batch"]


# --- the target --------------------------------------------------------------------------------------------


def ddim_target(sde: AbstractSDE, t: Scalar, s: Scalar, z_t: Molecule, z_s: Molecule, eta: Scalar = 0.0) -> Molecule:
    """The x0 estimate x~ for which the mean of one DDIM(eta) step t -> s from z_t is z_s (s < t).

    The step's mean is alpha_s x~ + k (z_t - alpha_t x~) / sigma_t with k = sqrt(sigma_s^2 - c^2),
    c = eta sigma_{t|s} sigma_s / sigma_t (`samplers.ddim_step`); solved for x~:
    x~ = (z_s - (k / sigma_t) z_t) / (alpha_s - (k / sigma_t) alpha_t). For eta = 0 (k = sigma_s) this is the
    target of Salimans & Ho; the denominator sigma_s (e^{logsnr_s / 2} - e^{logsnr_t / 2}) is positive whenever
    the SNR at s is larger than at t. For eta = 1 it inverts the DDPM posterior mean
    E[z_s | z_t, x0] = alpha_{t|s} sigma_s^2 / sigma_t^2 z_t + alpha_s sigma^2_{t|s} / sigma_t^2 x0."""
    alpha_t, sigma_t = sde.marginal(t)
    alpha_s, sigma_s = sde.marginal(s)
    _, sigma2_ts = sde.transition(s, t)
    c2 = eta**2 * sigma2_ts * (sigma_s / sigma_t) ** 2
    ratio = jnp.sqrt(jnp.maximum(sigma_s**2 - c2, 0.0)) / sigma_t
    return (z_s - ratio * z_t) / (alpha_s - ratio * alpha_t)


def truncated_snr_weight(sde: AbstractSDE, t: Scalar, eps_below_snr: float = 0.0) -> Real:
    """Salimans & Ho's truncated-SNR weight max(SNR, 1) of an x0 error, SNR = alpha^2 / sigma^2; with
    `eps_below_snr` = s0 > 0 it is tapered to SNR / s0 where SNR < s0, i.e. there the loss is the eps error
    ||eps - eps_hat||^2 / s0 (continuous at s0).

    Why the taper: an eps student's x0 = (z - sigma eps_hat) / alpha moves 1 / sqrt(SNR) times as far as its
    eps (~316 at t = 1 for EDM's schedule), so near SNR = 0 an x0-space loss is the eps error blown up by
    1 / SNR. Measured on the QM9 teacher (checkpoints/student_pd.md): the draws at t = 1 had losses of 26-35
    against 0.003-0.025 everywhere else, so they set the direction of every clipped update."""
    snr = jnp.exp(sde.logsnr(t))
    weight = jnp.maximum(snr, 1.0)
    if eps_below_snr > 0.0:
        weight = weight * jnp.minimum(snr / eps_below_snr, 1.0)
    return weight


# --- the objective -----------------------------------------------------------------------------------------


class ProgressiveDistillation(AbstractObjective):
    """Salimans & Ho's progressive distillation loss for a student `AbstractDenoiser` (module docstring).

    * `sde`: the process of teacher and student (both must be denoisers of it).
    * `schedule`: the rounds; N and the round are traced functions of the step.
    * `teacher`: round 0's teacher when it is not the training state's target (e.g. the exact oracle);
      None = the target is the teacher in every round (a network teacher the student was copied from).
    * `teacher_eta`: 0 = deterministic DDIM teacher, 1 = stochastic DDPM (ancestral) teacher.
    * `student_eta`: the DDIM eta of the student step the target is solved for, and to sample the student
      with: 0 = deterministic (Salimans & Ho; Lacombe & Vaidya's reading for a DDPM teacher), 1 = ancestral.
    * `eps_below_snr`: 0 = Salimans & Ho's truncated-SNR weight; s0 > 0 = the same, tapered to an eps-space
      loss where SNR < s0 (`truncated_snr_weight`), for eps-parametrised students.
    * `teacher_noise`: False = the target is solved from the MEANS of the teacher's two steps (each step's
      noise left out; for a DDPM teacher with `student_eta = 1`: the "mean path" target, module docstring).
      Chains of `teacher_trajectory` always carry their noise.
    """

    sde: AbstractSDE
    schedule: HalvingSchedule
    teacher: AbstractDenoiser | None = None
    teacher_eta: float = eqx.field(static=True, default=0.0)
    student_eta: float = eqx.field(static=True, default=0.0)
    eps_below_snr: float = eqx.field(static=True, default=0.0)
    teacher_noise: bool = eqx.field(static=True, default=True)

    def __check_init__(self):
        for name in ("teacher_eta", "student_eta"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ProgressiveDistillation.{name} must be in [0, 1], got {value}")
        if not self.eps_below_snr >= 0.0:
            raise ValueError(f"ProgressiveDistillation.eps_below_snr must be >= 0, got {self.eps_below_snr}")

    def weight(self, t: Scalar) -> Real:
        """The loss weight of an x0 error at time t (`truncated_snr_weight`)."""
        return truncated_snr_weight(self.sde, t, self.eps_below_snr)

    def teacher_endpoint(
        self,
        teacher: AbstractDenoiser,
        t: Scalar,
        t_mid: Scalar,
        t_end: Scalar,
        z_t: Molecule,
        mask,
        *,
        key: Key,
        noise: bool | None = None,
    ) -> Molecule:
        """The teacher's two steps t -> t_mid -> t_end from z_t (DDIM or DDPM by `teacher_eta`; with their noise,
        or their means only, by `noise`, default `teacher_noise`)."""
        noise = self.teacher_noise if noise is None else noise
        k1, k2 = jr.split(key)
        z_mid = ddim_step(teacher, self.sde, t_mid, t, z_t, mask, eta=self.teacher_eta, key=k1, noise=noise)
        return ddim_step(teacher, self.sde, t_end, t_mid, z_mid, mask, eta=self.teacher_eta, key=k2, noise=noise)

    def _endpoint(self, step, target, t, t_mid, t_end, z_t, mask, key) -> Molecule:
        def run(teacher):
            return self.teacher_endpoint(teacher, t, t_mid, t_end, z_t, mask, key=key)

        if target is None:
            if self.teacher is None:
                raise ValueError(
                    "ProgressiveDistillation has no teacher: give `teacher`, or train a state with a target model "
                    "(init_state(..., with_target=True)) that holds the teacher"
                )
            return run(self.teacher)
        if self.teacher is None:
            return run(target)
        first_round = self.schedule.round(step) == 0
        return jax.lax.cond(first_round, lambda: run(self.teacher), lambda: run(target))

    def grid(self, i: IntScalar, n: Real) -> tuple[Real, Real, Real]:
        """The times t_i, t_{i - 1/2}, t_{i - 1} of student level i on an n-step grid: exact grid nodes,
        integer numerators over (traced) denominators, placed on the SDE's own interval (for t in [0, 1] the map
        is the identity, exactly)."""
        i = jnp.asarray(i, jnp.int32)
        t_lo, t_span = self.sde.t_min, self.sde.t_max - self.sde.t_min
        t = t_lo + t_span * (i.astype(jnp.float32) / n)
        t_mid = t_lo + t_span * ((2 * i - 1).astype(jnp.float32) / (2.0 * n))
        t_end = t_lo + t_span * ((i - 1).astype(jnp.float32) / n)
        return t, t_mid, t_end

    def teacher_trajectory(
        self, teacher: AbstractDenoiser, n: int, mask: NodeMask, n_feat: int, *, key: Key
    ) -> Molecule:
        """The states of the 2n-step teacher's own sampling chain (its `teacher_eta` steps) from the prior, at
        the n-step student's levels n, n - 1, ..., 1 (leading axis; entry k is level n - k): where the
        student will be used, as opposed to the noised data states z_t = alpha x + sigma eps."""
        k_prior, k_steps = jr.split(key)
        nf = jnp.float32(n)

        def body(z, i):
            t, t_mid, t_end = self.grid(i, nf)
            z_next = self.teacher_endpoint(teacher, t, t_mid, t_end, z, mask, key=jr.fold_in(k_steps, i), noise=True)
            return z_next, z

        _, states = jax.lax.scan(body, self.sde.prior(mask, n_feat, key=k_prior), jnp.arange(n, 0, -1))
        return states

    def loss_one(self, model, mol: Molecule | LevelledState, mask: NodeMask, *, key: Key, step: IntScalar, target=None):
        k_i, k_eps, k_teacher = jr.split(key, 3)
        n = self.schedule.student_steps(step)
        nf = n.astype(jnp.float32)
        levelled = isinstance(mol, LevelledState)  # a state of a teacher's chain, distilled where it stands
        i = mol.level if levelled else jr.randint(k_i, (), 1, n + 1)
        t, t_mid, t_end = self.grid(i, nf)
        if levelled:
            z_t = mol.z
        else:  # a data molecule, noised to level i
            alpha_t, sigma_t = self.sde.marginal(t)
            eps = com_free_normal(k_eps, mask, mol.n_feat, mol.positions.dtype)
            z_t = project(alpha_t * mol + sigma_t * eps, mask)
        z_end = self._endpoint(step, target, t, t_mid, t_end, z_t, mask, k_teacher)
        x_target = jax.lax.stop_gradient(ddim_target(self.sde, t, t_end, z_t, z_end, self.student_eta))
        x_hat = model(t, z_t, mask)
        weight = self.weight(t)
        loss = weight * squared_error(x_hat, x_target, mask) / state_dim(mask, z_t.n_feat)
        return loss, {"student_steps": nf, "t": t}
