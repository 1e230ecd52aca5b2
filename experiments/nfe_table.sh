#!/usr/bin/env bash
# Quality against NFE: a teacher sampled training-free (DDIM, respaced ancestral steps on the uniform and on the
# Karras grid, PF-ODE heun on the Karras grid, all on its continuous twin), its recommended sampler, and every distilled student found, with the
# same molecules (seed 0) per row; then the markdown table and the trade-off plot of all rows.
#
# Usage: experiments/nfe_table.sh TEACHER OUT [STUDENT.eqx ...]
#   N=1000 (molecules per row), STEPS="1 2 4 8 16 32 64" (step counts of the training-free rows),
#   RECOMMENDED=1 (also the teacher's recommended sampler, autoguidance included for the default model; 0 skips it:
#   the slowest row), GUIDED=0 (1: the training-free rows autoguided as recipes/sample.py's default model is, by
#   its recommended guide; rows named *_guided)
# e.g. experiments/nfe_table.sh checkpoints/edm_qm9_base.eqx samples/nfe checkpoints/student_pd_*.eqx
# A row whose metrics.json exists is kept (delete it to redo the row).
set -euo pipefail
teacher=$1
out=$2
shift 2
n=${N:-1000}
steps=${STEPS:-1 2 4 8 16 32 64}

row() {  # row NAME LABEL ARGS...: one recipes/sample.py run into $out/NAME
    local name=$1 label=$2
    shift 2
    if [[ -f $out/$name/metrics.json ]]; then
        echo "kept $out/$name"
        return
    fi
    python recipes/sample.py --n-samples "$n" --seed 0 --quiet --overwrite --label "$label" \
        --out-dir "$out/$name" "$@"
}

guide=(--guide.checkpoint None)
suffix="" tag=""
if [[ ${GUIDED:-0} == 1 ]]; then
    guide=() suffix=_guided tag=", guided"
fi

if [[ ${RECOMMENDED:-1} == 1 ]]; then
    row recommended "teacher, recommended sampler" --checkpoint "$teacher"
fi
for k in $steps; do
    row "ddim_$k$suffix" "teacher, DDIM$tag" --checkpoint "$teacher" --continuous-time \
        --sampler.sampler ddim --sampler.steps "$k" ${guide[@]+"${guide[@]}"}
    row "ancestral_$k$suffix" "teacher, respaced ancestral$tag" --checkpoint "$teacher" --continuous-time \
        --sampler.sampler ancestral --sampler.steps "$k" ${guide[@]+"${guide[@]}"}
    if ((k > 1)); then  # one step is the same on either grid; heun: two evaluations a step, so k / 2 steps
        row "ancestral_karras_$k$suffix" "teacher, respaced ancestral (Karras grid)$tag" --checkpoint "$teacher" \
            --continuous-time --sampler.sampler ancestral --sampler.grid karras --sampler.steps "$k" \
            ${guide[@]+"${guide[@]}"}
        row "heun_karras_$((k / 2))$suffix" "teacher, PF-ODE heun (Karras)$tag" --checkpoint "$teacher" \
            --continuous-time --sampler.sampler pf_ode --sampler.solver heun --sampler.grid karras \
            --sampler.steps $((k / 2)) ${guide[@]+"${guide[@]}"}
    fi
done
for student in "$@"; do  # a student samples with its own sampler (its header says which)
    name=$(basename "$student" .eqx)
    method=${name%_*}  # student_pd_8nfe -> student_pd: one curve per method
    if [[ $method == "$name" || $method == student ]]; then  # runs/pd_qm9/student_8steps.eqx -> pd_qm9
        method=$(basename "$(dirname "$student")")
    fi
    row "${method}_$name" "$method" --checkpoint "$student"
done
python tools/plot.py table "$out"/*/metrics.json --out "$out/table.md"
python tools/plot.py tradeoff "$out"/*/metrics.json --out "$out/tradeoff.png"
