#!/bin/bash
#OAR -n heat-train-3
#OAR -O /home/user/runs/logs/train-00003.log
#OAR -E /home/user/runs/logs/train-00003.log
#OAR -l nodes=1/core=1,walltime=00:10:00
#OAR --project surrogates
# Written by jaxsurro's oar backend for `oarsub -S`; it also runs as a plain bash script.
set -e
exec 2>&1  # one open file for both streams: OAR opens -O and -E separately, each from offset 0
cd /home/user/runs
export JAXSURRO_SIM_ID=3
export JAXSURRO_ATTEMPT=1
exec /usr/bin/python3 -m solvers.heat --steps 100
