#!/bin/bash
#SBATCH '--job-name=it'"'"'s "$HOME" job'
#SBATCH '--output=/scratch/my run/100%% done/sim-1.log'
#SBATCH --open-mode=append
#SBATCH '--chdir=/scratch/my run'
#SBATCH '--comment=a '"'"'quoted'"'"' $VALUE'
#SBATCH '--constraint=x\\y'
export MESSAGE='it'"'"'s $HOME & "more"; `date`'
export EMPTY=''
export PATH_WITH_SPACE='/a b/c'
exec python -c 'print('"'"'a b'"'"', "$x")' 'back\slash' '*'
