#!/usr/bin/env bash
# A partitioned `mergeedit merge` on a SLURM cluster: N array tasks each compute their share of the output shards
# (`--part I/N`, parts numbered 1..N), then one dependent job checks every part and assembles OUT.
#
#   bash examples/slurm-merge.sh CONFIG.yaml OUT_DIR [N]
#
# OUT_DIR's parent must be on a file system every node sees (the parts are written beside OUT_DIR, in
# .OUT_DIR.mergeedit-parts/, and assembling hard-links them into place). A task that dies can be requeued as is:
# the array passes --resume, so a rerun keeps the shards its part already finished (sha256 verified) and a part that
# is already complete is only checked. Extra `mergeedit merge` options (--out-shard-size, --dtype, ...) go in MERGE_ARGS
# and must be the same for every task and for the assemble step (they are part of the plan every part is checked against).
set -euo pipefail

CONFIG=${1:?usage: slurm-merge.sh CONFIG.yaml OUT_DIR [N]}
OUT=${2:?usage: slurm-merge.sh CONFIG.yaml OUT_DIR [N]}
N=${3:-8}
MERGE_ARGS=${MERGE_ARGS:-}
MERGEEDIT=${MERGEEDIT:-mergeedit}
CPUS=${CPUS_PER_TASK:-8}
MEM=${MEM_PER_TASK:-32G}

# One array task per part. SLURM numbers tasks 1..N here, as mergeedit numbers parts.
parts=$(sbatch --parsable --job-name=merge-parts --array=1-"$N" --cpus-per-task="$CPUS" --mem="$MEM" \
    --output="merge-part-%a.log" \
    --wrap="$MERGEEDIT merge '$CONFIG' '$OUT' --part \${SLURM_ARRAY_TASK_ID}/$N --resume $MERGE_ARGS")

# The assemble step runs once every part succeeded: it verifies every shard's sha256 against its part's record,
# writes the index, config, tokenizer files and manifest, and renames OUT_DIR into place in one step.
sbatch --parsable --job-name=merge-assemble --dependency=afterok:"$parts" --cpus-per-task="$CPUS" --mem=8G \
    --output="merge-assemble.log" \
    --wrap="$MERGEEDIT merge '$CONFIG' '$OUT' --assemble $MERGE_ARGS && $MERGEEDIT verify '$OUT'"

echo "submitted $N part(s) as array job $parts; the assemble job waits for all of them"
echo "progress: tail -f merge-part-*.log; before assembling, mergeedit verify '$OUT' checks the finished parts"
