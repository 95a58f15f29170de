#!/bin/bash
#OAR -n heat_study__3__it_s__HOME_
#OAR -O /home/user/runs/logs/train-00003.log
#OAR -E /home/user/runs/logs/train-00003.log
#OAR -l nodes=1/core=1,walltime=00:10:00
#OAR -p gpu='YES'
#OAR --project surrogates
# Written by jaxsurro's oar backend for `oarsub -S`; it also runs as a plain bash script.
set -e
exec 2>&1  # one open file for both streams: OAR opens -O and -E separately, each from offset 0
cd '/home/user/my work/it'"'"'s $x'
export GREETING='hello world'
export QUOTE='it'"'"'s "quoted"'
export DOLLAR='$HOME and `id` and $(id)'
export EMPTY=''
exec /usr/bin/python3 -c 'import os; print(os.environ['"'"'GREETING'"'"'], "done")' 'an arg' '$HOME'
