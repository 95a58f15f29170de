#!/bin/bash
#SBATCH --job-name=jaxsurro
#SBATCH --ntasks=2
#SBATCH '--output=/scratch/runs/heat 1/server-%j.log'
#SBATCH --open-mode=append
#SBATCH --chdir=/home/user/project
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --time=02:00:00
#SBATCH --cpus-per-task=4
#SBATCH --gres=gpu:1
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"; fi
# The run's newest complete checkpoint (their names sort by step), or nothing.
latest_checkpoint() {
  local checkpoint latest=
  for checkpoint in '/scratch/runs/heat 1'/checkpoints/step-*; do
    if [ -d "$checkpoint" ]; then latest=$checkpoint; fi
  done
  echo "$latest"
}
# A run with a checkpoint is resumed from it: this job was requeued, or submitted again to resume.
resumed_from=$(latest_checkpoint)
run=(experiments/heat.toml --run-dir '/scratch/runs/heat 1')
if [ -n "$resumed_from" ]; then
  run=('/scratch/runs/heat 1' --resume)
  echo "jaxsurro: resuming the run from $resumed_from"
fi
# SIGUSR1 (the time-limit warning): SIGTERM to the server's step, step 0, the script's first srun.
warned=0
trap 'warned=1; interrupted=1; scancel --signal=TERM "$SLURM_JOB_ID.0"' USR1
srun --mpi=pmix --overlap --ntasks=2 '/opt/my venv/bin/python' -m jaxsurro.run "${run[@]}" --no-progress --set 'study.name=my study' --set training.lr=1e-3 --set 'x.y=$HOME' &
server=$!
interrupted=1
while [ "$interrupted" = 1 ]; do  # a trapped signal ends a wait early: wait again
  interrupted=0
  wait "$server"; status=$?
done
if [ "$warned" = 1 ] && [ "$status" = 143 ] && [ "$(latest_checkpoint)" != "$resumed_from" ]; then
  echo "jaxsurro: the server stopped with checkpoint $(latest_checkpoint); requeueing job $SLURM_JOB_ID"
  if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
  echo "jaxsurro: the requeue failed; resume the run with python -m jaxsurro.submit --resume" '/scratch/runs/heat 1' >&2
elif [ "$warned" = 1 ]; then
  echo "jaxsurro: the server ended (exit $status) without a new checkpoint after SIGUSR1; not requeued" >&2
fi
exit "$status"
