#!/bin/bash
#SBATCH --job-name=jaxsurro
#SBATCH --ntasks=2
#SBATCH '--output=/scratch/runs/heat 1/server-%j.log'
#SBATCH --chdir=/home/user/project
#SBATCH --time=02:00:00
#SBATCH --cpus-per-task=4
#SBATCH --gres=gpu:1
if [ -n "${SLURM_CPUS_PER_TASK:-}" ]; then export SRUN_CPUS_PER_TASK="$SLURM_CPUS_PER_TASK"; fi
exec srun --mpi=pmix --overlap --ntasks=2 '/opt/my venv/bin/python' -m jaxsurro.run experiments/heat.toml --no-progress --run-dir '/scratch/runs/heat 1' --set 'study.name=my study' --set training.lr=1e-3 --set 'x.y=$HOME'
