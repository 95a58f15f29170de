#!/bin/bash
#SBATCH --job-name=heat-sim-3
#SBATCH --output=/scratch/run/logs/sim-00003.log
#SBATCH --open-mode=append
#SBATCH --chdir=/scratch/run
#SBATCH --time=00:10:00
#SBATCH --partition=debug
#SBATCH -c2
export JAXSURRO_SIM_ID=3
export JAXSURRO_SERVER=tcp://10.0.0.1:5555
exec /opt/venv/bin/python -m solvers.heat --steps 100
