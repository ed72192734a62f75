#!/usr/bin/env bash
# The study's sweeps, one after another (experiments/motif_guided/README.md). Run from the repository root.
set -euo pipefail
OUT=${OUT:-outputs/motif_guided}
S=(structlearn -m experiment=motif_guided hydra/launcher=stacked)
"${S[@]}" method=static method.distribution=erk hydra.sweep.dir=$OUT/static_erk
"${S[@]}" method=static method.distribution=erk method.init=motif_seeded method.seed_motif.target_z=5 \
    hydra.sweep.dir=$OUT/static_enriched
"${S[@]}" method=static method.distribution=erk method.init=motif_seeded method.seed_motif.target_z=-3 \
    hydra.sweep.dir=$OUT/static_depleted
"${S[@]}" method=rigl hydra.sweep.dir=$OUT/rigl
"${S[@]}" method=rigl method.init=motif_seeded method.seed_motif.target_z=5 hydra.sweep.dir=$OUT/rigl_seeded
"${S[@]}" method=rigl method.motif_weight=1.0 hydra.sweep.dir=$OUT/rigl_motif
# networks for the lesions: SET, GMP and MorphoNet at density 0.1, seeds 0-4 (RigL's come from $OUT/rigl)
"${S[@]}" method=set,gmp density=0.1 'seed=range(5)' hydra.sweep.dir=$OUT/lesion_nets
"${S[@]}" method=morphonet density=0.1 'method.target_density=${density}' 'seed=range(5)' \
    hydra.sweep.dir=$OUT/lesion_morphonet
# the lesions: every RigL network at density 0.1 and every SET, GMP and MorphoNet network above
RIGL01=$(grep -l -x -- "- density=0.1" $OUT/rigl/*/.hydra/overrides.yaml | xargs -n1 dirname | xargs -n1 dirname)
structlearn-analyze $RIGL01 $OUT/lesion_nets $OUT/lesion_morphonet --randomizations 0 --export \
    --lesions bifan diamond/unbalanced --lesion-controls 5 --lesion-top-fraction 0.2 --out $OUT/lesions
